"""``phaseid``: map every smart meter to its service transformer and phase, from AMI voltage.

A thin command line: every subcommand parses its options, calls one library function and prints one short
summary (:mod:`phaseid_hpc.console`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .errors import PhaseIDError

__all__ = ["build_parser", "main"]

_EXAMPLES = """\
examples:
  phaseid synth --n-meters 2000 --days 14 --out export/      # a synthetic utility to try things on
  phaseid ingest --readings export/readings*.parquet --meters export/meters.csv \\
                 --transformers export/transformers.csv --store store.zarr
  phaseid run --store store.zarr --results results/          # writes results/report.html too
  phaseid score --results results/ --truth export/truth.csv
  phaseid config show                                        # every run-config key, default and doc

'phaseid COMMAND --help' shows each command's options and defaults.
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Examples kept as written; every option's default shown (``None`` and ``False`` defaults left out)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class _DeprecatedAlias(argparse.Action):
    """An old spelling of an option: same destination and type, and a note on stderr naming the new one."""

    def __init__(self, option_strings: Sequence[str], dest: str, new: str = "", **kwargs) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values,
                 option_string: str | None = None) -> None:
        print(f"{parser.prog}: note: {option_string} is deprecated and will be removed; use {self.new} "
              "(same meaning)", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _renamed_option(parser: argparse.ArgumentParser, new: str, old: str, *, required: bool = False,
                    **kwargs) -> None:
    """Add option ``new`` and its deprecated spelling ``old`` (one concept, one name: ``old`` still works).

    ``required``: one of the two must be given (checked by :func:`main`, a usage error otherwise).
    """
    dest = new.lstrip("-").replace("-", "_")
    if required:
        kwargs["help"] = f"{kwargs.get('help', '')} (required)".lstrip()
    parser.add_argument(new, dest=dest, **kwargs)
    parser.add_argument(old, dest=dest, action=_DeprecatedAlias, new=new, type=kwargs.get("type"),
                        default=argparse.SUPPRESS, metavar=kwargs.get("metavar", dest.upper()),
                        help=f"deprecated spelling of {new}")
    if required:
        parser.set_defaults(_required_options=[*(parser.get_default("_required_options") or []), (dest, new, old)],
                            _subparser=parser)


def _non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (a usage error, exit 64, otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"must be >= 0 (0 = run in this process, no Dask cluster), got {value}"
        )
    return value


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value:g}")
    return value


def _config_path(text: str | None) -> str | None:
    """A config file path; a name shipped in the package (``cluster-slurm``, ``default.toml``) also works."""
    if text is None or Path(text).exists():
        return text
    from .config_docs import packaged_config

    packaged = packaged_config(Path(text).name)
    return str(packaged) if packaged is not None else text


def _cluster_spec(args: argparse.Namespace):
    from .cluster import ClusterSpec, load_cluster_spec

    if getattr(args, "cluster_config", None):
        return load_cluster_spec(_config_path(args.cluster_config))
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
        n_meters=args.n_meters,
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
    from .console import format_synth

    print(format_synth(res))
    return 0


def _cmd_capacity(args: argparse.Namespace) -> int:
    from .capacity import run_capacity
    from .cluster import get_client
    from .config import load_config

    cfg = load_config(_config_path(args.config))
    kwargs = {"n_meters": args.n_meters, "days": args.days, "interval": args.interval, "seed": args.seed,
              "config": cfg}
    if args.workers == 0:
        s = run_capacity(args.out, **kwargs)
    else:
        with get_client(_cluster_spec(args)) as client:
            s = run_capacity(args.out, client=client, **kwargs)
    p = s.score["phase"]
    print(f"{s.n_meters:,} meters x {s.n_time} samples in {s.n_blocks} blocks: {s.wall_s:.1f} s "
          f"({s.per_meter_us:.0f} us per meter; blocks {s.blocks_wall_s:.1f} s, consolidation "
          f"{s.consolidate_s:.1f} s), client peak {s.client_peak_rss / 2**30:.2f} GiB; phase accuracy "
          f"{100 * (p['accuracy'] or 0):.2f}% (GIS {100 * (p['gis_accuracy'] or 0):.2f}%); results in {s.out_dir}")
    return 0


