"""The nightly job: store -> feeder blocks -> (quality, phase, transformer, validation) -> one output folder.

One Dask task per block of whole feeders (~``config.job.block_bytes``); never one task per meter and never
all-pairs across feeders. Each block's result is persisted as it finishes (``RESULTS/partitions/``), so a
rerun with the same inputs and config skips finished blocks and an interrupted run resumes. The final
tables are assembled in block order with stable sorts, so the output bytes do not depend on the number of
workers or on which block finished first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pandas as pd

from . import __version__
from .block import Block, join_reasons
from .config import RunConfig, config_fingerprint, config_to_dict
from .contract import METER_RESULT_COLUMNS, PHASE_CLASSES
from .errors import PhaseIDError, StoreError
from .logging_utils import get_run_logger, log_event
from .stages import BlockResult, run_block
from .transformer_mapping import REASON_TX_THREE_PHASE_ON_SINGLE

__all__ = ["RunSummary", "check_output_writable", "process_block", "run_job", "store_fingerprint"]

PARTITION_DIR = "partitions"
_RESULT_FILES = ("meters.parquet", "corrections.csv", "review.csv", "transformers.parquet", "summary.json")


@dataclass
class RunSummary:
    """What a run produced: where, how many, and how long."""

    out_dir: Path
    n_meters: int
    n_blocks: int
    n_blocks_reused: int
    counts: dict[str, int]
    timings_s: dict[str, float] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# Fingerprints and the output folder
# ----------------------------------------------------------------------------------------------------------
def store_fingerprint(store: str | os.PathLike[str]) -> str:
    """SHA-256 over the store's metadata documents and the names and sizes of its chunk files.

    Cheap (no chunk is read) and changes whenever an ingest adds or rewrites data.
    """
    root = Path(store)
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(root).as_posix()
        if rel.startswith(("quarantine/", ".")):
            continue
        h.update(rel.encode())
        if p.name in ("zarr.json", ".zattrs", ".zarray", ".zgroup"):
            h.update(p.read_bytes())
        else:
            h.update(str(p.stat().st_size).encode())
    return h.hexdigest()


def check_output_writable(out: str | os.PathLike[str]) -> Path:
    """Create the output folder and prove it is writable, before any work starts.

    Raises
    ------
    PhaseIDError
        Naming the folder, when it cannot be created or written.
    """
    out_path = Path(out)
    try:
        out_path.mkdir(parents=True, exist_ok=True)
        probe = out_path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise PhaseIDError(
            f"output folder {str(out_path)!r} is not writable ({exc.strerror or exc}); "
            "choose another --out or fix its permissions"
        ) from exc
    return out_path


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _parquet_bytes(df: pd.DataFrame) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------
# One block of whole feeders
# ----------------------------------------------------------------------------------------------------------
def _block_key(start: int, stop: int, feeders: Sequence[str], store_fp: str, config_fp: str) -> str:
    h = hashlib.sha256(f"{start}:{stop}:{','.join(feeders)}:{store_fp}:{config_fp}".encode()).hexdigest()
    return h[:16]


@dataclass(frozen=True)
class StoreTables:
    """The store's small tables, read once by the client and sliced per block.

    Attributes
    ----------
    meters : DataFrame
        One row per meter in store order (``meter_id``, ``feeder_id``, ``transformer_id``, ``phase_gis``,
        ``service_type``, ``nominal_v``, ``sampling_interval_s``, ``off_grid_fraction``, ``lat``, ``lon``).
    references : tuple of (DataFrame, ndarray) or None
        Reference rows (``feeder_id``, ``phase``) and their voltages, shape (n_refs, n_time) [V].
    transformers : DataFrame or None
        ``transformer_id``, ``feeder_id``, ``kva_rating``, ``n_phases``.
    times : DatetimeIndex
        The store's time grid (UTC, interval ends).
    interval_s : float
        Grid step [s].
    """

    meters: pd.DataFrame
    references: tuple[pd.DataFrame, np.ndarray] | None
    transformers: pd.DataFrame | None
    times: pd.DatetimeIndex
    interval_s: float

    @classmethod
    def from_dataset(cls, ds: Any) -> StoreTables:
        """Collect the tables of an opened store (see :func:`phaseid_hpc.store.open_store`)."""
        meter_coords = [c for c in ds.coords if ds[c].dims == ("meter",)]
        meters = pd.DataFrame({c: np.asarray(ds[c].values) for c in meter_coords})
        meters = meters.rename(columns={"meter": "meter_id"})
        for col in ("service_type",):
            if col not in meters:
                meters[col] = None
        for col in ("nominal_v", "sampling_interval_s", "off_grid_fraction", "lat", "lon"):
            if col not in meters:
                meters[col] = np.nan
        references = None
        if "reference_voltage" in ds:
            references = (
                pd.DataFrame({"feeder_id": np.asarray(ds["reference_feeder_id"].values, dtype=object),
                              "phase": np.asarray(ds["reference_phase"].values, dtype=object)}),
                np.asarray(ds["reference_voltage"].values, dtype=np.float64),
            )
        transformers = None
        if "transformer" in ds.dims:
            cols = [c for c in ds.coords if ds[c].dims == ("transformer",)]
            transformers = pd.DataFrame({c: np.asarray(ds[c].values) for c in cols})
            transformers = transformers.rename(
                columns={"transformer": "transformer_id", "transformer_feeder_id": "feeder_id"}
            )
        return cls(meters, references, transformers, pd.DatetimeIndex(ds["time"].values),
                   float(ds.attrs["interval_s"]))

    def block(self, start: int, stop: int) -> StoreTables:
        """The tables restricted to meters ``start:stop`` and their feeders."""
        meters = self.meters.iloc[start:stop].reset_index(drop=True)
        feeders = set(meters["feeder_id"].astype(str))
        references = None
        if self.references is not None:
            sel = self.references[0]["feeder_id"].astype(str).isin(feeders).to_numpy()
            if sel.any():
                references = (self.references[0][sel].reset_index(drop=True), self.references[1][sel])
        transformers = None
        if self.transformers is not None:
            transformers = self.transformers[
                self.transformers["feeder_id"].astype(str).isin(feeders)
            ].reset_index(drop=True)
        return StoreTables(meters, references, transformers, self.times, self.interval_s)


def read_block(
    store: str, start: int, stop: int, tables: StoreTables | None = None, *, device: str = "cpu"
) -> Block:
    """Read meters ``start:stop`` of a store as a :class:`~phaseid_hpc.block.Block` on ``device``.

    Parameters
    ----------
    store : str
        Path of the Zarr store.
    start, stop : int
        Meter slice of a block of whole feeders.
    tables : StoreTables, optional
        The block's tables (:meth:`StoreTables.block`); read from the store when not given.
    device : {"cpu", "gpu"}
        Where the arrays go (NumPy or CuPy); they stay there for every stage.
    """
    from ._compat import get_xp
    from .store import open_store, read_meter_block

    if tables is None:
        tables = StoreTables.from_dataset(open_store(store, block_bytes=None, recover=False)).block(start, stop)
    arrays = read_meter_block(store, start, stop)
    xp = get_xp(device)

    def on_device(name: str) -> Any:
        return xp.asarray(arrays[name].astype(np.float64)) if name in arrays else None

    return Block.from_tables(on_device("voltage"), on_device("kw"), on_device("kvar"), tables)


def process_block(
    store: str,
    start: int,
    stop: int,
    config: RunConfig,
    tables: StoreTables | None = None,
) -> BlockResult:
    """Read meters ``start:stop`` and run every stage on them: the job's unit of work.

    Parameters
    ----------
    store : str
        Path of the Zarr store.
    start, stop : int
        Meter slice of a block of whole feeders.
    config : RunConfig
    tables : StoreTables, optional
        The block's tables (:meth:`StoreTables.block`); read from the store when not given.

    Returns
    -------
    BlockResult
        One row per meter and per transformer, and the seconds each step took (``read`` first). [s]
    """
    t0 = time.perf_counter()
    block = read_block(store, start, stop, tables, device=config.job.device)
    return run_block(block, config, timings={"read": time.perf_counter() - t0})


def process_arrays(
    voltage: Any,
    kw: Any | None,
    kvar: Any | None,
    tables: StoreTables,
    config: RunConfig,
) -> dict[str, Any]:
    """Every stage of the job on in-memory arrays (benchmarks and capacity tests; no store).

    Parameters
    ----------
    voltage : array, shape (n_meters, n_time)
        Meter voltage on the grid of ``tables.times``, NaN where missing. [V]
    kw, kvar : array, shape (n_meters, n_time), optional
        Active [kW] and reactive [kvar] power.
    tables : StoreTables
        The meters (rows aligned with ``voltage``; whole feeders), references and transformers.
    config : RunConfig

    Returns
    -------
    dict
        ``meters`` (DataFrame, one row per meter, reasons joined as in the written tables),
        ``transformers`` (DataFrame), ``timings`` [s].
    """
    from ._compat import get_xp

    xp = get_xp(config.job.device)

    def on_device(x: Any) -> Any:
        return None if x is None else xp.asarray(x, dtype=xp.float64)

    res = run_block(Block.from_tables(on_device(voltage), on_device(kw), on_device(kvar), tables), config)
    meters = res.meters.assign(reasons=join_reasons(res.meters["reasons"]))
    return {"meters": meters, "transformers": res.transformers, "timings": res.timings}


def _run_block_to_file(
    store: str, start: int, stop: int, config: RunConfig, path: str, tables: StoreTables | None = None
) -> dict[str, Any]:
    """Worker-side: process one block and persist its result atomically (the unit of resume).

    BLAS runs single-threaded inside a block: a multi-threaded GEMM sums in an order that depends on the
    thread count, and results must not depend on where a block ran. Parallelism comes from blocks.
    """
    from threadpoolctl import threadpool_limits

    from ._memory import heap_for_arrays

    # freed array memory kept for the next temporary inside the block (a Dask worker otherwise maps and
    # faults in every large temporary afresh: a third more CPU per block)
    with threadpool_limits(limits=1, user_api="blas"), heap_for_arrays():
        res = process_block(store, start, stop, config, tables)
    p = Path(path)
    _atomic_write_bytes(p.with_suffix(".transformers.parquet"), _parquet_bytes(_flatten(res.transformers)))
    _atomic_write_bytes(p, _parquet_bytes(_flatten(res.meters)))  # written last: its presence marks completion
    return {"path": path, "timings": res.timings, "n": stop - start}


def _flatten(df: pd.DataFrame) -> pd.DataFrame:
    """Lists in cells become '; '-joined strings so tables stay flat and byte-stable."""
    out = df.copy()
    for c in out.columns:
        if out[c].dtype == object and len(out) and any(isinstance(v, (list, tuple)) for v in out[c]):
            out[c] = ["; ".join(map(str, v)) if isinstance(v, (list, tuple)) else v for v in out[c]]
    return out


# ----------------------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------------------
def run_job(
    store: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    config: RunConfig | None = None,
    client: Any = None,
    progress: bool = False,
    log_json: bool = False,
    echo: Callable[[str], None] | None = None,
    feeders: Sequence[str] | None = None,
    previous: str | os.PathLike[str] | None = None,
    report: bool = True,
) -> RunSummary:
    """Identify every meter's phase (and transformer) in a store and write one output folder.

    Parameters
    ----------
    store : path-like
        Zarr store written by ``phaseid ingest`` or ``phaseid synth --store``.
    out : path-like
        Output folder: ``meters.parquet``, ``corrections.csv``, ``review.csv``, ``transformers.parquet``,
        ``summary.json``, ``run.log``, ``report.html`` and ``partitions/`` (per-block results used to resume).
    config : RunConfig, optional
        Defaults to :class:`RunConfig()`.
    client : distributed.Client, optional
        Where blocks run. ``None`` runs blocks in this process, one after the other.
    progress : bool
        Show a progress bar on the terminal.
    log_json : bool
        Write ``run.log`` as JSON lines instead of key=value text.
    echo : callable, optional
        Receives human-readable progress lines (the CLI passes ``print``).
    feeders : sequence of str, optional
        Delta run: recompute only the blocks holding these feeders; every other feeder's rows are copied
        from ``previous``.
    previous : path-like, optional
        Results folder of an earlier run (needed with ``feeders``).
    report : bool
        Also write ``report.html`` (:func:`phaseid_hpc.report.write_report`); a failure there is logged
        (``report_failed`` in run.log) and does not fail the run.

    Returns
    -------
    RunSummary
    """
    config = config or RunConfig()
    say = echo or (lambda s: None)
    t_start = time.perf_counter()
    out_dir, part_dir, logger = _prepare_output(out, log_json)
    store = _existing_store(store)
    wanted = None if feeders is None else set(map(str, feeders))  # a delta run recomputes only these feeders

    plan, results, t_blocks = _plan_and_run_blocks(store, part_dir, config, client, progress, logger, say,
                                                   wanted, previous)
    block_timings = _log_blocks_done(results, logger)
    t_blocks = time.perf_counter() - t_blocks

    t_cons = time.perf_counter()
    meters, transformers, files = _consolidate_and_write(
        out_dir, plan.paths, None if wanted is None else Path(previous), wanted or set(), logger
    )
    t_cons = time.perf_counter() - t_cons

    counts = _counts(meters)
    timings = {
        "total": time.perf_counter() - t_start,
        "blocks_wall": t_blocks,
        "consolidate": t_cons,
        **{f"block_{k}_sum": v for k, v in block_timings.items()},
    }
    delta = None if wanted is None else {"previous": os.path.abspath(previous),
                                         "recomputed_feeders": sorted(wanted)}
    files["summary"] = _write_summary(out_dir, meters, transformers, counts, config, store, plan, timings,
                                      delta)
    files["run_log"] = str(out_dir / "run.log")
    if report:
        t_report = time.perf_counter()
        path = _write_report(out_dir, store, logger, say, client)
        if path is not None:
            files["report"] = path
        timings["report"] = time.perf_counter() - t_report
    log_event(logger, "run_done", meters=len(meters), confident=counts.get("confident", 0),
              changed=counts["phase_changed"], total_s=round(timings["total"], 3))
    return RunSummary(out_dir, len(meters), len(plan.blocks), plan.reused, counts, timings, files)


@dataclass(frozen=True)
class _BlockPlan:
    """What a run works on: the store's meter table, its blocks, their partition files and fingerprints."""

    meter_table: pd.DataFrame
    blocks: Sequence[Any]
    paths: list[Path]
    reused: int
    store_fp: str
    config_fp: str


