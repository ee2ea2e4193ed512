"""Time and peak memory of the synthetic utility generator at scale.

Peak memory is the largest resident set of this process plus its children (Dask worker processes),
sampled every 0.2 s.

Usage::

    .venv/bin/python benchmarks/synth_scale.py --meters 10000 --days 30            # readings.parquet
    .venv/bin/python benchmarks/synth_scale.py --meters 100000 --days 30 --workers 2
    .venv/bin/python benchmarks/synth_scale.py --meters 1000000 --days 30 --workers 2 --store-only

``--store-only`` writes the Zarr store directly (no readings parquet), the way a 1 M-meter utility is
meant to be generated. Output goes to ``--out`` (default a temporary directory, removed afterwards
unless ``--keep``).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Self

import psutil


class PeakMemory:
    """Background sampler of the summed RSS of this process and its children [bytes], and of their CPU
    time (user + system, each process's last sample) [s]."""

    def __init__(self, period_s: float = 0.2) -> None:
        self.period_s = period_s
        self.peak = 0
        self.cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me] + me.children(recursive=True):
                try:
                    total += p.memory_info().rss
                    t = p.cpu_times()
                    self.cpu[p.pid] = t.user + t.system
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.period_s)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def cpu_s(self) -> float:
        return sum(self.cpu.values())


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--meters", type=int, default=10_000)
    ap.add_argument("--days", type=float, default=30)
    ap.add_argument("--interval", default="15min")
    ap.add_argument("--workers", type=int, default=0, help="Dask worker processes (0: no cluster)")
    ap.add_argument("--store-only", action="store_true", help="write the Zarr store, no readings parquet")
    ap.add_argument("--store", action="store_true", help="write the Zarr store as well as the readings")
    ap.add_argument("--meters-per-block", type=int, default=20_000)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args(argv)

    from phaseid_hpc.synth import generate_utility

    out = a.out or Path(tempfile.mkdtemp(prefix="synth_scale_"))
    client = cluster = None
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        if a.workers:
            from distributed import Client, LocalCluster

            cluster = LocalCluster(
                n_workers=a.workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                memory_limit="6GiB",
            )
            client = Client(cluster)
        t1 = time.perf_counter()
        res = generate_utility(
            out,
            n_meters=a.meters,
            days=a.days,
            interval=a.interval,
            client=client,
            write_readings=not a.store_only,
            store=out / "store.zarr" if (a.store or a.store_only) else None,
            meters_per_block=a.meters_per_block,
        )
        t2 = time.perf_counter()
        time.sleep(2 * mem.period_s)  # a last sample of the workers' CPU time
        cpu_s = mem.cpu_s
        if client is not None:
            client.close()
            cluster.close()
    samples = res.n_meters * res.n_time
    print(
        "| meters | days | samples | workers | output | generate [s] | cluster start [s] | "
        "samples/s | CPU [s] | CPU per meter [us] | peak RSS [GiB] | on disk [GiB] |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    kind = "store" if a.store_only else ("readings+store" if a.store else "readings")
    print(
        f"| {res.n_meters:,} | {a.days:g} | {samples:,} | {a.workers or 'none'} | {kind} | {t2 - t1:.1f} | "
        f"{t1 - t0:.1f} | {samples / (t2 - t1):,.0f} | {cpu_s:.0f} | {cpu_s / res.n_meters * 1e6:.0f} | {mem.peak / 2**30:.2f} | {_size(out) / 2**30:.2f} |"
    )
    print(f"feeders {res.n_feeders}, substations {res.n_substations}, transformers {res.n_transformers}")
    if not a.keep and a.out is None:
        shutil.rmtree(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