def _cmd_ingest(args: argparse.Namespace) -> int:
    from .config import load_config
    from .console import format_ingest, progress_bar
    from .ingest import count_reading_rows, ingest_files

    cfg = load_config(_config_path(args.config))
    bar: Any = None  # started at the first staged batch: nothing is printed before the files pass their checks

    def staged(n: int) -> None:
        nonlocal bar
        if n <= 0:
            return
        if bar is None:
            bar = progress_bar(count_reading_rows(args.readings), "ingest", "row", enabled=not args.no_progress)
        bar.update(n)

    try:
        report = ingest_files(
            args.readings,
            args.meters,
            args.store,
            transformers_path=args.transformers,
            references_path=args.references,
            config=cfg.ingest,
            progress=staged,
        )
    finally:
        if bar is not None:
            bar.close()
    print(format_ingest(report))
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
    cfg = load_config(_config_path(args.config), overrides=overrides)
    summary = run_with_cluster(
        args.store,
        args.results,
        config=cfg,
        spec=_cluster_spec(args),
        in_process=args.workers == 0,
        progress=not args.no_progress,
        log_json=args.log_json,
        since=args.since,
        events=args.events,
    )
    from .console import format_run, store_period

    print(format_run(summary, period=store_period(args.store)))
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


def _cmd_config_show(args: argparse.Namespace) -> int:
    from .config import load_config
    from .config_docs import default_toml, format_config_keys

    cfg = load_config(_config_path(args.config)) if args.config else None
    if args.toml:  # the file as default_toml writes it: `phaseid config show --toml > configs/default.toml`
        sys.stdout.write(default_toml(cfg))
    else:
        print(format_config_keys(cfg))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, n_meters=args.n_meters, days=args.days, workers=args.workers, seed=args.seed)
    return 0


#: Exit codes: a data or input error (a file, store, meter or config value named in one line) is 2; a
#: command line that cannot be parsed (unknown option, bad value of an option) is 64 (``EX_USAGE``).
EXIT_DATA_ERROR = 2
EXIT_USAGE = 64


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors on their own exit code (:data:`EXIT_USAGE`), apart from data errors."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``phaseid`` (all subcommands)."""
    p = _Parser(prog="phaseid",
                description=__doc__.split("\n")[0].replace("``", "") if __doc__ else None,
                epilog=_EXAMPLES, formatter_class=_HelpFormatter)
    from . import __version__

    p.add_argument("--version", action="version", version=f"phaseid-hpc {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_synth_parser(sub)
    _add_capacity_parser(sub)
    _add_ingest_parser(sub)
    _add_validate_store_parser(sub)
    _add_run_parser(sub)
    _add_score_parser(sub)
    _add_report_parser(sub)
    _add_ingest_service_parser(sub)
    _add_config_parser(sub)
    _add_demo_parser(sub)
    return p


def _add_command(sub: argparse._SubParsersAction, name: str, help: str,
                 epilog: str) -> argparse.ArgumentParser:
    """Add subcommand ``name``: its help, a description made from it, and one example as epilog."""
    return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                          epilog="example:\n  " + epilog, formatter_class=_HelpFormatter)


def _add_synth_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``phaseid synth``: generate a synthetic utility."""
    s = _add_command(sub, "synth", "generate a synthetic utility (AMI export + truth, optionally a store)",
                     "phaseid synth --n-meters 2000 --days 14 --out export/ --store store.zarr")
    _renamed_option(s, "--n-meters", "--meters", type=_positive_int, default=2000,
                    help="number of meters to generate")
    s.add_argument("--days", type=_positive_float, default=14, help="length of the record [days]")
    s.add_argument("--interval", default="15min", help="reading interval (pandas offset: 5min, 15min, 1h)")
    s.add_argument("--seed", type=int, default=0, help="seed of the generator and the measurement model")
    s.add_argument("--out", required=True, help="output folder for the export")
    s.add_argument("--store", default=None, help="also write a Zarr store here")
    s.add_argument("--no-readings", action="store_true", help="do not write readings.parquet (store only)")
    s.add_argument("--accuracy-class", type=float, default=0.5, help="meter accuracy class [%%]")
    s.add_argument("--resolution", type=float, default=0.1, help="meter resolution [V]")
    s.add_argument("--missing", type=float, default=0.01, help="share of missing samples [-]")
    s.add_argument("--clock-offset-fraction", type=float, default=0.02,
                   help="share of meters with a clock offset [-]")
    s.add_argument("--phase-errors", type=float, default=0.08,
                   help="share of GIS phase labels made wrong [-]")
    s.add_argument("--transformer-errors", type=float, default=0.03,
                   help="share of GIS transformer labels made wrong [-]")
    s.add_argument("--pv-fraction", type=float, default=0.0, help="share of meters with rooftop PV [-]")
    s.add_argument(
        "--scenario",
        default=None,
        help="write a named scenario instead (phaseid_hpc.synth.SCENARIOS: regulators, large, late_clocks, "
        "lv_european, single_meter_transformers, regulators_pv), noise-free; uses --out, --days, --seed",
    )
    s.set_defaults(func=_cmd_synth)


def _add_capacity_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``phaseid capacity``: generate and run each block on its worker, nothing stored."""
    s = _add_command(sub, "capacity",
                     "capacity test: generate each block on its worker and run the job on it, nothing stored",
                     "phaseid capacity --n-meters 1000000 --days 30 --out capacity/ --workers 2")
    s.add_argument("--n-meters", type=_positive_int, default=100_000, help="number of meters to generate")
    s.add_argument("--days", type=_positive_float, default=30, help="length of the record [days]")
    s.add_argument("--interval", default="15min", help="reading interval (pandas offset: 5min, 15min, 1h)")
    s.add_argument("--seed", type=int, default=0, help="seed of the generator")
    s.add_argument("--out", required=True, help="results folder (meters.parquet, transformers.parquet)")
    s.add_argument("--config", default=None, help="run config (TOML/YAML); [job] block_bytes sets the blocks")
    s.add_argument("--workers", type=_non_negative_int, default=None,
                   help="LocalCluster workers (default: one per core; 0 = run in this process)")
    s.add_argument("--scheduler", default=None, help="join an existing Dask scheduler (tcp://host:port)")
    s.add_argument("--cluster-config", default=None, help="deployment config (as for 'phaseid run')")
    s.set_defaults(func=_cmd_capacity)


