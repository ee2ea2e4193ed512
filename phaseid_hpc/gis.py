"""The meters table (GIS view) from where it lives: GeoPackage / GeoJSON files and PostgreSQL (PostGIS).

:func:`read_meters_source` returns the table as found (column names not yet mapped); :mod:`phaseid_hpc.ingest`
maps the names (``[ingest] meters_column_map``), normalises the phase labels and checks the contract.

Sources
-------
* ``*.gpkg``, ``*.geojson``, ``*.json``, ``*.shp``, ``*.fgb``: read with geopandas (extra ``gis``); point
  geometries give ``lat`` / ``lon`` [deg, WGS 84] (other CRSs are transformed); any other geometry is an error.
* ``postgresql://[user@]host[:port]/dbname?table=schema.table`` (or ``&query=...``, URL-encoded), or the
  ``[ingest] meters_database`` table of the run config (libpq keywords and ``table`` or ``query``): read
  with psycopg 3 (extra ``postgres``) in a read-only transaction. A PostGIS geometry column of a ``table``
  gives ``lat`` / ``lon`` when the table has none.

Credentials never travel on the command line or in the config: a URL or table with a password is refused.
The password comes from the environment variable named by ``password_env`` (default ``PGPASSWORD``) or from
``~/.pgpass`` (``$PGPASSFILE``), which must not be readable by group or others, as for the broker's URL file
(:func:`phaseid_hpc.ingest_service.resolve_amqp_url`).

Before reading, the role's privileges are checked: when it can INSERT, UPDATE, DELETE or TRUNCATE the
table(s) read, or any other table or view of their schemas (a superuser can write everything), the read
is refused unless ``[ingest] meters_allow_write_role = true``, which gives a :class:`GISWriteRoleWarning`
instead. The tables read by a ``query`` are those its plan scans (``EXPLAIN``), views expanded.
"""

from __future__ import annotations

import os
import stat
import urllib.parse
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .config import IngestConfig
from .errors import BackendUnavailableError, ConfigError, ContractError, PhaseIDError

__all__ = [
    "GISDatabaseError",
    "GISWriteRoleWarning",
    "MetersSource",
    "is_gis_source",
    "read_meters_source",
    "redact_url",
]

#: File suffixes read with geopandas.
VECTOR_SUFFIXES: tuple[str, ...] = (".gpkg", ".geojson", ".json", ".shp", ".fgb")
_URL_SCHEMES = ("postgresql://", "postgres://")
#: Keys of a database URL's query string / ``meters_database`` that are ours, not libpq's.
_OWN_KEYS = ("table", "query", "password_env")
_WRITE_PRIVILEGES = ("INSERT", "UPDATE", "DELETE", "TRUNCATE")


class GISWriteRoleWarning(UserWarning):
    """The meters were read with a database role that can write to the GIS tables (allowed by config)."""


class GISDatabaseError(PhaseIDError):
    """The GIS database cannot be reached, refuses the role, or the role may write where it should only read."""


@dataclass
class MetersSource:
    """A meters table as read from its source, before column mapping."""

    table: pd.DataFrame
    #: The source, fit for logs (never a password).
    description: str
    notes: list[str] = field(default_factory=list)


def is_gis_source(source: object) -> bool:
    """True for a database URL or a vector file (GeoPackage, GeoJSON, ...), read by this module."""
    if source is None:
        return True  # the [ingest] meters_database table
    text = os.fspath(source) if isinstance(source, os.PathLike) else str(source)
    return text.startswith(_URL_SCHEMES) or Path(text).suffix.lower() in VECTOR_SUFFIXES


