"""Capacity mode at scale: per-meter time, client and total peak memory, accuracy against the truth.

Each block is generated on its worker and run through the job's per-block code
(:func:`phaseid_hpc.capacity.run_capacity`); nothing is stored but the per-block results, which are streamed
into ``meters.parquet``. Total peak memory is the largest summed RSS of this process and its children (the
Dask workers), sampled every 0.2 s; CPU is their user + system time.

Usage::

    .venv/bin/python benchmarks/capacity.py --meters 100000 --days 30 --workers 2
    .venv/bin/python benchmarks/capacity.py --meters 1000000 --days 30 --workers 2
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil


class _Sampler:
    """Summed RSS [bytes] and CPU time [s] of this process and its children, sampled in the background."""

    def __init__(self, period_s: float = 0.2) -> None:
        self.period_s, self.peak, self.cpu = period_s, 0, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(self.period_s):
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                    t = p.cpu_times()
                    self.cpu[p.pid] = t.user + t.system
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--meters", type=int, default=100_000)
    ap.add_argument("--days", type=float, default=30)
    ap.add_argument("--workers", type=int, default=2, help="Dask worker processes, one thread each (0: here)")
    ap.add_argument("--memory-limit", default="3GiB", help="per worker")
    ap.add_argument("--block-bytes", type=float, default=100e6, help="[job] block_bytes [bytes]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="results folder (default: a temporary one, removed)")
    a = ap.parse_args(argv)

    from phaseid_hpc.capacity import run_capacity
    from phaseid_hpc.config import load_config

    cfg = load_config(overrides={"job": {"block_bytes": int(a.block_bytes)}}, environ={})
    out = a.out or Path(tempfile.mkdtemp(prefix="capacity_"))
    sampler = _Sampler()
    sampler.start()
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        client = None
        if a.workers:  # the job's own local cluster (its worker settings included)
            from phaseid_hpc.cluster import ClusterSpec, get_client

            client = stack.enter_context(get_client(ClusterSpec(
                kind="local", n_workers=a.workers, threads_per_worker=1, memory_limit=a.memory_limit,
                dashboard_address=None)))
        t1 = time.perf_counter()
        s = run_capacity(out, n_meters=a.meters, days=a.days, seed=a.seed, config=cfg, client=client)
        time.sleep(2 * sampler.period_s)
        sampler.stop()
        cpu = sum(sampler.cpu.values())
    p, x = s.score["phase"], s.score.get("transformer", {})
    print("| meters | days | blocks | workers | run [s] | blocks [s] | consolidate [s] | us per meter | "
          "CPU per meter [us] | client peak [GiB] | total peak [GiB] | phase accuracy | GIS phase | "
          "transformer accuracy | cluster start [s] |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {s.n_meters:,} | {a.days:g} | {s.n_blocks} | {a.workers or 'none'} | {s.wall_s:.1f} | "
          f"{s.blocks_wall_s:.1f} | {s.consolidate_s:.1f} | {s.per_meter_us:.0f} | {cpu / s.n_meters * 1e6:.0f} | "
          f"{s.client_peak_rss / 2**30:.2f} | {sampler.peak / 2**30:.2f} | {100 * (p['accuracy'] or 0):.2f}% | "
          f"{100 * (p['gis_accuracy'] or 0):.2f}% | {100 * (x.get('accuracy') or 0):.2f}% | {t1 - t0:.1f} |")
    total = sum(s.block_timings_s.values()) or 1.0
    print("block time: " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in s.block_timings_s.items()))
    if a.out is None:
        shutil.rmtree(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
