"""Tests of phaseid_hpc/store.py: schema, block writes, partitions, validation, transactions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from phaseid_hpc import store as S
from phaseid_hpc.errors import ContractError, StoreError


def make_meters() -> pd.DataFrame:
    # Deliberately unsorted: feeder F2 first, transformer ids out of order.
    return pd.DataFrame(
        {
            "meter_id": ["m5", "m1", "m3", "m2", "m4", "m0", "m6"],
            "feeder_id": ["F2", "F1", "F1", "F1", "F2", "F1", "F3"],
            "transformer_id": ["T9", "T2", "T1", "T1", "T8", "T2", "T7"],
            "phase": ["A", "B", "A", "A", "C", "B", "ABC"],
            "nominal_v": [240.0, 240.0, 240.0, 240.0, 120.0, np.nan, 277.0],
        }
    )


TIMES = pd.date_range("2026-03-01 00:15", periods=10, freq="15min", tz="UTC")


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "s.zarr"
    S.initialize_store(path, make_meters(), TIMES, interval_s=900, block_bytes=8 * 4 * 4, time_chunk=4)
    return path


def test_initialize_sorts_meters_and_follows_schema(store):
    ds = S.open_store(store)
    assert list(ds["meter"].values.astype(str)) == ["m2", "m3", "m0", "m1", "m4", "m5", "m6"]
    assert list(ds["feeder_id"].values.astype(str)) == ["F1"] * 4 + ["F2"] * 2 + ["F3"]
    assert ds["voltage"].dims == ("meter", "time") and ds["voltage"].dtype == np.float32
    assert ds.attrs["interval_s"] == 900 and ds.attrs["phaseid_store_version"] == S.STORE_VERSION
    assert np.isnan(ds["voltage"].values).all()  # empty store: never-written chunks read as NaN
    assert ds["time"].values[0] == np.datetime64("2026-03-01T00:15")
    assert np.isnan(ds["nominal_v"].values[2])  # m0 has no nominal voltage
    assert S.validate_store(store) == []


@pytest.mark.parametrize("encoding", ["float32", "int16_decivolt"])
def test_write_meter_block_round_trip(tmp_path, encoding):
    path = tmp_path / "s.zarr"
    S.initialize_store(
        path, make_meters(), TIMES, interval_s=900, voltage_encoding=encoding, time_chunk=4, block_bytes=64
    )
    rng = np.random.default_rng(0)
    v = (240 + rng.normal(0, 2, (3, 10))).astype(np.float32)
    v[0, 3] = np.nan
    S.write_meter_block(path, 2, 5, {"voltage": v, "kw": np.ones((3, 10))})
    ds = S.open_store(path)
    got = ds["voltage"].values
    assert got.dtype == np.float32
    tol = 0.05 + 1e-4 if encoding == "int16_decivolt" else 0
    np.testing.assert_allclose(got[2:5], v, atol=tol)
    assert np.isnan(got[2, 3]) and np.isnan(got[:2]).all() and np.isnan(got[5:]).all()
    assert (ds["kw"].values[2:5] == 1).all()
    with pytest.raises(StoreError, match="expected shape"):
        S.write_meter_block(path, 0, 2, {"voltage": v})
    with pytest.raises(StoreError, match="no variable 'kvar'"):
        S.write_meter_block(path, 0, 3, {"kvar": v})


def test_open_store_chunks_are_whole_feeders(store):
    ds = S.open_store(store, block_bytes=2 * 10 * 4)  # ~2 meters per block
    bounds = np.cumsum((0,) + ds["voltage"].chunks[0])
    feeders = ds["feeder_id"].values.astype(str)
    for b in bounds[1:-1]:
        assert feeders[b - 1] != feeders[b]


def test_feeder_blocks_cover_whole_feeders():
    table = pd.DataFrame({"feeder_id": ["a"] * 5 + ["b"] * 2 + ["c"] * 2 + ["d"] * 1})
    blocks = S.feeder_blocks(table, target_bytes=4, bytes_per_meter=1)
    assert blocks[0] == (0, 5, ("a",))  # bigger than the target: a block of its own
    assert [b.start for b in blocks[1:]] == [b.stop for b in blocks[:-1]]
    assert blocks[-1].stop == 10
    assert [f for b in blocks for f in b.feeder_ids] == ["a", "b", "c", "d"]
    assert all(b.stop - b.start <= 4 for b in blocks[1:])
    one = S.feeder_blocks(table, target_bytes=1e9, bytes_per_meter=1)
    assert one == [(0, 10, ("a", "b", "c", "d"))]
    with pytest.raises(StoreError, match="'a' is not a contiguous"):
        S.feeder_blocks(pd.DataFrame({"feeder_id": ["a", "b", "a"]}), 10, bytes_per_meter=1)


def test_feeder_blocks_balanced_for_the_workers():
    # 12 feeders of 100 meters, target 500 meters: greedy gives 5+5+2 (a worker of two waits on the last);
    # balanced for 2 workers gives 4 blocks of 3 feeders
    table = pd.DataFrame({"feeder_id": np.repeat([f"f{i:02d}" for i in range(12)], 100)})
    greedy = S.feeder_blocks(table, target_bytes=500, bytes_per_meter=1)
    assert [b.stop - b.start for b in greedy] == [500, 500, 200]
    even = S.feeder_blocks(table, target_bytes=500, bytes_per_meter=1, multiple_of=2)
    assert [b.stop - b.start for b in even] == [300, 300, 300, 300]
    assert [f for b in even for f in b.feeder_ids] == [f"f{i:02d}" for i in range(12)]
    assert [b.start for b in even[1:]] == [b.stop for b in even[:-1]] and even[-1].stop == 1200


def test_feeder_blocks_balanced_do_not_drift_into_an_extra_block():
    # 10 feeders of 130 meters, 4 blocks of 325 wanted: closing each block where its own size is nearest 325
    # gave five blocks of 260 (one worker of two then runs the fifth alone); closing at the boundary nearest
    # each cumulative end gives exactly four
    table = pd.DataFrame({"feeder_id": np.repeat([f"f{i:02d}" for i in range(10)], 130)})
    even = S.feeder_blocks(table, target_bytes=500, bytes_per_meter=1, multiple_of=2)
    assert [b.stop - b.start for b in even] == [260, 390, 260, 390]
    # a feeder larger than a share is a block of its own, and the count is never exceeded
    table = pd.DataFrame({"feeder_id": np.repeat(["a", "big", "c", "d", "e"], [10, 1000, 10, 10, 10])})
    blocks = S.feeder_blocks(table, target_bytes=300, bytes_per_meter=1, multiple_of=2)
    assert len(blocks) <= 4 and ("big",) in [b.feeder_ids for b in blocks]
    assert [f for b in blocks for f in b.feeder_ids] == ["a", "big", "c", "d", "e"]


def test_sort_meters_errors_name_row_and_column():
    m = make_meters()
    m.loc[3, "phase"] = "X"
    with pytest.raises(ContractError, match=r"meters: row 5, column 'phase'.*'X'"):
        S.sort_meters(m)
    with pytest.raises(ContractError, match="missing required column"):
        S.sort_meters(make_meters().drop(columns="feeder_id"))
    m = make_meters()
    m.loc[2, "meter_id"] = "m5"
    with pytest.raises(ContractError, match="duplicate id 'm5'"):
        S.sort_meters(m)


def _rewrite(path, name, values):
    arr = zarr.open_array(str(path / name), mode="r+")
    arr[:] = values


def test_validate_store_names_problems(store):
    _rewrite(store, "meter", np.array(["m3", "m2", "m0", "m1", "m4", "m5", "m6"], dtype=object))
    problems = S.validate_store(store)
    assert any("not sorted" in p and "row 0" in p for p in problems), problems
    _rewrite(store, "meter", np.array(["m2", "m3", "m0", "m1", "m4", "m5", "m6"], dtype=object))
    t = zarr.open_array(str(store / "time"), mode="r+")
    vals = t[:]
    vals[5] += 60
    t[:] = vals
    problems = S.validate_store(store)
    assert any("non-regular time grid" in p and "index 5" in p for p in problems), problems
    with pytest.raises(StoreError, match="non-regular time grid"):
        S.validate_store(store, raise_on_error=True)


def test_validate_store_missing_variable(store):
    import shutil

    shutil.rmtree(store / "off_grid_fraction")
    S._consolidate(store)
    problems = S.validate_store(store)
    assert any("missing variable 'off_grid_fraction'" in p for p in problems), problems
    assert (
        S.validate_store(store.parent / "nope")
        and "does not open" in S.validate_store(store.parent / "nope")[0]
    )


def test_validate_store_reports_data_variables_chunked_differently(store):
    # kw rewritten with other chunks along time: a problem in the list, not a ValueError from the
    # feeder-alignment check
    import shutil

    a = zarr.open_array(str(store / "kw"), mode="r")
    data, attrs = a[:], dict(a.attrs)
    shutil.rmtree(store / "kw")
    b = zarr.create_array(str(store / "kw"), shape=a.shape, chunks=(a.shape[0], 3), dtype=a.dtype,
                          fill_value=a.fill_value, dimension_names=["meter", "time"], attributes=attrs,
                          zarr_format=3)
    b[:] = data
    S._consolidate(store)
    problems = S.validate_store(store)
    assert any("different storage chunks" in p for p in problems), problems


def _snapshot(path):
    # Retired stages (``_phaseid/done-*``) are pruned from the walk: a background thread may be deleting them.
    out = {}
    for root, dirs, names in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith("done-")]
        for n in names:
            if n != "lock":
                p = Path(root) / n
                out[str(p.relative_to(path))] = p.read_bytes()
    return dict(sorted(out.items()))


def _grow(path):
    with S.StoreTransaction(path) as tx:
        arr = tx.array("voltage")
        arr.resize((arr.shape[0], 12))
        arr[0:2, 8:12] = np.full((2, 4), 230.0, np.float32)
        t = tx.array("time")
        t.resize((12,))
        t[:] = TIMES[0].value // 10**9 + 900 * np.arange(12)
        for name in ("kw",):
            a = tx.array(name)
            a.resize((a.shape[0], 12))
        tx.write_file("quarantine/x.parquet", b"x")


@pytest.mark.parametrize("step", [("commit", 0), ("publish", 0), ("publish", 3)])
def test_transaction_crash_leaves_old_or_new_store(store, tmp_path, monkeypatch, step):
    import shutil

    reference = tmp_path / "ref.zarr"
    shutil.copytree(store, reference)
    _grow(reference)
    before = _snapshot(store)

    def crash(stage, index):
        if (stage, index) == step:
            raise OSError(f"injected crash at {stage} {index}")

    monkeypatch.setattr(S, "_FAULT_HOOK", crash)
    with pytest.raises(OSError, match="injected"):
        _grow(store)
    monkeypatch.setattr(S, "_FAULT_HOOK", None)
    if step[0] == "commit":  # before the commit point: nothing changed
        assert _snapshot(store) == before
        assert S.validate_store(store) == []
    else:  # after it: the next open rolls forward
        assert any("interrupted transaction" in p for p in S.validate_store(store))
        ds = S.open_store(store)
        assert ds.sizes["time"] == 12 and not list((store / "_phaseid").glob("txn-*"))
        assert S.validate_store(store) == []
        ref = S.open_store(reference)
        np.testing.assert_array_equal(ds["voltage"].values, ref["voltage"].values)
        assert (store / "quarantine" / "x.parquet").read_bytes() == b"x"
        assert json.loads((store / "zarr.json").read_text()) == json.loads(
            (reference / "zarr.json").read_text()
        )


def _full_store(path: Path) -> Path:
    """A store with every optional part: kw and kvar, transformers, feeder-head references."""
    m = make_meters()
    tr = pd.DataFrame({"transformer_id": ["T1", "T2", "T7", "T8", "T9"], "feeder_id": ["F1", "F1", "F3", "F2", "F2"],
                       "kva_rating": [25.0, 50.0, 75.0, 25.0, 10.0], "n_phases": [1, 1, 3, 1, 1]})
    ref = pd.DataFrame({"feeder_id": "F1", "phase": "A", "timestamp": TIMES, "voltage_v": 7200.0})
    S.initialize_store(path, m, TIMES, interval_s=900, transformers=tr, references=ref,
                       variables=("voltage", "kw", "kvar"), time_chunk=4)
    return path


def _cf_problems(ds) -> list[str]:
    """Variables and coordinates of ``ds`` without a non-empty ``units`` (attrs, or for decoded times the
    encoding) or ``long_name``."""
    bad = []
    for name, var in ds.variables.items():
        units = var.attrs.get("units", var.encoding.get("units"))
        if not units or not var.attrs.get("long_name"):
            bad.append(f"{name}: units={units!r} long_name={var.attrs.get('long_name')!r}")
    return bad


def test_every_variable_and_coordinate_has_cf_units_and_long_name(tmp_path):
    import xarray as xr

    path = _full_store(tmp_path / "s.zarr")
    ds = xr.open_zarr(path, consolidated=False)
    assert set(ds.variables) == set(S.CF_ATTRIBUTES)  # the table covers the whole schema, and only it
    assert _cf_problems(ds) == []
    assert ds["voltage"].attrs["units"] == "V" and ds["kva_rating"].attrs["units"] == "kVA"
    assert ds["lat"].attrs["units"] == "degrees_north" and ds["lon"].attrs["standard_name"] == "longitude"
    assert ds["time"].encoding["units"].startswith("seconds since 1970-01-01")
    assert _cf_problems(S.open_store(path)) == []  # the package's own reader keeps them too


def test_cf_attributes_survive_an_xarray_round_trip_and_an_ingest(tmp_path):
    import xarray as xr

    from phaseid_hpc.ingest import ingest_frame

    path = _full_store(tmp_path / "s.zarr")
    reads = pd.DataFrame({"meter_id": ["m1", "m2"], "timestamp": [TIMES[-1].tz_localize(None)
                                                                  + pd.Timedelta(minutes=15)] * 2,
                          "voltage_v": [241.0, 239.5], "kw": [1.0, 2.0]})
    ingest_frame(path, reads)  # appends a time step: arrays resized, attributes kept
    ds = xr.open_zarr(path, consolidated=False)
    assert ds.sizes["time"] == len(TIMES) + 1 and _cf_problems(ds) == []
    copy = tmp_path / "copy.zarr"
    ds.to_zarr(copy, zarr_format=3, consolidated=False)
    back = xr.open_zarr(copy, consolidated=False)
    assert _cf_problems(back) == []
    for name in ds.variables:
        assert back[name].attrs.get("units") == ds[name].attrs.get("units"), name
        assert back[name].attrs["long_name"] == ds[name].attrs["long_name"], name
