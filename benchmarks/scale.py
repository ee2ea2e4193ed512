"""End-to-end scale benchmark: `phaseid run` wall time and peak memory vs utility size.

For each size, a synthetic utility of N meters x D days at 15 minutes is written straight into a store (no
readings export), then the job runs on a LocalCluster of this machine's cores. Reported per size: wall time,
time per meter, peak resident memory of the client and of the workers (sampled), and the share of summed
block time spent reading (I/O) and in each stage; the rest of the wall time (wall x workers - summed block
time) is scheduling and idle.

Beside each figure, the floor it is measured against (``floor_s``): reading and decoding the store once
(its rate measured here on the first ~20,000 meters, one thread, page cache warm: the decoding floor) plus the one product any correlation
method needs, each feeder's meters against each other (``2 n_f^2 (n_time - 1)`` FLOPs per feeder, at the
GEMM rate measured here on one thread), both spread over the workers. ``x_floor`` is run wall / floor.

Usage::

    python benchmarks/scale.py --sizes 10000 100000 --days 30 [--workers 2] [--keep DIR]
    PHASEID__PHASE__LOAD_NEIGHBOURS=0 python benchmarks/scale.py ...   # run config overrides apply
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil


def _sample_peak(stop: threading.Event, peak: dict) -> None:
    me = psutil.Process()
    while not stop.is_set():
        rss = me.memory_info().rss
        kids = 0
        for c in me.children(recursive=True):
            try:
                kids += c.memory_info().rss
            except psutil.Error:
                pass
        peak["client"] = max(peak.get("client", 0), rss)
        peak["total"] = max(peak.get("total", 0), rss + kids)
        time.sleep(0.2)


def floor_s(store: Path, n_workers: int, sample_meters: int = 20_000) -> dict:
    """The run's floor on this machine: read + within-feeder Gram products, spread over ``n_workers``. [s]"""
    import numpy as np
    from threadpoolctl import threadpool_limits

    from phaseid_hpc.store import open_store, read_meter_block

    ds = open_store(store, block_bytes=None, recover=False)
    feeders = ds["feeder_id"].to_numpy().astype(str)
    n, n_t = ds.sizes["meter"], ds.sizes["time"]
    stop = min(n, sample_meters)
    read_rate = 0.0
    for _ in range(2):  # the second read finds the sample in the page cache: the decoding floor
        t0 = time.perf_counter()
        read_meter_block(store, 0, stop)
        read_rate = max(read_rate, stop / (time.perf_counter() - t0))  # meters per second, one thread
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2000, n_t - 1))
    with threadpool_limits(limits=1, user_api="blas"):
        a @ a.T
        t0 = time.perf_counter()
        a @ a.T
        gemm_rate = 2 * 2000**2 * (n_t - 1) / (time.perf_counter() - t0)  # FLOP/s, one thread
    _, sizes = np.unique(feeders, return_counts=True)
    flops = float(np.sum(2.0 * sizes.astype(np.float64) ** 2 * (n_t - 1)))
    read_s, gemm_s = n / read_rate / n_workers, flops / gemm_rate / n_workers
    return {"read_floor_s": round(read_s, 1), "gemm_floor_s": round(gemm_s, 1), "floor_s": round(read_s + gemm_s, 1),
            "read_meters_per_s": round(read_rate), "gemm_gflops": round(gemm_rate / 1e9, 1)}


def run_size(n_meters: int, days: float, workers: int | None, root: Path) -> dict:
    from phaseid_hpc.cluster import ClusterSpec
    from phaseid_hpc.jobs import run_with_cluster
    from phaseid_hpc.synth import generate_utility

    export, store, out = root / f"export-{n_meters}", root / f"store-{n_meters}.zarr", root / f"out-{n_meters}"
    t0 = time.perf_counter()
    if not store.exists():
        generate_utility(export, n_meters=n_meters, days=days, seed=1, write_readings=False, store=store)
    t_gen = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    peak: dict = {}
    stop = threading.Event()
    th = threading.Thread(target=_sample_peak, args=(stop, peak), daemon=True)
    th.start()
    t1 = time.perf_counter()
    from phaseid_hpc.config import load_config

    # the default run config, with any PHASEID__SECTION__KEY overrides of the environment
    s = run_with_cluster(store, out, spec=ClusterSpec(kind="local", n_workers=workers, dashboard_address=None),
                         config=load_config(None), progress=False, echo=lambda m: None)
    wall = time.perf_counter() - t1
    stop.set()
    th.join()
    tim = s.timings_s
    block_sum = sum(v for k, v in tim.items() if k.startswith("block_") and k.endswith("_sum"))
    n_workers = workers or psutil.cpu_count()
    shares = {k[len("block_"):-len("_sum")]: v / max(block_sum, 1e-9) for k, v in tim.items()
              if k.startswith("block_") and k.endswith("_sum")}
    floor = floor_s(store, n_workers)
    cpu_us = 1e6 * block_sum / n_meters
    return {
        **floor,
        "x_floor": round(wall / max(floor["floor_s"], 1e-9), 1),
        "block_cpu_us_per_meter": round(cpu_us),
        "meters": n_meters,
        "days": days,
        "generate_s": round(t_gen, 1),
        "run_wall_s": round(wall, 1),
        "us_per_meter": round(1e6 * wall / n_meters, 1),
        "blocks": s.n_blocks,
        "peak_rss_client_gib": round(peak.get("client", 0) / 2**30, 2),
        "peak_rss_total_gib": round(peak.get("total", 0) / 2**30, 2),
        "share_of_block_time": {k: round(v, 3) for k, v in sorted(shares.items())},
        "scheduling_idle_share": round(max(0.0, 1 - block_sum / max(wall * n_workers, 1e-9)), 3),
        "consolidate_s": round(tim.get("consolidate", 0.0), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--days", type=float, default=30)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--keep", default=None, help="folder to keep stores in (reused across invocations)")
    args = ap.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="phaseid-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in args.sizes:
        r = run_size(n, args.days, args.workers, root)
        rows.append(r)
        print(json.dumps(r), flush=True)
    stages = ("read", "quality", "phase", "clock", "transformer", "pt", "validation", "changes")
    print("\n| meters | days | run wall [s] | per meter [us] | block CPU per meter [us] | floor [s] (read + GEMM) "
          "| x floor | peak RSS total [GiB] | " + " | ".join(stages) + " | sched/idle |")
    print("| --- " * (9 + len(stages)) + "|")
    for r in rows:
        sh = r["share_of_block_time"]
        print(f"| {r['meters']:,} | {r['days']:g} | {r['run_wall_s']} | {r['us_per_meter']} | "
              f"{r['block_cpu_us_per_meter']:,} | {r['floor_s']} ({r['read_floor_s']} + {r['gemm_floor_s']}) | "
              f"{r['x_floor']} | {r['peak_rss_total_gib']} | "
              + " | ".join(f"{sh.get(k, 0):.0%}" for k in stages) + f" | {r['scheduling_idle_share']:.0%} |")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
