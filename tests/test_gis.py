"""Tests of phaseid_hpc/gis.py: meters from GeoPackage / GeoJSON and from PostgreSQL with a read-only role.

The database tests run against the PostgreSQL server of this machine (127.0.0.1:5432, user ``postgres``,
started by ``.ci/run`` when it is not running): a module fixture creates a database with a ``gis`` schema,
a meters table and roles with different privileges, and drops them afterwards. They skip, with the reason,
where psycopg is not installed or the server cannot be reached.
"""

from __future__ import annotations

import json
import os
import urllib.parse
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from phaseid_hpc import store as S
from phaseid_hpc.config import IngestConfig
from phaseid_hpc.errors import BackendUnavailableError, ConfigError, ContractError
from phaseid_hpc.gis import (
    GISDatabaseError,
    GISWriteRoleWarning,
    is_gis_source,
    read_meters_source,
    redact_url,
)
from phaseid_hpc.ingest import ingest_files

DATA = Path(__file__).parent / "data"
ADMIN = {"host": "127.0.0.1", "port": 5432, "user": "postgres", "dbname": "postgres", "connect_timeout": 3}
#: The meters of tests/data/gis_meters.geojson, as the utility's GIS table holds them.
GIS_ROWS = [
    ("M7700121", "FDR-12", "XF-5531", "a", 30.26741, -97.74312, 240),
    ("M7700122", "FDR-12", "XF-5531", "B-N", 30.26755, -97.74301, 240),
    ("M7700123", "FDR-12", "XF-5532", "3", 30.26790, -97.74250, 240),
    ("M9100450", "FDR-12", "XF-5590", "1.2.3", 30.26820, -97.74110, 208),
]
METERS_MAP = {"meter_no": "meter_id", "feeder": "feeder_id", "xfmr_id": "transformer_id", "phasing": "phase",
              "service_v": "nominal_v"}
PASSWORD = "pw-" + uuid.uuid4().hex[:8]


def mdm_config(**kw) -> IngestConfig:
    import dataclasses

    from phaseid_hpc.config import load_config

    return dataclasses.replace(load_config(DATA / "mdm.toml").ingest, **kw)


# ------------------------------------------------------------------ files
@pytest.fixture
def geopandas():
    return pytest.importorskip("geopandas", reason="geopandas (extra 'gis') is not installed")


def test_geojson_points_give_lat_lon_and_feed_an_ingest(geopandas, tmp_path):
    got = read_meters_source(DATA / "gis_meters.geojson")
    feats = json.loads((DATA / "gis_meters.geojson").read_text())["features"]
    assert list(got.table["MeterNo"]) == [f["properties"]["MeterNo"] for f in feats]
    np.testing.assert_allclose(got.table["lon"], [f["geometry"]["coordinates"][0] for f in feats])
    np.testing.assert_allclose(got.table["lat"], [f["geometry"]["coordinates"][1] for f in feats])
    r = ingest_files(DATA / "mdm_interval_export.csv", DATA / "gis_meters.geojson", tmp_path / "s.zarr",
                     config=mdm_config())
    ds = S.open_store(tmp_path / "s.zarr")
    assert dict(zip(ds["meter"].values, ds["phase_gis"].values)) == {
        "M7700121": "A", "M7700122": "B", "M7700123": "C", "M9100450": "ABC"}
    assert r.phase_labels == {"1.2.3": "ABC", "3": "C", "B-N": "B", "a": "A"}
    np.testing.assert_allclose(ds["lat"].sel(meter="M9100450").values, 30.26820)


def test_geopackage_in_a_projected_crs_is_transformed(geopandas, tmp_path):
    from shapely.geometry import LineString, Point

    lon, lat = np.array([-97.74312, -97.7411]), np.array([30.26741, 30.2682])
    gdf = geopandas.GeoDataFrame({"meter_id": ["m1", "m2"]}, geometry=[Point(x, y) for x, y in zip(lon, lat)],
                                 crs=4326).to_crs(3857)
    gdf.to_file(tmp_path / "m.gpkg", driver="GPKG")
    got = read_meters_source(tmp_path / "m.gpkg")
    np.testing.assert_allclose(got.table["lat"], lat, atol=1e-9)
    np.testing.assert_allclose(got.table["lon"], lon, atol=1e-9)
    assert any("EPSG:3857" in n for n in got.notes)
    pyogrio = pytest.importorskip("pyogrio")
    pyogrio.write_dataframe(pd.DataFrame({"meter_id": ["x", "y"]}), tmp_path / "attributes.gpkg")
    assert read_meters_source(tmp_path / "attributes.gpkg").table["meter_id"].tolist() == ["x", "y"]  # no geometry
    lines = geopandas.GeoDataFrame({"meter_id": ["m1"]}, geometry=[LineString([(0, 0), (1, 1)])], crs=4326)
    lines.to_file(tmp_path / "lines.geojson", driver="GeoJSON")
    with pytest.raises(ContractError, match=r"lines.geojson.*row 1 has a LineString geometry"):
        read_meters_source(tmp_path / "lines.geojson")


