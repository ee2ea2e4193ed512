"""The stages of one block, each a thin adapter from a :class:`~phaseid_hpc.block.Block` to its module.

The README's steps, in the order :func:`run_block` calls them:

1. :func:`check_quality` - units, implausible and flat-lined values, gaps, sampling, clock offsets
   (:mod:`phaseid_hpc.quality`);
2. :func:`identify` - each meter's phase from its neighbours' GIS labels (:mod:`phaseid_hpc.phase_identification`),
   then :func:`align_clocks` undoes the whole-interval clock errors it found, for every later stage, and
   :func:`confirm_clock_offsets` checks each clock flag against the meter's own neighbourhood;
3. :func:`map_meters_to_transformers` - transformer groups (:mod:`phaseid_hpc.transformer_mapping`);
4. :func:`check_meter_pts` and :func:`validate` - meter PT deviation (:mod:`phaseid_hpc.pt_deviation`) and
   per-transformer loading, imbalance and thermal model (:mod:`phaseid_hpc.validation`);
5. :func:`consolidate` - one row per meter and per transformer;
6. connection changes over time (:func:`phaseid_hpc.changes.with_connection_changes`): meters whose phase or
   transformer changed at a restoration event or at a change point get both answers and the time.

Each stage returns one small frozen dataclass; reasons stay lists of codes until :func:`consolidate`'s
tables are written.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from . import contract
from .block import Block, check_block, union_reasons
from .config import PhaseConfig, PTConfig, QualityConfig, RunConfig, TransformerConfig, ValidationConfig
from .quality import QualityResult

__all__ = [
    "BlockResult",
    "ClockCheck",
    "MappingResult",
    "PTResult",
    "PhaseResult",
    "align_clocks",
    "check_meter_pts",
    "check_quality",
    "confirm_clock_offsets",
    "consolidate",
    "identify",
    "map_meters_to_transformers",
    "run_block",
    "validate",
]


# ----------------------------------------------------------------------------------------------------------
# Stage results
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PhaseResult:
    """Phase identification of a block.

    Attributes
    ----------
    table : DataFrame, one row per meter
        ``phase`` (recommended), ``phase_inferred``, ``phase_confidence`` [0-1], ``phase_class``, ``zone``
        (int, -1 outside a zone) and ``clock_shift_intervals`` (int).
    reasons : list of list of str
        Reason codes per meter.
    """

    table: pd.DataFrame
    reasons: list[list[str]]

    @property
    def clock_shift(self) -> np.ndarray:
        """Whole intervals each meter's clock was found late (positive) or early. [intervals]"""
        return self.table["clock_shift_intervals"].to_numpy(dtype=np.int64)


@dataclass(frozen=True)
class ClockCheck:
    """Clock offsets after alignment, confirmed against each meter's neighbourhood.

    Attributes
    ----------
    clock_offset_s : ndarray, shape (n_meters,)
        The neighbourhood's estimate where the meter has one, else the feeder-level one. [s]
    unconfirmed : ndarray of bool, shape (n_meters,)
        Meters whose feeder-level clock flag the neighbourhood does not confirm (the flag is dropped).
    """

    clock_offset_s: np.ndarray
    unconfirmed: np.ndarray


@dataclass(frozen=True)
class MappingResult:
    """Transformer mapping of a block.

    Attributes
    ----------
    table : DataFrame, one row per meter
        ``transformer`` (recommended), ``transformer_inferred``, ``transformer_confidence`` [0-1],
        ``transformer_class``.
    reasons : list of list of str
    transformers : DataFrame
        One row per transformer (GIS and proposed new ones).
    """

    table: pd.DataFrame
    reasons: list[list[str]]
    transformers: pd.DataFrame


@dataclass(frozen=True)
class PTResult:
    """Meter PT deviation of a block.

    Attributes
    ----------
    pt_deviation_pct : ndarray, shape (n_meters,)
        Estimated PT gain error, NaN where not estimable. [%]
    reasons : list of list of str
    """

    pt_deviation_pct: np.ndarray
    reasons: list[list[str]]


