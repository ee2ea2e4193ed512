"""Sustained broker-to-store throughput of ``phaseid ingest-service`` [reads/s].

Creates a store for ``--meters`` meters and ``--intervals`` 15-minute intervals, publishes every read
(meters x intervals, default 10,000 x 100 = 1,000,000) to a fresh queue on the local RabbitMQ in messages of
``--reads-per-message`` reads, then runs :func:`run_ingest_service` until the queue is drained and reports:

* ``consume_reads_per_s``: reads durably in the store (and acknowledged) per second, from the start of the
  service to the return of the last store write (the target is >= 100,000 reads/s: one million meters'
  15-minute reads in 10 s);
* where the time went: parsing (consumer thread), store writes (writer thread, ``ingest_frame``), other;
* the store content check: every published read is in the store exactly once.

Usage::

    .venv/bin/python benchmarks/amqp_ingest.py                       # 1M reads, JSON records, real store
    .venv/bin/python benchmarks/amqp_ingest.py --format csv --sink null   # consumer ceiling, no store
    .venv/bin/python benchmarks/amqp_ingest.py --profile              # cProfile of the store writes
    .venv/bin/python benchmarks/amqp_ingest.py --format csv --meters 100000 --intervals 10 \
        --batch-max-reads 100000 --time-chunk 96                      # head-end stream: one interval a batch

``--concurrent`` publishes from a second process while the service consumes (publish and consume compete
for the same CPUs and broker); by default the queue is filled first.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import multiprocessing as mp
import pstats
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phaseid_hpc.ingest_service import IngestServiceConfig, parse_message, run_ingest_service

T0 = pd.Timestamp("2026-01-01 00:15:00")


def make_reads(n_meters: int, n_intervals: int) -> pd.DataFrame:
    """Interval-major long-format reads (a head-end publishes one interval of all meters at a time)."""
    k = np.repeat(np.arange(n_intervals), n_meters)
    m = np.tile(np.arange(n_meters), n_intervals)
    return pd.DataFrame({
        "meter_id": pd.Index([f"M{i:07d}" for i in range(n_meters)])[m].to_numpy(dtype=object),
        "timestamp": T0 + pd.to_timedelta(k * 900, unit="s"),
        "voltage_v": (240.0 + 0.01 * (m % 500) + 0.001 * k).round(3),
        "kw": (1.0 + 0.001 * (m % 100)).round(3),
    })


def encode(df: pd.DataFrame, fmt: str) -> tuple[bytes, str]:
    ts = df["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    if fmt == "csv":
        return df.assign(timestamp=ts).to_csv(index=False, float_format="%.3f").encode(), "text/csv"
    cols = {c: (ts if c == "timestamp" else df[c]).tolist() for c in df.columns}
    if fmt == "columnar":
        return json.dumps(cols).encode(), "application/json"
    names = list(cols)
    recs = [dict(zip(names, row)) for row in zip(*cols.values())]
    return json.dumps(recs).encode(), "application/json"


def publish(url: str, queue: str, bodies: list[tuple[bytes, str]]) -> float:
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.queue_declare(queue, durable=True)
    ch.confirm_delivery()
    t = time.perf_counter()
    for body, ctype in bodies:
        ch.basic_publish("", queue, body, pika.BasicProperties(content_type=ctype, delivery_mode=2,
                                                               timestamp=int(time.time())))
    dt = time.perf_counter() - t
    conn.close()
    return dt


def make_store(path: Path, n_meters: int, n_intervals: int, time_chunk: int = 2976) -> None:
    from phaseid_hpc.store import initialize_store

    ids = [f"M{i:07d}" for i in range(n_meters)]
    meters = pd.DataFrame({
        "meter_id": ids,
        "feeder_id": [f"F{i // 2000:04d}" for i in range(n_meters)],
        "transformer_id": [f"T{i // 8:06d}" for i in range(n_meters)],
        "phase": [("A", "B", "C")[(i // 8) % 3] for i in range(n_meters)],
    })
    times = pd.date_range(T0, periods=n_intervals, freq="15min")
    initialize_store(path, meters, times, interval_s=900, variables=("voltage", "kw"), time_chunk=time_chunk)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    p.add_argument("--meters", type=int, default=10_000)
    p.add_argument("--intervals", type=int, default=100)
    p.add_argument("--reads-per-message", type=int, default=10_000)
    p.add_argument("--format", choices=("json", "columnar", "csv"), default="json")
    p.add_argument("--sink", choices=("store", "null"), default="store")
    p.add_argument("--batch-max-reads", type=int, default=200_000)
    p.add_argument("--batch-seconds", type=float, default=2.0)
    p.add_argument("--prefetch", type=int, default=64)
    p.add_argument("--concurrent", action="store_true", help="publish while consuming")
    p.add_argument("--no-kw", action="store_true", help="publish voltage only (no kw column)")
    p.add_argument("--profile", action="store_true", help="cProfile the store writes (top 25 by cumtime)")
    p.add_argument("--keep", default=None, help="build the store here and keep it")
    p.add_argument("--time-chunk", type=int, default=2976,
                   help="storage chunk along time of the store (96 = one day: the streaming layout, see ingest.py)")
    args = p.parse_args(argv)

    n = args.meters * args.intervals
    reads = make_reads(args.meters, args.intervals)
    if args.no_kw:
        reads = reads.drop(columns="kw")
    t = time.perf_counter()
    bodies = [encode(reads.iloc[i : i + args.reads_per_message], args.format)
              for i in range(0, n, args.reads_per_message)]
    print(f"encoded {n:,} reads into {len(bodies)} {args.format} messages "
          f"({sum(len(b) for b, _ in bodies) / 1e6:.1f} MB) in {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    for b, c in bodies[:5]:
        parse_message(b, c)
    parse_s = (time.perf_counter() - t) / min(5, len(bodies)) * len(bodies)
    print(f"parse alone: {n / parse_s:,.0f} reads/s")

    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="phaseid-bench-")) / "store.zarr"
    if args.sink == "store":
        t = time.perf_counter()
        make_store(tmp, args.meters, args.intervals, args.time_chunk)
        print(f"store {tmp} ({args.meters:,} meters x {args.intervals} intervals) created in "
              f"{time.perf_counter() - t:.1f} s")
        from phaseid_hpc.ingest import ingest_frame as real_sink
    else:
        def real_sink(store, df, *, config, source):
            return None

    queue = f"phaseid-bench-{uuid.uuid4().hex[:8]}"
    pub_proc = None
    if args.concurrent:
        import pika

        conn = pika.BlockingConnection(pika.URLParameters(args.amqp))
        conn.channel().queue_declare(queue, durable=True)
        conn.close()
        pub_proc = mp.get_context("spawn").Process(target=publish, args=(args.amqp, queue, bodies))
        pub_proc.start()
    else:
        dt = publish(args.amqp, queue, bodies)
        print(f"published in {dt:.1f} s ({n / dt:,.0f} reads/s, publisher confirms, persistent)")

    sink_s = [0.0]
    last_end = [0.0]
    prof = cProfile.Profile() if args.profile else None
    lock = threading.Lock()

    def timed_sink(store, df, *, config, source):
        t1 = time.perf_counter()
        if prof is not None:
            prof.enable()
        try:
            return real_sink(store, df, config=config, source=source)
        finally:
            if prof is not None:
                prof.disable()
            with lock:
                sink_s[0] += time.perf_counter() - t1
                last_end[0] = time.perf_counter()

    svc = IngestServiceConfig(prefetch_count=args.prefetch, batch_max_reads=args.batch_max_reads,
                              batch_max_seconds=args.batch_seconds, metrics_interval_s=5.0)
    t_start = time.perf_counter()
    stats = run_ingest_service(args.amqp, queue, tmp, service_config=svc, sink=timed_sink,
                               stop_when_idle_s=3.0 if args.concurrent else 1.0)
    wall = last_end[0] - t_start
    if pub_proc is not None:
        pub_proc.join()
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(args.amqp))
    ch = conn.channel()
    ch.queue_delete(queue)
    ch.queue_delete(queue + ".dlq")
    conn.close()

    print(f"consumed {stats.reads_written:,} reads in {stats.batches} batches; wall {wall:.2f} s "
          f"-> consume_reads_per_s = {stats.reads_written / wall:,.0f}")
    print(f"  store writes {sink_s[0]:.2f} s ({100 * sink_s[0] / wall:.0f}% of wall, in the writer thread), "
          f"parsing ~{parse_s:.2f} s (consumer thread); dead-lettered {stats.messages_dead_lettered}, "
          f"quarantined {stats.rows_quarantined}")
    ok = stats.reads_written == n
    if args.sink == "store":
        import xarray as xr

        ds = xr.open_zarr(tmp, consolidated=False)
        v = ds["voltage"].values
        filled = int(np.isfinite(v).sum())
        expect = reads.pivot(index="meter_id", columns="timestamp", values="voltage_v")
        got = pd.DataFrame(v, index=ds["meter"].values, columns=ds["time"].values).loc[expect.index, expect.columns]
        same = np.allclose(got.to_numpy(), expect.to_numpy(), atol=0.05)
        print(f"  store check: {filled:,} of {n:,} cells filled, values match: {same}")
        ok = ok and filled == n and same
    if prof is not None:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("cumtime").print_stats(25)
        print(s.getvalue())
    if not args.keep:
        shutil.rmtree(tmp.parent, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
