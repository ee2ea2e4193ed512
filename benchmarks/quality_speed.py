"""CPU time of assess_quality per meter on one realistic block of a store (as process_block calls it).

Usage: OPENBLAS_NUM_THREADS=1 python benchmarks/quality_speed.py [store] [--save out.pkl] [--compare ref.pkl]
"""

from __future__ import annotations

import argparse
import cProfile
import pickle
import pstats
import time

import numpy as np


def main() -> None:
    from phaseid_hpc.config import QualityConfig
    from phaseid_hpc.pipeline import StoreTables
    from phaseid_hpc.quality import assess_quality
    from phaseid_hpc.store import feeder_blocks, open_store, read_meter_block

    ap = argparse.ArgumentParser()
    ap.add_argument("store", nargs="?", default="/work/bench/store-100000.zarr")
    ap.add_argument("--block-bytes", type=float, default=100e6)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--save")
    ap.add_argument("--compare")
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    ds = open_store(a.store)
    tables = StoreTables.from_dataset(ds)
    b = feeder_blocks(ds, a.block_bytes)[0]
    t = tables.block(b.start, b.stop)
    arrays = read_meter_block(a.store, b.start, b.stop)
    voltage = arrays["voltage"].astype(np.float64)
    m = t.meters

    def run():
        return assess_quality(
            voltage,
            m["nominal_v"].to_numpy(dtype=np.float64),
            m["sampling_interval_s"].to_numpy(dtype=np.float64),
            m["off_grid_fraction"].to_numpy(dtype=np.float64),
            t.interval_s,
            QualityConfig(),
            meter_ids=m["meter_id"].to_numpy(),
            feeder_ids=m["feeder_id"].to_numpy(),
            references=t.references,
        )

    q = run()
    ts = []
    for _ in range(a.repeat):
        t0 = time.process_time()
        q = run()
        ts.append(time.process_time() - t0)
    n = voltage.shape[0]
    med = float(np.median(ts))
    print(f"block {voltage.shape}: median {med:.3f} CPU-s, {med / n * 1e6:.1f} CPU-us per meter ({ts})")
    if a.profile:
        pr = cProfile.Profile()
        pr.enable()
        run()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)
    if a.save:
        with open(a.save, "wb") as f:
            pickle.dump((q.table, np.asarray(q.voltage)), f)
    if a.compare:
        with open(a.compare, "rb") as f:
            tab, vol = pickle.load(f)
        ok = True
        for c in tab.columns:
            x, y = tab[c].to_numpy(), q.table[c].to_numpy()
            if x.dtype.kind == "f":
                same = np.array_equal(x, y, equal_nan=True)
                rel = np.nanmax(np.abs(x - y) / np.maximum(np.abs(x), 1e-300)) if not same else 0.0
                print(f"  {c}: {'bit-identical' if same else f'max rel diff {rel:.3g}'}")
                ok &= bool(same or rel <= 1e-6) and np.array_equal(np.isnan(x), np.isnan(y))
            else:
                same = list(x) == list(y)
                print(f"  {c}: {'identical' if same else 'DIFFERENT'}")
                ok &= same
        vs = np.array_equal(vol, np.asarray(q.voltage), equal_nan=True)
        dv = "bit-identical" if vs else f"max abs diff {np.nanmax(np.abs(vol - np.asarray(q.voltage))):.3g}"
        print(f"  voltage: {dv}")
        print("MATCH" if ok else "MISMATCH")


if __name__ == "__main__":
    main()