def _prepare_output(out: str | os.PathLike[str], log_json: bool) -> tuple[Path, Path, logging.Logger]:
    """The writable output folder, its ``partitions/`` folder and the run logger (``run.log``)."""
    out_dir = check_output_writable(out)
    part_dir = out_dir / PARTITION_DIR
    part_dir.mkdir(exist_ok=True)
    return out_dir, part_dir, get_run_logger(out_dir / "run.log", json_lines=log_json)


def _existing_store(store: str | os.PathLike[str]) -> str:
    """The store's path as a string, once it is known to exist (:class:`StoreError` otherwise)."""
    store = str(store)
    if not Path(store).exists():
        raise StoreError(f"store {store!r} does not exist; create it with 'phaseid ingest' or 'phaseid synth'")
    return store


def _plan_and_run_blocks(
    store: str,
    part_dir: Path,
    config: RunConfig,
    client: Any,
    progress: bool,
    logger: logging.Logger,
    say: Callable[[str], None],
    wanted: set[str] | None,
    previous: str | os.PathLike[str] | None,
) -> tuple[_BlockPlan, dict[int, dict[str, Any]], float]:
    """Under the store's read lock: plan the blocks, then run those without a partition file yet.

    One consistent version of the store for the whole run: ingests wait for it (and it for them); the lock
    is released once every block has read its rows. Returns the plan, the result of each block run, and
    when the blocks started (``time.perf_counter``). [s]
    """
    from .store import open_store, read_lock

    def busy(holder: str) -> None:
        say(f"Waiting for a write to the store to finish ({holder})")
        log_event(logger, "store_busy", store=store, holder=holder)

    with read_lock(store, on_wait=busy):
        ds = open_store(store)
        # the store's small tables are read here, by threads of this process: not as graphs shipped to the
        # cluster (at 1 M meters each such graph carried the 15 MB meter index)
        with dask.config.set(scheduler="threads"):
            plan, todo = _plan_run(ds, store, part_dir, config, client, logger, say, wanted, previous)
        t_blocks = time.perf_counter()
        if todo:
            say(f"Processing {len(todo)} of {len(plan.blocks)} blocks "
                f"({plan.reused} reused from an earlier run)")
        with dask.config.set(scheduler="threads"):
            tables = StoreTables.from_dataset(ds) if todo else None
        results = _execute(todo, store, config, client, progress, tables)
    return plan, results, t_blocks