def test_vector_file_without_geopandas_names_the_extra(monkeypatch, tmp_path):
    import builtins

    real = builtins.__import__

    def no_geopandas(name, *a, **k):
        if name == "geopandas":
            raise ImportError("no geopandas here")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_geopandas)
    with pytest.raises(BackendUnavailableError, match=r"phaseid-hpc\[gis\]"):
        read_meters_source(DATA / "gis_meters.geojson")


def test_sources_and_urls_without_a_server():
    assert is_gis_source("postgresql://gis@db/gis?table=gis.meters") and is_gis_source(Path("m.GPKG"))
    assert not is_gis_source("meters.csv") and not is_gis_source(Path("meters.parquet"))
    assert redact_url("postgresql://u:secret@h:5433/db?table=t") == "postgresql://u@h:5433/db"
    with pytest.raises(ConfigError) as err:
        read_meters_source("postgresql://reader:hunter2@127.0.0.1/gis?table=gis.meters")
    assert "hunter2" not in str(err.value) and "~/.pgpass" in str(err.value)
    with pytest.raises(ConfigError, match="exactly one of table"):
        read_meters_source("postgresql://reader@127.0.0.1/gis")
    with pytest.raises(ConfigError, match=r"--meters FILE\|URL or set \[ingest\] meters_database"):
        read_meters_source(None)


def test_pgpass_readable_by_others_is_refused(tmp_path):
    pytest.importorskip("psycopg", reason="psycopg (extra 'postgres') is not installed")
    pgpass = tmp_path / "pgpass"
    pgpass.write_text("*:*:*:reader:secret\n")
    pgpass.chmod(0o644)
    with pytest.raises(ConfigError, match=r"mode 0644.*chmod 600"):
        read_meters_source("postgresql://reader@127.0.0.1:1/gis?table=gis.meters", environ={"PGPASSFILE": str(pgpass)})
    pgpass.chmod(0o600)  # now accepted: the failure is the (closed) port's
    with pytest.raises(GISDatabaseError, match=r"postgresql://reader@127.0.0.1:1/gis table gis.meters: cannot connect"):
        read_meters_source("postgresql://reader@127.0.0.1:1/gis?table=gis.meters", environ={"PGPASSFILE": str(pgpass)})
    with pytest.raises(ConfigError, match=r"\$GIS_PW, which is not set"):
        read_meters_source("postgresql://reader@127.0.0.1:1/gis?table=gis.meters&password_env=GIS_PW", environ={})