@dataclass(frozen=True)
class BlockResult:
    """What one block gives the job.

    Attributes
    ----------
    meters : DataFrame
        One row per meter (:data:`~phaseid_hpc.contract.METER_RESULT_COLUMNS` first); ``reasons`` holds lists.
    transformers : DataFrame
        One row per transformer; ``flag_codes``/``flag_reasons`` hold lists.
    timings : dict of str to float
        Seconds per stage. [s]
    """

    meters: pd.DataFrame
    transformers: pd.DataFrame
    timings: dict[str, float] = field(default_factory=dict)


class _Timer:
    """Wall time per named stage, accumulated into a dict."""

    def __init__(self, timings: dict[str, float] | None = None) -> None:
        self.timings: dict[str, float] = {} if timings is None else timings

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------------------
# The block, stage by stage
# ----------------------------------------------------------------------------------------------------------
def run_block(block: Block, config: RunConfig, timings: dict[str, float] | None = None) -> BlockResult:
    """Run every stage of the job on one block of whole feeders.

    Parameters
    ----------
    block : Block
        Arrays in the namespace the stages should run in (NumPy; CuPy on a GPU worker).
    config : RunConfig
    timings : dict, optional
        Timings already taken (e.g. the read), kept in front of the stages'. [s]

    Returns
    -------
    BlockResult
    """
    block = check_block(block)
    timer = _Timer(dict(timings or {}))
    with timer("quality"):
        quality = check_quality(block, config.quality)
    with timer("phase"):
        phases = identify(block, quality, config.phase)
        block = align_clocks(block, quality, phases)
    with timer("clock"):
        clocks = confirm_clock_offsets(block, quality, phases, config.quality)
    mapping = None
    if config.transformer.enabled:
        with timer("transformer"):
            mapping = map_meters_to_transformers(block, quality, phases, config.transformer)
    pt = None
    if config.pt.enabled:
        with timer("pt"):
            pt = check_meter_pts(block, phases, mapping, config.pt)
    loading = None
    if config.validation.enabled and block.kw is not None:
        with timer("validation"):
            loading = validate(block, phases, mapping, config.validation)
    meters, transformers = consolidate(block, quality, phases, clocks, mapping, pt, loading)
    result = BlockResult(meters, transformers, timer.timings)
    # 6: connection changes over time (restorations in config.changes.events_file, change points), on the
    # cleaned and clock-aligned block
    from .changes import with_connection_changes

    return with_connection_changes(block, result, config)


def check_quality(block: Block, config: QualityConfig) -> QualityResult:
    """Step 1: data quality of every meter (:func:`phaseid_hpc.quality.assess_quality`)."""
    from .quality import assess_quality

    xp = _namespace(block.voltage)
    m = block.meters
    q = assess_quality(
        block.voltage,
        xp.asarray(m["nominal_v"].to_numpy(dtype=np.float64)),
        xp.asarray(m["sampling_interval_s"].to_numpy(dtype=np.float64)),
        xp.asarray(m["off_grid_fraction"].to_numpy(dtype=np.float64)),
        block.interval_s,
        config,
        meter_ids=m["meter_id"].to_numpy(),
        feeder_ids=m["feeder_id"].to_numpy(),
        references=block.references,
    )
    return QualityResult(q.voltage, q.table.reset_index(drop=True))