def read_meters_source(
    source: str | os.PathLike[str] | None,
    config: IngestConfig | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> MetersSource:
    """Read a meters table from a vector file or PostgreSQL.

    Parameters
    ----------
    source : str, path-like or None
        A vector file, a ``postgresql://`` URL, or ``None`` for ``config.meters_database``.
    config : IngestConfig, optional
        ``meters_database`` and ``meters_allow_write_role``.
    environ : mapping, optional
        Environment for the password variable and ``PGPASSFILE`` (default: ``os.environ``).

    Returns
    -------
    MetersSource

    Raises
    ------
    ConfigError
        No source, a password in the URL or config, a ``~/.pgpass`` readable by others.
    BackendUnavailableError
        geopandas or psycopg is not installed (names the extra to install).
    GISDatabaseError
        The database cannot be reached or queried, or the role can write and that is not allowed.
    ContractError
        A vector file that cannot be read or holds geometries other than points.
    """
    config = IngestConfig() if config is None else config
    env = os.environ if environ is None else environ
    if source is None:
        if not config.meters_database:
            raise ConfigError("no meters table: give --meters FILE|URL or set [ingest] meters_database")
        return _read_postgres(dict(config.meters_database), config, env)
    text = os.fspath(source) if isinstance(source, os.PathLike) else str(source)
    if text.startswith(_URL_SCHEMES):
        return _read_postgres(_url_params(text), config, env)
    return _read_vector(Path(text))


# ------------------------------------------------------------------------------------------ files
def _geopandas() -> Any:
    try:
        import geopandas
    except ImportError:
        raise BackendUnavailableError(
            "reading GeoPackage / GeoJSON meters needs geopandas: pip install 'phaseid-hpc[gis]'"
        ) from None
    return geopandas


def _read_vector(path: Path) -> MetersSource:
    if not path.is_file():
        raise ContractError(f"meters file {str(path)!r} does not exist")
    gpd = _geopandas()
    try:
        gdf = gpd.read_file(path)
    except Exception as exc:  # noqa: BLE001 - GDAL's errors are many: name the file and pass its message on
        raise ContractError(f"meters file {str(path)!r} cannot be read as a vector file: {exc}") from None
    notes: list[str] = []
    if not isinstance(gdf, gpd.GeoDataFrame) or gdf.active_geometry_name is None:
        return MetersSource(pd.DataFrame(gdf), str(path), notes)  # an attribute table: no geometry
    table = pd.DataFrame(gdf.drop(columns=gdf.geometry.name))
    geom = gdf.geometry
    if len(gdf) and geom.notna().any():
        kinds = geom.geom_type
        bad = np.flatnonzero(geom.notna().to_numpy() & (kinds != "Point").to_numpy())
        if len(bad):
            raise ContractError(
                f"meters file {str(path)!r}: row {bad[0] + 1} has a {kinds.iloc[bad[0]]} geometry, expected a point "
                "per meter (its service location)"
            )
        if gdf.crs is not None and gdf.crs.to_epsg() != 4326:
            notes.append(f"{path.name}: coordinates transformed from {gdf.crs.to_string()} to WGS 84")
            geom = geom.to_crs(4326)
        empty = geom.isna() | geom.is_empty
        table["lat"] = np.where(empty, np.nan, geom.y.where(~empty))
        table["lon"] = np.where(empty, np.nan, geom.x.where(~empty))
        notes.append(f"{path.name}: lat/lon from the point geometries")
    return MetersSource(table, str(path), notes)


# ------------------------------------------------------------------------------------------ PostgreSQL
def redact_url(url: str) -> str:
    """The URL without password and query string (fit for logs and messages)."""
    u = urllib.parse.urlsplit(url)
    netloc = (f"{u.username}@" if u.username else "") + (u.hostname or "") + (f":{u.port}" if u.port else "")
    return urllib.parse.urlunsplit((u.scheme, netloc, u.path, "", ""))


def _url_params(url: str) -> dict[str, Any]:
    """libpq keywords and ours (``table``, ``query``, ``password_env``) of a ``postgresql://`` URL."""
    u = urllib.parse.urlsplit(url)
    if u.password is not None:
        raise ConfigError(
            f"database URL {redact_url(url)!r} holds a password: a command line shows in `ps` and shell history; "
            "put it in ~/.pgpass (mode 0600) or an environment variable (PGPASSWORD, or the one named by "
            "?password_env=NAME)"
        )
    params: dict[str, Any] = {k: v for k, v in urllib.parse.parse_qsl(u.query)}
    if "password" in params:
        raise ConfigError(f"database URL {redact_url(url)!r}: a password parameter is not accepted (use ~/.pgpass)")
    if u.hostname:
        params["host"] = u.hostname
    if u.port:
        params["port"] = u.port
    if u.username:
        params["user"] = urllib.parse.unquote(u.username)
    if u.path.strip("/"):
        params["dbname"] = urllib.parse.unquote(u.path.strip("/"))
    params["_description"] = redact_url(url)
    return params


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise BackendUnavailableError(
            "reading meters from PostgreSQL needs psycopg 3: pip install 'phaseid-hpc[postgres]'"
        ) from None
    return psycopg


def _check_pgpass(env: Mapping[str, str]) -> None:
    """Refuse a password file readable by group or others (libpq would ignore it with a stderr warning)."""
    path = Path(env.get("PGPASSFILE") or Path(env.get("HOME", str(Path.home()))) / ".pgpass")
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"password file {str(path)!r} has mode {stat.S_IMODE(mode):04o}: it holds credentials and must not be "
            f"accessible to group or others; run chmod 600 {str(path)!r}"
        )


