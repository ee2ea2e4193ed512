"""AMQP against STOMP: consumer throughput of ``phaseid ingest-service`` on the same messages [reads/s].

For each protocol, publishes ``--messages`` messages of ``--reads-per-message`` reads (CSV or JSON, the
same bodies) to a fresh queue over AMQP, then runs :func:`run_ingest_service` with that protocol's URL and a
sink that only counts (no store: this measures the transport, parsing, batching and acks) until the queue
is drained, and reports reads/s and messages/s with the median of ``--repeat`` runs. Every read must be
counted exactly once, else the run fails.

Usage (RabbitMQ with its STOMP plugin on 127.0.0.1, guest/guest)::

    .venv/bin/python benchmarks/broker_transports.py                        # 100 x 2,000 CSV reads, 3 runs
    .venv/bin/python benchmarks/broker_transports.py --reads-per-message 1 --messages 2000   # one read a message
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from amqp_ingest import encode, make_reads, publish

from phaseid_hpc.ingest_service import IngestServiceConfig, run_ingest_service

AMQP = "amqp://guest:guest@127.0.0.1:5672/%2F"
STOMP = "stomp://guest:guest@127.0.0.1:61613/%2F"


def consume(url: str, queue: str, expect: int, svc: IngestServiceConfig) -> tuple[float, int]:
    """Drain ``queue`` over ``url``; return (seconds to the last write, reads counted)."""
    counted = [0]
    last = [0.0]

    def sink(store, reads, *, config, source):
        counted[0] += len(reads)
        last[0] = time.perf_counter()

    t0 = time.perf_counter()
    run_ingest_service(url, queue, "unused", service_config=svc, sink=sink, stop_when_idle_s=1.0)
    if counted[0] != expect:
        raise SystemExit(f"{url.split(':', 1)[0]}: counted {counted[0]} reads, published {expect}")
    return last[0] - t0, counted[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--messages", type=int, default=100)
    p.add_argument("--reads-per-message", type=int, default=2000)
    p.add_argument("--format", choices=("json", "csv"), default="csv")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--prefetch", type=int, default=64)
    args = p.parse_args(argv)

    import pika

    n_meters = args.reads_per_message
    reads = make_reads(n_meters, args.messages)
    bodies = [encode(reads.iloc[i * n_meters:(i + 1) * n_meters], args.format) for i in range(args.messages)]
    svc = IngestServiceConfig(prefetch_count=args.prefetch, batch_max_reads=200_000, batch_max_seconds=0.5)
    print(f"{args.messages} messages x {args.reads_per_message} reads ({args.format}), prefetch {args.prefetch}, "
          f"null sink, median of {args.repeat}")
    for name, url in (("amqp", AMQP), ("stomp", STOMP)):
        rates = []
        for _ in range(args.repeat):
            queue = f"phaseid-bench-{uuid.uuid4().hex[:8]}"
            publish(AMQP, queue, bodies)
            try:
                dt, n = consume(url, queue, len(reads), svc)
            finally:
                conn = pika.BlockingConnection(pika.URLParameters(AMQP))
                ch = conn.channel()
                ch.queue_delete(queue)
                ch.queue_delete(queue + ".dlq")
                conn.close()
            rates.append(n / dt)
        r = statistics.median(rates)
        print(f"  {name:<5} {r:12,.0f} reads/s {r / args.reads_per_message:10,.0f} messages/s  "
              f"(runs: {', '.join(f'{x:,.0f}' for x in rates)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
