"""Capacity mode: the job's per-block code on generated blocks, without a stored copy of the data.

Each Dask task generates one block of whole substations (:func:`phaseid_hpc.synth.generator.simulate_substation`,
the same data ``phaseid synth --store`` writes), passes it through the store's encoding (int16 deci-volts or
float32, decoded as :func:`phaseid_hpc.store.read_meter_block` does), runs
:func:`phaseid_hpc.pipeline.process_arrays` on it, scores it against the generated truth
(:func:`phaseid_hpc.score.score_frames`) and writes its rows to a per-block Parquet file. The client only
plans, collects small per-block summaries and streams the part files into ``meters.parquet`` and
``transformers.parquet`` with a :class:`pyarrow.parquet.ParquetWriter`, one block at a time, so the
scheduler, the consolidation and the client's memory are exercised at 10 M meters without a 115 GB store.

Steps (one function each): :func:`plan_blocks` -> :func:`run_capacity_block` on the workers ->
:func:`consolidate_parts` -> :func:`combine_scores`.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Self

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .config import RunConfig
from .errors import PhaseIDError

__all__ = ["CapacitySummary", "combine_scores", "consolidate_parts", "plan_blocks", "run_capacity",
           "run_capacity_block"]

#: Part files of the blocks, under the output folder.
PART_DIR = "partitions"


@dataclass
class CapacitySummary:
    """What :func:`run_capacity` did and measured.

    Attributes
    ----------
    out_dir : Path
        Holds ``meters.parquet``, ``transformers.parquet`` and ``partitions/``.
    n_meters, n_blocks, n_time : int
    wall_s : float
        Whole run, planning to consolidation [s].
    blocks_wall_s : float
        From the first block submitted to the last one finished [s].
    consolidate_s : float
        Streaming the part files into the two output files [s].
    per_meter_us : float
        ``wall_s / n_meters`` [us].
    client_peak_rss : int
        Largest resident set of the client process during the run [bytes].
    block_timings_s : dict
        Sums over blocks of the worker-side stages (``generate``, ``quality``, ``phase``, ...) [s].
    score : dict
        :func:`combine_scores` of the blocks' :func:`~phaseid_hpc.score.score_frames`.
    """

    out_dir: Path
    n_meters: int
    n_blocks: int
    n_time: int
    wall_s: float
    blocks_wall_s: float
    consolidate_s: float
    per_meter_us: float
    client_peak_rss: int
    block_timings_s: dict[str, float] = field(default_factory=dict)
    score: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ step 1
def plan_blocks(
    n_meters: int, seed: int, n_time: int, block_bytes: float, feeder_meters: tuple[int, int] = (300, 4000)
) -> list[list[tuple[int, list[tuple[int, int]]]]]:
    """Group the generator's substations into blocks of about ``block_bytes`` of float32 voltage.

    Parameters
    ----------
    n_meters, seed : int
        As :func:`phaseid_hpc.synth.generator.plan_utility`.
    n_time : int
        Samples per meter [-].
    block_bytes : float
        Target block size [bytes] (``4 * n_time`` bytes per meter); whole substations, since a substation's
        feeders share its bus voltage.
    feeder_meters : (int, int)
        Smallest and largest feeder [meters].

    Returns
    -------
    list of blocks, each a list of ``(substation_index, [(feeder_index, n_meters), ...])``.
    """
    from .synth.generator import plan_utility

    per_block = max(1.0, float(block_bytes) / (4.0 * n_time))
    blocks: list[list[tuple[int, list[tuple[int, int]]]]] = [[]]
    size = 0
    for sub in enumerate(plan_utility(n_meters, seed, feeder_meters)):
        if size >= per_block:
            blocks.append([])
            size = 0
        blocks[-1].append(sub)
        size += sum(n for _, n in sub[1])
    return blocks


# ------------------------------------------------------------------------------------------------ step 2
def _stored_voltage(measured: np.ndarray, int16_decivolt: bool) -> np.ndarray:
    """Voltage as a block read from the store gives it: encoded and decoded again [V], float32."""
    from .store import DECIVOLT_SCALE, INT16_FILL, encode_voltage

    if not int16_decivolt:
        return measured.astype(np.float32)
    raw = encode_voltage(measured, "int16_decivolt")
    data = (raw.astype(np.float64) * DECIVOLT_SCALE).astype(np.float32)
    data[raw == INT16_FILL] = np.nan
    return data


def _store_tables_of(sims: list[Any], times: pd.DatetimeIndex, interval_s: float) -> Any:
    """The :class:`~phaseid_hpc.pipeline.StoreTables` a store of these feeders gives (same columns, order
    and dtypes as :meth:`StoreTables.from_dataset`)."""
    from .pipeline import StoreTables

    m = pd.concat([s.meters for s in sims], ignore_index=True)
    meters = pd.DataFrame({
        "feeder_id": m["feeder_id"].to_numpy(dtype=object),
        "lat": m["lat"].to_numpy(np.float64),
        "lon": m["lon"].to_numpy(np.float64),
        "nominal_v": m["nominal_v"].to_numpy(np.float64),
        "off_grid_fraction": np.zeros(len(m)),
        "phase_gis": m["phase"].to_numpy(dtype=object),
        "sampling_interval_s": np.full(len(m), float(interval_s)),
        "service_type": m["service_type"].to_numpy(dtype=object),
        "transformer_id": m["transformer_id"].to_numpy(dtype=object),
        "meter_id": m["meter_id"].to_numpy(dtype=object),
    })
    ref_keys = pd.DataFrame({"feeder_id": np.repeat(np.array([s.feeder_id for s in sims], dtype=object), 3),
                             "phase": np.array(list("ABC") * len(sims), dtype=object)})
    ref_values = np.concatenate([s.references.to_numpy(np.float32) for s in sims]).astype(np.float64)
    x = pd.concat([s.transformers for s in sims], ignore_index=True)
    transformers = pd.DataFrame({
        "kva_rating": x["kva_rating"].to_numpy(np.float64),
        "n_phases": x["n_phases"].to_numpy(np.int64),
        "feeder_id": x["feeder_id"].to_numpy(dtype=object),
        "transformer_id": x["transformer_id"].to_numpy(dtype=object),
    })
    return StoreTables(meters, (ref_keys, ref_values), transformers, times, float(interval_s))


def run_capacity_block(
    block: int,
    subs: list[tuple[int, list[tuple[int, int]]]],
    params: dict[str, Any],
    config: RunConfig,
    part_dir: str,
) -> dict[str, Any]:
    """Worker side: generate one block, run the job's per-block code on it, score it, write its rows.

    Parameters
    ----------
    block : int
        Block number (names the part files).
    subs : list
        The block's substations (:func:`plan_blocks`).
    params : dict
        ``start, days, interval, seed, measurement, phase_error_rate, transformer_error_rate, pv_fraction``.
    config : RunConfig
    part_dir : str
        Folder of the part files.

    Returns
    -------
    dict
        ``n`` meters, ``timings`` [s] (``generate`` then the stages of
        :func:`~phaseid_hpc.pipeline.process_arrays`), ``score`` (:func:`~phaseid_hpc.score.score_frames`).
    """
    from ._memory import heap_for_arrays

    with heap_for_arrays():
        return _capacity_block(block, subs, params, config, part_dir)


def _capacity_block(
    block: int, subs: list[tuple[int, list[tuple[int, int]]]], params: dict[str, Any], config: RunConfig,
    part_dir: str,
) -> dict[str, Any]:
    from threadpoolctl import threadpool_limits

    from .pipeline import process_arrays
    from .score import score_frames
    from .synth.generator import _make_grid, _region, simulate_substation, truth_table

    t0 = time.perf_counter()
    grid = _make_grid(params["start"], params["days"], params["interval"])
    gen = {k: params[k] for k in ("seed", "measurement", "phase_error_rate", "transformer_error_rate",
                                  "pv_fraction")}
    region = _region(params["seed"], grid)
    model = params["measurement"]
    int16 = model is not None and model.resolution_v > 0 and abs(
        model.resolution_v / 0.1 - round(model.resolution_v / 0.1)) < 1e-9
    sims = []  # what the store keeps of each feeder (voltage as stored, kw; not kvar), the rest dropped at once
    for sub_index, feeders in subs:
        for sim in simulate_substation(sub_index, feeders, grid, region=region, **gen):
            sims.append(SimpleNamespace(feeder_id=sim.feeder_id, meters=sim.meters, transformers=sim.transformers,
                                        references=sim.references, kw=sim.kw,
                                        voltage=_stored_voltage(sim.measured, int16)))
            del sim
    sims.sort(key=lambda s: s.feeder_id)  # store order: feeder, then (already) transformer, meter id
    voltage = np.concatenate([s.voltage for s in sims]).astype(np.float64)
    kw = np.concatenate([s.kw for s in sims]).astype(np.float64)
    truth = pd.concat([truth_table(s.meters, s.feeder_id) for s in sims], ignore_index=True)
    times = pd.DatetimeIndex(grid.times.tz_convert("UTC").tz_localize(None).as_unit("ns"))
    tables = _store_tables_of(sims, times, grid.interval_s)
    del sims
    generate_s = time.perf_counter() - t0
    with threadpool_limits(limits=1, user_api="blas"):
        res = process_arrays(voltage, kw, None, tables, config)
    del voltage, kw
    parts = Path(part_dir)
    _write_part(res["meters"], parts / f"meters-{block:05d}.parquet")
    _write_part(res["transformers"], parts / f"transformers-{block:05d}.parquet")
    return {"n": len(res["meters"]), "timings": {"generate": generate_s, **res["timings"]},
            "score": score_frames(res["meters"], truth)}


def _write_part(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp, compression="zstd")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ step 3
def consolidate_parts(parts: list[Path], dest: Path) -> int:
    """Stream part files, in order, into one Parquet file, one part in memory at a time.

    The schema is the union of the parts' schemas (a column that is all-null in one block takes its type
    from the others); columns a part lacks are written as nulls.

    Parameters
    ----------
    parts : list of Path
    dest : Path

    Returns
    -------
    int
        Rows written.
    """
    parts = [p for p in parts if p.is_file()]
    if not parts:
        pq.write_table(pa.table({}), dest)
        return 0
    schemas = [pq.read_schema(p).remove_metadata() for p in parts]
    schema = pa.unify_schemas(schemas, promote_options="permissive")
    rows = 0
    with pq.ParquetWriter(dest, schema, compression="zstd") as writer:
        for p in parts:
            tab = pq.read_table(p).replace_schema_metadata(None)
            cols = [tab.column(f.name).cast(f.type) if f.name in tab.column_names
                    else pa.nulls(len(tab), f.type) for f in schema]
            writer.write_table(pa.Table.from_arrays(cols, schema=schema))
            rows += len(tab)
    return rows


# ------------------------------------------------------------------------------------------------ step 4
def combine_scores(scores: list[dict[str, Any]]) -> dict[str, Any]:
    """Headline figures of per-block :func:`~phaseid_hpc.score.score_frames` results over all blocks.

    Every ratio whose denominator a block's score gives (meters, or meters given a phase) is recombined
    exactly from counts; counts are summed.

    Returns
    -------
    dict
        ``phase``: ``meters, accuracy, accuracy_identified, coverage, gis_accuracy, corrections,
        gis_errors``; ``transformer`` (when scored): ``meters, accuracy, gis_accuracy, flags, gis_errors``.
    """
    def total(part: str, key: str) -> int:
        return int(sum(s[part][key] for s in scores if part in s))

    def counted(part: str, key: str, den_key: str = "meters") -> float:
        num = sum(round((s[part][key] or 0.0) * s[part][den_key]) for s in scores if part in s)
        den = total(part, den_key)
        return None if den == 0 else num / den

    n = total("phase", "meters")
    identified = sum(round((s["phase"]["coverage"] or 0.0) * s["phase"]["meters"]) for s in scores)
    correct = sum(round((s["phase"]["accuracy"] or 0.0) * s["phase"]["meters"]) for s in scores)
    out: dict[str, Any] = {"phase": {
        "meters": n,
        "accuracy": counted("phase", "accuracy"),
        "accuracy_identified": None if identified == 0 else correct / identified,
        "coverage": counted("phase", "coverage"),
        "gis_accuracy": counted("phase", "gis_accuracy"),
        "corrections": total("phase", "corrections"),
        "gis_errors": total("phase", "gis_errors"),
    }}
    if scores and all("transformer" in s for s in scores):
        out["transformer"] = {
            "meters": total("transformer", "meters"),
            "accuracy": counted("transformer", "accuracy"),
            "gis_accuracy": counted("transformer", "gis_accuracy"),
            "flags": total("transformer", "flags"),
            "gis_errors": total("transformer", "gis_errors"),
        }
    return out


class _PeakRSS:
    """Background sampler of this process's resident set [bytes]."""

    def __init__(self, period_s: float = 0.1) -> None:
        import psutil

        self._proc = psutil.Process()
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.period_s = period_s

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def run_capacity(
    out: str | os.PathLike[str],
    *,
    n_meters: int,
    days: float = 30,
    interval: str = "15min",
    seed: int = 0,
    start: str = "2026-06-01",
    measurement: Any = "default",
    phase_error_rate: float = 0.08,
    transformer_error_rate: float = 0.03,
    pv_fraction: float = 0.0,
    feeder_meters: tuple[int, int] = (300, 4000),
    config: RunConfig | None = None,
    client: Any = None,
    keep_parts: bool = False,
) -> CapacitySummary:
    """Run the job's per-block code on a generated utility of ``n_meters``, block by block, nothing stored.

    Parameters
    ----------
    out : path-like
        Output folder: ``meters.parquet``, ``transformers.parquet`` (and ``partitions/`` while running).
    n_meters : int
        Meters of the generated utility [-].
    days : float
        Length of the record [days].
    interval, seed, start, phase_error_rate, transformer_error_rate, pv_fraction, feeder_meters
        As :func:`phaseid_hpc.synth.generate_utility` (the same seed gives the same data).
    measurement : MeasurementModel or None
        Meter model; ``"default"``: class 0.5, 0.1 V (the generator's default).
    config : RunConfig, optional
        Job configuration; ``job.block_bytes`` sets the block size.
    client : distributed.Client, optional
        Where blocks run; ``None`` runs them here, one after the other.
    keep_parts : bool
        Keep the per-block part files after consolidation.

    Returns
    -------
    CapacitySummary
    """
    from .synth.generator import _DEFAULT_MODEL, _make_grid

    if n_meters < 1:
        raise PhaseIDError(f"capacity: n_meters must be >= 1, got {n_meters}")
    config = config or RunConfig()
    t_start = time.perf_counter()
    out_dir = Path(out)
    part_dir = out_dir / PART_DIR
    part_dir.mkdir(parents=True, exist_ok=True)
    for stale in part_dir.glob("*.parquet"):
        stale.unlink()
    grid = _make_grid(start, days, interval)
    params = {
        "start": start, "days": days, "interval": interval, "seed": seed,
        "measurement": _DEFAULT_MODEL if isinstance(measurement, str) and measurement == "default" else measurement,
        "phase_error_rate": phase_error_rate, "transformer_error_rate": transformer_error_rate,
        "pv_fraction": pv_fraction,
    }
    with _PeakRSS() as rss:
        blocks = plan_blocks(n_meters, seed, grid.n_time, config.job.block_bytes, feeder_meters)
        t_blocks = time.perf_counter()
        results: dict[int, dict[str, Any]] = {}
        if client is None:
            for b, blk in enumerate(blocks):
                results[b] = run_capacity_block(b, blk, params, config, str(part_dir))
        else:
            from distributed import as_completed

            futures = {client.submit(run_capacity_block, b, blk, params, config, str(part_dir),
                                     key=f"phaseid-capacity-{seed}-{b:05d}", pure=False, retries=2): b
                       for b, blk in enumerate(blocks)}
            for fut in as_completed(list(futures)):
                results[futures[fut]] = fut.result()
                fut.release()
        blocks_wall = time.perf_counter() - t_blocks
        t_cons = time.perf_counter()
        n_rows = consolidate_parts([part_dir / f"meters-{b:05d}.parquet" for b in range(len(blocks))],
                                   out_dir / "meters.parquet")
        consolidate_parts([part_dir / f"transformers-{b:05d}.parquet" for b in range(len(blocks))],
                          out_dir / "transformers.parquet")
        consolidate_s = time.perf_counter() - t_cons
        if not keep_parts:
            for p in part_dir.glob("*.parquet"):
                p.unlink()
    timings: dict[str, float] = {}
    for r in results.values():
        for k, v in r["timings"].items():
            timings[k] = timings.get(k, 0.0) + float(v)
    wall = time.perf_counter() - t_start
    return CapacitySummary(
        out_dir=out_dir,
        n_meters=n_rows,
        n_blocks=len(blocks),
        n_time=grid.n_time,
        wall_s=wall,
        blocks_wall_s=blocks_wall,
        consolidate_s=consolidate_s,
        per_meter_us=wall / max(n_rows, 1) * 1e6,
        client_peak_rss=rss.peak,
        block_timings_s=timings,
        score=combine_scores([results[b]["score"] for b in sorted(results)]),
    )
