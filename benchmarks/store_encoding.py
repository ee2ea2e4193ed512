"""Voltage encoding in the store: float32 + NaN versus int16 deci-volts (CF scale_factor 0.1, fill -32768).

For each data set and encoding the script builds a store with :func:`phaseid_hpc.store.initialize_store`
and :func:`~phaseid_hpc.store.write_meter_block` and prints the size of the ``voltage`` array [MB], the
write time and the median time of ``N`` full reads through :func:`~phaseid_hpc.store.open_store` [s].

Data sets (``../shared/data/epri-ckt5`` readings; skipped with a message where absent):

* ``ckt5-raw``: simulated voltage at full precision (float32 only: int16 would round it);
* ``ckt5-0.1V``: the same rounded to 0.1 V (what a meter with 0.1 V resolution reports);
* ``synth-like``: ckt5 x (1 + N(0, 0.07%)) rounded to 0.1 V with 2% of samples missing (seeded).

Usage::

    .venv/bin/python benchmarks/store_encoding.py [--repeats 5] [--meters 1379] [--ingest-batches 5]

It also measures :func:`phaseid_hpc.ingest.ingest_frame` throughput for batches of 100k reads.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import zarr

from phaseid_hpc import store as S

CKT5 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "epri-ckt5"

CODECS = {
    "zstd": lambda dtype: (zarr.codecs.ZstdCodec(level=5),),
    "blosc-zstd-shuffle": S._compressors,
}


def load_ckt5(n_meters: int) -> tuple[pd.DataFrame, pd.DatetimeIndex, np.ndarray]:
    meters = S.sort_meters(pd.read_csv(CKT5 / "meters.csv"))
    meters = meters.iloc[:n_meters]
    t = pq.read_table(CKT5 / "readings.parquet", columns=["meter_id", "timestamp", "voltage_v"]).to_pandas()
    t = t[t["meter_id"].isin(meters["meter_id"])]
    times = pd.DatetimeIndex(np.sort(t["timestamp"].unique()))
    wide = np.full((len(meters), len(times)), np.nan, np.float32)
    row = pd.Index(meters["meter_id"]).get_indexer(t["meter_id"])
    col = times.get_indexer(pd.DatetimeIndex(t["timestamp"]))
    wide[row, col] = t["voltage_v"].to_numpy(np.float32)
    return meters, times, wide


def measure(name: str, meters, times, values, encoding: str, codec: str, repeats: int, tmp: Path) -> dict:
    path = tmp / f"{name}-{encoding}-{codec}"
    original = S._compressors
    S._compressors = CODECS[codec]
    try:
        t0 = time.perf_counter()
        S.initialize_store(
            path,
            meters,
            times,
            interval_s=900,
            variables=("voltage",),
            voltage_encoding=encoding,
            time_chunk=2976,
            overwrite=True,
        )
        S.write_meter_block(path, 0, len(meters), {"voltage": values})
        t_write = time.perf_counter() - t0
    finally:
        S._compressors = original
    size = sum(p.stat().st_size for p in (path / "voltage").rglob("*") if p.is_file()) / 1e6
    reads = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        v = S.open_store(path).voltage.values
        reads.append(time.perf_counter() - t0)
    err = float(np.nanmax(np.abs(v - values))) if np.isfinite(values).any() else float("nan")
    shutil.rmtree(path)
    return {
        "data": name,
        "encoding": encoding,
        "codec": codec,
        "size_MB": round(size, 2),
        "write_s": round(t_write, 3),
        "read_median_s": round(statistics.median(reads), 3),
        "max_abs_err_V": round(err, 4),
    }


def measure_ingest(meters, times, encoding: str, batch: int, n_batches: int, tmp: Path) -> list[dict]:
    """ingest_frame throughput [reads/s] for time-ordered batches (as a broker delivers them)."""
    from phaseid_hpc.config import IngestConfig
    from phaseid_hpc.ingest import ingest_frame

    t = pq.read_table(CKT5 / "readings.parquet").to_pandas()
    t = t[t["meter_id"].isin(meters["meter_id"])].sort_values(["timestamp", "meter_id"], kind="stable")
    path = tmp / f"ingest-{encoding}"
    S.initialize_store(
        path,
        meters,
        times,
        interval_s=900,
        variables=("voltage", "kw"),
        voltage_encoding=encoding,
        overwrite=True,
    )
    cfg = IngestConfig(voltage_encoding=encoding)
    rows = []
    for label in ("new reads", "re-ingest (unchanged)"):
        rates = []
        for i in range(n_batches):
            df = t.iloc[i * batch : (i + 1) * batch]
            r = ingest_frame(path, df, config=cfg, source=f"bench{i}")
            rates.append(r.reads_per_s)
        rows.append(
            {
                "encoding": encoding,
                "batch_rows": batch,
                "batches": n_batches,
                "case": label,
                "median_reads_per_s": round(statistics.median(rates)),
                "min_reads_per_s": round(min(rates)),
            }
        )
    shutil.rmtree(path)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--meters", type=int, default=1379)
    ap.add_argument(
        "--ingest-batches", type=int, default=5, help="ingest_frame batches of 100k reads (0: skip)"
    )
    args = ap.parse_args()
    if not CKT5.is_dir():
        print(f"skipped: {CKT5} is absent (the benchmark needs ../shared/data/epri-ckt5)")
        return
    meters, times, raw = load_ckt5(args.meters)
    rng = np.random.default_rng(0)
    rounded = np.round(raw.astype(np.float64), 1).astype(np.float32)
    noisy = raw * (1 + rng.normal(0, 0.0007, raw.shape))
    noisy = np.round(noisy, 1).astype(np.float32)
    noisy[rng.random(raw.shape) < 0.02] = np.nan
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name, values, encodings in [
            ("ckt5-raw", raw, ["float32"]),
            ("ckt5-0.1V", rounded, ["float32", "int16_decivolt"]),
            ("synth-like", noisy, ["float32", "int16_decivolt"]),
        ]:
            for enc in encodings:
                for codec in CODECS:
                    rows.append(measure(name, meters, times, values, enc, codec, args.repeats, tmp))
    table = pd.DataFrame(rows)
    print(
        f"{len(meters)} meters x {len(times)} steps ({raw.nbytes / 1e6:.1f} MB as float32), "
        f"median of {args.repeats} full reads via open_store"
    )
    print(table.to_string(index=False))
    if args.ingest_batches:
        with tempfile.TemporaryDirectory() as d:
            rows = []
            for enc in ("float32", "int16_decivolt"):
                rows += measure_ingest(meters, times, enc, 100_000, args.ingest_batches, Path(d))
        print(
            "\ningest_frame throughput, time-ordered batches of ckt5 reads (meter_id, timestamp, voltage_v, kw)"
        )
        print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