def _connect_kwargs(params: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    kwargs = {k: str(v) for k, v in params.items() if k not in _OWN_KEYS and not k.startswith("_")}
    if "password" in kwargs or "passfile" in kwargs:
        raise ConfigError("[ingest] meters_database: a password is not accepted here (use ~/.pgpass or PGPASSWORD)")
    var = str(params.get("password_env") or "PGPASSWORD")
    if env.get(var):
        kwargs["password"] = env[var]
    elif params.get("password_env"):
        raise ConfigError(f"[ingest] meters_database.password_env names ${var}, which is not set")
    else:
        _check_pgpass(env)
        if env.get("PGPASSFILE"):
            kwargs["passfile"] = env["PGPASSFILE"]
    kwargs.setdefault("connect_timeout", "10")
    kwargs.setdefault("application_name", "phaseid-ingest")
    return kwargs


def _describe(params: Mapping[str, Any]) -> str:
    if params.get("_description"):
        return str(params["_description"])
    who = f"{params['user']}@" if params.get("user") else ""
    port = f":{params['port']}" if params.get("port") else ""
    return f"postgresql://{who}{params.get('host', '')}{port}/{params.get('dbname', '')}"


def _plan_relations(cur: Any, query: str) -> list[tuple[str, str]]:
    """(schema, table) of every relation the plan of ``query`` scans."""
    cur.execute(b"EXPLAIN (VERBOSE, FORMAT JSON) " + query.encode())
    plan = cur.fetchone()[0]
    found: set[tuple[str, str]] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "Relation Name" in node:
                found.add((node.get("Schema", "public"), node["Relation Name"]))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(plan)
    return sorted(found)


def _table_relation(cur: Any, table: str, where: str) -> tuple[str, str]:
    cur.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.oid = to_regclass(%s)",
        (table,),
    )
    row = cur.fetchone()
    if row is None:
        raise GISDatabaseError(f"{where}: no table or view {table!r} visible to this role")
    return row[0], row[1]


def _writable_tables(cur: Any, schemas: list[str]) -> list[tuple[str, str, str]]:
    """(schema, table, privileges) of every table or view in ``schemas`` the current role can write."""
    cur.execute(
        "SELECT n.nspname, c.relname, concat_ws(',', "
        + ", ".join(f"CASE WHEN has_table_privilege(c.oid, '{p}') THEN '{p}' END" for p in _WRITE_PRIVILEGES)
        + ") FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = ANY(%s) AND c.relkind IN ('r', 'p', 'v', 'm', 'f') "
        f"AND has_table_privilege(c.oid, '{', '.join(_WRITE_PRIVILEGES)}') ORDER BY 1, 2",
        (schemas,),
    )
    return [tuple(r) for r in cur.fetchall()]


