"""``phaseid``: a thin command line. Every subcommand parses its options and calls one library function."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import PhaseIDError

__all__ = ["build_parser", "main"]


def _cluster_spec(args: argparse.Namespace):
    from .cluster import ClusterSpec, load_cluster_spec

    if getattr(args, "cluster_config", None):
        return load_cluster_spec(args.cluster_config)
    if getattr(args, "scheduler", None):
        return ClusterSpec(kind="scheduler", address=args.scheduler)
    if getattr(args, "device", "cpu") == "gpu":
        return ClusterSpec(kind="gpu", n_workers=args.workers)
    return ClusterSpec(kind="local", n_workers=args.workers)


def _cmd_synth(args: argparse.Namespace) -> int:
    from .synth import MeasurementModel, generate_utility

    if args.scenario:  # a named feeder scenario, noise-free (the consumer applies the meter model)
        from .synth.scenarios import write_scenario

        print(write_scenario(args.scenario, args.out, seed=args.seed, days=int(args.days)))
        return 0
    model = MeasurementModel(
        accuracy_class=args.accuracy_class,
        resolution_v=args.resolution,
        missing_fraction=args.missing,
        clock_offset_fraction=args.clock_offset_fraction,
    )
    res = generate_utility(
        args.out,
        n_meters=args.meters,
        days=args.days,
        interval=args.interval,
        seed=args.seed,
        measurement=model,
        phase_error_rate=args.phase_errors,
        transformer_error_rate=args.transformer_errors,
        pv_fraction=args.pv_fraction,
        write_readings=not args.no_readings,
        store=args.store,
    )
    print(res)
    return 0


def _cmd_ingest(args: argparse.Namespace) -> int:
    from .config import load_config
    from .ingest import ingest_files

    cfg = load_config(args.config)
    report = ingest_files(
        args.readings,
        args.meters,
        args.store,
        transformers_path=args.transformers,
        references_path=args.references,
        config=cfg.ingest,
    )
    print(report)
    return 0


def _cmd_validate_store(args: argparse.Namespace) -> int:
    from .store import validate_store

    problems = validate_store(args.store, deep=args.deep)
    if problems:
        for p in problems:
            print(f"- {p}")
        return 1
    print(f"{args.store}: store is valid")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .jobs import run_with_cluster

    overrides = {"job": {"device": args.device}} if args.device else None
    cfg = load_config(args.config, overrides=overrides)
    summary = run_with_cluster(
        args.store,
        args.out,
        config=cfg,
        spec=_cluster_spec(args),
        in_process=args.workers == 0,
        progress=not args.no_progress,
        log_json=args.log_json,
        since=args.since,
        events=args.events,
    )
    print(f"Results in {summary.out_dir}: {summary.counts}")
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from .score import dumps, format_score_table, score_results

    score = score_results(args.results, args.truth)
    if args.json:
        Path(args.json).write_text(dumps(score) + "\n")
    print(format_score_table(score))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    path = write_report(args.results, store=args.store)
    print(f"Report written to {path}")
    return 0


def _cmd_ingest_service(args: argparse.Namespace) -> int:
    from .ingest_service import main_from_cli

    return main_from_cli(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, n_meters=args.meters, days=args.days, workers=args.workers, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``phaseid`` (all subcommands)."""
    p = argparse.ArgumentParser(prog="phaseid", description=__doc__.split("\n")[0] if __doc__ else None)
    from . import __version__

    p.add_argument("--version", action="version", version=f"phaseid-hpc {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="generate a synthetic utility (AMI export + truth, optionally a store)")
    s.add_argument("--meters", type=int, default=2000)
    s.add_argument("--days", type=float, default=14)
    s.add_argument("--interval", default="15min")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="output folder for the export")
    s.add_argument("--store", default=None, help="also write a Zarr store here")
    s.add_argument("--no-readings", action="store_true", help="do not write readings.parquet (store only)")
    s.add_argument("--accuracy-class", type=float, default=0.5)
    s.add_argument("--resolution", type=float, default=0.1, help="meter resolution [V]")
    s.add_argument("--missing", type=float, default=0.01, help="share of missing samples [-]")
    s.add_argument("--clock-offset-fraction", type=float, default=0.02)
    s.add_argument("--phase-errors", type=float, default=0.08)
    s.add_argument("--transformer-errors", type=float, default=0.03)
    s.add_argument("--pv-fraction", type=float, default=0.0)
    s.add_argument(
        "--scenario",
        default=None,
        help="write a named scenario instead (phaseid_hpc.synth.SCENARIOS: regulators, large, late_clocks, "
        "lv_european, single_meter_transformers, regulators_pv), noise-free; uses --out, --days, --seed",
    )
    s.set_defaults(func=_cmd_synth)

    s = sub.add_parser("ingest", help="build or extend a Zarr store from contract files")
    s.add_argument("--readings", nargs="+", required=True, help="readings CSV/Parquet file(s)")
    s.add_argument("--meters", required=True, help="meters.csv (GIS view)")
    s.add_argument("--transformers", default=None)
    s.add_argument("--references", default=None)
    s.add_argument("--store", required=True)
    s.add_argument("--config", default=None, help="run config (TOML/YAML); uses its [ingest] table")
    s.set_defaults(func=_cmd_ingest)

    s = sub.add_parser("validate-store", help="check a store against the schema; list every problem")
    s.add_argument("--store", required=True)
    s.add_argument("--deep", action="store_true",
                   help="also read every chunk: checksums, missing and corrupt chunks (names each bad chunk)")
    s.set_defaults(func=_cmd_validate_store)

    s = sub.add_parser("run", help="identify phases (and transformers) for every meter of a store")
    s.add_argument("--store", required=True)
    s.add_argument("--out", required=True, help="results folder")
    s.add_argument("--config", default=None, help="run config (TOML/YAML)")
    s.add_argument("--workers", type=int, default=None,
                   help="LocalCluster workers (default: all cores; 0 = run in this process)")
    s.add_argument("--scheduler", default=None, help="join an existing Dask scheduler (tcp://host:port)")
    s.add_argument("--cluster-config", default=None, help="deployment config (configs/cluster-*.toml)")
    s.add_argument("--device", choices=["cpu", "gpu"], default=None)
    s.add_argument("--since", default=None, help="previous results folder (delta run)")
    s.add_argument("--events", default=None, help="events.csv of outages/restorations (delta run)")
    s.add_argument("--log-json", action="store_true", help="write run.log as JSON lines")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=_cmd_run)

    s = sub.add_parser("score", help="score results against a truth.csv")
    s.add_argument("--results", required=True)
    s.add_argument("--truth", required=True)
    s.add_argument("--json", default=None, help="also write the score as JSON here")
    s.set_defaults(func=_cmd_score)

    s = sub.add_parser("report", help="write RESULTS/report.html (static, opens offline)")
    s.add_argument("--results", required=True)
    s.add_argument("--store", default=None, help="store, for the per-feeder PCA projections")
    s.set_defaults(func=_cmd_report)

    s = sub.add_parser("ingest-service", help="consume meter reads from an AMQP broker into a store")
    s.add_argument("--amqp", default=None,
                   help="amqp://user:pass@host:5672/vhost (prefer PHASEID_AMQP_URL or --amqp-url-file)")
    s.add_argument("--amqp-url-file", default=None, help="file holding the URL (mode 0600)")
    s.add_argument("--queue", required=True)
    s.add_argument("--store", required=True)
    s.add_argument("--config", default=None)
    s.add_argument("--batch-reads", type=int, default=None)
    s.add_argument("--batch-seconds", type=float, default=None)
    s.add_argument("--stop-when-idle", type=float, default=None, help="exit after this many idle seconds")
    s.set_defaults(func=_cmd_ingest_service)

    s = sub.add_parser("demo", help="generate a synthetic utility, ingest it, run the job, score it")
    s.add_argument("--out", default="demo")
    s.add_argument("--meters", type=int, default=3000)
    s.add_argument("--days", type=float, default=14)
    s.add_argument("--workers", type=int, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``phaseid`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PhaseIDError as exc:
        print(f"phaseid {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # pragma: no cover
        print(f"phaseid {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

