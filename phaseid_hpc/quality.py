"""Per-meter data quality, run on each block of whole feeders before phase identification.

One public entry, :func:`assess_quality`: it calls :func:`phaseid_hpc.kernels.quality.quality_block` on the
block's arrays (NumPy or CuPy) and turns the per-meter findings into a table of contract reason codes.
Per-meter data problems are results (reason codes), never exceptions.

Checks, in the order they are applied
-------------------------------------
1. **Sampling.** ``sampling_interval_s`` differing from the grid step by more than ``sampling_rel_tol`` (relative)
   or ``off_grid_fraction > max_off_grid_fraction`` -> ``REASON_INCONSISTENT_SAMPLING``. Such a meter is not
   usable (``inconsistent_sampling_unusable``, default True): its grid values are snapped or sparse reads whose
   timing cannot be trusted at the interval scale that identification correlates at. NaN inputs are not flagged.
2. **Units.** From the median reading: kV (1000x too small) -> rescaled to V; ``sqrt(3)`` off (line-to-line vs
   line-to-neutral) or 2x off (120 V vs 240 V base) -> not rescaled, judged against the matching base (the
   per-unit series, all identification uses, is the same). Each -> ``REASON_WRONG_UNITS``; ``detected_units``
   says which. An unknown ``nominal_v`` (NaN) is inferred as the nearest of 120/208/240/277/480 V (in V or kV)
   and is not a finding; ``nominal_v_used`` is what was judged against.
3. **Flat lines.** Samples in runs of more than ``max_flat_run`` identical readings, or all readings of a
   zero-variance meter, are removed (NaN) -> ``REASON_FLAT_LINE``; the rest of the meter is kept.
4. **Plausibility.** Samples outside ``[min_pu, max_pu]`` of the base are removed (NaN) and counted; a meter with
   more than ``max_implausible_fraction`` of its readings outside -> ``REASON_IMPLAUSIBLE_VOLTAGE``, not usable.
5. **Gaps.** Interior gaps of at most ``max_interp_gap`` missing samples (removed samples included, so a one-
   sample spike is interpolated over) are filled linearly; longer gaps and gaps at the ends stay NaN
   (``REASON_LONG_GAPS``, informational). ``usable_fraction`` = finite samples of the cleaned series / n_time
   (interpolated samples count). Below ``min_usable_fraction`` or ``min_usable_samples`` ->
   ``REASON_INSUFFICIENT_DATA``, not usable. No finite reading at all -> ``REASON_NO_READINGS`` only.
6. **Clock offset.** Each meter's lag against its feeder's common signal, with a three-tap fractional-delay
   least-squares fit of the differenced per-unit series (see :func:`~phaseid_hpc.kernels.quality.estimate_clock_offsets`).
   The common signal is the feeder-head reference where ``references`` holds a row for the feeder (each meter
   against the reference phase it correlates with best; ``clock_use_references``), else the median over the
   feeder's usable meters (two more passes rebuild it without meters whose offset exceeds
   ``max_clock_offset_s``). The series are interval means: a clock offset shifts the averaging window, which on
   piecewise-constant load is a linear interpolation between neighbouring intervals, exactly the two-tap filter
   the fit's centroid recovers. ``clock_offset_s`` > 0 means the meter's clock is late (its series is delayed),
   the convention of :func:`phaseid_hpc.synth.measurement.apply_measurement_model`; ``clock_offset_se_s`` is its
   standard error from the fit's residual. NaN where not estimable (too few samples, correlation below
   ``clock_min_correlation``, fewer than ``clock_min_meters`` usable meters on a feeder without reference).
   ``|offset| - max_clock_offset_s > clock_flag_z * clock_offset_se_s`` -> ``REASON_CLOCK_OFFSET``: the offset is
   above the limit by a significant margin. Informational (the meter stays usable). With
   ``correct_clock_offset`` flagged meters are shifted back in ``.voltage`` by linear interpolation
   (``clock_corrected`` True; samples shifted in from beyond the ends are NaN). Measured accuracy: README,
   *Data quality: clock offsets* (``benchmarks/clock_offset.py``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ._compat import array_namespace, to_numpy
from .config import QualityConfig
from .contract import (
    REASON_CLOCK_OFFSET,
    REASON_FLAT_LINE,
    REASON_IMPLAUSIBLE_VOLTAGE,
    REASON_INCONSISTENT_SAMPLING,
    REASON_INSUFFICIENT_DATA,
    REASON_LONG_GAPS,
    REASON_NO_READINGS,
    REASON_WRONG_UNITS,
)
from .kernels import quality as kq

__all__ = ["QUALITY_COLUMNS", "QualityResult", "assess_quality", "block_parameters", "local_clock_offsets",
           "nearest_clock_offsets"]

#: Columns of :attr:`QualityResult.table`, in order.
QUALITY_COLUMNS: tuple[str, ...] = (
    "usable",
    "usable_fraction",
    "clock_offset_s",
    "reasons",
    "clock_offset_se_s",
    "clock_correlation",
    "clock_corrected",
    "detected_units",
    "unit_scale",
    "nominal_v_used",
    "nominal_inferred",
    "n_readings",
    "n_implausible",
    "n_flat",
    "n_filled",
    "n_gaps_filled",
    "n_long_gaps",
)


@dataclass(frozen=True)
class QualityResult:
    """Output of :func:`assess_quality`.

    Attributes
    ----------
    voltage : array, shape (n_meters, n_time)
        Cleaned voltage in the input's namespace: kV rescaled to V, implausible and flat-lined samples NaN,
        short gaps interpolated, optionally clock-corrected. [V]
    table : pandas.DataFrame
        One row per input row, in input order (index: ``meter_ids`` when given), columns
        :data:`QUALITY_COLUMNS`.
    """

    voltage: Any
    table: pd.DataFrame


_DEFAULT_CONFIG = QualityConfig()


def block_parameters(config: QualityConfig) -> dict[str, Any]:
    """The thresholds of :func:`phaseid_hpc.kernels.quality.quality_block`, taken from ``config``.

    The kernel's required keyword arguments other than ``interval_s``, each a field of
    :class:`~phaseid_hpc.config.QualityConfig` (the only place their defaults are written).
    """
    return {name: getattr(config, name) for name in _BLOCK_PARAMETERS}


#: Required threshold arguments of the kernel (all but the grid step), each a field of QualityConfig.
_BLOCK_PARAMETERS: tuple[str, ...] = tuple(
    p.name
    for p in inspect.signature(kq.quality_block).parameters.values()
    if p.kind is p.KEYWORD_ONLY and p.default is p.empty and p.name != "interval_s"
)


def _codes(labels: Any, n: int) -> np.ndarray:
    """Integer feeder index per row from any labels (sorted label order)."""
    if labels is None:
        return np.zeros(n, dtype=np.int64)
    lab = np.asarray(to_numpy(labels))
    if lab.shape != (n,):
        raise ValueError(f"feeder_ids must have shape ({n},) to match voltage rows, got {lab.shape}")
    _, inv = np.unique(lab.astype(str) if lab.dtype == object else lab, return_inverse=True)
    return inv.astype(np.int64)


def _reference_rows(references: Any, feeder_ids: Any, n_time: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Reference rows of this block's feeders and their feeder codes (those of :func:`_codes`)."""
    if references is None:
        return None
    try:
        ref_meta, ref_v = references
    except (TypeError, ValueError):
        raise ValueError(
            "references must be a pair (DataFrame with column feeder_id, array (n_refs, n_time) [V])"
        ) from None
    arr = np.asarray(to_numpy(ref_v), dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != n_time or arr.shape[0] != len(ref_meta):
        raise ValueError(
            f"references voltage must have shape ({len(ref_meta)}, {n_time}) (one row per reference, "
            f"voltage's time axis), got {arr.shape}"
        )
    if feeder_ids is None:  # the block is one feeder: every reference row is its reference
        return arr, np.zeros(arr.shape[0], dtype=np.int64)
    lab = np.asarray(to_numpy(feeder_ids))
    lab = lab.astype(str) if lab.dtype == object else lab
    labels = np.unique(lab)
    rf = np.asarray(ref_meta["feeder_id"].to_numpy())
    rf = rf.astype(str) if rf.dtype == object or labels.dtype.kind == "U" else rf
    if labels.size == 0:
        return None
    pos = np.clip(np.searchsorted(labels, rf), 0, labels.size - 1)
    hit = labels[pos] == rf  # reference rows of feeders outside the block are dropped
    if not hit.any():
        return None
    return arr[hit], pos[hit].astype(np.int64)


def assess_quality(
    voltage: Any,
    nominal_v: Any,
    sampling_interval_s: Any,
    off_grid_fraction: Any,
    interval_s: float,
    config: QualityConfig = _DEFAULT_CONFIG,
    *,
    meter_ids: Any = None,
    feeder_ids: Any = None,
    references: Any = None,
    xp: Any = None,
) -> QualityResult:
    """Run the per-meter data-quality checks on a block of whole feeders.

    Parameters
    ----------
    voltage : array, shape (n_meters, n_time)
        Meter voltage on the store's grid, NaN = missing. [V]
    nominal_v : array-like, shape (n_meters,)
        Nominal service voltage, NaN = unknown (inferred). [V]
    sampling_interval_s : array-like, shape (n_meters,)
        Median spacing of each meter's raw timestamps, NaN = unknown. [s]
    off_grid_fraction : array-like, shape (n_meters,)
        Share of each meter's raw reads that were off the grid, NaN = unknown. [-]
    interval_s : float
        Grid step. [s]
    config : QualityConfig
        Thresholds (see the module docstring for what each check does).
    meter_ids : array-like of str, shape (n_meters,), optional
        Index of the returned table.
    feeder_ids : array-like, shape (n_meters,), optional
        Feeder of each row; clock offsets are measured against each feeder's own common signal.
        ``None`` treats the block as one feeder.
    references : tuple of (pandas.DataFrame, array of shape (n_refs, n_time)), optional
        Feeder-head voltages as the pipeline passes them: a table with column ``feeder_id`` (and ``phase``)
        and the voltages, rows aligned, on ``voltage``'s time axis [V]. A feeder with references has its
        clock offsets measured against them (each meter against the phase it follows best; a reference is
        not blurred by offset meters); other feeders use their median. Ignored when ``config.clock_use_references`` is False.
    xp : module, optional
        Array namespace; default that of ``voltage``.

    Returns
    -------
    QualityResult
        ``.voltage`` (cleaned, same namespace and shape) and ``.table`` (aligned with the input rows).

    Examples
    --------
    >>> import numpy as np
    >>> v = 240 + np.random.default_rng(0).normal(0, 1, (4, 200))
    >>> v[0, 10:13] = np.nan
    >>> q = assess_quality(v, np.full(4, 240.0), np.full(4, 900.0), np.zeros(4), 900.0)
    >>> bool(np.isnan(q.voltage[0]).any()), q.table["usable"].tolist()
    (False, [True, True, True, True])
    """
    if xp is None:
        xp = array_namespace(voltage)
    v = _block_voltage(voltage, interval_s, xp)
    r = _run_quality_block(
        v, nominal_v, sampling_interval_s, off_grid_fraction, interval_s, config, feeder_ids, references, xp
    )
    h = {k: to_numpy(val) for k, val in r._asdict().items() if k != "voltage"}
    table = _quality_table(h, _reason_lists(h, v.shape[0]))
    if meter_ids is not None:
        table.index = _meter_index(meter_ids, v.shape[0])
    return QualityResult(voltage=r.voltage, table=table)


def _block_voltage(voltage: Any, interval_s: float, xp: Any) -> Any:
    """``voltage`` as a 2-D array of ``xp``, after checking it and the grid step ``interval_s`` [s]."""
    v = xp.asarray(voltage)
    if v.ndim != 2:
        raise ValueError(f"voltage must have shape (n_meters, n_time), got {tuple(v.shape)}")
    if not interval_s > 0:
        raise ValueError(f"interval_s must be a positive number of seconds, got {interval_s!r}")
    return v


def _per_meter(x: Any, name: str, n: int, xp: Any) -> Any:
    """Per-meter input ``x`` (argument ``name``) as a float64 array of ``xp``, shape ``(n,)``."""
    a = np.asarray(to_numpy(x), dtype=np.float64).reshape(-1)
    if a.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match voltage rows, got {a.shape}")
    return xp.asarray(a)


def _run_quality_block(
    v: Any,
    nominal_v: Any,
    sampling_interval_s: Any,
    off_grid_fraction: Any,
    interval_s: float,
    config: QualityConfig,
    feeder_ids: Any,
    references: Any,
    xp: Any,
) -> kq.QualityArrays:
    """Run :func:`~phaseid_hpc.kernels.quality.quality_block` on the inputs of :func:`assess_quality`."""
    n_m = v.shape[0]
    groups = xp.asarray(_codes(feeder_ids, n_m))
    refs = _reference_rows(references, feeder_ids, v.shape[1]) if config.clock_use_references else None
    return kq.quality_block(
        v,
        _per_meter(nominal_v, "nominal_v", n_m, xp),
        _per_meter(sampling_interval_s, "sampling_interval_s", n_m, xp),
        _per_meter(off_grid_fraction, "off_grid_fraction", n_m, xp),
        groups,
        interval_s=float(interval_s),
        references=None if refs is None else xp.asarray(refs[0]),
        reference_groups=None if refs is None else xp.asarray(refs[1]),
        **block_parameters(config),
    )


def _reason_lists(h: dict[str, np.ndarray], n: int) -> list[list[str]]:
    """Contract reason codes of each of the ``n`` meters, in the order the checks are applied.

    ``h`` holds the kernel's per-meter findings as NumPy arrays.
    """
    flags = (
        (h["no_readings"], REASON_NO_READINGS),
        (h["sampling_bad"], REASON_INCONSISTENT_SAMPLING),
        (h["units_code"] != kq.UNITS_OK, REASON_WRONG_UNITS),
        (h["implausible"], REASON_IMPLAUSIBLE_VOLTAGE),
        (h["flat_line"], REASON_FLAT_LINE),
        (h["insufficient"], REASON_INSUFFICIENT_DATA),
        (h["long_gaps"], REASON_LONG_GAPS),
        (h["clock_flag"], REASON_CLOCK_OFFSET),
    )
    reasons: list[list[str]] = [[] for _ in range(n)]
    for mask, code in flags:
        for i in np.flatnonzero(mask):
            reasons[i].append(code)
    return reasons


def _quality_table(h: dict[str, np.ndarray], reasons: list[list[str]]) -> pd.DataFrame:
    """Table of :class:`QualityResult` (columns :data:`QUALITY_COLUMNS`, default index) from ``h``."""
    return pd.DataFrame(
        {
            "usable": h["usable"].astype(bool),
            "usable_fraction": h["usable_fraction"].astype(np.float64),
            "clock_offset_s": h["clock_offset_s"].astype(np.float64),
            "reasons": reasons,
            "clock_offset_se_s": h["clock_offset_se_s"].astype(np.float64),
            "clock_correlation": h["clock_correlation"].astype(np.float64),
            "clock_corrected": h["clock_corrected"].astype(bool),
            "detected_units": np.asarray(kq.UNITS_NAMES, dtype=object)[h["units_code"].astype(np.int64)],
            "unit_scale": h["unit_scale"].astype(np.float64),
            "nominal_v_used": h["base_v"].astype(np.float64),
            "nominal_inferred": h["nominal_inferred"].astype(bool),
            "n_readings": h["n_readings"].astype(np.int64),
            "n_implausible": h["n_implausible"].astype(np.int64),
            "n_flat": h["n_flat"].astype(np.int64),
            "n_filled": h["n_filled"].astype(np.int64),
            "n_gaps_filled": h["n_gaps_filled"].astype(np.int64),
            "n_long_gaps": h["n_long_gaps"].astype(np.int64),
        },
        columns=list(QUALITY_COLUMNS),
    )


def _meter_index(meter_ids: Any, n: int) -> pd.Index:
    """``meter_ids`` as the table's index (name ``meter_id``), checked to have ``n`` entries."""
    ids = np.asarray(to_numpy(meter_ids))
    if ids.shape != (n,):
        raise ValueError(f"meter_ids must have shape ({n},) to match voltage rows, got {ids.shape}")
    return pd.Index(ids, name="meter_id")


def local_clock_offsets(
    voltage: Any,
    nominal_v: Any,
    zones: Any,
    usable: Any,
    interval_s: float,
    config: QualityConfig = QualityConfig(),  # noqa: B008 - frozen dataclass, safe as a default
) -> pd.DataFrame:
    """Clock offsets measured against each meter's own neighbourhood instead of the whole feeder.

    Below a line regulator, or where an LTC or capacitor acts, a meter's voltage responds to load through
    the controller's delayed corrections; against the feeder head (or the feeder median) that filter reads
    as a clock offset of tens of seconds, significant over weeks of data. Meters of one zone (the same
    phase in one neighbourhood, from phase identification) share that response, so against their median
    only a real clock offset remains.

    Parameters
    ----------
    voltage : array, shape (n_meters, n_time)
        Cleaned meter voltage (whole-interval clock errors already undone). [V]
    nominal_v : array, shape (n_meters,)
        Per-unit base of each meter. [V]
    zones : array of int, shape (n_meters,)
        Zone code per meter (``identify_phases(...)["zone"]``); -1: not estimated here.
    usable : array of bool, shape (n_meters,)
        Meters that may form a zone's common signal.
    interval_s : float
        Grid step. [s]
    config : QualityConfig
        ``max_clock_offset_s``, ``clock_flag_z``, ``clock_search_s``, ``clock_min_correlation``,
        ``clock_min_meters``, ``min_usable_samples``.

    Returns
    -------
    DataFrame, one row per meter
        ``clock_offset_s`` [s] and ``clock_offset_se_s`` [s] (NaN where not estimable: no zone, or a zone
        of fewer than ``clock_min_meters`` usable meters) and ``clock_flag`` (bool, the rule of
        :func:`assess_quality`).
    """
    xp = array_namespace(voltage)
    v = xp.asarray(voltage, dtype=xp.float64)
    base = np.asarray(to_numpy(nominal_v), dtype=np.float64)
    base = np.where(np.isfinite(base) & (base > 0), base, 1.0)
    zones_h = np.asarray(to_numpy(zones), dtype=np.int64)
    n = zones_h.size
    offset = np.full(n, np.nan)
    se = np.full(n, np.nan)
    rows = np.flatnonzero(zones_h >= 0)
    if rows.size and v.shape[1] >= 3:
        sub = xp.take(v, xp.asarray(rows), axis=0) / xp.asarray(base[rows])[:, None]
        k = max(1, int(np.ceil(config.clock_search_s / interval_s))) if interval_s > 0 else 1
        off, _, s_e = kq.estimate_clock_offsets(
            sub,
            xp.asarray(zones_h[rows]),
            max_lag=k,
            include=xp.asarray(np.asarray(to_numpy(usable), dtype=bool)[rows]),
            min_pairs=config.min_usable_samples,
            min_correlation=config.clock_min_correlation,
            min_meters=config.clock_min_meters,
            exclude_above=config.max_clock_offset_s / interval_s,
            n_refine=2,
        )
        offset[rows] = np.asarray(to_numpy(off), dtype=np.float64) * interval_s
        se[rows] = np.asarray(to_numpy(s_e), dtype=np.float64) * interval_s
    se = np.where(np.isfinite(offset), se, np.nan)
    flag = kq.clock_offset_flag(offset, se, limit_s=config.max_clock_offset_s, z=config.clock_flag_z)
    return pd.DataFrame({"clock_offset_s": offset, "clock_offset_se_s": se, "clock_flag": flag})


def nearest_clock_offsets(
    voltage: Any,
    nominal_v: Any,
    feeders: Any,
    usable: Any,
    rows: Any,
    interval_s: float,
    config: QualityConfig = QualityConfig(),  # noqa: B008 - frozen dataclass, safe as a default
    *,
    k: int = 3,
) -> pd.DataFrame:
    """Clock offsets of some meters measured against their ``k`` most similar meters of the same feeder.

    A clock offset is one meter's fault; a group of meters sharing a lag against their zone is physics
    (e.g. customers at the end of a long LV feeder whose own loads move their voltage with a timing of
    their own, read on hourly means as a quarter of an hour). Against the median of its nearest meters (the
    highest correlation of the differenced per-unit series at lag 0) only the meter's own offset remains.

    Parameters
    ----------
    voltage : array, shape (n_meters, n_time)
        Cleaned meter voltage. [V]
    nominal_v : array, shape (n_meters,)
        Per-unit base of each meter. [V]
    feeders : array, shape (n_meters,)
        Feeder of each meter (neighbours are taken within it).
    usable : array of bool, shape (n_meters,)
        Meters that may be neighbours.
    rows : array of int
        The meters to measure (e.g. those still flagged).
    interval_s : float
        Grid step. [s]
    config : QualityConfig
        As :func:`local_clock_offsets`.
    k : int
        Neighbours whose median is the reference.

    Returns
    -------
    DataFrame, one row per entry of ``rows``
        ``clock_offset_s``, ``clock_offset_se_s`` [s] (NaN where not estimable) and ``clock_flag``.
    """
    from .kernels.neighbours import top_k_neighbours
    from .kernels.preprocess import unit_rows

    rows = np.asarray(rows, dtype=np.int64)
    offset = np.full(rows.size, np.nan)
    se = np.full(rows.size, np.nan)
    v = np.asarray(to_numpy(voltage), dtype=np.float64)
    base = np.asarray(to_numpy(nominal_v), dtype=np.float64)
    base = np.where(np.isfinite(base) & (base > 0), base, 1.0)
    feeder_code = pd.factorize(pd.Series(np.asarray(feeders)).astype(str))[0]
    ok = np.asarray(to_numpy(usable), dtype=bool)
    pu_rows, d_rows, groups, include = [], [], [], []
    # only the feeders of the queried meters are read; neighbours come from the meter's own feeder, never
    # the meter itself (its row is its group)
    for f in np.unique(feeder_code[rows]) if v.shape[1] >= 3 else []:
        members = np.flatnonzero(feeder_code == f)
        qpos = np.flatnonzero(feeder_code[rows] == f)
        q = np.searchsorted(members, rows[qpos])  # positions within the feeder
        c = np.flatnonzero(ok[members])
        if c.size < 2:
            continue
        pu = v[members] / base[members, None]
        d = np.diff(pu, axis=1)
        with np.errstate(invalid="ignore"):
            u = unit_rows(d - np.nanmean(d, axis=1, keepdims=True))
        nb, sim = top_k_neighbours(u[q], q, k, candidates=u[c], candidate_group=c)
        for j, (i, pos) in enumerate(zip(q, qpos)):
            good = c[nb[j][np.isfinite(sim[j])]]
            if good.size < min(k, 2):
                continue
            take = np.r_[i, good]
            pu_rows.append(pu[take])
            d_rows.append(d[take])
            groups.append(np.full(take.size, pos))
            include.append(np.r_[False, np.ones(good.size, dtype=bool)])
    if groups:
        g = np.concatenate(groups)
        lag = max(1, int(np.ceil(config.clock_search_s / interval_s))) if interval_s > 0 else 1
        off, _, s_e = kq.estimate_clock_offsets(
            np.concatenate(pu_rows), g, max_lag=lag, include=np.concatenate(include),
            min_pairs=config.min_usable_samples, min_correlation=config.clock_min_correlation, min_meters=2,
            n_refine=0, diff=np.concatenate(d_rows),
        )
        first = np.r_[True, g[1:] != g[:-1]]
        offset[g[first]] = np.asarray(off)[first] * interval_s
        se[g[first]] = np.asarray(s_e)[first] * interval_s
    se = np.where(np.isfinite(offset), se, np.nan)
    flag = kq.clock_offset_flag(offset, se, limit_s=config.max_clock_offset_s, z=config.clock_flag_z)
    return pd.DataFrame({"clock_offset_s": offset, "clock_offset_se_s": se, "clock_flag": flag})