def identify(block: Block, quality: QualityResult, config: PhaseConfig) -> PhaseResult:
    """Step 2: each meter's phase (:func:`phaseid_hpc.phase_identification.identify_phases`), recommended
    by the decision policy (:func:`phaseid_hpc.phase_identification.recommend`)."""
    from .phase_identification import identify_phases, recommend

    m = block.meters
    ph = identify_phases(
        quality.voltage,
        pd.DataFrame({"meter_id": m["meter_id"], "feeder_id": m["feeder_id"], "transformer_id": m["transformer_gis"],
                      "phase_gis": m["phase_gis"], "service_type": m["service_type"], "nominal_v": m["nominal_v"],
                      "usable": quality.table["usable"].to_numpy(dtype=bool)}),
        config,
        references=block.references,
        interval_s=block.interval_s,
        kw=block.kw,
    )
    gis = m["phase_gis"].astype(str).to_numpy()
    inferred = ph["phase"].to_numpy(dtype=object)
    table = pd.DataFrame({
        "phase": recommend(gis, inferred, ph["phase_class"].to_numpy(dtype=object)),
        "phase_inferred": pd.Series(ph["phase"].to_numpy(dtype=object), dtype=object),
        "phase_confidence": ph["phase_confidence"].to_numpy(dtype=np.float64),
        "phase_class": ph["phase_class"].astype(str).to_numpy(),
        "zone": ph["zone"].to_numpy(dtype=np.int64),
        "clock_shift_intervals": ph["clock_shift_intervals"].to_numpy(dtype=np.int64),
    })
    lag = table["clock_shift_intervals"].to_numpy()
    reasons = [list(r) + ([contract.REASON_CLOCK_SHIFTED] if s else []) for r, s in zip(ph["reasons"], lag)]
    return PhaseResult(table, reasons)


def align_clocks(block: Block, quality: QualityResult, phases: PhaseResult) -> Block:
    """The block every later stage sees: cleaned voltage, and voltage and power of meters whose clock was a
    whole number of intervals off moved back by that many (:func:`~phaseid_hpc.phase_identification.shift_rows`).
    """
    from .phase_identification import shift_rows

    lag = phases.clock_shift
    if not lag.any():
        return block.replace(voltage=quality.voltage)
    return block.replace(
        voltage=shift_rows(quality.voltage, lag),
        kw=None if block.kw is None else shift_rows(block.kw, lag),
        kvar=None if block.kvar is None else shift_rows(block.kvar, lag),
    )


def confirm_clock_offsets(block: Block, quality: QualityResult, phases: PhaseResult,
                          config: QualityConfig) -> ClockCheck:
    """Step 2b: the clock check again, each meter against its own zone where it has one.

    The feeder head or median reads a regulator's delayed response as a clock offset; a flag stays only
    where the meter's neighbourhood (one phase, nearby; :func:`phaseid_hpc.quality.local_clock_offsets`)
    confirms it.
    """
    from .quality import local_clock_offsets, nearest_clock_offsets

    feeder = block.meters["feeder_id"].astype(str)
    zone = phases.table["zone"].to_numpy(dtype=np.int64)
    zone = np.where(zone >= 0, pd.factorize(feeder + "|" + zone.astype(str), sort=True)[0], -1)
    usable = quality.table["usable"].to_numpy(dtype=bool)
    local = local_clock_offsets(block.voltage, quality.table["nominal_v_used"].to_numpy(dtype=np.float64), zone,
                                usable, block.interval_s, config)
    has_local = np.isfinite(local["clock_offset_s"].to_numpy())
    offset = np.where(has_local, local["clock_offset_s"], quality.table["clock_offset_s"]).astype(np.float64)
    unconfirmed = has_local & ~local["clock_flag"].to_numpy(dtype=bool)
    # a flag still standing must also hold against the meter's nearest meters: a group sharing a lag is
    # physics, a clock is one meter's
    flagged = np.array([contract.REASON_CLOCK_OFFSET in r for r in quality.table["reasons"]], dtype=bool)
    rows = np.flatnonzero(flagged & ~unconfirmed)
    if rows.size and config.clock_nearest_meters > 0:
        near = nearest_clock_offsets(block.voltage, quality.table["nominal_v_used"].to_numpy(dtype=np.float64),
                                     feeder.to_numpy(), usable, rows, block.interval_s, config,
                                     k=config.clock_nearest_meters)
        estimated = np.isfinite(near["clock_offset_s"].to_numpy())
        unconfirmed[rows[estimated & ~near["clock_flag"].to_numpy(dtype=bool)]] = True
    return ClockCheck(offset, unconfirmed)