def _plan_run(
    ds: Any,
    store: str,
    part_dir: Path,
    config: RunConfig,
    client: Any,
    logger: logging.Logger,
    say: Callable[[str], None],
    wanted: set[str] | None,
    previous: str | os.PathLike[str] | None,
) -> tuple[_BlockPlan, list[tuple[int, int, int, str]]]:
    """Log the run's start, cut the opened store into blocks (a delta run: the ``wanted`` feeders' rows
    only) and name each block's partition file; the blocks still to run come second."""
    from .store import feeder_blocks

    n_meters = int(ds.sizes["meter"])
    meter_table = ds[[c for c in ds.coords if ds[c].dims == ("meter",)]].to_dataframe().reset_index()
    blocks = feeder_blocks(ds, config.job.block_bytes, multiple_of=_worker_threads(client))
    store_fp = store_fingerprint(store)
    config_fp = config_fingerprint(config)
    log_event(logger, "run_start", store=store, meters=n_meters, blocks=len(blocks), store_fingerprint=store_fp,
              config_fingerprint=config_fp, device=config.job.device)
    if client is not None:
        say(f"Dask dashboard: {getattr(client, 'dashboard_link', 'n/a')}")
        log_event(logger, "dask_client", dashboard=getattr(client, "dashboard_link", ""),
                  workers=len(client.scheduler_info().get("workers", {})))
    if wanted is not None:
        blocks = _delta_blocks(blocks, meter_table, wanted, previous, store)  # the affected feeders' rows
        log_event(logger, "delta_plan", feeders=",".join(sorted(wanted)), blocks=len(blocks))
    todo, paths = _plan_blocks(blocks, part_dir, store_fp, config_fp, logger)
    plan = _BlockPlan(meter_table, blocks, paths, len(blocks) - len(todo), store_fp, config_fp)
    return plan, todo