def _add_ingest_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``phaseid ingest``: build or extend a store from contract files."""
    s = _add_command(sub, "ingest", "build or extend a Zarr store from contract files",
                     "phaseid ingest --readings export/readings*.parquet --meters export/meters.csv \\\n"
                     "                 --transformers export/transformers.csv --store store.zarr")
    s.add_argument("--readings", nargs="+", required=True, help="readings CSV/Parquet file(s)")
    s.add_argument("--meters", default=None,
                   help="meters table (GIS view): CSV/Parquet, GeoPackage/GeoJSON (extra 'gis'), or a database URL "
                   "postgresql://USER@HOST/DB?table=SCHEMA.TABLE (extra 'postgres'; password from $PGPASSWORD or "
                   "~/.pgpass, never in the URL); default: the config's [ingest] meters_database")
    s.add_argument("--transformers", default=None, help="transformers.csv (ratings; optional)")
    s.add_argument("--references", default=None, help="feeder-head reference voltages (optional)")
    s.add_argument("--store", required=True, help="Zarr store to create or extend")
    s.add_argument("--config", default=None, help="run config (TOML/YAML); uses its [ingest] table")
    s.add_argument("--no-progress", action="store_true", help="no progress display (rows staged, rate, ETA)")
    s.set_defaults(func=_cmd_ingest)


def _add_validate_store_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``phaseid validate-store``: check a store against the schema."""
    s = _add_command(sub, "validate-store", "check a store against the schema; list every problem",
                     "phaseid validate-store --store store.zarr --deep")
    s.add_argument("--store", required=True, help="Zarr store to check")
    s.add_argument("--deep", action="store_true",
                   help="also read every chunk: checksums, missing and corrupt chunks (names each bad chunk)")
    s.set_defaults(func=_cmd_validate_store)


def _add_run_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``phaseid run``: identify phases and transformers for every meter of a store."""
    s = _add_command(sub, "run", "identify phases (and transformers) for every meter of a store",
                     "phaseid run --store store.zarr --results results/ --workers 4\n"
                     "  phaseid run --store store.zarr --results results/ --cluster-config cluster-slurm")
    s.add_argument("--store", required=True, help="Zarr store written by 'phaseid ingest'")
    _renamed_option(s, "--results", "--out", required=True,
                    help="results folder to write (meters.parquet, corrections.csv, review.csv, report.html, ...)")
    s.add_argument("--config", default=None, help="run config (TOML/YAML; default: built-in defaults, see "
                                                   "'phaseid config show')")
    s.add_argument("--workers", type=_non_negative_int, default=None,
                   help="LocalCluster workers (default: one per core; 0 = run in this process)")
    s.add_argument("--scheduler", default=None, help="join an existing Dask scheduler (tcp://host:port)")
    s.add_argument("--cluster-config", default=None,
                   help="deployment config: a file, or a shipped name (cluster-local, cluster-slurm, "
                        "cluster-gpu, cluster-tls)")
    s.add_argument("--device", choices=["cpu", "gpu"], default=None,
                   help="array backend of the workers (default: [job] device of the config, cpu)")
    s.add_argument("--since", default=None, help="previous results folder (delta run)")
    s.add_argument("--events", default=None, help="events.csv of outages/restorations (delta run)")
    s.add_argument("--log-json", action="store_true", help="write run.log as JSON lines")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_run)


def _add_score_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``phaseid score``: score results against a truth.csv."""
    s = _add_command(sub, "score", "score results against a truth.csv",
                     "phaseid score --results results/ --truth export/truth.csv --json score.json")
    _renamed_option(s, "--results", "--out", required=True, help="results folder of 'phaseid run'")
    s.add_argument("--truth", required=True, help="truth.csv (meter_id, phase, transformer_id, ...)")
    s.add_argument("--json", default=None, help="also write the score as JSON here")
    s.set_defaults(func=_cmd_score)