def map_meters_to_transformers(block: Block, quality: QualityResult, phases: PhaseResult,
                               config: TransformerConfig) -> MappingResult:
    """Step 3: each meter's transformer (:func:`phaseid_hpc.transformer_mapping.map_transformers`),
    recommended by the policy of :func:`phaseid_hpc.transformer_mapping.recommend_transformers`."""
    from .transformer_mapping import (
        REASON_TX_THREE_PHASE_ON_SINGLE,
        map_transformers,
        recommend_transformers,
        three_phase_on_single_phase,
    )

    m = block.meters
    tm_meters = pd.DataFrame({
        "meter_id": m["meter_id"], "feeder_id": m["feeder_id"], "transformer_id": m["transformer_gis"],
        "phase_gis": m["phase_gis"], "service_type": m["service_type"], "nominal_v": m["nominal_v"],
        "usable": quality.table["usable"].to_numpy(dtype=bool), "phase": phases.table["phase"].to_numpy(),
        "lat": m["lat"], "lon": m["lon"],
    })
    mres, transformers = map_transformers(block.voltage, tm_meters, config, kw=block.kw, kvar=block.kvar,
                                          interval_s=block.interval_s)
    table = pd.DataFrame({
        "transformer": recommend_transformers(tm_meters, mres["transformer"].to_numpy(dtype=object),
                                              mres["transformer_class"].to_numpy(dtype=object), config),
        "transformer_inferred": pd.Series(mres["transformer"].to_numpy(dtype=object), dtype=object),
        "transformer_confidence": mres["transformer_confidence"].to_numpy(dtype=np.float64),
        "transformer_class": mres["transformer_class"].astype(str).to_numpy(),
    })
    reasons = [list(r) for r in mres["reasons"]]
    for i in np.flatnonzero(three_phase_on_single_phase(tm_meters, block.transformers)):
        reasons[i].append(REASON_TX_THREE_PHASE_ON_SINGLE)
    return MappingResult(table, reasons, transformers)


def _recommended(block: Block, phases: PhaseResult, mapping: MappingResult | None) -> pd.DataFrame:
    """Feeder, recommended transformer and phase (GIS where none is recommended) of every meter."""
    phase = phases.table["phase"]
    return pd.DataFrame({
        "meter_id": block.meters["meter_id"].astype(str),
        "feeder_id": block.meters["feeder_id"].astype(str),
        "transformer_id": (mapping.table["transformer"] if mapping is not None
                           else block.meters["transformer_gis"].astype(str)).to_numpy(),
        "phase": phase.where(phase.notna(), block.meters["phase_gis"].astype(str)).to_numpy(),
    })


def check_meter_pts(block: Block, phases: PhaseResult, mapping: MappingResult | None,
                    config: PTConfig) -> PTResult:
    """Step 4a: meter PT deviation against the recommended transformer's siblings
    (:func:`phaseid_hpc.pt_deviation.detect_pt_deviation`)."""
    from .pt_deviation import detect_pt_deviation

    rec = _recommended(block, phases, mapping)
    pt = detect_pt_deviation(
        block.voltage, block.kw,
        pd.DataFrame({"feeder_id": rec["feeder_id"], "transformer_id": rec["transformer_id"], "phase": rec["phase"],
                      "nominal_v": block.meters["nominal_v"].to_numpy(dtype=np.float64)}),
        config, interval_s=block.interval_s,
    )
    return PTResult(pt["pt_deviation_pct"].to_numpy(dtype=np.float64), [list(r) for r in pt["reasons"]])


def validate(block: Block, phases: PhaseResult, mapping: MappingResult | None,
             config: ValidationConfig) -> pd.DataFrame:
    """Step 4b: per-transformer loading, imbalance, thermal model and health
    (:func:`phaseid_hpc.validation.validate_transformers`) on the recommended assignment."""
    from .validation import validate_transformers

    rec = _recommended(block, phases, mapping)
    return validate_transformers(block.kw, block.kvar, block.voltage, rec, block.transformers, block.times, config,
                                 references=block.references)