def _check_privileges(cur: Any, relations: list[tuple[str, str]], where: str, config: IngestConfig) -> list[str]:
    """Refuse (or, when allowed, warn about) a role that can write to the GIS schema; returns report notes."""
    cur.execute("SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user")
    role, superuser = cur.fetchone()
    schemas = sorted({s for s, _ in relations})
    writable = _writable_tables(cur, schemas)
    if not writable:
        return [f"{where}: role {role!r} can read but not write schema(s) {schemas}"]
    listed = "; ".join(f"{s}.{t} ({p})" for s, t, p in writable[:10]) + (
        f"; ... ({len(writable)} in all)" if len(writable) > 10 else "")
    what = f"role {role!r}{' (a superuser)' if superuser else ''} can write to {listed}"
    if not config.meters_allow_write_role:
        raise GISDatabaseError(
            f"{where}: {what}; the GIS is read with a read-only role (GRANT SELECT only). Use such a role, or "
            "set [ingest] meters_allow_write_role = true to read anyway (the read itself runs in a read-only "
            "transaction)"
        )
    msg = f"{where}: {what} ([ingest] meters_allow_write_role = true; read in a read-only transaction)"
    warnings.warn(msg, GISWriteRoleWarning, stacklevel=4)
    return [msg]


def _select_table(cur: Any, sql: Any, schema: str, name: str) -> Any:
    """``SELECT *`` of a table, with ``lat``/``lon`` from a PostGIS point column when it has none."""
    cur.execute(
        "SELECT a.attname, t.typname FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
        "WHERE a.attrelid = to_regclass(quote_ident(%s) || '.' || quote_ident(%s)) AND a.attnum > 0 "
        "AND NOT a.attisdropped ORDER BY a.attnum",
        (schema, name),
    )
    cols = cur.fetchall()
    names = [c for c, _ in cols]
    geoms = [c for c, t in cols if t == "geometry"]
    rel = sql.Identifier(schema, name)
    if not geoms or {"lat", "lon"} <= set(names):
        return sql.SQL("SELECT * FROM {}").format(rel)
    g = sql.Identifier(geoms[0])
    wgs = sql.SQL("CASE WHEN ST_SRID({g}) IN (0, 4326) THEN {g} ELSE ST_Transform({g}, 4326) END").format(g=g)
    keep = sql.SQL(", ").join(sql.Identifier(c) for c in names if c not in geoms)
    return sql.SQL("SELECT {keep}, ST_Y({w}) AS lat, ST_X({w}) AS lon FROM {rel}").format(keep=keep, w=wgs, rel=rel)


def _read_postgres(params: dict[str, Any], config: IngestConfig, env: Mapping[str, str]) -> MetersSource:
    where = _describe(params)
    table, query = params.get("table"), params.get("query")
    if bool(table) == bool(query):
        raise ConfigError(
            f"meters database {where}: give exactly one of table (\"schema.table\") or query "
            "(URL ?table=... or [ingest] meters_database.table / .query)"
        )
    where += f" table {table}" if table else " query"
    psycopg = _psycopg()
    from psycopg import sql

    kwargs = _connect_kwargs(params, env)
    try:
        conn = psycopg.connect(**kwargs)
    except psycopg.Error as exc:
        raise GISDatabaseError(f"meters database {where}: cannot connect ({str(exc).strip().splitlines()[0]})") from None
    try:
        conn.read_only = True
        with conn.cursor() as cur:
            relations = [_table_relation(cur, table, where)] if table else _plan_relations(cur, query)
            notes = _check_privileges(cur, relations, where, config)
            stmt = _select_table(cur, sql, *relations[0]) if table else sql.SQL(query)
            cur.execute(stmt)
            names = [d.name for d in cur.description]
            rows = cur.fetchall()
        conn.rollback()
    except psycopg.Error as exc:
        raise GISDatabaseError(f"meters database {where}: {str(exc).strip().splitlines()[0]}") from None
    finally:
        conn.close()
    frame = pd.DataFrame.from_records(rows, columns=names)
    for c in frame.columns:  # numeric(p, s) arrives as Decimal: numbers, not objects
        if len(frame) and frame[c].map(lambda v: v.__class__.__name__ == "Decimal").all():
            frame[c] = frame[c].astype(np.float64)
    notes.append(f"{where}: {len(frame):,} meters read")
    return MetersSource(frame, where, notes)