def _add_report_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``phaseid report``: write the static report.html of a results folder."""
    s = _add_command(sub, "report", "write RESULTS/report.html (static, opens offline)",
                     "phaseid report --results results/")
    _renamed_option(s, "--results", "--out", required=True, help="results folder of 'phaseid run'")
    s.add_argument("--store", default=None,
                   help="store, for the data period, locations and projections (default: the run's store)")
    s.set_defaults(func=_cmd_report)


def _add_ingest_service_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``phaseid ingest-service``: consume meter reads from a broker into a store."""
    s = _add_command(sub, "ingest-service", "consume meter reads from a broker (AMQP or STOMP) into a store",
                     "PHASEID_AMQP_URL=amqp://... phaseid ingest-service "
                     "--queue meter-reads --store store.zarr\n"
                     "  PHASEID_STOMP_URL_FILE=/run/credentials/stomp-url phaseid ingest-service --stomp \\\n"
                     "      --queue meter-reads --store store.zarr")
    from .ingest_service import add_broker_arguments

    add_broker_arguments(s)
    s.add_argument("--queue", required=True, help="queue to consume")
    s.add_argument("--store", required=True, help="Zarr store to extend")
    s.add_argument("--config", default=None, help="service config (TOML)")
    s.add_argument("--batch-reads", type=_positive_int, default=None,
                   help="reads per durable write (default: from the config)")
    s.add_argument("--batch-seconds", type=_positive_float, default=None,
                   help="most seconds between durable writes (default: from the config)")
    s.add_argument("--stop-when-idle", type=float, default=None, help="exit after this many idle seconds")
    s.set_defaults(func=_cmd_ingest_service)


def _add_config_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``phaseid config`` and its action ``show``: the run configuration, documented."""
    s = _add_command(sub, "config", "show the run configuration: every key, its default and what it does",
                     "phaseid config show                      # defaults\n"
                     "  phaseid config show --config my.toml --toml > my-full.toml")
    csub = s.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    c = csub.add_parser("show", help="print every key with its value and documentation",
                        formatter_class=_HelpFormatter)
    c.add_argument("--config", default=None, help="show the values of this config file instead of defaults")
    c.add_argument("--toml", action="store_true", help="print as a documented TOML file")
    c.set_defaults(func=_cmd_config_show)


def _add_demo_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``phaseid demo``: synth, ingest, run and score in one go."""
    s = _add_command(sub, "demo", "generate a synthetic utility, ingest it, run the job, score it",
                     "phaseid demo --out demo --n-meters 3000 --days 14")
    s.add_argument("--out", default="demo", help="demo folder (export/, store.zarr, results/)")
    _renamed_option(s, "--n-meters", "--meters", type=_positive_int, default=3000,
                    help="number of meters to generate")
    s.add_argument("--days", type=_positive_float, default=14, help="length of the record [days]")
    s.add_argument("--workers", type=_non_negative_int, default=None,
                   help="LocalCluster workers (default: one per core; 0 = run in this process)")
    s.add_argument("--seed", type=int, default=0, help="seed of the generator")
    s.set_defaults(func=_cmd_demo)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``phaseid`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    missing = [f"{new} (or its old spelling {old})" for dest, new, old in getattr(args, "_required_options", [])
               if getattr(args, dest, None) is None]
    if missing:
        getattr(args, "_subparser", parser).error(f"the following arguments are required: {', '.join(missing)}")
    try:
        return int(args.func(args) or 0)
    except PhaseIDError as exc:
        print(f"phaseid {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_DATA_ERROR
    except KeyboardInterrupt:  # pragma: no cover
        print(f"phaseid {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