def consolidate(
    block: Block,
    quality: QualityResult,
    phases: PhaseResult,
    clocks: ClockCheck,
    mapping: MappingResult | None,
    pt: PTResult | None,
    loading: pd.DataFrame | None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Step 5: one row per meter (contract columns first, reasons as lists) and one per transformer."""
    m = block.meters
    first = [[r for r in set(q) | set(p) if not (unconfirmed and r == contract.REASON_CLOCK_OFFSET)]
             for q, p, unconfirmed in zip(quality.table["reasons"], phases.reasons, clocks.unconfirmed)]
    out = pd.DataFrame({
        "meter_id": m["meter_id"].astype(str),
        "feeder_id": m["feeder_id"].astype(str),
        "transformer_id": m["transformer_gis"].astype(str),
        "phase_gis": m["phase_gis"].astype(str),
        "phase": phases.table["phase"].to_numpy(),
        "phase_inferred": phases.table["phase_inferred"],
        "phase_confidence": phases.table["phase_confidence"].to_numpy(),
        "phase_class": phases.table["phase_class"].to_numpy(),
    })
    out["changed"] = out["phase"].notna() & (out["phase"] != out["phase_gis"])
    out["reasons"] = None
    out["clock_offset_s"] = clocks.clock_offset_s
    out["usable_fraction"] = quality.table["usable_fraction"].to_numpy(dtype=np.float64)
    more: list[list[list[str]]] = []
    transformers = pd.DataFrame()
    if mapping is not None:
        for c in mapping.table.columns:
            out[c] = mapping.table[c].to_numpy()
        out["transformer_changed"] = out["transformer"].to_numpy() != out["transformer_id"].to_numpy()
        more.append(mapping.reasons)
        transformers = mapping.transformers
    if pt is not None:
        out["pt_deviation_pct"] = pt.pt_deviation_pct
        more.append(pt.reasons)
    out["reasons"] = union_reasons(first, *more)
    if loading is not None:
        transformers = _merge_transformer_tables(transformers, loading)
    if len(transformers):
        transformers = transformers.sort_values(["feeder_id", "transformer_id"], kind="stable").reset_index(drop=True)
    return out, transformers


#: Count columns of the transformer table: integers, 0 where a transformer is absent from one side.
_TRANSFORMER_COUNTS = ("n_meters_gis", "n_meters_inferred", "meters_changed", "n_meters", "n_phases",
                       "correlation_lost_windows")


def _merge_transformer_tables(mapping: pd.DataFrame, validation: pd.DataFrame) -> pd.DataFrame:
    """One row per transformer from the mapping and validation tables, without merge leftovers.

    Both tables name the phases a transformer serves; the validation table's ``phases`` (from the
    recommended transformer and phase of each meter, GIS phase where none is recommended: what its loading
    was computed on) is kept, and the mapping's fills the transformers validation does not know. Counts
    stay integers (0 where one side has no row) and ``proposed_new`` stays boolean.
    """
    if not len(mapping):
        return validation
    if not len(validation):
        return mapping
    merged = mapping.merge(validation, on=["transformer_id", "feeder_id"], how="outer", sort=False,
                           suffixes=("_mapping", ""))
    if "phases_mapping" in merged:
        missing = merged["phases"].isna() | (merged["phases"].astype(object) == "")
        merged["phases"] = merged["phases"].astype(object).where(~missing, merged["phases_mapping"])
        merged["phases"] = merged["phases"].where(merged["phases"].astype(object) != "", None)
        merged = merged.drop(columns="phases_mapping")
    for c in _TRANSFORMER_COUNTS:
        if c in merged:
            merged[c] = merged[c].fillna(0).astype("int64")
    for c in ("flag_codes", "flag_reasons"):
        if c in merged:
            merged[c] = [v if isinstance(v, list) else [] for v in merged[c]]
    if "proposed_new" in merged:
        merged["proposed_new"] = merged["proposed_new"].astype("boolean").fillna(False).astype(bool)
    return merged


def _namespace(x: Any) -> Any:
    from ._compat import array_namespace

    return array_namespace(x)