# ------------------------------------------------------------------ PostgreSQL
@pytest.fixture(scope="module")
def pg():
    """A database ``phaseid_gis_<tag>`` with schema ``gis`` (tables meters, poles) and four roles."""
    psycopg = pytest.importorskip("psycopg", reason="psycopg (extra 'postgres') is not installed")
    try:
        admin = psycopg.connect(**ADMIN, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable at 127.0.0.1:5432 as postgres ({' '.join(str(exc).split())[:160]})")
    tag = uuid.uuid4().hex[:8]
    db = f"phaseid_gis_{tag}"
    roles = {k: f"phaseid_{k}_{tag}" for k in ("ro", "rw", "schema_rw", "none")}
    admin.execute(f"CREATE DATABASE {db}")
    try:
        for r in roles.values():
            admin.execute(f"CREATE ROLE {r} LOGIN PASSWORD '{PASSWORD}'")
        with psycopg.connect(**{**ADMIN, "dbname": db}, autocommit=True) as c:
            c.execute("CREATE SCHEMA gis")
            c.execute("CREATE TABLE gis.meters (meter_no text PRIMARY KEY, feeder text, xfmr_id text, phasing text, "
                      "lat double precision, lon double precision, service_v numeric(6, 1))")
            with c.cursor() as cur:
                cur.executemany("INSERT INTO gis.meters VALUES (%s, %s, %s, %s, %s, %s, %s)", GIS_ROWS)
            c.execute("CREATE TABLE gis.poles (pole_id text PRIMARY KEY)")
            # Stand-ins for PostGIS (not installed here): a type named geometry and the four functions the
            # reader calls, so the geometry-column path is exercised (not PostGIS itself).
            c.execute("CREATE DOMAIN public.geometry AS point")
            for fn, body in (("st_x", "($1::point)[0]"), ("st_y", "($1::point)[1]")):
                c.execute(f"CREATE FUNCTION public.{fn}(geometry) RETURNS double precision LANGUAGE sql "
                          f"IMMUTABLE AS 'SELECT {body}'")
            c.execute("CREATE FUNCTION public.st_srid(geometry) RETURNS integer LANGUAGE sql IMMUTABLE AS 'SELECT 4326'")
            c.execute("CREATE FUNCTION public.st_transform(geometry, integer) RETURNS geometry LANGUAGE sql "
                      "IMMUTABLE AS 'SELECT $1'")
            c.execute("CREATE TABLE gis.meters_geom (meter_no text, phasing text, geom geometry)")
            c.execute("INSERT INTO gis.meters_geom VALUES ('M1', 'A', point(-97.74312, 30.26741)), ('M2', 'B', NULL)")
            c.execute("CREATE VIEW gis.meters_fdr12 AS SELECT * FROM gis.meters WHERE feeder = 'FDR-12'")
            c.execute(f"GRANT USAGE ON SCHEMA gis TO {', '.join(roles.values())}")
            c.execute(f"GRANT SELECT ON gis.meters, gis.meters_fdr12, gis.meters_geom TO {roles['ro']}, "
                      f"{roles['schema_rw']}")
            c.execute(f"GRANT SELECT, INSERT, UPDATE ON gis.meters TO {roles['rw']}")
            c.execute(f"GRANT UPDATE ON gis.poles TO {roles['schema_rw']}")
        yield {"db": db, "roles": roles, "psycopg": psycopg}
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        for r in roles.values():
            admin.execute(f"DROP ROLE IF EXISTS {r}")
        admin.close()


def url(pg, role: str, **query: str) -> str:
    q = urllib.parse.urlencode(query or {"table": "gis.meters"})
    return f"postgresql://{pg['roles'][role]}@127.0.0.1:5432/{pg['db']}?{q}"


ENV = {"PGPASSWORD": PASSWORD}


def test_read_only_role_reads_the_table(pg):
    got = read_meters_source(url(pg, "ro"), environ=ENV)
    assert list(got.table.columns) == ["meter_no", "feeder", "xfmr_id", "phasing", "lat", "lon", "service_v"]
    assert sorted(got.table.itertuples(index=False, name=None)) == sorted(GIS_ROWS)
    assert got.table["service_v"].dtype == np.float64  # numeric arrives as numbers, not Decimal objects
    assert PASSWORD not in got.description and pg["roles"]["ro"] in got.description
    assert any("can read but not write" in n for n in got.notes)


def test_query_and_config_section(pg):
    q = "SELECT meter_no, feeder, xfmr_id, phasing FROM gis.meters_fdr12 WHERE xfmr_id = 'XF-5531' ORDER BY 1"
    got = read_meters_source(url(pg, "ro", query=q), environ=ENV)
    assert list(got.table["meter_no"]) == ["M7700121", "M7700122"]
    cfg = IngestConfig(meters_database={"host": "127.0.0.1", "port": 5432, "dbname": pg["db"],
                                        "user": pg["roles"]["ro"], "query": q, "password_env": "GIS_PW"})
    got = read_meters_source(None, cfg, environ={"GIS_PW": PASSWORD})
    assert list(got.table["meter_no"]) == ["M7700121", "M7700122"]


def test_ingest_from_the_database_url(pg, tmp_path):
    from phaseid_hpc.cli import main

    cfg = tmp_path / "run.toml"
    cfg.write_text((DATA / "mdm.toml").read_text().split("[ingest.meters_column_map]")[0]
                   + "[ingest.meters_column_map]\n" + "\n".join(f'{k} = "{v}"' for k, v in METERS_MAP.items()))
    old = os.environ.get("PGPASSWORD")
    os.environ["PGPASSWORD"] = PASSWORD
    try:
        rc = main(["ingest", "--readings", str(DATA / "mdm_interval_export.csv"), "--meters", url(pg, "ro"),
                   "--config", str(cfg), "--store", str(tmp_path / "s.zarr")])
    finally:
        if old is None:
            del os.environ["PGPASSWORD"]
        else:
            os.environ["PGPASSWORD"] = old
    assert rc == 0
    ds = S.open_store(tmp_path / "s.zarr")
    assert sorted(ds["meter"].values) == [r[0] for r in GIS_ROWS]
    assert dict(zip(ds["meter"].values, ds["phase_gis"].values))["M9100450"] == "ABC"
    np.testing.assert_allclose(ds["nominal_v"].sel(meter="M9100450").values, 208.0)


@pytest.mark.parametrize(("role", "writable"), [("rw", "gis.meters (INSERT,UPDATE)"),
                                                ("schema_rw", "gis.poles (UPDATE)")])
def test_role_that_can_write_is_refused(pg, tmp_path, role, writable):
    with pytest.raises(GISDatabaseError) as err:
        ingest_files(DATA / "mdm_interval_export.csv", url(pg, role), tmp_path / "s.zarr",
                     config=mdm_config(meters_column_map=METERS_MAP))
    msg = str(err.value)
    assert f"role '{pg['roles'][role]}' can write to {writable}" in msg
    assert "meters_allow_write_role = true" in msg and PASSWORD not in msg
    assert not (tmp_path / "s.zarr").exists()


def test_superuser_is_refused(pg):
    with pytest.raises(GISDatabaseError, match=r"role 'postgres' \(a superuser\) can write to gis.meters"):
        read_meters_source(f"postgresql://postgres@127.0.0.1:5432/{pg['db']}?table=gis.meters", environ={})


def test_write_role_allowed_by_config_warns_and_reads_read_only(pg, tmp_path):
    cfg = mdm_config(meters_column_map=METERS_MAP, meters_allow_write_role=True)
    with pytest.warns(GISWriteRoleWarning, match=r"can write to gis.meters \(INSERT,UPDATE\)"):
        r = ingest_files(DATA / "mdm_interval_export.csv", url(pg, "rw"), tmp_path / "s.zarr", config=cfg)
    assert any("meters_allow_write_role = true" in n for n in r.notes)
    assert S.open_store(tmp_path / "s.zarr").sizes["meter"] == 4
    # the read runs in a read-only transaction: even a role that may write cannot through this path
    q = "UPDATE gis.meters SET feeder = 'X' RETURNING meter_no, feeder, xfmr_id, phasing"
    with pytest.warns(GISWriteRoleWarning), pytest.raises(GISDatabaseError, match="read-only transaction"):
        read_meters_source(url(pg, "rw", query=q), cfg, environ=ENV)
    with pg["psycopg"].connect(**{**ADMIN, "dbname": pg["db"]}) as c:
        assert c.execute("SELECT count(*) FROM gis.meters WHERE feeder = 'X'").fetchone()[0] == 0


def test_role_without_select_gets_a_clear_error(pg):
    with pytest.raises(GISDatabaseError, match=r"permission denied for table meters"):
        read_meters_source(url(pg, "none"), environ=ENV)
    with pytest.raises(GISDatabaseError, match=r"no table or view 'gis.nope'"):
        read_meters_source(url(pg, "ro", table="gis.nope"), environ=ENV)


def test_ingest_without_meters_names_both_ways(tmp_path, capsys):
    from phaseid_hpc.cli import main

    rc = main(["ingest", "--readings", str(DATA / "mdm_interval_export.csv"), "--config", str(DATA / "mdm.toml"),
               "--store", str(tmp_path / "s.zarr")])
    assert rc == 2 and "--meters FILE|URL or set [ingest] meters_database" in capsys.readouterr().err
    assert not (tmp_path / "s.zarr").exists()


def test_geometry_column_gives_lat_lon(pg):
    got = read_meters_source(url(pg, "ro", table="gis.meters_geom"), environ=ENV)
    assert list(got.table.columns) == ["meter_no", "phasing", "lat", "lon"]
    np.testing.assert_allclose(got.table[["lat", "lon"]].to_numpy(np.float64)[0], [30.26741, -97.74312])
    assert got.table[["lat", "lon"]].iloc[1].isna().all()
