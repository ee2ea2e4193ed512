"""Trials of issue 11: concurrent ingests, kill -9 at random moments, damaged chunks.

Uses a synthetic export (``phaseid synth``) split by time into three parts: ``day0`` builds the store;
``day1`` and ``day2`` are the "different data" of later ingests (both extend the time axis).

* ``concurrent``: two ``phaseid ingest`` processes (``day1``, ``day2``) started together into one store;
  counts the readings lost (expected voltage cells that are missing or hold another value).
* ``kill``: a multi-file, multi-batch ingest (``day1`` + ``day2``, ``batch_rows`` 5000) into an existing
  store, or a store creation from all three parts, killed with SIGKILL after a random delay; the store must
  equal the old or the new one exactly (every voltage and kw cell, the time axis), and a rerun of the same
  command must give the new one.
* ``corrupt``: a random chunk file of a copy of the store deleted, truncated or with one bit flipped;
  ``validate_store(deep=True)`` must name it.

Usage::

    .venv/bin/python benchmarks/store_integrity_trials.py [--concurrent 20] [--kill 100] [--corrupt 10]
        [--meters 300] [--days 3] [--seed 1]

Measured with the defaults (shared 2-core machine, about 20 minutes): concurrent: 20 trials, 0 failed
commands, 0 of 85,499 readings lost; corrupt: 10 of 10 damaged chunks named; kill: 100 trials (50
extensions, 50 creations; delays 0.3 s to the command's duration + 0.3 s), 84 left the old store, 16 the
new one, 0 anything else, and 100 of 100 reruns converged to the new store with no ``*.init-*`` leftover.
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def phaseid(*args: str, env_batch: int | None = None) -> subprocess.Popen:
    env = None
    if env_batch is not None:
        import os

        env = dict(os.environ, PHASEID__INGEST__BATCH_ROWS=str(env_batch))
    return subprocess.Popen([PY, "-m", "phaseid_hpc.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def content(store: Path) -> tuple:
    """(time axis, voltage, kw) of a store, read straight from Zarr (None: no store)."""
    if not (store / "zarr.json").is_file():
        return None
    g = zarr.open_group(str(store), mode="r", use_consolidated=False)
    return tuple(np.asarray(g[name][:]) for name in ("time", "voltage", "kw") if name in g)


def same(a: tuple | None, b: tuple | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return len(a) == len(b) and all(x.shape == y.shape and np.array_equal(x, y, equal_nan=x.dtype.kind == "f")
                                    for x, y in zip(a, b))


def ingest(store: Path, files: list[Path], meters: Path, batch: int | None = None, extra: tuple = ()) -> subprocess.Popen:
    return phaseid("ingest", "--readings", *map(str, files), "--meters", str(meters), "--store", str(store),
                   *extra, env_batch=batch)


def setup(tmp: Path, n_meters: int, days: int, seed: int) -> tuple[Path, list[Path]]:
    subprocess.run([PY, "-m", "phaseid_hpc.cli", "synth", "--n-meters", str(n_meters), "--days", str(days),
                    "--seed", str(seed), "--out", str(tmp / "export")], cwd=ROOT, check=True, capture_output=True)
    df = pd.read_parquet(tmp / "export" / "readings.parquet")
    ts = pd.to_datetime(df["timestamp"], utc=True)
    edges = np.quantile(ts.astype("int64"), [1 / 3, 2 / 3])
    parts = []
    for i, mask in enumerate([ts.astype("int64") <= edges[0],
                              (ts.astype("int64") > edges[0]) & (ts.astype("int64") <= edges[1]),
                              ts.astype("int64") > edges[1]]):
        parts.append(tmp / f"day{i}.parquet")
        df[mask.to_numpy()].to_parquet(parts[-1])
    return tmp / "export" / "meters.csv", parts


def lost_readings(got: tuple, ref: tuple) -> int:
    """Voltage cells of the reference store (sequential ingests) that ``got`` lacks or holds otherwise."""
    t_ref, v_ref = ref[0], ref[1]
    t_got, v_got = got[0], got[1]
    col = pd.Index(t_got).get_indexer(t_ref)
    have = ~np.isnan(v_ref)
    found = np.full(v_ref.shape, np.nan, v_ref.dtype)
    found[:, col >= 0] = v_got[:, col[col >= 0]]
    return int((have & ~(found == v_ref)).sum())


def trial_concurrent(tmp: Path, meters: Path, parts: list[Path], base: Path, ref: tuple, n: int) -> None:
    total_lost, failures = 0, 0
    want = int((~np.isnan(ref[1])).sum())
    for i in range(n):
        store = tmp / f"conc{i}.zarr"
        shutil.copytree(base, store)
        procs = [ingest(store, [parts[1]], meters), ingest(store, [parts[2]], meters)]
        codes = [p.wait(300) for p in procs]
        failures += sum(c != 0 for c in codes)
        lost = lost_readings(content(store), ref)
        total_lost += lost
        print(f"concurrent {i}: exit codes {codes}, lost readings {lost} of {want}", flush=True)
        shutil.rmtree(store)
    print(f"CONCURRENT: {n} trials, {failures} failed commands, {total_lost} lost readings")


def trial_kill(tmp: Path, meters: Path, parts: list[Path], base: Path, ref_ext: Path, t_ext: float, n: int,
               rng: random.Random) -> None:
    # reference result of a creation from all parts
    ref_new = tmp / "ref_new.zarr"
    t0 = time.perf_counter()
    assert ingest(ref_new, parts, meters, batch=5000).wait(300) == 0
    t_new = time.perf_counter() - t0
    old_ext, new_ext, new_new = content(base), content(ref_ext), content(ref_new)
    outcomes = {"old": 0, "new": 0, "other": 0}
    converged = 0
    for i in range(n):
        creation = i % 2 == 1
        store = tmp / f"kill{i}.zarr"
        if not creation:
            shutil.copytree(base, store)
        files = parts if creation else parts[1:]
        delay = rng.uniform(0.3, (t_new if creation else t_ext) + 0.3)
        p = ingest(store, files, meters, batch=5000)
        time.sleep(delay)
        p.kill()
        p.wait()
        got = content(store)
        old, new = (None, new_new) if creation else (old_ext, new_ext)
        kind = "old" if same(got, old) else "new" if same(got, new) else "other"
        outcomes[kind] += 1
        rc = ingest(store, files, meters, batch=5000).wait(300)
        ok = rc == 0 and same(content(store), new) and not list(tmp.glob(f"kill{i}.zarr.init-*"))
        converged += ok
        print(f"kill {i}: {'creation' if creation else 'extension'} killed after {delay:.2f} s -> {kind} store; "
              f"rerun {'converged' if ok else 'DID NOT converge'}", flush=True)
        shutil.rmtree(store, ignore_errors=True)
    print(f"KILL: {n} trials: {outcomes}; reruns converged {converged}/{n}")


def trial_corrupt(tmp: Path, base: Path, n: int, rng: random.Random) -> None:
    from phaseid_hpc.store import validate_store

    detected = 0
    for i in range(n):
        store = tmp / f"corrupt{i}.zarr"
        shutil.copytree(base, store)
        chunks = sorted(p for v in ("voltage", "kw") for p in (store / v / "c").rglob("*") if p.is_file())
        f = rng.choice(chunks)
        how = ["deleted", "truncated", "flipped"][i % 3]
        data = bytearray(f.read_bytes())
        if how == "deleted":
            f.unlink()
        elif how == "truncated":
            f.write_bytes(bytes(data[: rng.randrange(len(data))]))
        else:
            k = rng.randrange(len(data))
            data[k] ^= 1 << rng.randrange(8)
            f.write_bytes(bytes(data))
        rel = f.relative_to(store).as_posix()
        problems = validate_store(store, deep=True)
        named = any(rel in p for p in problems)
        detected += named
        print(f"corrupt {i}: {how} {rel}: {'named' if named else 'NOT DETECTED'} {problems[:1]}", flush=True)
        shutil.rmtree(store)
    print(f"CORRUPT: {n} trials, {detected} detected and named")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrent", type=int, default=20)
    ap.add_argument("--kill", type=int, default=100)
    ap.add_argument("--corrupt", type=int, default=10)
    ap.add_argument("--meters", type=int, default=300)
    ap.add_argument("--days", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        meters, parts = setup(tmp, args.meters, args.days, args.seed)
        base = tmp / "base.zarr"
        assert ingest(base, [parts[0]], meters).wait(300) == 0
        # the reference: the two later parts ingested one after the other, in one command
        ref_ext = tmp / "ref_ext.zarr"
        shutil.copytree(base, ref_ext)
        t0 = time.perf_counter()
        assert ingest(ref_ext, parts[1:], meters, batch=5000).wait(300) == 0
        t_ext = time.perf_counter() - t0
        if args.concurrent:
            trial_concurrent(tmp, meters, parts, base, content(ref_ext), args.concurrent)
        if args.corrupt:
            trial_corrupt(tmp, base, args.corrupt, rng)
        if args.kill:
            trial_kill(tmp, meters, parts, base, ref_ext, t_ext, args.kill, rng)
    return 0


if __name__ == "__main__":
    sys.exit(main())