def _consolidate_and_write(
    out_dir: Path, paths: Sequence[Path], previous: Path | None, feeders: set[str], logger: logging.Logger
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, str]]:
    """The consolidated meters and transformers tables (see :func:`_consolidate`), each meter finding logged,
    and the result files written (:func:`_write_outputs`, whose paths come third)."""
    meters, transformers = _consolidate(paths, previous, feeders)
    for fid, mid, reason in _findings(meters):
        log_event(logger, "meter_finding", logging.WARNING, feeder=fid, meter=mid, reason=reason)
    files = _write_outputs(out_dir, meters, transformers)
    return meters, transformers, files


def _write_summary(
    out_dir: Path,
    meters: pd.DataFrame,
    transformers: pd.DataFrame,
    counts: dict[str, int],
    config: RunConfig,
    store: str,
    plan: _BlockPlan,
    timings: dict[str, float],
    delta: dict[str, Any] | None,
) -> str:
    """Write ``summary.json`` (with ``delta`` when given, and ``timings`` rounded to ms) and return its path."""
    summary = _summary(meters, transformers, counts, config, store, plan.store_fp, plan.config_fp,
                       len(plan.blocks), plan.reused, plan.meter_table)
    if delta is not None:
        summary["delta"] = delta
    summary["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    path = out_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return str(path)


def _worker_threads(client: Any) -> int:
    """Threads of the cluster's workers (1 without a client): blocks are planned in multiples of it."""
    if client is None:
        return 1
    try:
        return max(1, sum(int(v) for v in client.nthreads().values()))
    except Exception:  # noqa: BLE001 - a client that cannot say: plan as for one worker
        return 1


def _delta_blocks(blocks: Sequence[Any], meter_table: pd.DataFrame, feeders: set[str],
                  previous: str | os.PathLike[str] | None, store: str) -> list[Any]:
    """Delta run: the blocks cut to the rows of ``feeders`` (checked to be in the store)."""
    if previous is None:
        raise PhaseIDError("a delta run (feeders=...) needs the previous results folder")
    unknown = sorted(feeders - set(meter_table["feeder_id"].astype(str)))
    if unknown:
        raise PhaseIDError(f"delta run: feeder(s) {unknown[:5]} are not in the store {store!r}")
    from .delta import affected_blocks

    return affected_blocks(meter_table, blocks, feeders)


def _write_report(out_dir: Path, store: str, logger: logging.Logger, say: Callable[[str], None],
                  client: Any = None) -> str | None:
    """``report.html`` from the written results (feeder figures drawn on the ``client``'s workers where one
    is given); a failure is logged and said, never fatal (``None``)."""
    try:
        from .report import write_report

        return str(write_report(out_dir, store=store, client=client))
    except Exception as exc:  # noqa: BLE001 - the report is a view of written results: never fatal
        log_event(logger, "report_failed", logging.ERROR, error=f"{type(exc).__name__}: {exc}")
        say(f"report.html not written ({type(exc).__name__}: {exc}); the results are complete, "
            f"retry with: phaseid report --results {out_dir}")
        return None


def _plan_blocks(
    blocks: Sequence[Any], part_dir: Path, store_fp: str, config_fp: str, logger: logging.Logger
) -> tuple[list[tuple[int, int, int, str]], list[Path]]:
    """Each block's partition file, and the blocks still to run (``(index, start, stop, path)``).

    A block whose two partition files exist (same rows, feeders, store and config fingerprints) is reused;
    any other file in ``part_dir`` belongs to another store or config and is removed, so results are never
    mixed.
    """
    todo: list[tuple[int, int, int, str]] = []
    paths: list[Path] = []
    for i, b in enumerate(blocks):
        start, stop, b_feeders = b.start, b.stop, list(map(str, b.feeder_ids))
        key = _block_key(start, stop, b_feeders, store_fp, config_fp)
        path = part_dir / f"block-{start:09d}-{key}.parquet"
        paths.append(path)
        if path.exists() and path.with_suffix(".transformers.parquet").exists():
            log_event(logger, "block_reused", block=i, feeders=",".join(b_feeders))
        else:
            todo.append((i, start, stop, str(path)))
    valid = {p.name for p in paths} | {p.with_suffix(".transformers.parquet").name for p in paths}
    for stale in part_dir.iterdir():
        if stale.name not in valid:
            stale.unlink()
    return todo, paths


def _log_blocks_done(results: dict[int, dict[str, Any]], logger: logging.Logger) -> dict[str, float]:
    """One ``block_done`` line per finished block, in block order; the stage timings summed [s]."""
    block_timings: dict[str, float] = {}
    for i, r in sorted(results.items()):
        for k, v in r["timings"].items():
            block_timings[k] = block_timings.get(k, 0.0) + float(v)
        log_event(logger, "block_done", block=i, meters=r["n"],
                  **{f"{k}_s": round(float(v), 3) for k, v in r["timings"].items()})
    return block_timings


def _consolidate(
    paths: Sequence[Path], previous: Path | None, feeders: set[str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The meters and transformers tables of every block, in canonical order (stable sorts).

    With ``previous`` (a delta run) the rows of ``feeders`` come from ``paths`` and every other feeder's
    from the previous results.
    """
    meters = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True) if paths else pd.DataFrame(
        columns=list(METER_RESULT_COLUMNS)
    )
    meters = meters.sort_values(["feeder_id", "transformer_id", "meter_id"], kind="stable").reset_index(drop=True)
    xfs = [pd.read_parquet(p.with_suffix(".transformers.parquet")) for p in paths]
    xfs = [x for x in xfs if len(x)]
    transformers = pd.concat(xfs, ignore_index=True) if xfs else pd.DataFrame()
    if previous is not None:
        meters, transformers = _merge_previous(previous, feeders, meters, transformers)
    if len(transformers):
        transformers = transformers.sort_values(["feeder_id", "transformer_id"], kind="stable").reset_index(
            drop=True
        )
    return meters, transformers


def _findings(meters: pd.DataFrame) -> list[tuple[str, str, str]]:
    """``(feeder, meter, reasons)`` of every meter with at least one reason code."""
    found = meters[meters["reasons"].astype(str).str.len() > 0]
    return list(zip(found["feeder_id"], found["meter_id"], found["reasons"]))


def _counts(meters: pd.DataFrame) -> dict[str, int]:
    """Meters per confidence class, and how many had their phase (and transformer) changed."""
    counts = {c: int((meters["phase_class"] == c).sum()) for c in PHASE_CLASSES}
    counts["meters"] = len(meters)
    counts["phase_changed"] = int(meters["changed"].sum())
    if "transformer_changed" in meters:
        counts["transformer_changed"] = int(meters["transformer_changed"].sum())
    return counts


def _merge_previous(
    previous: Path, feeders: set[str], meters: pd.DataFrame, transformers: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Delta run: recomputed rows for ``feeders``, every other feeder's rows copied from ``previous``."""
    prev_m = previous / "meters.parquet"
    if not prev_m.is_file():
        raise PhaseIDError(f"delta run: previous results {str(previous)!r} have no meters.parquet")
    old = pd.read_parquet(prev_m)
    keep = ~old["feeder_id"].astype(str).isin(feeders)
    new = meters[meters["feeder_id"].astype(str).isin(feeders)]
    merged = pd.concat([old[keep], new], ignore_index=True)
    prev_x = previous / "transformers.parquet"
    if prev_x.is_file():
        oldx = pd.read_parquet(prev_x)
        newx = transformers[transformers["feeder_id"].astype(str).isin(feeders)] if len(transformers) else transformers
        transformers = pd.concat([oldx[~oldx["feeder_id"].astype(str).isin(feeders)], newx], ignore_index=True)
    return merged, transformers


def _execute(
    todo: list[tuple[int, int, int, str]],
    store: str,
    config: RunConfig,
    client: Any,
    progress: bool,
    tables: StoreTables | None,
) -> dict[int, dict[str, Any]]:
    from .console import progress_bar

    results: dict[int, dict[str, Any]] = {}
    if not todo:
        return results
    if client is None:
        bar = progress_bar(len(todo), "identify", "block", enabled=progress)
        for i, start, stop, path in todo:
            results[i] = _run_block_to_file(store, start, stop, config, path,
                                            tables.block(start, stop) if tables else None)
            bar.update()
        bar.close()
        return results
    from distributed import as_completed

    futures = {}
    for i, start, stop, path in todo:
        fut = client.submit(_run_block_to_file, store, start, stop, config, path,
                            tables.block(start, stop) if tables else None,
                            key=f"phaseid-block-{Path(path).stem}", pure=False, retries=2)
        futures[fut] = i
    bar = progress_bar(len(todo), "identify", "block", enabled=progress)
    for fut in as_completed(list(futures)):
        results[futures[fut]] = fut.result()
        bar.update()
    bar.close()
    return results


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _safe_csv_cells(df: pd.DataFrame) -> pd.DataFrame:
    """Text cells a spreadsheet would evaluate (first character ``= + - @``, tab, CR) get a leading ``'``."""
    out = df.copy()
    for c in out.columns:
        if out[c].dtype == object:
            out[c] = [("'" + v) if isinstance(v, str) and v.startswith(_FORMULA_START) else v for v in out[c]]
    return out


def _worklist(meters: pd.DataFrame, rows: np.ndarray, phase_col: str, tx_col: str) -> pd.DataFrame:
    """Rows of ``meters`` whose ``phase_col`` / ``tx_col`` differ from GIS, in worklist columns and order."""
    sel = meters[rows].copy()
    ph = (sel[phase_col].notna() & (sel[phase_col] != sel["phase_gis"])).to_numpy()
    tr = np.zeros(len(sel), dtype=bool)
    if tx_col in sel:
        tr = (sel[tx_col].notna() & (sel[tx_col] != sel["transformer_id"])).to_numpy()
    sel.insert(0, "correction", np.where(ph & tr, "phase+transformer", np.where(ph, "phase", "transformer")))
    cols = ["feeder_id", "transformer_id", "meter_id", "correction", "phase_gis", phase_col, "phase_confidence",
            "phase_class"]
    if tx_col in sel:
        cols += [tx_col, "transformer_confidence", "transformer_class"]
    cols += [c for c in ("phase_before", "changed_at") if c in sel] + ["reasons"]  # changed_at: GIS stale since
    out = sel[cols].rename(columns={phase_col: "phase", tx_col: "transformer"})
    return _safe_csv_cells(out.sort_values(["feeder_id", "transformer_id", "meter_id"], kind="stable"))


def _write_outputs(out_dir: Path, meters: pd.DataFrame, transformers: pd.DataFrame) -> dict[str, str]:
    """``meters.parquet``, the field worklist ``corrections.csv`` (confident changes only: the recommended
    phase or transformer differs from GIS) and ``review.csv`` (the inference disagrees with GIS but is not
    confident, or GIS contradicts itself: a three-phase service on a single-phase transformer; GIS kept,
    worth a look), and ``transformers.parquet``."""
    _atomic_write_bytes(out_dir / "meters.parquet", _parquet_bytes(meters))
    changed = meters["changed"].to_numpy(dtype=bool)
    if "transformer_changed" in meters:
        changed = changed | meters["transformer_changed"].to_numpy(dtype=bool)
    corr = _worklist(meters, changed, "phase", "transformer")
    _atomic_write_bytes(out_dir / "corrections.csv", corr.to_csv(index=False, float_format="%.4f").encode())
    disagree = meters["phase_inferred"].notna() & (meters["phase_inferred"] != meters["phase_gis"])
    if "transformer_inferred" in meters:
        disagree = disagree | (meters["transformer_inferred"].notna()
                               & (meters["transformer_inferred"] != meters["transformer_id"]))
    disagree = disagree.to_numpy(dtype=bool, copy=True)
    # GIS records that contradict each other go to review whatever the voltage says
    disagree |= meters["reasons"].astype(str).str.contains(REASON_TX_THREE_PHASE_ON_SINGLE, regex=False).to_numpy()
    review = _worklist(meters, disagree & ~changed, "phase_inferred", "transformer_inferred")
    _atomic_write_bytes(out_dir / "review.csv", review.to_csv(index=False, float_format="%.4f").encode())
    files = {"meters": str(out_dir / "meters.parquet"), "corrections": str(out_dir / "corrections.csv"),
             "review": str(out_dir / "review.csv")}
    if len(transformers):
        _atomic_write_bytes(out_dir / "transformers.parquet", _parquet_bytes(transformers))
        files["transformers"] = str(out_dir / "transformers.parquet")
    return files


def _summary(
    meters: pd.DataFrame,
    transformers: pd.DataFrame,
    counts: dict[str, int],
    config: RunConfig,
    store: str,
    store_fp: str,
    config_fp: str,
    n_blocks: int,
    reused: int,
    meter_table: pd.DataFrame,
) -> dict[str, Any]:
    import dask
    import xarray
    import zarr

    per_feeder = {}
    for fid, g in meters.groupby("feeder_id", sort=True):
        d = {c: int((g["phase_class"] == c).sum()) for c in PHASE_CLASSES}
        d["meters"] = len(g)
        d["phase_changed"] = int(g["changed"].sum())
        if "transformer_changed" in g:
            d["transformer_changed"] = int(g["transformer_changed"].sum())
        per_feeder[str(fid)] = d
    reason_counts: dict[str, int] = {}
    for r in meters["reasons"]:
        for code in filter(None, str(r).split("; ")):
            reason_counts[code] = reason_counts.get(code, 0) + 1
    out: dict[str, Any] = {
        "phaseid_hpc_version": __version__,
        "counts": counts,
        "per_feeder": per_feeder,
        "reasons": dict(sorted(reason_counts.items())),
        "inputs": {"store": os.path.abspath(store), "store_fingerprint": store_fp},
        "config": config_to_dict(config),
        "config_fingerprint": config_fp,
        "blocks": {"total": n_blocks, "reused": reused},
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "pandas": pd.__version__,
            "dask": dask.__version__,
            "xarray": xarray.__version__,
            "zarr": zarr.__version__,
        },
    }
    if len(transformers) and "flag_codes" in transformers:
        flag_counts: dict[str, int] = {}
        for f in transformers["flag_codes"]:
            for code in filter(None, str(f).split("; ")):
                flag_counts[code] = flag_counts.get(code, 0) + 1
        out["transformer_flags"] = dict(sorted(flag_counts.items()))
        out["counts"]["transformers"] = len(transformers)
    return out


def clear_partitions(out: str | os.PathLike[str]) -> None:
    """Remove persisted block results (forces a full recompute)."""
    shutil.rmtree(Path(out) / PARTITION_DIR, ignore_errors=True)


