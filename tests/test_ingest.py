"""Tests of phaseid_hpc/ingest.py: files and frames into the store."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phaseid_hpc import store as S
from phaseid_hpc.config import IngestConfig
from phaseid_hpc.errors import ContractError, StoreError
from phaseid_hpc.ingest import QUARANTINE_REASONS, IngestReport, ingest_files, ingest_frame

CKT5 = Path(__file__).parents[1] / ".." / "shared" / "data" / "epri-ckt5"
T0 = pd.Timestamp("2026-03-07 00:15", tz="UTC")
N_T = 16


def meters_table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "meter_id": ["b2", "a1", "c1", "a2", "b1"],
            "feeder_id": ["F2", "F1", "F2", "F1", "F2"],
            "transformer_id": ["T3", "T1", "T2", "T1", "T3"],
            "phase": ["B", "A", "C", "A", "B"],
            "service_type": ["1ph-240"] * 5,
            "nominal_v": [240.0, 240.0, 240.0, np.nan, 240.0],
        }
    )


def readings_table(n_t: int = N_T, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    ids = meters_table()["meter_id"].tolist()
    times = pd.date_range(T0, periods=n_t, freq="15min")
    df = pd.DataFrame(
        {
            "meter_id": np.repeat(ids, n_t),
            "timestamp": np.tile(times, len(ids)),
            "voltage_v": np.round(240 + rng.normal(0, 2, len(ids) * n_t), 3),
            "kw": np.round(rng.uniform(0, 3, len(ids) * n_t), 3),
        }
    )
    return df


@pytest.fixture
def files(tmp_path):
    meters = tmp_path / "meters.csv"
    meters_table().to_csv(meters, index=False)
    readings = tmp_path / "readings.parquet"
    readings_table().to_parquet(readings)
    return readings, meters


def load(path) -> dict[str, np.ndarray]:
    ds = S.open_store(path).load()
    return {k: np.asarray(v.values) for k, v in ds.variables.items()}


def assert_same_store(a, b):
    la, lb = load(a), load(b)
    assert la.keys() == lb.keys()
    for k in la:
        np.testing.assert_array_equal(la[k], lb[k], err_msg=k)


def files_of(store: Path) -> dict[Path, bytes]:
    """Every file of a store except the lock and retired stages (``_phaseid/done-*``, garbage).

    Retired stages are pruned from the walk, not filtered after it: a background thread may be deleting
    them while we walk (``rglob`` would then fail on a vanished folder).
    """
    out = {}
    for root, dirs, names in os.walk(store):
        dirs[:] = [d for d in dirs if not d.startswith("done-")]
        for n in names:
            if n != "lock":
                out[Path(root) / n] = (Path(root) / n).read_bytes()
    return out


def check_counts(r: IngestReport):
    assert r.rows_accepted + r.rows_quarantined + r.duplicates_identical == r.rows_read, r.summary()


def test_contract_round_trip(files, tmp_path):
    readings, meters = files
    store = tmp_path / "s.zarr"
    r = ingest_files(readings, meters, store)
    check_counts(r)
    assert r.rows_written == r.rows_read == 5 * N_T and r.rows_quarantined == 0
    assert S.validate_store(store) == []
    ds = S.open_store(store)
    assert list(ds["meter"].values) == ["a1", "a2", "c1", "b1", "b2"]  # feeder, transformer, meter
    assert ds.sizes["time"] == N_T and ds.attrs["interval_s"] == 900
    assert pd.Timestamp(ds["time"].values[0]) == T0.tz_localize(None)
    src = readings_table().set_index(["meter_id", "timestamp"])
    got = ds["voltage"].sel(meter="b1").values
    want = src.loc["b1"]["voltage_v"].to_numpy(np.float32)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(ds["kw"].sel(meter="a2").values, src.loc["a2"]["kw"].to_numpy(np.float32))
    assert (ds["sampling_interval_s"].values == 900).all() and (ds["off_grid_fraction"].values == 0).all()


def test_ingest_twice_is_idempotent(files, tmp_path):
    readings, meters = files
    store = tmp_path / "s.zarr"
    ingest_files(readings, meters, store)
    before = load(store)
    r = ingest_files(readings, meters, store)
    assert r.rows_written == 0 and r.rows_unchanged == r.rows_read
    after = load(store)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k], err_msg=k)


def test_multi_batch_streaming_equals_single_batch(files, tmp_path):
    readings, meters = files
    csv = tmp_path / "readings.csv"
    readings_table().to_csv(csv, index=False)
    ingest_files(readings, meters, tmp_path / "one.zarr", config=IngestConfig(batch_rows=1_000_000))
    r = ingest_files(csv, meters, tmp_path / "many.zarr", config=IngestConfig(batch_rows=23))
    assert len(r.quarantine_files) == 0 and r.rows_read == 5 * N_T
    assert_same_store(tmp_path / "one.zarr", tmp_path / "many.zarr")


def test_extend_time_and_failed_append_rolls_back(files, tmp_path, monkeypatch):
    readings, meters = files
    store = tmp_path / "s.zarr"
    ingest_files(readings, meters, store)
    more = readings_table(n_t=N_T + 40, seed=1)
    more = more[pd.DatetimeIndex(more["timestamp"]) >= T0 + pd.Timedelta(minutes=15 * N_T)]
    snapshot = files_of(store)
    before = load(store)

    def crash(stage, index):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(S, "_FAULT_HOOK", crash)
    with pytest.raises(OSError, match="injected"):
        ingest_frame(store, more, source="more")
    monkeypatch.setattr(S, "_FAULT_HOOK", None)
    assert files_of(store) == snapshot
    after = load(store)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k], err_msg=k)
    r = ingest_frame(store, more, source="more")
    assert r.time_steps_added == 40 and r.rows_written == len(more)
    ds = S.open_store(store)
    assert ds.sizes["time"] == N_T + 40 and S.validate_store(store) == []
    assert not np.isnan(ds["voltage"].values).any()


def test_quarantine_reasons(files, tmp_path):
    readings, meters = files
    store = tmp_path / "s.zarr"
    ingest_files(readings, meters, store)
    t = (T0 + pd.Timedelta(minutes=30)).isoformat()
    bad = pd.DataFrame(
        {
            "meter_id": ["zz", "a1", "a1", "a1", "a1", "a2", "a2", "b1", "b1", "c1", None],
            "timestamp": [
                t,
                "not a time",
                t,
                t,
                (T0 + pd.Timedelta(minutes=7)).isoformat(),
                t,
                t,
                t,
                t,
                (T0 - pd.Timedelta(days=1)).isoformat(),
                t,
            ],
            "voltage_v": ["240", "240", "abc", "inf", "240", "241.5", "241.5", "239", "238", "240", "240"],
        }
    )
    r = ingest_frame(store, bad, source="bad feed")
    check_counts(r)
    assert r.quarantined == {
        "unknown_meter": 2,
        "invalid_timestamp": 1,
        "invalid_value": 2,
        "off_grid": 1,
        "conflicting_duplicate": 2,
        "before_store_start": 1,
    }
    assert r.duplicates_identical == 1 and r.rows_written == 1
    q = pd.read_parquet(store / r.quarantine_files[0])
    assert set(q["reason"]) <= set(QUARANTINE_REASONS) and len(q) == r.rows_quarantined
    assert list(q.loc[q["reason"] == "off_grid", "row"]) == [4]
    assert r.quarantine_files[0].startswith("quarantine/bad_feed-")
    ds = S.open_store(store)
    assert ds["voltage"].sel(meter="a2").values[2] == np.float32(241.5)
    assert ds["off_grid_fraction"].sel(meter="a1").values > 0


def test_kv_detection_scales_meter(files, tmp_path):
    _, meters = files
    store = tmp_path / "s.zarr"
    df = readings_table()
    kv = df["meter_id"].isin(["a2", "c1"])  # a2 has no nominal_v: falls back to the 60..1000 V band
    df.loc[kv, "voltage_v"] = df.loc[kv, "voltage_v"] / 1000.0
    p = tmp_path / "kv.parquet"
    df.to_parquet(p)
    r = ingest_files(p, meters, store)
    assert sorted(r.kv_scaled_meters) == ["a2", "c1"]
    assert any("looks like kV" in n and "c1" in n for n in r.notes)
    v = S.open_store(store)["voltage"].sel(meter="c1").values
    assert np.nanmedian(v) == pytest.approx(240, abs=5)


def test_time_zones_and_dst(files, tmp_path):
    _, meters = files
    df = readings_table(n_t=24)
    # 2026-03-08 is the US spring-forward day: local offsets change from -05:00 to -04:00.
    df["timestamp"] = pd.date_range("2026-03-08 05:15", periods=24, freq="15min", tz="UTC").tolist() * 5
    utc = tmp_path / "utc.parquet"
    df.to_parquet(utc)
    local = df.copy()
    local["timestamp"] = pd.DatetimeIndex(df["timestamp"]).tz_convert("America/New_York")
    loc_csv = tmp_path / "local.csv"
    local.assign(timestamp=[t.isoformat() for t in local["timestamp"]]).to_csv(loc_csv, index=False)
    naive = tmp_path / "naive.csv"
    df.assign(timestamp=pd.DatetimeIndex(df["timestamp"]).tz_localize(None).astype(str)).to_csv(
        naive, index=False
    )
    r = ingest_files(utc, meters, tmp_path / "a.zarr")
    ingest_files(loc_csv, meters, tmp_path / "b.zarr")
    ingest_files(naive, meters, tmp_path / "c.zarr")
    assert r.rows_written == len(df)
    assert_same_store(tmp_path / "a.zarr", tmp_path / "b.zarr")
    assert_same_store(tmp_path / "a.zarr", tmp_path / "c.zarr")


def test_column_map_snapping_and_errors(files, tmp_path):
    _, meters = files
    df = readings_table().rename(columns={"meter_id": "MeterNo", "voltage_v": "V"})
    df["timestamp"] = pd.DatetimeIndex(df["timestamp"]) + pd.Timedelta(seconds=20)
    p = tmp_path / "mapped.parquet"
    df.to_parquet(p)
    with pytest.raises(ContractError, match=r"mapped.parquet.*missing required column"):
        ingest_files(p, meters, tmp_path / "x.zarr")
    cfg = IngestConfig(
        column_map={"MeterNo": "meter_id", "V": "voltage_v"}, snap_tolerance_s=30, interval_s=900
    )
    r = ingest_files(p, meters, tmp_path / "s.zarr", config=cfg)
    assert r.snapped == r.rows_written == len(df)
    with pytest.raises(ContractError, match="does not exist"):
        ingest_files(tmp_path / "nope.parquet", meters, tmp_path / "s.zarr")


def test_new_meters_are_rejected_with_a_clear_error(files, tmp_path):
    readings, meters = files
    store = tmp_path / "s.zarr"
    ingest_files(readings, meters, store)
    m = pd.concat([meters_table(), meters_table().iloc[:1].assign(meter_id="new1")])
    p = tmp_path / "meters2.csv"
    m.to_csv(p, index=False)
    with pytest.raises(StoreError, match=r"1 meter\(s\) not in store.*new1"):
        ingest_files(readings, p, store)


row = st.fixed_dictionaries(
    {
        "meter_id": st.sampled_from(["a1", "a2", "b1", "b2", "c1", "zz", "", None]),
        "timestamp": st.one_of(
            st.integers(-4, N_T + 4).map(lambda k: (T0 + pd.Timedelta(minutes=15 * k)).isoformat()),
            st.integers(0, 3000).map(lambda s: (T0 + pd.Timedelta(seconds=s)).isoformat()),
            st.sampled_from(["", "garbage", "2026-13-45T99:00:00", None, "2026-03-07T01:00:00+01:00"]),
        ),
        "voltage_v": st.one_of(
            st.floats(allow_nan=True, allow_infinity=True).map(str),
            st.sampled_from(["240.0", "0.24", "x", "", None, "1e30"]),
        ),
    }
)


@pytest.fixture(scope="module")
def template_store(tmp_path_factory):
    store = tmp_path_factory.mktemp("template") / "s.zarr"
    S.initialize_store(
        store,
        meters_table(),
        pd.date_range(T0, periods=4, freq="15min"),
        interval_s=900,
        variables=("voltage",),
        voltage_encoding="int16_decivolt",
    )
    return store


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(row, min_size=0, max_size=30))
def test_malformed_readings_never_crash(rows, tmp_path_factory, template_store):
    store = tmp_path_factory.mktemp("h") / "s.zarr"
    shutil.copytree(template_store, store)
    df = pd.DataFrame(rows, columns=["meter_id", "timestamp", "voltage_v"])
    r = ingest_frame(store, df, source="fuzz")
    check_counts(r)
    if r.rows_quarantined:
        q = pd.read_parquet(store / r.quarantine_files[0])
        assert len(q) == r.rows_quarantined and q["reason"].isin(QUARANTINE_REASONS).all()
    assert S.validate_store(store) == []


@pytest.mark.requires_shared
def test_ckt5_subset(tmp_path):
    if not (CKT5 / "readings.parquet").is_file():
        pytest.skip(f"../shared/data/epri-ckt5 is absent ({CKT5})")
    import pyarrow.parquet as pq

    meters = pd.read_csv(CKT5 / "meters.csv")
    keep = set(meters["meter_id"].iloc[:60])
    batch = next(pq.ParquetFile(CKT5 / "readings.parquet").iter_batches(batch_size=200_000))
    df = batch.to_pandas()
    df = df[df["meter_id"].isin(keep) & (df["timestamp"] < df["timestamp"].min() + pd.Timedelta(days=3))]
    p = tmp_path / "sub.parquet"
    df.to_parquet(p)
    r = ingest_files(
        p,
        CKT5 / "meters.csv",
        tmp_path / "s.zarr",
        transformers_path=CKT5 / "transformers.csv",
        references_path=CKT5 / "references.parquet",
        config=IngestConfig(batch_rows=6000),
    )
    check_counts(r)
    ds = S.open_store(tmp_path / "s.zarr")
    assert ds.sizes["meter"] == len(meters) and ds.sizes["time"] == 3 * 96
    assert S.validate_store(tmp_path / "s.zarr") == []
    order = pd.DataFrame(
        {"f": ds["feeder_id"].values, "t": ds["transformer_id"].values, "m": ds["meter"].values}
    )
    assert order.equals(order.sort_values(["f", "t", "m"]))
    n_obs = (~np.isnan(ds["voltage"].values)).sum(axis=1)
    assert (n_obs[ds["meter"].isin(list(keep)).values] == 3 * 96).all() and n_obs.sum() == len(df)
    assert ds.sizes["reference"] == 3 and ds.sizes["transformer"] > 0


def test_ingest_frame_keeps_coordinates_of_meters_it_has_not_seen(tmp_path):
    store = tmp_path / "s.zarr"
    S.initialize_store(store, meters_table(), pd.date_range(T0, periods=8, freq="15min"), interval_s=900)
    import zarr

    zarr.open_array(str(store / "sampling_interval_s"), mode="r+")[:] = np.full(5, 900.0)
    zarr.open_array(str(store / "off_grid_fraction"), mode="r+")[:] = np.zeros(5)
    df = readings_table(n_t=8)
    df = df[df["meter_id"] == "a1"].iloc[::2]  # a1 every 30 min
    r = ingest_frame(store, df, source="one meter")
    assert r.rows_written == 4
    ds = S.open_store(store)
    assert float(ds["sampling_interval_s"].sel(meter="a1")) == 1800.0
    assert (ds["sampling_interval_s"].drop_sel(meter="a1").values == 900.0).all()
    assert (ds["off_grid_fraction"].values == 0).all()


def _stats(store: Path) -> dict[str, np.ndarray]:
    with np.load(store / "_phaseid" / "meter_stats.npz") as z:
        return {k: z[k].copy() for k in z.files}


def test_redelivery_split_differently_is_not_counted_twice(tmp_path):
    """A redelivered stream (other batch boundaries, other row order) leaves the store and its statistics."""
    df = readings_table()
    df.loc[3, "timestamp"] = pd.Timestamp(df.loc[3, "timestamp"]) + pd.Timedelta(minutes=7)  # one off-grid read
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    S.initialize_store(a, meters_table(), pd.date_range(T0, periods=N_T, freq="15min"), interval_s=900)
    shutil.copytree(a, b)
    for part in np.array_split(np.arange(len(df)), 3):
        ingest_frame(a, df.iloc[part], source="feed")
    ingest_frame(b, df, source="feed")
    once = _stats(a)
    # redeliver everything, split and ordered differently
    shuffled = df.sample(frac=1.0, random_state=1)
    for part in np.array_split(np.arange(len(df)), 4):
        r = ingest_frame(a, shuffled.iloc[part], source="feed")
        assert r.rows_written == 0
    again = _stats(a)
    for k in once:
        np.testing.assert_array_equal(once[k], again[k], err_msg=k)
    np.testing.assert_array_equal(once["n_raw"], _stats(b)["n_raw"])
    np.testing.assert_array_equal(once["n_off"], _stats(b)["n_off"])
    assert once["n_raw"].sum() == len(df) and once["n_off"].sum() == 1
    ds = S.open_store(a)
    assert ds["off_grid_fraction"].sel(meter=df.loc[3, "meter_id"]).values == pytest.approx(1 / N_T)
    assert (ds["sampling_interval_s"].values == 900).all()


def test_bookkeeping_does_not_grow_with_batches(tmp_path):
    """Re-ingesting many batches writes no per-batch log (the old seen-batches list grew forever)."""
    store = tmp_path / "s.zarr"
    S.initialize_store(store, meters_table(), pd.date_range(T0, periods=N_T, freq="15min"), interval_s=900)
    df = readings_table()
    ingest_frame(store, df, source="feed")
    size = sum(p.stat().st_size for p in (store / "_phaseid").glob("*") if p.is_file())
    for i in range(6):
        r = ingest_frame(store, df.iloc[i::6], source=f"feed{i}")
        assert r.rows_unchanged == len(df.iloc[i::6])
    assert not (store / "_phaseid" / "seen_batches.txt").exists()
    assert sum(p.stat().st_size for p in (store / "_phaseid").glob("*") if p.is_file()) == size


def test_unplaced_key_log_is_bounded(tmp_path, monkeypatch):
    import phaseid_hpc.ingest as I

    monkeypatch.setattr(I, "_UNPLACED_KEYS_MAX", 3)
    store = tmp_path / "s.zarr"
    S.initialize_store(store, meters_table(), pd.date_range(T0, periods=N_T, freq="15min"), interval_s=900)
    off = pd.DataFrame(
        {
            "meter_id": ["a1"] * 5,
            "timestamp": [T0 + pd.Timedelta(minutes=15 * k + 7) for k in range(5)],
            "voltage_v": [240.0] * 5,
        }
    )
    r = ingest_frame(store, off, source="off")
    assert r.quarantined == {"off_grid": 5}
    st = _stats(store)
    assert len(st["u_meter"]) == len(st["u_ts"]) == 3 and st["n_off"].sum() == 5
    ingest_frame(store, off.iloc[2:], source="off")  # the 3 newest keys are remembered: not counted again
    assert _stats(store)["n_off"].sum() == 5


def test_meter_ids_of_any_dtype_map_to_the_same_rows():
    import pyarrow as pa

    from phaseid_hpc.ingest import _meter_positions

    index = pd.Index(["a1", "a2", "c1", "b1", "b2"])
    want = np.array([3, -1, 0, -1, 4, -1])
    vals = ["b1", "zz", "a1", None, "b2", ""]
    for s in (
        pd.Series(vals, dtype="str"),
        pd.Series(vals, dtype=object),
        pd.Series(vals, dtype="string[pyarrow]"),
        pd.Series(vals, dtype="string[python]"),
    ):
        np.testing.assert_array_equal(_meter_positions(s, index), want, err_msg=str(s.dtype))
        ids = pa.array(index.to_numpy(dtype=object), type=pa.string())
        np.testing.assert_array_equal(_meter_positions(s, index, ids), want, err_msg=f"arrow {s.dtype}")
        np.testing.assert_array_equal(_meter_positions(s.iloc[:1], index, ids), want[:1])  # small batch
    np.testing.assert_array_equal(_meter_positions(pd.Series([1, 2]), pd.Index(["2", "1"])), [1, 0])


def test_chunk_fast_path_equals_zarr_api(tmp_path, monkeypatch):
    """The direct Blosc chunk path writes the same store as the Zarr array API (also int16, time growth)."""
    import phaseid_hpc.ingest as I

    df = readings_table(n_t=N_T + 8, seed=3)
    for enc in ("float32", "int16_decivolt"):
        a, b = tmp_path / f"a-{enc}.zarr", tmp_path / f"b-{enc}.zarr"
        for s in (a, b):
            S.initialize_store(
                s, meters_table(), pd.date_range(T0, periods=N_T, freq="15min"), interval_s=900,
                voltage_encoding=enc, time_chunk=5,
            )
        for part in np.array_split(np.arange(len(df)), 3):
            ingest_frame(a, df.iloc[part], source="x")
        monkeypatch.setattr(I, "_direct_codec", lambda arr: None)
        for part in np.array_split(np.arange(len(df)), 3):
            ingest_frame(b, df.iloc[part], source="x")
        monkeypatch.undo()
        assert_same_store(a, b)
        assert S.open_store(a).sizes["time"] == N_T + 8 and S.validate_store(a) == []


# ------------------------------------------------------------------ inputs as utilities have them
DATA = Path(__file__).parent / "data"


def _proposed_toml(message: str, key: str) -> dict:
    """The ``[ingest]`` inline table ``key = { ... }`` an error message proposes, parsed."""
    import tomllib

    start = message.index(f"{key} = {{")
    return tomllib.loads(message[start : message.index("}", start) + 1])[key]


def test_head_end_column_names_error_shows_header_and_the_toml_that_fixes_it(files, tmp_path):
    from phaseid_hpc.errors import DataError

    _, meters = files
    df = readings_table().rename(columns={"meter_id": "MeterID", "timestamp": "ReadTime", "voltage_v": "Voltage",
                                          "kw": "Demand kW"})
    head_end = tmp_path / "headend.csv"
    df.to_csv(head_end, index=False)
    with pytest.raises(DataError) as err:
        ingest_files(head_end, meters, tmp_path / "s.zarr")
    msg = str(err.value)
    assert "headend.csv" in msg and "['MeterID', 'ReadTime', 'Voltage', 'Demand kW']" in msg
    assert "missing required column(s) ['meter_id', 'timestamp', 'voltage_v']" in msg
    assert "\n" not in msg  # one line, as every data error
    fix = _proposed_toml(msg, "column_map")
    assert fix == {"MeterID": "meter_id", "ReadTime": "timestamp", "Voltage": "voltage_v", "Demand kW": "kw"}
    r = ingest_files(head_end, meters, tmp_path / "s.zarr", config=IngestConfig(column_map=fix))
    assert r.rows_written == r.rows_read == len(df)
    assert "kw" in S.open_store(tmp_path / "s.zarr").data_vars
    # a frame (the broker's path) gets the same help
    with pytest.raises(ContractError, match=r"under \[ingest\]: column_map = \{ MeterID = \"meter_id\", "):
        ingest_frame(tmp_path / "s.zarr", df, source="queue")


def test_meters_column_names_error_and_phase_spellings(files, tmp_path):
    readings, _ = files
    m = meters_table().rename(columns={"meter_id": "MeterNo", "feeder_id": "Circuit", "transformer_id": "XfmrID",
                                       "phase": "Phasing"})
    m["Phasing"] = ["b-n", "a", "3", "1", "B"]  # b2 B, a1 A, c1 C, a2 A, b1 B
    path = tmp_path / "gis.csv"
    m.to_csv(path, index=False)
    with pytest.raises(ContractError) as err:
        ingest_files(readings, path, tmp_path / "s.zarr")
    msg = str(err.value)
    assert "gis.csv" in msg and "'MeterNo', 'Circuit', 'XfmrID', 'Phasing'" in msg
    assert "\n" not in msg
    fix = _proposed_toml(msg, "meters_column_map")
    assert fix == {"MeterNo": "meter_id", "Circuit": "feeder_id", "XfmrID": "transformer_id", "Phasing": "phase"}
    r = ingest_files(readings, path, tmp_path / "s.zarr", config=IngestConfig(meters_column_map=fix))
    assert r.phase_labels == {"1": "A", "3": "C", "a": "A", "b-n": "B"}
    assert any("phase labels normalised" in n and "'b-n' -> B" in n for n in r.notes)
    ds = S.open_store(tmp_path / "s.zarr")
    got = dict(zip(ds["meter"].values, ds["phase_gis"].values))
    assert got == {"a1": "A", "a2": "A", "b1": "B", "b2": "B", "c1": "C"}


@pytest.mark.parametrize(
    ("label", "want"),
    [("A", "A"), ("bc", "BC"), ("CB", "BC"), ("b-c", "BC"), ("C/A", "CA"), ("ac", "CA"), ("BA", "AB"),
     ("2", "B"), ("1.2", "AB"), ("2.3", "BC"), ("1.3", "CA"), ("123", "ABC"), ("1.2.3", "ABC"), ("ABC", "ABC"),
     ("cba", "ABC"), ("AN", "A"), ("A-N", "A"), ("Phase B", "B"), ("3.0", "C"), (" c ", "C"),
     ("X", None), ("AA", None), ("1.1", None), ("ABCD", None), ("", None), ("4", None), (None, None)],
)
def test_normalise_phase(label, want):
    from phaseid_hpc.input_formats import normalise_phase

    assert normalise_phase(label) == want


def test_unknown_phase_labels_name_the_rows_and_meters(files, tmp_path):
    readings, _ = files
    m = meters_table()
    m["phase"] = ["B", "X", "C", "A", "1.1"]
    path = tmp_path / "m.csv"
    m.to_csv(path, index=False)
    with pytest.raises(ContractError) as err:
        ingest_files(readings, path, tmp_path / "s.zarr")
    msg = str(err.value)
    assert "m.csv" in msg and "2 phase label(s)" in msg
    assert "row 3, meter 'a1': 'X'" in msg and "row 6, meter 'b1': '1.1'" in msg
    assert not (tmp_path / "s.zarr").exists()


def test_us_local_timestamps_error_then_format_and_timezone(files, tmp_path):
    from phaseid_hpc.errors import DataError

    _, meters = files
    df = readings_table()
    local = pd.DatetimeIndex(df["timestamp"]).tz_convert("America/Chicago")
    df["ReadTime"] = local.strftime("%m/%d/%Y %H:%M")
    df = df.drop(columns="timestamp")
    path = tmp_path / "us.csv"
    df.to_csv(path, index=False)
    with pytest.raises(DataError) as err:
        ingest_files(path, meters, tmp_path / "s.zarr", config=IngestConfig(column_map={"ReadTime": "timestamp"}))
    msg = str(err.value)
    assert "us.csv" in msg and "column 'ReadTime'" in msg and f"{len(df):,} of {len(df):,} timestamps" in msg
    assert repr(df["ReadTime"].iloc[0]) in msg
    assert 'timestamp_format = "%m/%d/%Y %H:%M"' in msg and "timezone" in msg
    assert not (tmp_path / "s.zarr").exists()
    cfg = IngestConfig(column_map={"ReadTime": "timestamp"}, timestamp_format="%m/%d/%Y %H:%M",
                       timezone="America/Chicago")
    r = ingest_files(path, meters, tmp_path / "s.zarr", config=cfg)
    assert r.rows_written == len(df) and r.timezone == "America/Chicago"
    assert any("America/Chicago" in n for n in r.notes)
    assert pd.Timestamp(S.open_store(tmp_path / "s.zarr")["time"].values[0]) == T0.tz_localize(None)
    # the same wall times read as UTC (the default, stated in the report) land 6 h earlier (CST is UTC-6)
    r = ingest_files(path, meters, tmp_path / "utc.zarr",
                     config=IngestConfig(column_map={"ReadTime": "timestamp"}, timestamp_format="%m/%d/%Y %H:%M"))
    assert r.timezone == "UTC" and any("read as UTC" in n for n in r.notes)
    first = pd.Timestamp(S.open_store(tmp_path / "utc.zarr")["time"].values[0])
    assert first - T0.tz_localize(None) == pd.Timedelta(hours=-6)


def test_some_unparsed_timestamps_are_counted_with_examples(files, tmp_path):
    _, meters = files
    df = readings_table()
    df["timestamp"] = df["timestamp"].astype(str)
    df.loc[[3, 40], "timestamp"] = ["31/02/2026 10:00", "yesterday"]
    path = tmp_path / "r.csv"
    df.to_csv(path, index=False)
    r = ingest_files(path, meters, tmp_path / "s.zarr")
    check_counts(r)
    assert r.quarantined == {"invalid_timestamp": 2} and r.timestamps_unparsed == 2
    assert r.timestamp_examples == ["31/02/2026 10:00", "yesterday"]
    note = next(n for n in r.notes if "did not parse" in n)
    assert "r.csv" in note and "2 of 80" in note and "'yesterday'" in note
    # extending the store with a file whose timestamps all fail is an error, and writes nothing
    bad = readings_table()
    bad["timestamp"] = pd.DatetimeIndex(bad["timestamp"]).strftime("%d.%m.%Y %H:%M")
    bad.to_csv(tmp_path / "bad.csv", index=False)
    before = files_of(tmp_path / "s.zarr")
    with pytest.raises(ContractError, match=r"80 of 80 timestamps did not parse.*%d\.%m\.%Y %H:%M"):
        ingest_files(tmp_path / "bad.csv", meters, tmp_path / "s.zarr")
    assert files_of(tmp_path / "s.zarr") == before


def test_parse_timestamps_zone_dst_and_offsets():
    from phaseid_hpc.ingest import _NAT, _parse_timestamps

    s = pd.Series(["2026-03-08 01:45", "2026-03-08 02:30", "2026-03-08 03:15", "2026-11-01 01:30",
                   "2026-03-08T02:30:00-06:00", "2026-03-08T08:30Z", "9999-12-31 00:00"])
    got = _parse_timestamps(s, tz="America/Chicago")
    want = [pd.Timestamp("2026-03-08 07:45"), None, pd.Timestamp("2026-03-08 08:15"), None,
            pd.Timestamp("2026-03-08 08:30"), pd.Timestamp("2026-03-08 08:30"), None]
    for g, w, raw in zip(got, want, s):
        assert (g == _NAT) if w is None else (g == w.value), raw  # 02:30 skipped, 01:30 in Nov repeats
    naive = pd.Series(pd.to_datetime(["2026-06-01 12:00"]))
    assert _parse_timestamps(naive, tz="Europe/Berlin")[0] == pd.Timestamp("2026-06-01 10:00").value
    fmt = _parse_timestamps(pd.Series(["06/01/2026 12:00 +0200", "junk"]), fmt="%m/%d/%Y %H:%M %z")
    assert fmt[0] == pd.Timestamp("2026-06-01 10:00").value and fmt[1] == _NAT


def test_config_rejects_bad_ingest_keys():
    from phaseid_hpc.config import load_config
    from phaseid_hpc.errors import ConfigError

    with pytest.raises(ConfigError, match="ingest.timezone.*'Central'"):
        load_config(overrides={"ingest": {"timezone": "Central"}})
    with pytest.raises(ConfigError, match="channel_map.*'KWH': 'kilowatt-hours'"):
        load_config(overrides={"ingest": {"channel_map": {"KWH": "kilowatt-hours"}}})
    with pytest.raises(ConfigError, match="password"):
        load_config(overrides={"ingest": {"meters_database": {"host": "x", "password": "secret"}}})
    with pytest.raises(ConfigError, match="readings_layout"):
        load_config(overrides={"ingest": {"readings_layout": "tall"}})


# ------------------------------------------------------------------ MDM channel export
def mdm_config(**kw) -> IngestConfig:
    from phaseid_hpc.config import load_config

    return dataclasses_replace(load_config(DATA / "mdm.toml").ingest, **kw)


def dataclasses_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def mdm_meters(tmp_path) -> Path:
    path = tmp_path / "meters.csv"
    pd.DataFrame({"meter_id": ["M7700121", "M7700122", "M7700123", "M9100450"], "feeder_id": "F1",
                  "transformer_id": ["T1", "T1", "T2", "T3"], "phase": ["A", "B", "C", "ABC"]}).to_csv(path, index=False)
    return path


def test_mdm_channel_export_pivots_to_wide_rows_losing_nothing(tmp_path):
    export = pd.read_csv(DATA / "mdm_interval_export.csv", dtype=str)
    cfg = mdm_config()
    r = ingest_files(DATA / "mdm_interval_export.csv", mdm_meters(tmp_path), tmp_path / "s.zarr", config=cfg)
    check_counts(r)
    # every row of the export is accounted for: ignored, an identical duplicate, or a value in a wide row
    n_ignored = int((export["UOM"] == "DEGC").sum())
    assert r.channel_rows_read == len(export) == 130
    assert r.channel_rows_ignored == {"9 (DEGC)": n_ignored}
    assert r.channel_duplicates_identical == 1
    assert r.quarantined == {"conflicting_duplicate": 2}  # the actual and the estimate of one interval
    assert r.rows_read == 4 * 8 + 1 and r.rows_written == 4 * 8 - 1
    ds = S.open_store(tmp_path / "s.zarr").load()
    assert ds.attrs["interval_s"] == 900 and ds.sizes["time"] == 8
    # interval ends are Chicago wall times (CDT, UTC-5)
    assert pd.Timestamp(ds["time"].values[0]) == pd.Timestamp("2026-05-31 23:15")
    e = export.assign(
        t=pd.to_datetime(export["IntervalEndTime"], format="%m/%d/%Y %H:%M").dt.tz_localize("America/Chicago")
        .dt.tz_convert("UTC").dt.tz_localize(None),
        v=export["IntervalValue"].astype(float) * export["Multiplier"].astype(float),
    ).drop_duplicates()
    for (uom, var, factor) in (("V", "voltage", 1.0), ("KWH", "kw", 4.0), ("KVARH", "kvar", 4.0)):
        rows = e[(e["UOM"] == uom) & (e["QualityCode"] == "A")]
        for m, t, v in zip(rows["MeterID"], rows["t"], rows["v"]):
            if m == "M7700123" and t == pd.Timestamp("2026-06-01 00:15") and var == "voltage":
                assert np.isnan(ds["voltage"].sel(meter=m, time=t).item())  # conflicting: quarantined
                continue
            got = ds[var].sel(meter=m, time=t).item()
            if m == "M7700123" and t == pd.Timestamp("2026-06-01 00:15"):
                assert np.isnan(got)  # the whole interval row of the conflict is quarantined
            else:
                np.testing.assert_allclose(got, v * factor, rtol=1e-6, err_msg=f"{m} {t} {var}")
    # the CT-rated meter's multiplier of 40 is applied
    ct = e[(e["MeterID"] == "M9100450") & (e["UOM"] == "KWH")]
    assert (ct["Multiplier"] == "40").all()
    note = next(n for n in r.notes if "channel layout" in n)
    assert "130 rows -> 33 interval rows" in note and "kw <- ['1 (KWH)']" in note and "0.25 h" in note


def test_mdm_unknown_channel_is_an_error_naming_it(tmp_path):
    cfg = mdm_config(channel_ignore=[])
    with pytest.raises(ContractError) as err:
        ingest_files(DATA / "mdm_interval_export.csv", mdm_meters(tmp_path), tmp_path / "s.zarr", config=cfg)
    msg = str(err.value)
    assert "mdm_interval_export.csv" in msg and "channel '9' uom 'DEGC': 32 rows" in msg
    assert "channel_ignore" in msg and 'channel_map = { 9 = "QUANTITY" }' in msg and "\n" not in msg
    assert not (tmp_path / "s.zarr").exists()


def test_pivot_channels_units_and_interval():
    from phaseid_hpc.ingest import _parse_timestamps
    from phaseid_hpc.input_formats import pivot_channels

    t = ["2026-01-01T01:00Z", "2026-01-01T02:00Z"]
    df = pd.DataFrame({
        "meter_id": ["m"] * 6, "timestamp": t * 3, "channel": ["WH"] * 2 + ["KV"] * 2 + ["VARH"] * 2,
        "value": ["500", "1000", "0.24", "0.241", "100", "x"], "multiplier": ["2", None, "1", "1", "1", "1"],
    })
    piv = pivot_channels(df, {"WH": "wh", "KV": "kv", "VARH": "varh"}, [], "f", parse_ns=_parse_timestamps)
    assert piv.interval_s == 3600 and piv.rows_read == 6 and piv.conflicts == 0
    w = piv.wide.set_index("timestamp")
    np.testing.assert_allclose(w["kw"], [1.0, 1.0])  # 500 Wh x 2 in 1 h; 1000 Wh x (no multiplier: 1)
    np.testing.assert_allclose(w["voltage_v"], [240.0, 241.0])
    assert w["kvar"].iloc[0] == pytest.approx(0.1) and np.isnan(w["kvar"].iloc[1])  # 'x' is not a number
    assert list(piv.wide.columns) == ["meter_id", "timestamp", "voltage_v", "kw", "kvar"]
    # an explicit interval wins over the spacing of the interval ends
    piv = pivot_channels(df, {"WH": "wh", "KV": "kv", "VARH": "varh"}, [], "f", parse_ns=_parse_timestamps,
                         interval_s=900)
    assert piv.wide["kw"].iloc[0] == pytest.approx(4.0)


def test_mdm_export_hints_channel_layout_and_timestamp_format(tmp_path):
    from phaseid_hpc.errors import DataError

    with pytest.raises(DataError, match=r'(?s)IntervalEndTime = "timestamp".*readings_layout = "channel"'):
        ingest_files(DATA / "mdm_interval_export.csv", mdm_meters(tmp_path), tmp_path / "s.zarr")
    with pytest.raises(DataError, match=r"column 'IntervalEndTime': 130 of 130 timestamps.*%m/%d/%Y %H:%M"):
        ingest_files(DATA / "mdm_interval_export.csv", mdm_meters(tmp_path), tmp_path / "s.zarr",
                     config=mdm_config(timestamp_format=""))
    assert not (tmp_path / "s.zarr").exists()


def test_mapped_meter_ids_keep_leading_zeros(tmp_path):
    from phaseid_hpc.ingest import _read_meters

    path = tmp_path / "m.csv"
    path.write_text("MeterNo,Feeder,Xfmr,Phasing\n000123,07,0042,1.2\n")
    cfg = IngestConfig(meters_column_map={"MeterNo": "meter_id", "Feeder": "feeder_id", "Xfmr": "transformer_id",
                                          "Phasing": "phase"})
    report = IngestReport(store="x")
    table, name = _read_meters(path, cfg, report)
    assert table.loc[0, ["meter_id", "feeder_id", "transformer_id", "phase"]].tolist() == ["000123", "07", "0042", "AB"]
    assert name == str(path) and report.phase_labels == {"1.2": "AB"}


def test_mdm_export_as_parquet_with_typed_columns(tmp_path):
    """Integer channel numbers, float values and tz-aware interval ends (a Parquet export) pivot the same."""
    export = pd.read_csv(DATA / "mdm_interval_export.csv", dtype=str)
    typed = export.assign(
        ChannelID=export["ChannelID"].astype(int), IntervalValue=export["IntervalValue"].astype(float),
        Multiplier=export["Multiplier"].astype(int),
        IntervalEndTime=pd.to_datetime(export["IntervalEndTime"], format="%m/%d/%Y %H:%M").dt.tz_localize(
            "America/Chicago"),
    )
    typed.to_parquet(tmp_path / "export.parquet")
    meters = mdm_meters(tmp_path)
    a = ingest_files(DATA / "mdm_interval_export.csv", meters, tmp_path / "a.zarr", config=mdm_config())
    b = ingest_files(tmp_path / "export.parquet", meters, tmp_path / "b.zarr",
                     config=mdm_config(timestamp_format="", channel_map={"1": "kwh", "2": "kvarh", "3": "voltage_v"},
                                       channel_ignore=["9"]))
    assert (a.rows_written, a.quarantined) == (b.rows_written, b.quarantined)
    assert b.channel_rows_ignored == {"9 (DEGC)": 32}
    for v in ("voltage", "kw", "kvar"):
        np.testing.assert_array_equal(load(tmp_path / "a.zarr")[v], load(tmp_path / "b.zarr")[v], err_msg=v)
