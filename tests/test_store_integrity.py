"""The store never loses or silently corrupts a reading (issue 11): concurrent writers, whole-ingest
transactions, kill -9, input validation, chunk checksums. Tests of phaseid_hpc/store.py and ingest.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from phaseid_hpc import ingest as I
from phaseid_hpc import store as S
from phaseid_hpc.cli import main as cli_main
from phaseid_hpc.config import IngestConfig
from phaseid_hpc.errors import ContractError, DataError, StoreError
from phaseid_hpc.ingest import ingest_files, ingest_frame
from tests.test_ingest import meters_table, readings_table

REPO = Path(__file__).resolve().parents[1]


def _cells(store: Path) -> dict[tuple[str, pd.Timestamp], float]:
    """Every non-missing voltage cell of a store, keyed by (meter, time)."""
    ds = S.open_store(store, block_bytes=None)
    v = ds["voltage"].values
    m, t = np.nonzero(~np.isnan(v))
    meters, times = ds["meter"].values, pd.DatetimeIndex(ds["time"].values)
    return {(str(meters[i]), times[j]): float(v[i, j]) for i, j in zip(m, t)}


def _expected(*frames: pd.DataFrame) -> dict[tuple[str, pd.Timestamp], float]:
    df = pd.concat(frames)
    ts = pd.DatetimeIndex(pd.to_datetime(df["timestamp"], utc=True)).tz_localize(None)
    return {(m, t): float(np.float32(v)) for m, t, v in zip(df["meter_id"], ts, df["voltage_v"])}


def _snapshot(path: Path) -> dict[str, bytes]:
    """Bytes of every file of a store except bookkeeping that does not change its content."""
    out = {}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        if p.is_file() and not rel.startswith("_phaseid/done-") and rel != "_phaseid/lock":
            out[rel] = p.read_bytes()
    return out


def _shifted(n_t: int, start: int, seed: int) -> pd.DataFrame:
    df = readings_table(n_t=n_t, seed=seed)
    df["timestamp"] = df["timestamp"] + pd.Timedelta(minutes=15 * start)
    return df


@pytest.fixture
def base(tmp_path):
    """A store made from 16 steps of readings, and the meters file."""
    meters = tmp_path / "meters.csv"
    meters_table().to_csv(meters, index=False)
    first = readings_table()
    first.to_parquet(tmp_path / "a.parquet")
    store = tmp_path / "s.zarr"
    ingest_files(tmp_path / "a.parquet", meters, store)
    return store, meters, first


# ------------------------------------------------------------------------------------- concurrent writers
def test_writers_take_the_lock_before_reading_the_store(base, tmp_path):
    """Two ingests started while a third writer holds the lock wait, then both land: nothing lost."""
    store, meters, first = base
    frames = [_shifted(16, 16, 1), _shifted(16, 32, 2)]
    for i, f in enumerate(frames):
        f.to_parquet(tmp_path / f"b{i}.parquet")
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            ingest_files(tmp_path / f"b{i}.parquet", meters, store)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    with S._store_lock(store):
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        assert all(t.is_alive() for t in threads)  # both wait for the lock holder
    for t in threads:
        t.join(60)
    assert not errors
    assert _cells(store) == _expected(first, *frames)
    assert S.validate_store(store, deep=True) == []


def test_a_writer_that_cannot_wait_names_the_holder(base):
    store, _, first = base
    holder = rf"locked by another writer \(pid {os.getpid()} on .*waited 0.2 s"
    with S._store_lock(store), pytest.raises(StoreError, match=holder):
        ingest_frame(store, first, lock_timeout_s=0.2)


def test_lock_file_mode_does_not_follow_the_umask(base):
    store, _, first = base
    (store / "_phaseid" / "lock").unlink()
    old = os.umask(0)
    try:
        ingest_frame(store, first)
    finally:
        os.umask(old)
    assert (store / "_phaseid" / "lock").stat().st_mode & 0o777 == 0o644


_INGEST = textwrap.dedent(
    """
    import sys
    from phaseid_hpc.cli import main
    sys.exit(main(["ingest", "--readings", sys.argv[1], "--meters", sys.argv[2], "--store", sys.argv[3]]))
    """
)


def test_two_processes_creating_one_store_both_land(tmp_path):
    meters = tmp_path / "meters.csv"
    meters_table().to_csv(meters, index=False)
    frames = [readings_table(seed=1), _shifted(16, 8, 2)]
    for i, f in enumerate(frames):
        f.to_parquet(tmp_path / f"r{i}.parquet")
    store = tmp_path / "s.zarr"
    procs = [
        subprocess.Popen([sys.executable, "-c", _INGEST, str(tmp_path / f"r{i}.parquet"), str(meters), str(store)],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    codes = [p.returncode for p in procs]
    got = _cells(store)
    if codes == [0, 0]:
        want = _expected(*frames)
    else:
        # the later file's ingest created the store first: the earlier file cannot be prepended, and its
        # ingest fails with a message saying so (exit 2), writing nothing; nothing of the other is lost
        assert sorted(codes) == [0, 2], outs
        failed = codes.index(2)
        assert "was created by another ingest while this one waited" in outs[failed][1]
        want = _expected(frames[1 - failed])
        assert not any(k in got and got[k] != v for k, v in _expected(frames[failed]).items() if k not in want)
    # the two files overlap on 8 steps with different values: each cell holds one of them, none is lost
    assert set(got) == set(want)
    second = _expected(frames[1])
    assert all(got[k] == want[k] or got[k] == second.get(k) or got[k] == _expected(frames[0]).get(k) for k in got)


# ------------------------------------------------------------------------------------- one transaction
def test_a_failing_second_file_leaves_the_store_unchanged(base, tmp_path):
    store, meters, _ = base
    before = _snapshot(store)
    _shifted(16, 16, 3).to_parquet(tmp_path / "good.parquet")
    data = (tmp_path / "good.parquet").read_bytes()
    (tmp_path / "truncated.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"truncated\.parquet.*not a readable Parquet file"):
        ingest_files([tmp_path / "good.parquet", tmp_path / "truncated.parquet"], meters, store)
    assert _snapshot(store) == before


def test_multi_batch_multi_file_ingest_is_one_transaction(base, tmp_path, monkeypatch):
    """A crash after the first file (batches of 20 rows) leaves the old store; a rerun converges."""
    store, meters, first = base
    frames = [_shifted(16, 16, 4), _shifted(16, 32, 5)]
    paths = []
    for i, f in enumerate(frames):
        paths.append(tmp_path / f"m{i}.parquet")
        f.to_parquet(paths[-1])
    before = _snapshot(store)

    def crash(step, detail):
        if step == "file":
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(I, "_FAULT_HOOK", crash)
    with pytest.raises(KeyboardInterrupt):
        ingest_files(paths, meters, store, config=IngestConfig(batch_rows=20))
    assert _snapshot(store) == before and not list((store / "_phaseid").glob("txn-*"))
    monkeypatch.setattr(I, "_FAULT_HOOK", None)
    r = ingest_files(paths, meters, store, config=IngestConfig(batch_rows=20))
    assert r.rows_read == sum(map(len, frames))
    assert _cells(store) == _expected(first, *frames)


_KILLED_CREATION = textwrap.dedent(
    """
    import os, signal, sys
    from phaseid_hpc import ingest as I
    def hook(step, detail):
        if step == sys.argv[4]:
            os.kill(os.getpid(), signal.SIGKILL)
    I._FAULT_HOOK = hook
    I.ingest_files(sys.argv[1], sys.argv[2], sys.argv[3])
    """
)


@pytest.mark.parametrize("step", ["file", "create"])
def test_kill_9_during_creation_leaves_no_store_and_the_next_writer_cleans_up(tmp_path, step):
    meters = tmp_path / "meters.csv"
    meters_table().to_csv(meters, index=False)
    first = readings_table()
    first.to_parquet(tmp_path / "a.parquet")
    store = tmp_path / "s.zarr"
    p = subprocess.run([sys.executable, "-c", _KILLED_CREATION, str(tmp_path / "a.parquet"), str(meters), str(store),
                        step], cwd=REPO, capture_output=True, timeout=120, check=False)
    assert p.returncode == -signal.SIGKILL
    assert not store.exists()
    leftovers = list(tmp_path.glob("s.zarr.init-*"))
    assert leftovers and any("killed store creation" in q for q in S.validate_store(store))
    ingest_files(tmp_path / "a.parquet", meters, store)
    assert not list(tmp_path.glob("s.zarr.init-*"))
    assert _cells(store) == _expected(first)
    assert S.validate_store(store, deep=True) == []


# ------------------------------------------------------------------------------------- input validation
def test_boolean_voltage_column_is_refused_before_any_write(base, tmp_path):
    store, meters, first = base
    before = _snapshot(store)
    bad = first.assign(voltage_v=True)
    bad.to_parquet(tmp_path / "bool.parquet")
    with pytest.raises(DataError, match=r"bool\.parquet.*'voltage_v' is of type bool"):
        ingest_files(tmp_path / "bool.parquet", meters, store)
    with pytest.raises(DataError, match="'voltage_v' holds booleans"):
        ingest_frame(store, bad)
    assert _snapshot(store) == before
    # JSON-like objects: a True among numbers is not 1.0 V
    mixed = first.head(3).assign(voltage_v=pd.Series([True, 230.0, "x"], dtype=object))
    r = ingest_frame(store, mixed)
    assert r.quarantined == {"invalid_value": 2} and r.rows_written == 1
    assert _cells(store) == _expected(first, mixed.iloc[[1]])


@pytest.mark.parametrize("stamp", ["2610-03-07T00:15:00Z", "9999-12-31T23:45:00Z", "1677-09-21T00:15:00Z"])
def test_far_timestamps_are_refused_never_wrapped(base, stamp):
    store, _, first = base
    before = _cells(store)
    row = first.head(1).assign(timestamp=stamp, voltage_v=111.0)
    r = ingest_frame(store, row, config=IngestConfig(snap_tolerance_s=1))
    assert r.quarantined == {"invalid_timestamp": 1}
    # the same, as a datetime64[us] column (Parquet): the wrap-around happened in the unit conversion
    row_us = row.assign(timestamp=pd.Series(pd.to_datetime([stamp], utc=True)).dt.tz_localize(None).astype(
        "datetime64[us]"))
    r = ingest_frame(store, row_us, config=IngestConfig(snap_tolerance_s=1))
    assert r.quarantined == {"invalid_timestamp": 1}
    assert _cells(store) == before


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.csv", b"", "is empty"),
        ("header.csv", b"meter_id,timestamp,voltage_v\n", "holds no readings"),
        ("garbage.csv", bytes(range(256)) * 8, "not a readable CSV file"),
        ("garbage.parquet", b"PAR1" + os.urandom(300), "not a readable Parquet file"),
        ("nocols.csv", b"a,b\n1,2\n", "missing required column"),
    ],
)
def test_bad_files_give_one_line_and_exit_code_2(base, tmp_path, capsys, name, content, message):
    store, meters, _ = base
    before = _snapshot(store)
    bad = tmp_path / name
    bad.write_bytes(content)
    code = cli_main(["ingest", "--readings", str(bad), "--meters", str(meters), "--store", str(store)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and name in err and err.count("\n") == 1 and "Traceback" not in err
    assert _snapshot(store) == before
    # a new store: nothing created either
    code = cli_main(["ingest", "--readings", str(bad), "--meters", str(meters), "--store", str(tmp_path / "n.zarr")])
    assert code == 2 and not (tmp_path / "n.zarr").exists()


def test_a_bare_zarr_group_is_not_a_store(tmp_path, capsys, base):
    _, meters, _ = base
    zarr.open_group(str(tmp_path / "bare.zarr"), mode="w")
    readings_table().to_parquet(tmp_path / "r.parquet")
    code = cli_main(["ingest", "--readings", str(tmp_path / "r.parquet"), "--meters", str(meters),
                     "--store", str(tmp_path / "bare.zarr")])
    err = capsys.readouterr().err
    assert code == 2 and "not a phaseid store" in err and err.count("\n") == 1
    with pytest.raises(ContractError):
        ingest_frame(tmp_path / "bare.zarr", readings_table().drop(columns="voltage_v"))


# ------------------------------------------------------------------------------------- checksums
def _damage(f: Path, how: str, rng: np.random.Generator) -> None:
    data = bytearray(f.read_bytes())
    if how == "deleted":
        f.unlink()
    elif how == "truncated":
        f.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "flipped":
        i = int(rng.integers(len(data)))
        data[i] ^= 1 << int(rng.integers(8))
        f.write_bytes(bytes(data))
    else:
        f.write_bytes(os.urandom(len(data)))


@pytest.mark.parametrize("how", ["deleted", "truncated", "flipped", "garbage"])
def test_a_damaged_chunk_is_named_by_deep_validation_reads_and_writes(base, how):
    store, _, first = base
    rng = np.random.default_rng(len(how))
    chunk = next(c for c in sorted((store / "voltage" / "c").rglob("*")) if c.is_file())
    rel = chunk.relative_to(store).as_posix()
    assert S.validate_store(store, deep=True) == []
    _damage(chunk, how, rng)
    problems = S.validate_store(store, deep=True)
    assert len(problems) == 1 and rel in problems[0], problems
    assert S.validate_store(store) == []  # the quick check does not read chunks
    with pytest.raises(StoreError, match=rf"{rel} is (missing|corrupt)") as info:
        S.read_meter_block(store, 0, 5)
    assert "\n" not in str(info.value)
    with pytest.raises(StoreError, match=rf"{rel} is (missing|corrupt)"):
        ingest_frame(store, first)  # never merged into and overwritten


def test_validate_store_deep_from_the_command_line(base, capsys):
    store, _, _ = base
    assert cli_main(["validate-store", "--store", str(store), "--deep"]) == 0
    f = next(p for p in (store / "kw" / "c").rglob("*") if p.is_file())
    f.write_bytes(f.read_bytes()[:-1] + bytes([f.read_bytes()[-1] ^ 0xFF]))
    assert cli_main(["validate-store", "--store", str(store), "--deep"]) == 1
    assert f.relative_to(store).as_posix() in capsys.readouterr().out


def test_every_chunk_exists_after_the_time_axis_grows(base):
    """Growth by an ingest stages fill chunks for new chunk columns, so a store stays complete."""
    store, _, _ = base
    far = _shifted(4, 3000, 7)  # past the first 2976-step chunk column
    ingest_frame(store, far)
    arr = zarr.open_group(str(store), mode="r")["voltage"]
    assert arr.cdata_shape[1] == 2
    assert S.validate_store(store, deep=True) == []
    assert S.read_meter_block(store, 0, 5)["voltage"].shape == (5, arr.shape[1])


def test_read_meter_block_reads_the_last_intervals_only(base):
    """``last=``: the record's most recent intervals, across chunk columns, and all of it when longer."""
    store, _, _ = base
    ingest_frame(store, _shifted(4, 3000, 7))  # two chunk columns along time
    full = S.read_meter_block(store, 0, 5)
    for last in (1, 30, full["voltage"].shape[1], full["voltage"].shape[1] + 100):
        got = S.read_meter_block(store, 0, 5, last=last)
        for name, values in full.items():
            np.testing.assert_array_equal(got[name], values[:, -last:])


def test_run_fails_with_one_line_naming_the_damaged_chunk(base, tmp_path, capsys):
    store, _, _ = base
    f = store / "voltage" / "c" / "0" / "0"
    data = bytearray(f.read_bytes())
    data[10] ^= 1
    f.write_bytes(bytes(data))
    code = cli_main(["run", "--store", str(store), "--results", str(tmp_path / "r"), "--workers", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "chunk voltage/c/0/0 is corrupt" in err
