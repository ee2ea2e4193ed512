"""Phase identification of smart meters from AMI voltage: one block of whole feeders at a time.

Method (per feeder; no cross-feeder pairs are ever formed). One function per step:

1. **Features** (:func:`_align_clocks`, then the ``preprocess`` kernels). Meters whose series is a whole
   number of intervals off the feeder's common signal (a clock that stamps the start of the interval) are
   shifted back first. Then per-unit voltage, first difference, robust row standardisation and removal of
   the feeder-wide common mode (source and LTC variations shared by all phases). Where the block has kW,
   each meter's voltage is first compensated for the drops its own load and its GIS transformer's load
   explain (:func:`_compensate_load`): the transformer drop is private to one transformer and hides its
   phase where its load swings are large.
2. **Denoising** (:func:`_denoised_coordinates`). The unit signals are projected on the top
   ``denoise_rank`` principal directions of the feeder's single-phase meters (randomized range finder).
3. **Neighbour votes** (``kernels.neighbours``). Each single-phase meter's ``n_neighbours`` most
   correlated meters, other than those of its own GIS transformer-and-phase group, vote with their GIS
   labels weighted by similarity; further rounds vote with the previous round's answers, until nothing
   changes (at most ``vote_rounds``): wrong labels stop voting for themselves. No assumption of
   three global clusters: a regulator zone, a long branch or an LTC shapes which meters are close, and
   the vote is local (one three-phase transformer serving every phase is just three groups).
4. **Evidence** (:func:`_phase_neighbourhood_correlation`, :func:`_vote_confidence`). Each meter is
   correlated (raw signals, not denoised) with the pooled signal of its nearest meters of each phase.
   Confidence is the winning label's vote share above chance, scaled down where the meter does not
   correlate significantly (``min_strength_se`` standard errors) with its phase's neighbourhood (a dead,
   misaligned or foreign meter: ``Low Correlation Coefficient``, never guessed), and where that
   correlation does not beat the other phases' by ``min_margin_se`` standard errors. The meter enters as a
   virtual meter (:func:`_pool_agreeing`); a clear majority with three times that margin counts as a
   unanimous vote. A GIS group moves as one (:func:`_group_consensus`: confident together, or not at all
   where a check held one member back), and a meter filed under the wrong transformer moves no more
   confidently than its physical siblings do (:func:`_stray_sibling_factor`).
5. **Multi-phase services** (:func:`_identify_pairs`). A phase-to-phase service takes the pair of phases
   whose local signals (pooled from its nearest single-phase meters of each phase), regressed together,
   best explain its own; three-phase services keep ``ABC``.

The result is the raw inference. The decision policy (GIS stays unless the evidence against it is
confident) is applied by :func:`recommend`.

References: Blakely & Reno, "Phase identification using co-association matrix ensemble clustering",
IET Smart Grid 2020 (clusters named by the majority of the existing labels); Zaragoza & Rao (SVD
denoising); Olivier et al., PSCC 2018 (local structure of LV networks).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pandas as pd

from . import contract
from ._compat import array_namespace, to_numpy
from .confidence import confidence_class
from .config import PhaseConfig
from .errors import ContractError
from .kernels.kmeans import batched_kmeans
from .kernels.load_compensation import compensated_differences
from .kernels.neighbours import (
    clock_lag,
    neighbour_sums,
    neighbour_votes,
    pooled_neighbour_correlation,
    principal_basis,
    top_k_neighbours,
)
from .kernels.preprocess import (
    common_mode_residual,
    standardized_differences,
    unit_rows,
    zero_step_share,
)
from .kernels.pt_deviation import aggregate_means

__all__ = ["RESULT_COLUMNS", "identify_phases", "recommend", "shift_rows"]

RESULT_COLUMNS: tuple[str, ...] = ("phase", "phase_confidence", "phase_class", "reasons", "zone",
                                   "clock_shift_intervals")
_PHASES = contract.SINGLE_PHASES
#: Candidate labels of a phase-to-phase service, as sorted pairs of phase codes (AB, BC, CA).
_PAIRS = ((0, 1), (1, 2), (0, 2))
_PAIR_NAMES = {(0, 1): "AB", (1, 2): "BC", (0, 2): "CA"}
_REQUIRED = ("meter_id", "feeder_id", "transformer_id", "phase_gis")
#: Largest whole-interval clock error undone before identification [samples].
_MAX_CLOCK_LAG = 2
#: Extra nearest meters looked at in the nearest-GIS check, so that excluded siblings leave enough [meters].
_SIBLING_LOOKAHEAD = 8


def identify_phases(
    voltage: Any,
    meters: pd.DataFrame,
    config: PhaseConfig = PhaseConfig(),
    *,
    references: tuple[pd.DataFrame, Any] | None = None,
    interval_s: float = 900,
    kw: Any | None = None,
    xp: Any | None = None,
) -> pd.DataFrame:
    """Identify the phase of every meter of a block of whole feeders.

    Parameters
    ----------
    voltage : array, shape (n_meters, n_time)
        Meter voltage, NaN where missing; short gaps already interpolated by the quality stage. [V]
    meters : DataFrame, n_meters rows aligned with ``voltage``
        Columns ``meter_id, feeder_id, transformer_id, phase_gis``; optional ``service_type``,
        ``nominal_v`` [V] (NaN: the meter's mean) and ``usable`` (bool, default True).
    config : PhaseConfig
        Thresholds, seed, use of references.
    references : (DataFrame, array of shape (n_refs, n_time)), optional
        Feeder-head references: a table with one row per reference (columns ``feeder_id, phase``) and
        the line-to-neutral voltages, rows aligned with the table, on the time grid of ``voltage``. [V]
        Used only on a feeder without any GIS phase label: each meter is first labelled by the reference
        it correlates with best (where that is significant), and those labels vote as GIS labels would.
        With GIS labels present they are not used: a feeder-head reference upstream of line regulators,
        or moved by an LTC, does not separate phases reliably.
    interval_s : float
        Sampling interval. [s] (kept for the record; the method is scale-free in time.)
    kw : array, shape (n_meters, n_time), optional
        Active power of each meter, NaN where missing. [kW] Where given (and ``config.load_neighbours``
        > 0), each meter's voltage is compensated for the drops its own load and its GIS transformer's
        load explain before the features are formed (:func:`_compensate_load`).
    xp : module, optional
        Array namespace; default: that of ``voltage`` (NumPy, CuPy).

    Returns
    -------
    DataFrame, index of ``meters``, columns
        ``phase`` (``A/B/C``, ``AB/BC/CA``, ``ABC``; None when unusable), ``phase_confidence`` in [0, 1],
        ``phase_class`` (``confident`` >= ``config.confident_threshold`` > ``suspect`` >=
        ``config.suspect_threshold`` > ``low``; ``insufficient_data`` when unusable), ``reasons``
        (list of contract reason codes) and ``zone`` (int, numbered within each feeder: meters of one phase
        in one neighbourhood of the feeder, about ``config.zone_meters`` each, for local comparisons such
        as the clock check; -1 for meters not in one) and ``clock_shift_intervals`` (int: whole intervals a
        meter's clock was found late, positive, or early, and undone before identification; see
        :func:`shift_rows`).
    """
    xp = array_namespace(voltage) if xp is None else xp
    v, kw, refs = _checked_inputs(xp, voltage, meters, kw, references)
    n_m = len(meters)

    out_phase = np.full(n_m, None, dtype=object)
    out_conf = np.zeros(n_m)
    out_class = np.full(n_m, contract.CLASS_INSUFFICIENT, dtype=object)
    out_reasons: list[list[str]] = [[] for _ in range(n_m)]
    out_zone = np.full(n_m, -1, dtype=np.int64)
    out_lag = np.zeros(n_m, dtype=np.int64)

    feeders = meters["feeder_id"].astype(str).to_numpy()
    coarse = _coarse_feeders(v, meters, config, interval_s)
    for feeder in sorted(set(feeders)):
        rows = np.flatnonzero(feeders == feeder)
        ref_v = None if refs is None else _feeder_references(xp, refs[0], refs[1], feeder)
        res = _feeder_passes(xp, _take_rows(xp, v, rows), meters.iloc[rows], config, ref_v, interval_s,
                             coarse.get(feeder), None if kw is None else _take_rows(xp, kw, rows))
        out_phase[rows], out_conf[rows], out_class[rows] = res[0], res[1], res[2]
        for j, i in enumerate(rows):
            out_reasons[i] = res[3][j]
        out_zone[rows], out_lag[rows] = res[4], res[5]
    return pd.DataFrame(
        {
            "phase": pd.Series(out_phase, index=meters.index, dtype=object),  # None stays None
            "phase_confidence": pd.Series(out_conf, index=meters.index),
            "phase_class": pd.Series(out_class, index=meters.index, dtype=object),
            "reasons": pd.Series(out_reasons, index=meters.index, dtype=object),
            "zone": pd.Series(out_zone, index=meters.index),
            "clock_shift_intervals": pd.Series(out_lag, index=meters.index),
        },
        index=meters.index,
    )


def _checked_inputs(xp: Any, voltage: Any, meters: pd.DataFrame, kw: Any | None,
                    references: tuple[pd.DataFrame, Any] | None) -> tuple[Any, Any | None, tuple | None]:
    """:func:`identify_phases`'s inputs checked against the contract: ``(voltage, kw, (table, reference
    voltage))`` as float64 arrays of ``xp`` (kW and references None where not given); a
    :class:`~phaseid_hpc.errors.ContractError` names what does not fit."""
    missing = [c for c in _REQUIRED if c not in meters.columns]
    if missing:
        raise ContractError(f"identify_phases: meters table lacks column(s) {missing}; "
                            f"expected {list(_REQUIRED)}")
    v = xp.asarray(voltage, dtype=xp.float64)
    n_m = len(meters)
    if v.ndim != 2 or v.shape[0] != n_m:
        raise ContractError(
            f"identify_phases: voltage must have shape (n_meters={n_m}, n_time), got {tuple(v.shape)}"
        )
    if kw is not None:
        kw = xp.asarray(kw, dtype=xp.float64)
        if tuple(kw.shape) != tuple(v.shape):
            raise ContractError(f"identify_phases: kw must have the shape of voltage {tuple(v.shape)}, "
                                f"got {tuple(kw.shape)}")
    if references is None:
        return v, kw, None
    if not (isinstance(references, tuple) and len(references) == 2):
        raise ContractError("identify_phases: references must be a tuple (table, reference_voltage)")
    ref_table, reference_voltage = references
    if len(ref_table) != reference_voltage.shape[0] or reference_voltage.shape[-1] != v.shape[1]:
        raise ContractError(
            f"identify_phases: reference_voltage must have shape (n_refs={len(ref_table)}, "
            f"n_time={v.shape[1]}), got {tuple(reference_voltage.shape)}"
        )
    return v, kw, (ref_table, xp.asarray(reference_voltage, dtype=xp.float64))


def _feeder_references(xp: Any, ref_table: pd.DataFrame, reference_voltage: Any, feeder: str) -> Any | None:
    """The feeder's A, B and C head references as rows of one array (3, n_time), or None unless it has
    exactly those three."""
    rsel = np.flatnonzero(ref_table["feeder_id"].astype(str).to_numpy() == feeder)
    phases = ref_table["phase"].to_numpy()[rsel].tolist()
    if sorted(phases) != sorted(_PHASES):
        return None
    return xp.stack([reference_voltage[int(rsel[phases.index(p)]), :] for p in _PHASES], axis=0)


def _feeder_passes(xp: Any, v: Any, meters: pd.DataFrame, config: PhaseConfig, ref_v: Any | None,
                   interval_s: float, coarse_factor: int | None, kw: Any | None) -> tuple:
    """One feeder: the pass on the measured voltage, the load-compensated one where ``kw`` is given
    (:func:`_combine_passes`), each with its second look on coarse means where the feeder's resolution
    asks for it (``coarse_factor``). Returns :func:`_identify_feeder`'s tuple."""
    two = kw is not None and config.load_neighbours > 0
    shared: dict | None = {} if two else None
    res = _identify_feeder(xp, v, meters, config, ref_v, interval_s, shared=shared)
    if coarse_factor:
        res = _coarse_second_look(xp, v, meters, config, ref_v, interval_s, coarse_factor, res)
    if not two:
        return res
    res_c = _identify_feeder(xp, v, meters, config, ref_v, interval_s, kw, shared=shared, zones=False)
    if coarse_factor:
        res_c = _coarse_second_look(xp, v, meters, config, ref_v, interval_s, coarse_factor, res_c, kw)
    out = _combine_passes(res, res_c, config, meters)
    if "check" not in shared:
        return out
    return _transformer_tiebreak(xp, shared["check"][1], shared["single"], res, res_c, out, meters, config)


def _transformer_tiebreak(xp: Any, u: Any, s_idx: np.ndarray, raw: tuple, comp: tuple, combined: tuple,
                          meters: pd.DataFrame, config: PhaseConfig) -> tuple:
    """Where the two passes contradict each other on a single-phase meter (:func:`_combine_passes` put it at
    most ``suspect``), the answer of the meter's transformer decides: if every other single-phase meter of
    its GIS transformer (two or more) is confidently on one phase (the combined answer), the meter shares
    their secondary voltage (its mean raw similarity ``u`` with them, as measured, at least
    ``config.nearest_gis_sibling_ratio`` times theirs with each other: not a meter of another phase of a
    three-phase bank) and exactly one pass answers that phase, that pass's answer and confidence stand.

    ``u``: unit signals of the single-phase rows ``s_idx``. Returns ``combined`` with those rows replaced.
    """
    p0, c0, _, _, _, _, _, _ = raw
    p1, c1, _, _, _, _, _, _ = comp
    phase, conf, cls, reasons, zone, lag, free, cut = combined
    contested = np.flatnonzero(pd.notna(p0) & pd.notna(p1) & (p0.astype(str) != p1.astype(str))
                               & (np.minimum(c0, c1) >= config.suspect_threshold))
    contested = contested[np.isin(contested, s_idx)]
    if not contested.size:
        return combined
    tx = meters["transformer_id"].astype(str).to_numpy()
    pos = np.full(len(meters), -1, dtype=np.int64)
    pos[s_idx] = np.arange(s_idx.size)
    sure = conf >= config.confident_threshold
    p_all = phase.astype(str)
    phase, conf, cls, free = phase.copy(), conf.copy(), cls.copy(), free.copy()
    reasons = list(reasons)
    for i in contested:
        mates = s_idx[(tx[s_idx] == tx[i]) & (s_idx != i)]
        if mates.size < 2 or not sure[mates].all() or len(set(p_all[mates])) != 1:
            continue
        q = p_all[mates[0]]
        if (str(p0[i]) == q) == (str(p1[i]) == q):
            continue
        if not _shares_secondary(xp, u, int(pos[i]), pos[mates], config):
            continue
        src = raw if str(p0[i]) == q else comp
        phase[i], conf[i], cls[i], reasons[i] = src[0][i], src[1][i], src[2][i], list(src[3][i])
        free[i] = src[6][i]
    return phase, conf, cls, reasons, zone, lag, free, cut


def _combine_passes(raw: tuple, comp: tuple, config: PhaseConfig, meters: pd.DataFrame | None = None) -> tuple:
    """One answer per meter from the pass on the voltage as measured and the load-compensated pass.

    Each meter takes the answer of the more confident pass (the measured one on ties), unless a check or
    group rule lowered the measured pass's confidence (generated ``large``, fourth realisation: an
    11-meter transformer whose own load hides its phase, held back by the group veto there, half of it
    confidently moved by the compensated pass, to A at 7 days and to C at 14; it is on B). Where the two
    passes give different answers and the less confident one is itself at least ``suspect``, the meter is
    at most ``suspect`` (the review list): the evidence contradicts itself. Clock shifts and zones are the
    measured pass's (the compensation comes after the clock alignment). Each pass keeps its own checks; the
    compensated one judges its changes against the measured signals (:func:`_evidence_confidence`).

    Why both: compensation reveals a transformer whose own load hides its phase (generated ``large``,
    ``late_clocks``, 7 days), while on some feeders the shared transformer drop is what ties a mislabelled
    meter to its siblings, or carries a whole transformer's vote (generated ``regulators_pv``, 14 days: a
    12-meter transformer confident on the measured voltage, 0.5-0.8 compensated).

    Returns
    -------
    tuple
        :func:`_identify_feeder`'s ``(phase, confidence, class, reasons, zone, lag, free, cut)``.
    """
    p0, c0, k0, r0, z0, l0, f0, cut0 = raw
    p1, c1, k1, r1, _, _, f1, _ = comp
    # a measured-pass answer that a check or group rule cut keeps that verdict: the objection (a group
    # whose members split, nearest GIS meters that disagree) is about the meters, not about their load
    cut_any = cut0 | comp[7]
    if meters is not None:
        # ... and so does the rest of its GIS group (transformer and GIS phase) making the same change: one
        # voltage, one verdict
        gis = meters["phase_gis"].astype(str).to_numpy()
        key = pd.Series(meters["transformer_id"].astype(str).to_numpy() + "|" + gis + "|" + p0.astype(str))
        changed = pd.notna(p0) & (p0.astype(str) != gis)
        held_keys = set(key[changed & cut_any])
        cut0 = cut0 | (changed & key.isin(held_keys).to_numpy())
    take = (c1 > c0) & ~cut0
    phase = np.where(take, p1, p0)
    conf = np.where(take, c1, c0)
    cls = np.where(take, k1, k0)
    reasons = [list(b) if t else list(a) for a, b, t in zip(r0, r1, take)]
    free = np.where(take, f1, f0)
    differ = np.array([a != b for a, b in zip(p0, p1)], dtype=bool) & pd.notna(p0) & pd.notna(p1)
    contested = differ & (np.minimum(c0, c1) >= config.suspect_threshold)
    if contested.any():
        conf = np.where(contested, np.minimum(conf, config.suspect_threshold), conf)
        cls = np.where(contested, _confidence_class(conf, config), cls)
        free = free & ~contested
    return phase, conf, cls, reasons, z0, l0, free, cut0


def _coarse_feeders(v: Any, meters: pd.DataFrame, config: PhaseConfig, interval_s: float) -> dict[str, int]:
    """Feeders whose resolution swallows most steps, with the number of readings each coarse mean takes:
    the median meter's share of exact-zero differences above ``config.coarse_zero_share``."""
    factor = round(config.coarse_aggregate_s / interval_s) if interval_s > 0 else 1
    if factor < 2 or v.shape[1] // factor < 3 or config.coarse_zero_share >= 1:
        return {}
    zero = to_numpy(zero_step_share(v))
    share = pd.Series(zero).groupby(meters["feeder_id"].astype(str).to_numpy()).median()
    return {str(f): factor for f in share.index[share.to_numpy() > config.coarse_zero_share]}


def _coarse_second_look(xp: Any, v: Any, meters: pd.DataFrame, config: PhaseConfig, ref_v: Any | None,
                        interval_s: float, factor: int, res: tuple, kw: Any | None = None) -> tuple:
    """A feeder whose readings' resolution swallows most steps, identified again on means of ``factor``
    readings: a single-phase meter this pass calls confident keeps the first pass's answer and takes this
    pass's confidence where both give the same phase and the first pass's was only weak (above 0, cut by
    no check or group rule: ``free``). The means bring back what the rounding hid; neither pass moves a
    meter the other contradicts, and what a check held back stays held (at class 1.0, 1 V, 30 days, lifting
    those too added 8 wrong rows to 177 right ones), nor, in the load-compensated pass (``kw``), does a meter
    that the first pass found without a significant correlation with its phase (``Low Correlation
    Coefficient``). Clock shifts, zones and reasons stay the first pass's.

    Returns ``res`` (:func:`_identify_feeder`'s tuple) with confidence and class raised where so.
    """
    phase, conf, cls, reasons, zone, lag, free, cut = res
    vc = aggregate_means(shift_rows(v, lag) if np.any(lag) else v, factor)
    ref_c = None if ref_v is None else aggregate_means(ref_v, factor)
    kw_c = None if kw is None else aggregate_means(shift_rows(kw, lag) if np.any(lag) else kw, factor)
    p2, c2, k2, _, _, _, _, _ = _identify_feeder(xp, vc, meters, dataclasses.replace(config, clock_lag_se=0.0),
                                              ref_c, interval_s * factor, kw_c, zones=False)
    # in the load-compensated pass, a meter that does not correlate significantly with its phase's
    # neighbourhood at full resolution is not lifted (ckt7, class 1.0, 1 V, 30 days: a lone meter with a
    # 134 s clock offset, 0.006 there, confident on its compensated hourly means, on the wrong phase; in the
    # measured pass such lifts are most of what the second look brings: M1 99.5% with them, 98.4% without)
    weak = np.array([kw is not None and contract.REASON_LOW_CORRELATION in r for r in reasons], dtype=bool)
    lift = free & ~weak & (k2 == contract.CLASS_CONFIDENT) & (cls != contract.CLASS_CONFIDENT) & (p2 == phase)
    conf = np.where(lift, np.maximum(conf, c2), conf)
    cls = np.where(lift, contract.CLASS_CONFIDENT, cls)
    return phase, conf, cls, reasons, zone, lag, free, cut


def shift_rows(x: Any, lag: Any) -> Any:
    """Rows of ``x`` (n, T) moved back by ``lag`` samples (``x_aligned(t) = x(t + lag)``), NaN-filled.

    What identification does to a meter whose clock is ``lag`` intervals late (its
    ``clock_shift_intervals``); the pipeline applies it to the voltage and power of later stages.

    Parameters
    ----------
    x : array, shape (n, T)
        Rows to move, in any array namespace (the result stays in it).
    lag : array of int, shape (n,)
        Samples to move each row back (negative: forward); 0 leaves a row as it is.

    Returns
    -------
    array, shape (n, T), float64
    """
    xp = array_namespace(x)
    out = xp.asarray(x, dtype=xp.float64, copy=True)
    lag = np.asarray(to_numpy(lag), dtype=np.int64)
    n_t = int(out.shape[1])
    for i in np.flatnonzero(lag):
        s = int(lag[i])
        fill = xp.full((min(abs(s), n_t),), xp.nan, dtype=xp.float64)
        row = x[int(i), :]
        row = xp.astype(row, xp.float64) if row.dtype != xp.float64 else row
        if s > 0:
            out[int(i), :] = xp.concat([row[s:], fill]) if s < n_t else fill
        else:
            out[int(i), :] = xp.concat([fill, row[:s]]) if -s < n_t else fill
    return out


def _take_rows(xp: Any, v: Any, rows: np.ndarray) -> Any:
    if rows.size and np.all(np.diff(rows) == 1):
        return v[int(rows[0]) : int(rows[-1]) + 1, :]
    return xp.take(v, xp.asarray(rows), axis=0)


def _phase_codes(labels: Any) -> np.ndarray:
    """0, 1, 2 for ``A``, ``B``, ``C``; -1 for anything else."""
    codes = pd.Series(np.asarray(labels, dtype=object), dtype=object).map({p: i for i, p in enumerate(_PHASES)})
    return codes.fillna(-1).to_numpy(np.int64)


def _service_kinds(meters: pd.DataFrame) -> np.ndarray:
    """``single``, ``pair`` or ``three`` per meter, from the GIS phase and the service type."""
    gis = meters["phase_gis"].to_numpy(dtype=object)
    st = meters["service_type"] if "service_type" in meters else pd.Series([None] * len(meters))
    st_low = pd.Series(st.to_numpy(dtype=object), dtype=object)
    st_low = st_low.where(st_low.map(type) == str, "").str.lower()
    three = (gis == contract.THREE_PHASE) | st_low.str.startswith("3ph").to_numpy(dtype=bool)
    pair = np.isin(gis, list(contract.PAIR_PHASES)) | st_low.str.startswith("2ph").to_numpy(dtype=bool)
    return np.where(three, "three", np.where(pair, "pair", "single"))


def _identify_feeder(xp: Any, v: Any, meters: pd.DataFrame, config: PhaseConfig, ref_v: Any | None = None,
                     interval_s: float = 900.0, kw: Any | None = None, shared: dict | None = None,
                     zones: bool = True):
    """Phase of every meter of one feeder: the named steps of the module docstring.

    Returns ``(phase, confidence, class, reasons, zone, lag, free, cut)`` arrays of the raw inference (no
    decision policy); ``free``: single-phase answers whose confidence, above 0, no check or group rule cut;
    ``cut``: those whose confidence a check or group rule lowered. ``shared``
    (a dict, for two passes over one feeder): the pass on the measured voltage leaves its clock alignment
    and its signals there, and the load-compensated pass (``kw``) takes them instead of computing them again.
    ``zones=False`` leaves every zone -1 (passes whose zones nobody reads: the combined answer keeps the
    measured pass's).
    """
    n = len(meters)
    gis = meters["phase_gis"].to_numpy(dtype=object)
    kind = _service_kinds(meters)
    usable = meters["usable"].to_numpy(dtype=bool) if "usable" in meters else np.ones(n, dtype=bool)
    nominal = (
        meters["nominal_v"].to_numpy(dtype=np.float64) if "nominal_v" in meters else np.full(n, np.nan)
    )
    phase = np.full(n, None, dtype=object)
    conf = np.zeros(n)
    cls = np.full(n, contract.CLASS_INSUFFICIENT, dtype=object)
    reasons: list[list[str]] = [[] for _ in range(n)]
    zone = np.full(n, -1, dtype=np.int64)
    free = np.zeros(n, dtype=bool)  # single-phase answers whose confidence no check or group rule cut
    cut = np.zeros(n, dtype=bool)  # answers whose confidence a check or group rule lowered
    if v.shape[1] < 2:
        for i in range(n):
            reasons[i].append(contract.REASON_INSUFFICIENT_DATA)
        return phase, conf, cls, reasons, zone, np.zeros(n, dtype=np.int64), free, cut

    # Step 1: features, with whole-interval clock errors undone first
    lag, n_obs_h, ok, (z, observed), raw_feat = _feeder_features(xp, v, kw, meters, kind, usable, nominal,
                                                                 config, shared)
    single = ok & (kind == "single")
    for i in np.flatnonzero(~ok):
        reasons[i].append(contract.REASON_INSUFFICIENT_DATA)
    for i in np.flatnonzero(ok & (lag != 0)):
        reasons[i].append(contract.REASON_CLOCK_SHIFTED)
    gis_code = _phase_codes(gis)
    feat, _ = common_mode_residual(z, observed, xp.asarray(single.astype(np.float64)))
    # float32 signals (from _align_clocks), as transformer mapping's: the neighbour searches, pooled sums
    # and products that follow move half the bytes; correlations stay good to ~1e-6 (every README accuracy
    # table: every phase, class and reason the same as in float64, confidences within 1e-6)
    u = unit_rows(feat)
    if not (gis_code[single] >= 0).any() and ref_v is not None:
        gis_code = np.where(single, _reference_labels(xp, ref_v, u, n_obs_h), -1)
    if single.sum() < 3 or not (gis_code[single] >= 0).any():
        # Too few meters (or no labels) to vote: keep GIS, unverified.
        for i in np.flatnonzero(ok):
            phase[i], conf[i], cls[i] = gis[i], 0.0, contract.CLASS_LOW
        return phase, conf, cls, reasons, zone, lag, free, cut

    # Step 2: denoised coordinates (principal subspace of the single-phase meters)
    s_idx = np.flatnonzero(single)
    y = _denoised_coordinates(xp, u, s_idx, config)

    # Step 3: votes of the neighbours' labels: GIS first, then the previous round's answers
    group = _gis_groups(meters, gis, s_idx, config)
    tx_group = _transformer_groups(meters, gis, s_idx, config)
    y_s = _pool_groups(xp, xp.take(y, xp.asarray(s_idx), axis=0), group, config)
    if shared is not None and raw_feat is None:  # the measured pass: its signals are the checks' of the next
        shared["check"] = (y_s, xp.take(u, xp.asarray(s_idx), axis=0))
        shared["single"] = s_idx
        shared["space"] = y
    # small feeders (an LV network of a dozen customers): a few meters per phase, so fewer voters
    k = min(config.n_neighbours, max(3, s_idx.size // 6))
    labels, share = _neighbour_vote(xp, y_s, group, gis_code[s_idx], k, config)

    # Step 4: evidence: vote share, and the raw (not denoised) correlation with each phase's neighbourhood
    tx_code = pd.factorize(meters["transformer_id"].astype(str).to_numpy()[s_idx], sort=True)[0]
    check = None if shared is None else shared.get("check")
    if raw_feat is not None and check is None:
        check = _measured_signals(xp, raw_feat, single, s_idx, group, config)
    c, z_strength, free_s, cut_s = _evidence_confidence(xp, y_s, xp.take(u, xp.asarray(s_idx), axis=0), group, labels,
                                                 share, n_obs_h[s_idx], k, config, gis_code[s_idx], interval_s,
                                                 tx_group, tx_code, check=check)
    phase[s_idx] = np.array(_PHASES, dtype=object)[labels]
    conf[s_idx] = c
    free[s_idx] = free_s
    cut[s_idx] = cut_s
    for j in np.flatnonzero(z_strength < config.min_strength_se):
        reasons[s_idx[j]].append(contract.REASON_LOW_CORRELATION)

    # Step 5: phase-to-phase services: the pair of phases whose local signals best explain theirs;
    # three-phase services keep ABC
    p_idx = np.flatnonzero(ok & (kind == "pair"))
    if p_idx.size:
        phase[p_idx], conf[p_idx], weak = _identify_pairs(xp, y, u, p_idx, s_idx, labels, n_obs_h, config,
                                                          gis, interval_s)
        for i in p_idx[weak]:
            reasons[i].append(contract.REASON_LOW_CORRELATION)
    three = ok & (kind == "three")
    phase[three], conf[three] = contract.THREE_PHASE, 1.0

    scored = ok & pd.notna(phase)
    cls[scored] = _confidence_class(conf[scored], config)
    if zones:
        zone[s_idx] = _zones(xp, y_s, labels, config)
    return phase, conf, cls, reasons, zone, lag, free, cut


def _feeder_features(xp: Any, v: Any, kw: Any | None, meters: pd.DataFrame, kind: np.ndarray,
                     usable: np.ndarray, nominal: np.ndarray, config: PhaseConfig,
                     shared: dict | None) -> tuple:
    """Step 1: clock shifts undone (:func:`_align_clocks`; the first pass's where ``shared`` holds them) and
    the standardised differences, load-compensated where ``kw`` is given (:func:`_compensate_load`).

    Returns ``(lag, n_obs, ok, (z, observed), raw_feat)``: whole-interval shifts, observed samples per meter
    (host), meters usable with enough samples, the features with their mask, and the features of the voltage
    as measured where they were compensated (the checks of step 4 look at those; else None).
    """
    if shared is not None and "aligned" in shared:  # the second pass: the first pass's alignment
        v, lag, (z, observed, n_obs) = shared["aligned"]
    else:
        gis_codes = _phase_codes(meters["phase_gis"].to_numpy(dtype=object))
        gis_single = np.where(usable & (kind == "single"), gis_codes, -1)
        v, lag, (z, observed, n_obs) = _align_clocks(xp, v, nominal, gis_single, config)
        if shared is not None:
            shared["aligned"] = (v, lag, (z, observed, n_obs))
    n_obs_h = to_numpy(n_obs)
    ok = usable & (n_obs_h >= config.min_samples)
    raw_feat = None
    if kw is not None and config.load_neighbours > 0:
        raw_feat = (z, observed)
        z, observed, _ = _compensate_load(xp, v, kw, lag, nominal, meters, z, observed, n_obs,
                                          ok & (kind == "single"), config,
                                          None if shared is None else shared.get("space"))
    return lag, n_obs_h, ok, (z, observed), raw_feat


def _neighbour_vote(xp: Any, y: Any, group: np.ndarray, labels: np.ndarray, k: int,
                    config: PhaseConfig) -> tuple[np.ndarray, np.ndarray]:
    """Step 3: labels by similarity-weighted votes of each meter's ``k`` nearest meters outside its group.

    The first round votes with ``labels`` (GIS), each further one with the previous round's answers, until
    nothing changes (at most ``config.vote_rounds``). Returns the answers (codes 0-2) and the winning
    label's share of the last round's votes.
    """
    idx, sim = top_k_neighbours(y, xp.asarray(group), k)
    for _ in range(config.vote_rounds):
        votes = to_numpy(neighbour_votes(idx, sim, xp.asarray(labels), 3))
        new = np.where(votes.sum(axis=1) > 0, np.argmax(votes, axis=1), labels)
        if np.array_equal(new, labels):
            break
        labels = new
    share = votes.max(axis=1) / np.maximum(votes.sum(axis=1), 1e-12)
    return labels, share


def _evidence_confidence(xp: Any, y: Any, u: Any, group: np.ndarray, labels: np.ndarray, share: np.ndarray,
                         n_obs: np.ndarray, k: int, config: PhaseConfig,
                         gis: np.ndarray, interval_s: float = 900.0,
                         tx_group: np.ndarray | None = None,
                         tx_code: np.ndarray | None = None,
                         check: tuple[Any, Any] | None = None,
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Step 4: confidence of each answer, its correlation with its phase's neighbourhood [SE], whether
    no check or group rule cut its (non-zero) confidence, and whether one lowered it.

    The meter (as a virtual meter, :func:`_pool_agreeing`) is correlated with each phase's neighbourhood;
    ``z_strength`` is the correlation with its answer's, ``z_margin`` how far it beats the best other phase,
    both in standard errors (``1 / sqrt(n_obs)``). A split vote (neighbours across a lateral boundary) does
    not outweigh overwhelming direct evidence: with a clear majority and twice the margin threshold for a
    change (``_DECISIVE_MARGINS``; three times for an answer that confirms GIS), the vote counts as
    unanimous. A change of phase whose nearest meters of each GIS label do not favour it is not confident
    (:func:`_nearest_gis_checks`), unless those labels are themselves corrected with confidence
    (:func:`_nearest_gis_second_look`). A change of a meter whose physical siblings GIS files under
    other transformers must be shared by them (:func:`_stray_sibling_factor`, with ``tx_code``).
    """
    u_eval = _pool_agreeing(xp, u, group, labels)
    r_phase = _phase_neighbourhood_correlation(xp, y, u, group, labels, k, u_eval)
    r_phase = r_phase * np.sqrt(n_obs)[:, None]
    z_strength = r_phase[np.arange(labels.size), labels]
    others = np.where(np.arange(3)[None, :] == labels[:, None], -np.inf, r_phase)
    z_margin = z_strength - others.max(axis=1)
    changed = np.flatnonzero((gis >= 0) & (labels != gis))
    n_batches = int(u.shape[1] * interval_s // config.margin_batch_s) if config.margin_batch_s > 0 else 0
    if changed.size and n_batches >= 4:
        t = _batch_margin_t(xp, y, u, u_eval, group, labels, gis, changed, k, n_batches)
        z_margin[changed] = np.fmin(z_margin[changed], t)
    # a change must still pass every check below; a confirmation of GIS has no such checks: three times
    margins = np.where(labels != gis, _DECISIVE_MARGINS, 3.0)
    decisive = (share >= 0.6) & (z_margin >= margins * config.min_margin_se)
    share = np.where(decisive, 1.0, share)
    c = _vote_confidence(share, z_strength, 3, config) * np.clip(z_margin / config.min_margin_se, 0.0, 1.0)
    if check is not None:
        y, u = check
        u_eval = _pool_agreeing(xp, u, group, labels)
    pairs = _group_pair_dots(xp, u, group, changed) if changed.size else None  # shared by the three checks
    near = _nearest_gis_checks(xp, y, u, u_eval, group, gis, labels, config, pairs)
    sib = _sibling_agreement_factor(xp, u, group, gis, labels, config, pairs=pairs)
    near = _nearest_gis_second_look(xp, y, u, u_eval, group, gis, labels, config, pairs, near,
                                    c * near * sib >= config.confident_threshold)
    checks = near * sib
    if tx_group is not None and changed.size:
        # siblings GIS files on another phase of the meter's transformer count too, as they stand: their
        # answer, or their GIS phase where the nearest-GIS checks held their own change back
        stands = np.where((labels != gis) & (near == 0), gis, labels)
        checks = checks * _sibling_agreement_factor(xp, u, tx_group, gis, labels, config,
                                                    sibling_labels=stands)
    evidence = c
    c = _group_consensus(group, gis, labels, c * checks, config, held=(labels != gis) & (checks == 0))
    if tx_code is not None and changed.size:
        c = c * _stray_sibling_factor(xp, u, tx_code, gis, labels, c, config)
    cut = c < evidence
    if tx_group is not None and changed.size:
        c = _transformer_consensus(xp, u, tx_group, gis, labels, c, cut, config)
    return c, z_strength, (c == evidence) & (c > 0), cut


def _transformer_consensus(xp: Any, u: Any, tx_group: np.ndarray, gis: np.ndarray, labels: np.ndarray,
                           c: np.ndarray, cut: np.ndarray, config: PhaseConfig) -> np.ndarray:
    """Step 4f: a lone change that the meter's whole transformer confirms is confident.

    A meter whose GIS phase no other meter of its GIS transformer has (``tx_group``), whose answer is the
    phase on which every other meter of that transformer (two or more) is confidently answered, and which
    shares their secondary voltage (its mean raw similarity with them at least
    ``config.nearest_gis_sibling_ratio`` times theirs with each other) is on their phase: one transformer's
    single-phase meters are on one phase. Lifted to ``config.confident_threshold`` where its own evidence
    is at least ``_CONSENSUS_FLOOR`` and no check or group rule cut it (``cut``).

    Returns
    -------
    ndarray, shape (n,)
        ``c`` with such changes lifted.
    """
    out = c.copy()
    cand = np.flatnonzero((gis >= 0) & (labels != gis) & ~cut & (c >= _CONSENSUS_FLOOR)
                          & (c < config.confident_threshold))
    for i in cand:
        mates = np.flatnonzero(tx_group == tx_group[i])
        mates = mates[mates != i]
        if mates.size < 2 or np.any(gis[mates] == gis[i]):
            continue
        if not np.all((labels[mates] == labels[i]) & (c[mates] >= config.confident_threshold)):
            continue
        if _shares_secondary(xp, u, i, mates, config):
            out[i] = config.confident_threshold
    return out


def _shares_secondary(xp: Any, u: Any, row: int, mates: np.ndarray, config: PhaseConfig) -> bool:
    """Whether row ``row`` of the unit signals ``u`` shares the secondary voltage of ``mates`` (two or more):
    its mean raw similarity with them is at least ``config.nearest_gis_sibling_ratio`` times theirs with
    each other."""
    own = _pair_dots(xp, u, np.full(mates.size, row), mates).mean()
    a, b = np.triu_indices(mates.size, 1)
    return bool(own >= config.nearest_gis_sibling_ratio * _pair_dots(xp, u, mates[a], mates[b]).mean())


#: Raw neighbours of a changed meter searched for its physical siblings (:func:`_stray_sibling_factor`)
#: [meters].
_STRAY_LOOK = 16
#: A physical sibling's raw similarity is at least this many times that of the meter's ``_STRAY_LOOK``-th
#: nearest meter: a shared secondary stands out of the phase neighbourhood.
_STRAY_CONTRAST = 2.0


def _stray_sibling_factor(xp: Any, u: Any, tx_code: np.ndarray, gis: np.ndarray, labels: np.ndarray,
                          c: np.ndarray, config: PhaseConfig) -> np.ndarray:
    """Step 4e: 0 for a change of phase that the meter's physical siblings under other GIS transformers do
    not share with confidence, else 1.

    A meter filed under the wrong transformer (a stray) has its physical siblings elsewhere: meters whose raw
    similarity with it reaches ``config.nearest_gis_sibling_ratio`` of its best and ``_STRAY_CONTRAST`` times
    that of its ``_STRAY_LOOK``-th nearest meter (they share its secondary voltage, which stands out of the
    phase neighbourhood). Found without GIS, among the single-phase meters of other GIS transformers (those
    of its own are :func:`_sibling_agreement_factor`'s); only a meter with more of them there than under its
    own GIS transformer is a stray (else a transformer would wait on its own strays). Each stands at its
    answer where that confirms its GIS phase or changes it with confidence (``c``), else at its GIS phase:
    a stray cannot move with more confidence than the transformer it hangs on. Without this, on the generated 4,200-meter LTC feeder
    (seed 3, 7 and 14 days) two strays of a 12-meter transformer whose own load hides its phase (raw
    similarity 0.8 with each other, under 0.2 with anyone else) were moved with full confidence while the
    transformer's own, unconfident, answer swung from A (7 d) to C (14 d).

    Returns
    -------
    ndarray, shape (n,)
    """
    factor = np.ones(labels.size)
    changed = np.flatnonzero((gis >= 0) & (labels != gis) & (c >= config.confident_threshold))
    if not changed.size or config.sibling_agreement <= 0 or labels.size <= _STRAY_LOOK:
        return factor
    # every row its own group: the meter itself is the one candidate left out
    idx, sim = top_k_neighbours(xp.take(u, xp.asarray(changed), axis=0), xp.asarray(changed), _STRAY_LOOK,
                                candidates=u, candidate_group=xp.asarray(np.arange(labels.size)))
    idx, sim = to_numpy(idx), to_numpy(sim)
    floor = np.maximum(config.nearest_gis_sibling_ratio * sim[:, :1], _STRAY_CONTRAST * sim[:, -1:])
    family = (sim >= floor) & (sim > 0)
    sib = family & (tx_code[idx] != tx_code[changed][:, None])
    sure = (labels == gis) | (c >= config.confident_threshold)
    stands = np.where(sure, labels, gis)
    agree = (stands[idx] == labels[changed][:, None]) & sib
    n_sib = sib.sum(axis=1)
    # only the stray side: a meter most of whose family GIS files with it is not the stray of its strays
    stray = n_sib > (family & ~sib).sum(axis=1)
    held = stray & (agree.sum(axis=1) < config.sibling_agreement * np.maximum(n_sib, 1))
    factor[changed[held]] = 0.0
    return factor


#: Fewest members of a GIS group for :func:`_group_consensus`, and the least confidence each must have.
_CONSENSUS_MEMBERS = 3
_CONSENSUS_FLOOR = 0.5


def _group_consensus(group: np.ndarray, gis: np.ndarray, labels: np.ndarray, c: np.ndarray,
                     config: PhaseConfig, held: np.ndarray | None = None) -> np.ndarray:
    """Step 4d: a whole GIS group that moves together is confident together, or not at all.

    Where every member of a GIS group (transformer and GIS phase) of ``_CONSENSUS_MEMBERS`` or more answers
    the same phase other than the GIS one, at least half of them with confidence and none below
    ``_CONSENSUS_FLOOR`` (no check held any of them back), the others are confident too: a whole
    mislabelled transformer, some of whose meters carry their own load swings. The mirror of the sibling
    agreement (:func:`_sibling_agreement_factor`), which holds back a change the siblings do not share. On
    the generated feeders (class 0.5, 7-30 days) 17 more right corrections and no wrong one; every whole
    group the vote moved wrongly there had no confident member.

    The veto is the other side: where every member of a GIS group of two or more answers the same new phase,
    no more than half of them with confidence, and a check held one of them back (``held``: the nearest-GIS
    or sibling checks), none is confident (at most ``config.suspect_threshold``: the review list). Its
    members share one voltage, so the evidence against the move holds for all (a group confident but for
    one held member is not vetoed: on the generated regulator feeder, class 1.0, a 7-meter transformer
    moved rightly at 6-8 batch-means standard errors had one member held). On 70 runs (the six generated
    scenarios, seeds 0-4, and the five shared feeders, 7 and 14 days) it removed all 4 wrong worklist rows
    of moving groups (a 12-meter transformer whose own load hides its phase: 11-17 nominal standard errors
    for A at 7 days, for C at 14).

    Returns
    -------
    ndarray, shape (n,)
        ``c`` raised to ``config.confident_threshold`` on the members of such groups.
    """
    changed = (gis >= 0) & (labels != gis)
    if not changed.any():
        return c
    df = pd.DataFrame({"g": group, "lab": labels, "ch": changed, "c": c,
                       "sure": c >= config.confident_threshold,
                       "held": np.zeros(c.size, dtype=bool) if held is None else held})
    agg = df.groupby("g").agg(n=("lab", "size"), n_lab=("lab", "nunique"), all_ch=("ch", "all"),
                              c_min=("c", "min"), n_sure=("sure", "sum"), any_held=("held", "any"))
    together = (agg["n_lab"] == 1) & agg["all_ch"]
    whole = together & (agg["n"] >= _CONSENSUS_MEMBERS) & (agg["c_min"] >= _CONSENSUS_FLOOR) \
        & (2 * agg["n_sure"] >= agg["n"])
    lift = np.isin(group, agg.index[whole].to_numpy())
    # the veto: a check held one member of the moving group back (confidence about 0), and it shares its
    # siblings' voltage, so the evidence against the move holds for all of them
    vetoed = together & (agg["n"] >= 2) & agg["any_held"] & (agg["n_sure"] > 0) \
        & (2 * agg["n_sure"] <= agg["n"])
    veto = np.isin(group, agg.index[vetoed].to_numpy())
    out = np.where(lift, np.maximum(c, config.confident_threshold), c)
    return np.where(veto, np.minimum(out, config.suspect_threshold), out)


def _nearest_gis_checks(xp: Any, y: Any, u: Any, u_eval: Any, group: np.ndarray, gis: np.ndarray,
                        labels: np.ndarray, config: PhaseConfig, pairs: pd.DataFrame | None) -> np.ndarray:
    """Step 4b: :func:`_nearest_gis_factor` in the denoised coordinates ``y``, times the same in the raw
    signals ``u`` with the meter as a virtual meter ``u_eval`` (the denoised space can mislead an isolated
    group; ``config.nearest_gis_raw_tolerance``)."""
    near = _nearest_gis_factor(xp, y, u, group, gis, labels, config, pairs=pairs)
    return near * _nearest_gis_factor(xp, u, u, group, gis, labels, config, query=u_eval,
                                      tolerance=config.nearest_gis_raw_tolerance, pairs=pairs)


def _nearest_gis_second_look(xp: Any, y: Any, u: Any, u_eval: Any, group: np.ndarray, gis: np.ndarray,
                             labels: np.ndarray, config: PhaseConfig, pairs: pd.DataFrame | None,
                             near: np.ndarray, confident: np.ndarray) -> np.ndarray:
    """Step 4b again: changes the nearest-GIS checks held (``near == 0``), checked once more with the GIS
    labels of the changes that are ``confident`` replaced by their answers.

    A nearest meter whose GIS label this very pass corrects with confidence is no evidence for that label.
    The case it serves: a meter filed under another transformer beside its real siblings, whose whole
    transformer GIS puts on the wrong phase; its nearest meters are those siblings, still under the wrong
    label, until their own correction is taken into account (on the generated feeders at 7-30 days, 106
    more right corrections and no wrong one). One look, not an iteration: the labels replaced are only
    those confident before any of the held changes is released.

    Returns
    -------
    ndarray, shape (n,)
        ``near`` with the held changes' factors from the second look.
    """
    changed = (gis >= 0) & (labels != gis)
    held = changed & (near == 0)
    fixed = changed & confident
    if not held.any() or not fixed.any():
        return near
    again = _nearest_gis_checks(xp, y, u, u_eval, group, np.where(fixed, labels, gis), labels, config, pairs)
    return np.where(held, again, near)


def _nearest_by_gis_phase(xp: Any, q: Any, q_group: np.ndarray, space: Any, group: np.ndarray, gis: np.ndarray,
                          k: int):
    """For each phase GIS uses (codes 0-2 in ``gis``): ``(phase, candidate rows, index, similarity)`` of the
    ``k`` rows of ``space`` filed under it most similar to each query row (own group excluded), on the host;
    similarity NaN where fewer than ``k`` candidates."""
    for p in range(3):
        cand = np.flatnonzero(gis == p)
        if not cand.size:
            continue
        idx, sim = top_k_neighbours(q, xp.asarray(q_group), k, candidates=xp.take(space, xp.asarray(cand), axis=0),
                                    candidate_group=xp.asarray(group[cand]))
        sim = to_numpy(sim)
        yield p, cand, to_numpy(idx), np.where(np.isfinite(sim), sim, np.nan)


def _time_blocks(xp: Any, n_t: int, n_batches: int) -> Any:
    """(n_time, n_batches) 0/1 matrix of consecutive blocks of ``n_t // n_batches`` samples (the remainder
    joins the last), in the namespace ``xp``: ``x @ blocks`` sums each row over each block."""
    which = np.minimum(np.arange(n_t) // (n_t // n_batches), n_batches - 1)
    return xp.asarray((which[:, None] == np.arange(n_batches)[None, :]).astype(np.float64))


def _neighbourhood_block_products(xp: Any, q_y: Any, q_u: Any, q_group: np.ndarray, y: Any, u: Any,
                                  cand: np.ndarray, group: np.ndarray, k: int, blocks: Any) -> np.ndarray:
    """Per time block, each query's unit signal ``q_u`` times the unit pooled raw signal of its ``k`` nearest
    ``cand`` rows (searched in ``y`` with ``q_y``, own group excluded, similarity weights), on the host
    (m, n_batches): summed over the blocks, the correlation of :func:`_phase_neighbourhood_correlation`."""
    return to_numpy((q_u * _neighbourhood_signal(xp, q_y, q_group, y, u, cand, group, k)) @ blocks)


def _neighbourhood_signal(xp: Any, q_y: Any, q_group: np.ndarray, y: Any, u: Any, cand: np.ndarray,
                          group: np.ndarray, k: int) -> Any:
    """Unit pooled raw signal (m, n_time) of each query's ``k`` nearest ``cand`` rows (searched in ``y`` with
    ``q_y``, own group excluded, similarity weights); zero where nothing pools."""
    idx, sim = top_k_neighbours(q_y, xp.asarray(q_group), min(k, cand.size),
                                candidates=xp.take(y, xp.asarray(cand), axis=0),
                                candidate_group=xp.asarray(group[cand]))
    acc = neighbour_sums(xp.take(u, xp.asarray(cand), axis=0), idx, xp.asarray(np.maximum(to_numpy(sim), 0.0)))
    norm = xp.sqrt(xp.vecdot(acc, acc, axis=-1))
    return acc / xp.where(norm > 0, norm, xp.ones_like(norm))[:, None]


def _batch_t(diff: np.ndarray) -> np.ndarray:
    """Batch-means t statistic of each row of per-block differences (m, n_batches); NaN where undefined."""
    sd = np.std(diff, axis=1, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = diff.mean(axis=1) / (sd / np.sqrt(diff.shape[1]))
    return np.where(np.isfinite(t), t, np.nan)


def _batch_margin_t(xp: Any, y: Any, u: Any, u_eval: Any, group: np.ndarray, labels: np.ndarray,
                    gis: np.ndarray, rows: np.ndarray, k: int, n_batches: int) -> np.ndarray:
    """Step 4a: the margin of a change of phase as a batch-means t statistic, for ``rows``.

    The correlation of the (virtual) meter ``u_eval`` with its answer's neighbourhood minus that with its GIS
    phase's neighbourhood (as in :func:`_phase_neighbourhood_correlation`) is split into ``n_batches``
    consecutive blocks of time; ``t = mean / (sd / sqrt(n_batches))`` of the block margins. Where the
    residual is white, ``t`` is about the margin in standard errors; where it is autocorrelated (a large
    transformer whose own load swings dominate its voltage) ``1 / sqrt(n_obs)`` understates the error and
    ``t`` is the honest figure (on the shared and generated feeders ``z / t`` has a median of about 1.6 for
    right changes: the nominal error is too small almost everywhere). Blocks are ``n_time // n_batches``
    samples each (``[phase] margin_batch_s``, half a day); the remainder joins the last. NaN where a margin
    cannot be formed.
    """
    n_t = int(u.shape[1])
    if n_t // n_batches < 2:
        return np.full(rows.size, np.nan)
    # block sums on the device: (n, n_time) @ (n_time, n_batches); only the small result comes to the host
    blocks = _time_blocks(xp, n_t, n_batches)
    per = np.zeros((rows.size, 2, n_batches))
    for side, target in enumerate((labels[rows], gis[rows])):
        for p in range(3):
            sel = np.flatnonzero(target == p)
            cand = np.flatnonzero(labels == p)
            if not sel.size or not cand.size:
                per[sel, side, :] = np.nan
                continue
            q = xp.asarray(rows[sel])
            per[sel, side, :] = _neighbourhood_block_products(
                xp, xp.take(y, q, axis=0), xp.take(u_eval, q, axis=0), group[rows[sel]], y, u, cand, group, k, blocks)
    return _batch_t(per[:, 0, :] - per[:, 1, :])


def _nearest_gis_factor(xp: Any, y: Any, u: Any, group: np.ndarray, gis: np.ndarray, labels: np.ndarray,
                        config: PhaseConfig, query: Any | None = None,
                        tolerance: float | None = None, pairs: pd.DataFrame | None = None) -> np.ndarray:
    """Step 4b: 0 for a change of phase that the nearest meters of each GIS label speak against, else 1.

    For a meter whose answer differs from its GIS label: the mean similarity of its
    ``config.nearest_gis_count`` most similar meters (own GIS group excluded) that GIS puts on the answer's
    phase, minus the same for its GIS phase. A true GIS error sits among meters of its real phase, so the
    difference is positive or near zero; a small cluster of correctly labelled meters swallowed by a larger
    neighbourhood of another phase has its nearest meters on its own GIS phase. A change whose difference
    is below ``-config.nearest_gis_tolerance`` is held back (factor 0); ``inf`` turns the check off.

    Meters that are physically the meter's siblings (GIS puts them on another transformer, a transformer
    error) do not count: a candidate whose raw similarity with the meter reaches
    ``config.nearest_gis_sibling_ratio`` times the meter's mean raw similarity with its own GIS group-mates
    shares its secondary voltage, so its GIS label is the same error, not independent evidence. (A meter
    alone in its group has no such yardstick and excludes nobody.)

    ``y`` is the space the neighbours are searched in (the denoised coordinates, or the raw signals ``u``
    for the second pass), ``query`` what is searched with (default the rows of ``y``; the virtual meters in
    the raw pass), ``tolerance`` overrides ``config.nearest_gis_tolerance`` and ``pairs`` are the group pair
    similarities (:func:`_group_pair_dots`) if already computed.
    """
    factor = np.ones(labels.size)
    changed = np.flatnonzero((gis >= 0) & (labels != gis))
    tol = config.nearest_gis_tolerance if tolerance is None else tolerance
    if not changed.size or not np.isfinite(tol):
        return factor
    q = xp.take(y if query is None else query, xp.asarray(changed), axis=0)
    sib = _sibling_similarity(xp, u, group, changed, pairs) * config.nearest_gis_sibling_ratio
    n_look = config.nearest_gis_count + (_SIBLING_LOOKAHEAD if np.isfinite(sib).any() else 0)
    best = np.full((changed.size, 3), np.nan)
    for p, cand, idx, sim in _nearest_by_gis_phase(xp, q, group[changed], y, group, gis, n_look):
        # only the two phases compared, and only meters with a yardstick, need the raw similarities
        need = np.flatnonzero(((labels[changed] == p) | (gis[changed] == p)) & np.isfinite(sib))
        if n_look > config.nearest_gis_count and need.size:
            rows = cand[idx[need]]
            raw = _pair_dots(xp, u, np.repeat(changed[need], rows.shape[1]), rows.ravel()).reshape(rows.shape)
            sim[need] = np.where(raw >= sib[need, None], np.nan, sim[need])
        # the best nearest_gis_count of the rest (sorted descending, NaN last)
        top = -np.sort(-sim, axis=1)[:, : config.nearest_gis_count]
        cnt = np.isfinite(top).sum(axis=1)
        best[:, p] = np.where(cnt > 0, np.nansum(top, axis=1) / np.maximum(cnt, 1), np.nan)
    margin = best[np.arange(changed.size), labels[changed]] - best[np.arange(changed.size), gis[changed]]
    # NaN: no meter of one of the two phases to compare with (a phase GIS does not use nearby): no objection
    factor[changed] = np.where(np.isnan(margin) | (margin >= -tol), 1.0, 0.0)
    return factor


def _sibling_agreement_factor(xp: Any, u: Any, group: np.ndarray, gis: np.ndarray, labels: np.ndarray,
                              config: PhaseConfig, pairs: pd.DataFrame | None = None,
                              sibling_labels: np.ndarray | None = None) -> np.ndarray:
    """Step 4c: 0 for a change of phase that the meter's physical siblings do not share, else 1.

    Meters of one single-phase transformer are on one phase. The siblings of a meter are the members of its
    GIS group (transformer and GIS phase) whose raw similarity with it reaches
    ``config.nearest_gis_sibling_ratio`` times the group's typical best match (median over members of each
    one's highest similarity with another member): they share its secondary voltage. A change of phase is
    confident only where at least ``config.sibling_agreement`` of them get the same answer: a whole
    mislabelled transformer moves together; a stray meter filed under the wrong transformer has no siblings
    there and is judged alone; a transformer whose meters the vote splits between phases is not evidence of
    an error (a large transformer alone among meters of another phase). 0 turns the check off. ``pairs``:
    :func:`_group_pair_dots` of the groups of the changed meters, if already computed.

    With ``group`` the GIS transformer alone (:func:`_transformer_groups`), siblings GIS files on another
    phase are compared by ``sibling_labels`` (what they stand at), those of the meter's own GIS phase by their
    answers: on the generated regulator feeder with PV a meter filed on A among four C siblings was moved
    to B with full confidence while the C siblings' own change to B was held back by the nearest-GIS checks.
    """
    factor = np.ones(labels.size)
    changed = np.flatnonzero((gis >= 0) & (labels != gis))
    if not changed.size or config.sibling_agreement <= 0:
        return factor
    dots = (_group_pair_dots(xp, u, group, changed) if pairs is None else pairs).copy()
    if dots.empty:
        return factor
    best = dots.groupby("a")["dot"].max()
    level = best.groupby(group[best.index.to_numpy()]).median()
    dots["sib"] = dots["dot"].to_numpy() >= config.nearest_gis_sibling_ratio * level.reindex(dots["g"]).to_numpy()
    mine = dots[dots["sib"] & np.isin(dots["a"].to_numpy(), changed)]
    if mine.empty:
        return factor
    a, b = mine["a"].to_numpy(), mine["b"].to_numpy()
    theirs = labels[b] if sibling_labels is None else np.where(gis[b] == gis[a], labels[b], sibling_labels[b])
    agree = (theirs == labels[a]).astype(np.float64)
    share = pd.Series(agree).groupby(mine["a"].to_numpy()).mean()
    held = share.index.to_numpy()[share.to_numpy() < config.sibling_agreement]
    factor[held] = 0.0
    return factor


def _pair_dots(xp: Any, u: Any, a: np.ndarray, b: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Dot products ``u[a[j]] . u[b[j]]`` of row pairs, on the host as float64 (n_pairs,)."""
    out = np.empty(a.size)
    for s in range(0, a.size, chunk):
        ua = xp.take(u, xp.asarray(a[s : s + chunk]), axis=0)
        ub = xp.take(u, xp.asarray(b[s : s + chunk]), axis=0)
        out[s : s + chunk] = to_numpy(xp.vecdot(ua, ub, axis=-1))
    return out


def _group_pair_dots(xp: Any, u: Any, group: np.ndarray, rows: np.ndarray) -> pd.DataFrame:
    """Raw similarity of every ordered pair of distinct members of the groups of ``rows``.

    Columns ``a``, ``b`` (row indices, ``a != b``), ``g`` (their group) and ``dot``; pairs in group order,
    each ``a``'s partners ascending. Computed once per feeder and shared by the sibling yardstick of
    :func:`_nearest_gis_factor` (both passes) and :func:`_sibling_agreement_factor`.
    """
    members = np.flatnonzero(np.isin(group, np.unique(group[rows])))
    members = members[np.argsort(group[members], kind="stable")]
    blocks = [m for m in np.split(members, np.flatnonzero(np.diff(group[members])) + 1) if m.size >= 2]
    # each group's Gram matrix, groups of one size in one batched product (rows read once per group,
    # not once per pair); only the small matrices come to the host
    gram: list[np.ndarray | None] = [None] * len(blocks)
    sizes = np.array([m.size for m in blocks], dtype=np.int64)
    for k in np.unique(sizes):
        which = np.flatnonzero(sizes == k)
        idx = np.stack([blocks[w] for w in which])  # (B, k)
        zm = xp.reshape(xp.take(u, xp.asarray(idx.reshape(-1)), axis=0), (len(which), int(k), int(u.shape[1])))
        c = to_numpy(zm @ xp.matrix_transpose(zm)).astype(np.float64)
        for j, w in enumerate(which):
            gram[w] = c[j]
    a, b, dot = [], [], []
    for m, c in zip(blocks, gram):
        ii, jj = np.meshgrid(m, m, indexing="ij")
        off = ii != jj
        a.append(ii[off])
        b.append(jj[off])
        dot.append(c[off])
    a = np.concatenate(a) if a else np.zeros(0, dtype=np.int64)
    b = np.concatenate(b) if b else np.zeros(0, dtype=np.int64)
    dot = np.concatenate(dot) if dot else np.zeros(0)
    return pd.DataFrame({"a": a, "b": b, "g": group[a], "dot": dot})


def _sibling_similarity(xp: Any, u: Any, group: np.ndarray, rows: np.ndarray,
                        pairs: pd.DataFrame | None = None) -> np.ndarray:
    """How similar siblings of each of ``rows`` (sorted) are: the mean raw similarity of the other members
    of its group with each other (with the meter itself where it has one group-mate); NaN where alone.

    The other members' own similarity is the yardstick, not the meter's with them: a meter filed under the
    wrong transformer is little like its group-mates, and a yardstick taken from it would call every
    meter of its neighbourhood a sibling (on the generated regulator feeder with PV, a meter whose GIS
    phase was right was moved with its whole phase neighbourhood excluded so).

    ``pairs``: :func:`_group_pair_dots` of (at least) the groups of ``rows``, if already computed.
    """
    pairs = _group_pair_dots(xp, u, group, rows) if pairs is None else pairs
    out = np.full(rows.size, np.nan)
    if not len(pairs):
        return out
    a, b, g, dot = (pairs[c].to_numpy() for c in ("a", "b", "g", "dot"))
    n_groups = int(group.max()) + 1
    size = np.bincount(group, minlength=n_groups)
    g_sum = np.bincount(g, weights=dot, minlength=n_groups)  # every ordered pair of the group
    g_cnt = np.bincount(g, minlength=n_groups).astype(np.float64)
    own = np.isin(a, rows)
    pos = np.searchsorted(rows, a[own])
    a_sum = np.bincount(pos, weights=dot[own], minlength=rows.size)  # ordered pairs (row, b) ...
    a_cnt = np.bincount(pos, minlength=rows.size).astype(np.float64)
    gr = group[rows]
    # ... and (b, row) have the same dot: the pairs without the row are the group's less twice the row's
    rest_cnt = g_cnt[gr] - 2 * a_cnt
    rest = (g_sum[gr] - 2 * a_sum) / np.maximum(rest_cnt, 1)
    mine = a_sum / np.maximum(a_cnt, 1)
    out = np.where(rest_cnt > 0, rest, np.where(a_cnt > 0, mine, np.nan))
    out[size[gr] < 2] = np.nan
    return out


def _align_clocks(xp: Any, v: Any, nominal: np.ndarray, label: np.ndarray, config: PhaseConfig):
    """Undo whole-interval clock errors: ``(voltage, lag, features)`` with late or early rows shifted back
    and ``features = standardized_differences(voltage)`` of the result.

    A meter that stamps the start instead of the end of each interval is one sample late; its differenced
    voltage then correlates with its phase's common signal best at lag +1, not 0. The common signals are
    the means over the feeder's single-phase meters of each GIS phase (``label`` 0, 1, 2; -1: not used;
    late meters, a minority, barely move them); each row is judged against the one it follows best. The
    signals are autocorrelated (slow source and load swings), so an on-time meter also correlates at lag
    ``l`` by ``rho_l corr(0)``: lag ``l`` wins over lag 0 when what it explains beyond that exceeds what
    lag 0 explains beyond ``rho_l corr(l)``, i.e. ``(1 + rho_l) (corr(l) - corr(0)) > clock_lag_se /
    sqrt(n_time)``. Shifted rows are NaN where shifted out.
    """
    n = v.shape[0]
    lag = np.zeros(n, dtype=np.int64)
    features = standardized_differences(v, xp.asarray(nominal), dtype=xp.float32)
    if config.clock_lag_se <= 0 or (label >= 0).sum() < 3 or v.shape[1] < 8:
        return v, lag, features
    z = features[0]
    refs = [xp.mean(xp.take(z, xp.asarray(np.flatnonzero(label == p)), axis=0), axis=0)
            for p in range(3) if (label == p).sum() >= 3]
    if not refs:
        refs = [xp.mean(xp.take(z, xp.asarray(np.flatnonzero(label >= 0)), axis=0), axis=0)]
    zero = _MAX_CLOCK_LAG
    corr = to_numpy(clock_lag(z, xp.stack(refs), max_lag=_MAX_CLOCK_LAG)[0])  # (refs, n, lags)
    rho = np.stack([to_numpy(clock_lag(r[None, :], r, max_lag=_MAX_CLOCK_LAG)[0])[0] for r in refs])
    which = np.argmax(corr.max(axis=2), axis=0)  # the reference each row follows best, at any lag
    c = corr[which, np.arange(n), :]
    gain = (1.0 + rho[which, :]) * (c - c[:, zero : zero + 1])
    best = np.argmax(c, axis=1)
    shift = (best != zero) & (gain[np.arange(n), best] > config.clock_lag_se / np.sqrt(v.shape[1]))
    if not shift.any():
        return v, lag, features
    lag[shift] = np.arange(-_MAX_CLOCK_LAG, _MAX_CLOCK_LAG + 1)[best[shift]]  # x_aligned(t) = x(t + lag)
    v = shift_rows(v, lag)
    # the features of the shifted rows only (they are row-wise)
    rows = np.flatnonzero(shift)
    sub = standardized_differences(xp.take(v, xp.asarray(rows), axis=0), xp.asarray(nominal[rows]),
                                   dtype=xp.float32)
    merged = []
    for full, part in zip(features, sub):
        h = np.array(to_numpy(full), copy=True)
        h[rows] = to_numpy(part)
        merged.append(xp.asarray(h))
    return v, lag, tuple(merged)


def _measured_signals(xp: Any, raw_feat: tuple[Any, Any], single: np.ndarray, s_idx: np.ndarray,
                      group: np.ndarray, config: PhaseConfig) -> tuple[Any, Any]:
    """The pooled denoised coordinates and unit signals of the single-phase rows ``s_idx``, from the
    features of the voltage as measured (``raw_feat``: standardised differences and their mask): what the
    load-compensated pass's checks look at when the measured pass did not leave them."""
    feat, _ = common_mode_residual(raw_feat[0], raw_feat[1], xp.asarray(single.astype(np.float64)))
    u = unit_rows(feat)
    y = xp.take(_denoised_coordinates(xp, u, s_idx, config), xp.asarray(s_idx), axis=0)
    return _pool_groups(xp, y, group, config), xp.take(u, xp.asarray(s_idx), axis=0)


def _compensate_load(xp: Any, v: Any, kw: Any, lag: np.ndarray, nominal: np.ndarray, meters: pd.DataFrame,
                     z: Any, observed: Any, n_obs: Any, single: np.ndarray,
                     config: PhaseConfig, space: Any | None = None) -> tuple[Any, Any, Any]:
    """Step 1b: the features again, of each meter's voltage less the drops its own load and its GIS
    transformer's load explain (``kernels.load_compensation``).

    The coefficients are fitted on the meter's per-unit voltage changes less the mean of its
    ``config.load_neighbours`` most similar single-phase meters on other GIS transformers, by their
    denoised coordinates ``space`` (the measured pass's, else computed here) (the primary
    voltage they share is not fitted away; a transformer carrying much of its lateral's load would otherwise
    lose its phase signal). ``kw`` is moved by the clock shifts ``lag`` as the voltage was. Returns
    ``(z, observed, n_obs)`` as :func:`~phaseid_hpc.kernels.preprocess.standardized_differences` does.

    Measured with ``benchmarks/feeders.py`` (class 0.5, 0.1 V, 7 days, truth-labelled neighbourhoods): the
    generated ``large`` feeder's own-phase neighbours correlate 0.29 instead of 0.21 (median), its meters
    whose own phase's ten best neighbours did not beat another phase's fell from 23 to 0. Without the
    neighbours (fitted on the meter's voltage alone) EPRI M1 lost accuracy.
    """
    s_idx = np.flatnonzero(single)
    if s_idx.size < 2:
        return z, observed, n_obs
    kw = shift_rows(kw, lag) if np.any(lag) else kw
    tx = pd.factorize(meters["transformer_id"].astype(str).to_numpy(), sort=True)[0].astype(np.int64)
    sib_rows, large = _sibling_term_rows(meters, single, config)
    # neighbours on other transformers; under a transformer serving a whole network, any other meter
    excl = np.where(large, tx.max(initial=-1) + 1 + np.arange(tx.size), tx)
    if space is None:
        feat, _ = common_mode_residual(z, observed, xp.asarray(single.astype(np.float64)))
        space = _denoised_coordinates(xp, unit_rows(feat), s_idx, config)
    k = min(config.load_neighbours, s_idx.size - 1)
    idx, sim = top_k_neighbours(space, xp.asarray(excl), k, candidates=xp.take(space, xp.asarray(s_idx), axis=0),
                                candidate_group=xp.asarray(excl[s_idx]))
    present = ~xp.isinf(sim)  # fewer candidates than k on other transformers: padding, weight 0
    rows = _candidate_rows(xp, s_idx, xp.where(present, idx, 0))
    return compensated_differences(v, xp.asarray(nominal), kw, tx, rows,
                                   xp.astype(present, xp.float64), sib_rows.astype(np.float64),
                                   min_samples=config.min_samples, dtype=xp.float32)


def _candidate_rows(xp: Any, cand: np.ndarray, idx: Any) -> Any:
    """Neighbour indices ``idx`` (n, k) into the rows ``cand`` of an array, as rows of the array itself."""
    return xp.reshape(xp.take(xp.asarray(cand), xp.reshape(idx, (-1,)), axis=0), idx.shape)


def _sibling_term_rows(meters: pd.DataFrame, single: np.ndarray,
                       config: PhaseConfig) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose transformer's load is compensated, and rows of a transformer serving a whole network.

    The first: meters of a GIS transformer whose single-phase meters
    GIS files on one phase, or of one serving so many that its GIS groups carry no local information
    (:func:`_gis_groups`: one three-phase transformer under a whole LV network).

    Where GIS files a transformer's meters on different phases, the drop they share is the evidence that
    settles which label is wrong (a meter filed on another phase than its siblings correlates with them
    through it): there only the meter's own load is compensated. On EPRI M1 (7 days) compensating those too
    cost 5 right corrections of lone mislabelled meters among transformers of 4-14.
    """
    gis = meters["phase_gis"].astype(str).to_numpy()
    tx = meters["transformer_id"].astype(str).to_numpy()
    s_idx = np.flatnonzero(single)
    df = pd.DataFrame({"tx": tx[s_idx], "ph": gis[s_idx]})
    n_ph = df.groupby("tx")["ph"].nunique()
    one_phase = pd.Series(tx).map(n_ph).fillna(1).to_numpy() <= 1
    _, large = _gis_group_codes(meters, gis, s_idx, config)
    network = np.isin(tx, np.unique(tx[s_idx][large]))
    return one_phase | network, network


def _reference_labels(xp: Any, ref_v: Any, u: Any, n_obs: np.ndarray) -> np.ndarray:
    """Phase code (0, 1, 2; -1: undecided) of each row of ``u`` by the feeder-head reference it follows.

    The references (rows A, B, C) get the same features as the meters (differences, standardisation,
    common mode removed); a meter is labelled where its best reference beats the second by 3 standard
    errors (``1 / sqrt(n_obs)``). With an LTC the three heads move together and few meters are labelled.
    """
    rz, robs, _ = standardized_differences(ref_v, xp.asarray(np.full(3, np.nan)))
    rfeat, _ = common_mode_residual(rz, robs, None)
    corr = to_numpy(u @ xp.permute_dims(unit_rows(rfeat), (1, 0)))
    top = np.sort(corr, axis=1)
    sep = (top[:, -1] - top[:, -2]) * np.sqrt(np.maximum(n_obs, 1)) > 3.0
    return np.where(sep, np.argmax(corr, axis=1), -1).astype(np.int64)


def _gis_groups(meters: pd.DataFrame, gis: np.ndarray, s_idx: np.ndarray, config: PhaseConfig) -> np.ndarray:
    """Group code per single-phase meter (rows ``s_idx``): its GIS transformer and GIS phase.

    Groups of more than ``config.max_group_size`` meters, or of more than a quarter of the feeder's meters
    with that GIS phase (one three-phase transformer serving a whole LV network), carry no local
    information: each of their meters gets a group of its own (else a phase would vote only for others).
    """
    code, large = _gis_group_codes(meters, gis, s_idx, config)
    return np.where(large, code.max(initial=-1) + 1 + np.arange(code.size), code).astype(np.int64)


def _gis_group_codes(meters: pd.DataFrame, gis: np.ndarray, s_idx: np.ndarray,
                     config: PhaseConfig) -> tuple[np.ndarray, np.ndarray]:
    """Code of each single-phase meter's (GIS transformer, GIS phase) key, and whether its group is too large."""
    labels = gis[s_idx].astype(str)
    key = meters["transformer_id"].astype(str).to_numpy()[s_idx] + "|" + labels
    code, uniq = pd.factorize(key, sort=True)
    size = np.bincount(code, minlength=len(uniq))[code]
    per_label = pd.Series(labels).map(pd.Series(labels).value_counts()).to_numpy()
    return code, (size > config.max_group_size) | (size > 0.25 * per_label)


#: A change with a clear majority of the vote (60%) and a margin of this many times ``min_margin_se`` counts
#: as unanimous (a split vote across a lateral boundary does not outweigh such direct evidence). 3 before
#: 2026-12-07; at 2, 15 more right corrections on the generated and shared feeders and no wrong one. An
#: answer that confirms GIS keeps 3 (at 2 one wrong GIS label of `lv_european` was confirmed confidently).
_DECISIVE_MARGINS = 2.0

#: Fewest single-phase meters on a GIS transformer for its meters of other GIS phases to count as siblings
#: (with two or three, any two meters filed together look alike enough: strays would vote).
_MIN_TRANSFORMER_SIBLINGS = 4


def _transformer_groups(meters: pd.DataFrame, gis: np.ndarray, s_idx: np.ndarray, config: PhaseConfig) -> np.ndarray:
    """Group code per single-phase meter (rows ``s_idx``): its GIS transformer, whatever its GIS phase, where
    that transformer has ``_MIN_TRANSFORMER_SIBLINGS`` or more; any other meter, and one of a group too large
    to carry local information (:func:`_gis_groups`), has a group of its own."""
    code, _ = pd.factorize(meters["transformer_id"].astype(str).to_numpy()[s_idx], sort=True)
    _, large = _gis_group_codes(meters, gis, s_idx, config)
    alone = large | (np.bincount(code)[code] < _MIN_TRANSFORMER_SIBLINGS)
    return np.where(alone, code.max(initial=-1) + 1 + np.arange(code.size), code).astype(np.int64)


def _pool_groups(xp: Any, y: Any, group: np.ndarray, config: PhaseConfig) -> Any:
    """Average each meter with the members of its group that move with the group (virtual meters).

    A member whose similarity with the rest of its group (leave-one-out mean direction) is below
    ``config.pool_similarity`` keeps its own signal: a meter on another phase than its GIS siblings
    is not averaged into them and votes on its own evidence. Rows: unit vectors (n, r).
    """
    n_groups = int(group.max()) + 1
    w = xp.asarray((group[:, None] == np.arange(n_groups)[None, :]).astype(np.float64)) if n_groups * y.shape[0] < 5e7 \
        else None
    if w is None:  # very large feeders: sums by sorting instead of a dense one-hot
        return y
    gsum = xp.permute_dims(w, (1, 0)) @ y
    own = xp.take(gsum, xp.asarray(group), axis=0)
    loo = own - y
    loo_norm = xp.sqrt(xp.vecdot(loo, loo, axis=-1))
    cos = xp.where(loo_norm > 0, xp.vecdot(y, loo, axis=-1) / xp.where(loo_norm > 0, loo_norm, 1.0), 0.0)
    member = xp.astype(cos > config.pool_similarity, xp.float64)
    msum = xp.permute_dims(w, (1, 0)) @ (member[:, None] * y)
    pooled = xp.take(msum, xp.asarray(group), axis=0)
    return unit_rows(xp.where(member[:, None] > 0, pooled, y))


def _zones(xp: Any, y: Any, labels: np.ndarray, config: PhaseConfig) -> np.ndarray:
    """Neighbourhoods of one phase: k-means of the denoised coordinates ``y`` of each phase's meters into
    groups of about ``config.zone_meters``; codes unique across phases, ordered by phase.

    ``kernels.kmeans`` rather than scikit-learn's ``KMeans``: the latter costs ~0.4 ms of CPU per meter
    here (its per-call overhead on many small problems), the whole budget of identification, and has no
    GPU path.
    """
    zone = np.full(labels.size, -1, dtype=np.int64)
    next_code = 0
    for p in range(3):
        rows = np.flatnonzero(labels == p)
        if rows.size == 0:
            continue
        k = max(1, round(rows.size / config.zone_meters))
        if k == 1:
            code = np.zeros(rows.size, dtype=np.int64)
        else:
            code, _, _ = batched_kmeans(xp.take(y, xp.asarray(rows), axis=0), k, random_state=config.random_state,
                                        n_init=1)
            code = np.asarray(to_numpy(code), dtype=np.int64)
        zone[rows] = next_code + code
        next_code += k
    return zone


def _denoised_coordinates(xp: Any, u: Any, s_idx: np.ndarray, config: PhaseConfig) -> Any:
    """Unit rows of ``u`` projected on the top principal subspace of its single-phase rows, (n, rank)."""
    us = xp.take(u, xp.asarray(s_idx), axis=0)
    rank = max(2, min(config.denoise_rank, s_idx.size - 1, u.shape[1] - 1))
    basis = principal_basis(us, rank, random_state=config.random_state)
    return unit_rows(u @ basis)


def _pool_agreeing(xp: Any, u: Any, group: np.ndarray, labels: np.ndarray) -> Any:
    """Unit mean signal of the members of each meter's GIS group that the vote puts on its phase.

    Meters of one transformer and phase share its voltage; averaging them (virtual meters) cuts their own
    load and meter noise by ``sqrt(m)`` while the phase neighbourhood they follow stays. A meter the vote
    puts on another phase than its group-mates is averaged only with those that share its answer.
    """
    key = group.astype(np.int64) * 3 + labels
    codes, inv = np.unique(key, return_inverse=True)
    if codes.size == key.size:  # nobody to pool with
        return u
    from scipy import sparse

    if isinstance(u, np.ndarray):
        # in u's dtype: float32 unit signals give float32 virtual meters (a float64 one would make every
        # product with the signals convert them to float64 first)
        w = sparse.csr_matrix((np.ones(key.size, dtype=u.dtype), (inv, np.arange(key.size))),
                              shape=(codes.size, key.size))
        sums = np.asarray(w @ u)
        return unit_rows(sums[inv])
    onehot = xp.astype(xp.asarray(inv[None, :] == np.arange(codes.size)[:, None]), u.dtype)
    sums = onehot @ u
    return unit_rows(xp.take(sums, xp.asarray(inv), axis=0))


def _phase_neighbourhood_correlation(xp: Any, y: Any, u: Any, group: np.ndarray, labels: np.ndarray,
                                     k: int, u_eval: Any | None = None) -> np.ndarray:
    """Correlation of each meter with the pooled raw signal of its ``k`` nearest meters of each phase.

    For phase ``p`` the neighbours are searched (in the denoised coordinates ``y``) among the meters now
    labelled ``p`` only, outside the meter's own group; their raw unit signals ``u`` are summed with
    similarity weights; ``u_eval`` (default ``u``) is what is correlated with them (e.g. the virtual
    meters of :func:`_pool_agreeing`). Returns (n, 3); ``-1`` where a phase has no meter. The margin of the answer's
    column over the others is the direct evidence that the meter moves with that phase's neighbourhood
    and not with the one its GIS label claims.
    """
    n = u.shape[0]
    out = np.full((n, 3), -1.0)
    for p in range(3):
        cand = np.flatnonzero(labels == p)
        if cand.size < 1:
            continue
        # search only among the phase's meters: the similarity block is n x n_p, not n x n
        idx, sim = top_k_neighbours(y, xp.asarray(group), min(k, cand.size),
                                    candidates=xp.take(y, xp.asarray(cand), axis=0),
                                    candidate_group=xp.asarray(group[cand]))
        w = np.maximum(to_numpy(sim), 0.0)
        rows = _candidate_rows(xp, cand, idx)  # rows of u itself: no copy of the phase's signals
        out[:, p] = to_numpy(pooled_neighbour_correlation(u if u_eval is None else u_eval, rows, xp.asarray(w),
                                                          candidates=u))
    return out


def _vote_confidence(share: np.ndarray, z_strength: np.ndarray, n_choices: int, config: PhaseConfig):
    """Confidence in [0, 1]: the vote share above chance, scaled down where the evidence is weak.

    ``share`` is the winning label's share of the neighbour votes (1 / n_choices: chance); ``z_strength``
    the correlation with the voting neighbours' pooled signal in standard errors: below
    ``config.min_strength_se`` the neighbours are not shown to be related at all (a dead, noisy or
    misaligned meter) and the confidence falls in proportion.
    """
    base = np.clip((share - 1.0 / n_choices) / (1.0 - 1.0 / n_choices), 0.0, 1.0)
    return base * np.clip(z_strength / config.min_strength_se, 0.0, 1.0)


def _confidence_class(conf: np.ndarray, config: PhaseConfig) -> np.ndarray:
    """``confident`` / ``suspect`` / ``low`` by the thresholds of ``config``."""
    return confidence_class(conf, confident_threshold=config.confident_threshold,
                            suspect_threshold=config.suspect_threshold)


def _pair_margin(xp: Any, y: Any, u: Any, s_idx: np.ndarray, labels: np.ndarray, rows: np.ndarray,
                 top2: np.ndarray, k: int, n_obs: np.ndarray, n_batches: int,
                 regression: bool = True) -> np.ndarray:
    """Margin [SE] of phase-to-phase services ``rows`` answered ``top2`` (phase codes, (m, 2)) over the third.

    Each row is correlated with the pooled raw signal of its ``k`` nearest single-phase meters (rows
    ``s_idx``, answered ``labels``) of each phase, as in :func:`_phase_neighbourhood_correlation`; the
    margin is the weaker of its two phases' correlation less the third's, in standard errors
    (``sqrt(n_obs)``), and, with ``n_batches >= 4``, at most the batch-means t of the same difference
    (:func:`_batch_margin_t`: the nominal error is too small where a service's own load dominates its voltage).
    ``inf`` where the third phase has no meter. With ``regression`` the margin is at most 0 unless the
    service's signal, regressed (least squares) on the three pooled phase signals, gives the third phase the
    smallest weight: near a phase that moves with another phase's load (mutual coupling, a regulated
    lateral elsewhere) the correlations rank a phase the service does not have above one it has (a C-A
    service of the generated regulator feeder with PV, seed 2, called A-B with full confidence).
    """
    n_t = int(u.shape[1])
    batched = n_batches >= 4 and n_t // n_batches >= 2
    blocks = _time_blocks(xp, n_t, n_batches if batched else 1)
    per = np.full((rows.size, 3, int(blocks.shape[1])), np.nan)
    q = xp.take(y, xp.asarray(rows), axis=0)
    q_u = xp.take(u, xp.asarray(rows), axis=0)
    no_group = np.full(u.shape[0], -2, dtype=np.int64)  # pairs exclude no single-phase meter
    basis = np.zeros((rows.size, 3, 3))  # Gram matrix of the three pooled phase signals, per row
    signals = [None, None, None]
    for p in range(3):
        cand = s_idx[labels == p]
        if cand.size:
            signals[p] = _neighbourhood_signal(xp, q, np.full(rows.size, -1, dtype=np.int64), y, u, cand,
                                               no_group, k)
            per[:, p, :] = to_numpy((q_u * signals[p]) @ blocks)
    for a in range(3):
        for b in range(a, 3):
            if signals[a] is not None and signals[b] is not None:
                basis[:, a, b] = basis[:, b, a] = to_numpy(xp.vecdot(signals[a], signals[b], axis=-1))
    total = per.sum(axis=2)  # (m, 3): the correlations over the whole window
    m = np.arange(rows.size)
    third = 3 - top2.sum(axis=1)
    if regression:
        # the three local phase signals overlap (a phase near the service can move with another phase's
        # load), so the correlations alone can rank a phase the service does not have above one it has: the
        # weights of the service's signal regressed on the three (least squares) must also put the third
        # phase last
        have = np.array([s is not None for s in signals])
        beta = np.full((rows.size, 3), np.nan)
        for j in range(rows.size):
            g = basis[j][np.ix_(have, have)]
            beta[j, have] = np.linalg.lstsq(g, total[j, have], rcond=None)[0]
        last = np.nan_to_num(beta[m, third], nan=-np.inf) < np.fmin(beta[m, top2[:, 0]], beta[m, top2[:, 1]])
    weaker = np.where(total[m, top2[:, 0]] <= total[m, top2[:, 1]], top2[:, 0], top2[:, 1])
    rival = np.where(np.isnan(total[m, third]), -np.inf, total[m, third])  # a phase without meters: no rival
    z = (total[m, weaker] - rival) * np.sqrt(n_obs)
    if batched:
        z = np.fmin(z, _batch_t(per[m, weaker, :] - per[m, third, :]))
    if regression:
        z = np.where(last, z, np.fmin(z, 0.0))
    return z


def _pair_fit(xp: Any, y: Any, u: Any, rows: np.ndarray, s_idx: np.ndarray, labels: np.ndarray,
              k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The phase pair (codes, (m, 2)) whose local signals best explain each service ``rows``, and the
    multiple correlation of the best and of the second-best pair [-].

    Each phase's local signal is the pooled raw signal ``u`` of the row's ``k`` nearest single-phase meters
    (rows ``s_idx``, answered ``labels``) on it, searched in ``y`` (:func:`_neighbourhood_signal`). For a
    pair ``(p, q)`` the row's unit signal is regressed on the two; where a weight comes out negative (a
    line-to-line voltage does not fall as one of its phases rises) the better single phase counts alone.
    A phase without meters leaves its pairs out (correlation 0).
    """
    q = xp.take(y, xp.asarray(rows), axis=0)
    q_u = xp.take(u, xp.asarray(rows), axis=0)
    no_group = np.full(u.shape[0], -2, dtype=np.int64)  # pairs exclude no single-phase meter
    dots, signals = np.zeros((rows.size, 3)), [None, None, None]
    for p in range(3):
        cand = s_idx[labels == p]
        if cand.size:
            signals[p] = _neighbourhood_signal(xp, q, np.full(rows.size, -1, dtype=np.int64), y, u, cand,
                                               no_group, k)
            dots[:, p] = to_numpy(xp.vecdot(q_u, signals[p], axis=-1))
    r2 = np.zeros((rows.size, len(_PAIRS)))
    for j, (a, b) in enumerate(_PAIRS):
        if signals[a] is None or signals[b] is None:
            continue
        g = to_numpy(xp.vecdot(signals[a], signals[b], axis=-1))
        det = np.maximum(1.0 - g * g, 1e-12)
        wa, wb = (dots[:, a] - g * dots[:, b]) / det, (dots[:, b] - g * dots[:, a]) / det
        joint = (dots[:, a] ** 2 + dots[:, b] ** 2 - 2.0 * g * dots[:, a] * dots[:, b]) / det
        alone = np.maximum(np.maximum(dots[:, a], 0.0), np.maximum(dots[:, b], 0.0)) ** 2
        r2[:, j] = np.where((wa > 0) & (wb > 0), joint, alone)
    r = np.sqrt(np.maximum(r2, 0.0))
    order = np.argsort(-r, axis=1, kind="stable")
    m = np.arange(rows.size)
    return np.array(_PAIRS, dtype=np.int64)[order[:, 0]], r[m, order[:, 0]], r[m, order[:, 1]]


def _identify_pairs(xp: Any, y: Any, u: Any, p_idx: np.ndarray, s_idx: np.ndarray, labels: np.ndarray,
                    n_obs: np.ndarray, config: PhaseConfig, gis: np.ndarray | None = None,
                    interval_s: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step 5: phase-to-phase services ``p_idx``: the two phases whose local signals best explain theirs.

    A line-to-line voltage moves with both of its phases (to first order, with the mean of their changes).
    :func:`_pair_fit` regresses the service's raw signal on each pair of its phases' local signals and the
    pair explaining the most wins. Confidence: the winner's multiple correlation over the runner-up's in
    standard errors (``1 / sqrt(n_obs)``), scaled by ``config.min_margin_se``, times its strength over
    ``config.min_strength_se``. A change from the GIS pair must also pass the margin test of single-phase
    changes (:func:`_pair_margin`) and be backed by the raw signals (:func:`_pair_raw_backing`).

    Returns
    -------
    phase : ndarray of object, shape (m,)
        ``AB``, ``BC`` or ``CA`` for each row of ``p_idx``.
    confidence : ndarray, shape (m,)
    low_correlation : ndarray of bool, shape (m,)
        The winner's strength is below ``config.min_strength_se``.
    """
    top2, r_best, r_second = _pair_fit(xp, y, u, p_idx, s_idx, labels, config.n_neighbours)
    z_strength = r_best * np.sqrt(n_obs[p_idx])
    z_fit = (r_best - r_second) * np.sqrt(n_obs[p_idx])
    c = np.clip(z_fit / config.min_margin_se, 0.0, 1.0) * np.clip(z_strength / config.min_strength_se, 0.0, 1.0)
    answer = np.array([_PAIR_NAMES[(int(a), int(b))] for a, b in top2], dtype=object)
    if gis is not None:
        moved = np.flatnonzero((answer != gis[p_idx]) & np.isin(gis[p_idx], list(_PAIR_NAMES.values())))
        n_batches = int(u.shape[1] * interval_s // config.margin_batch_s) if config.margin_batch_s > 0 else 0
        if moved.size and interval_s > 0:
            # the weaker of the answer's two phases must beat the third, nominally and as a batch-means t
            z_margin = _pair_margin(xp, y, u, s_idx, labels, p_idx[moved], top2[moved], config.n_neighbours,
                                    n_obs[p_idx[moved]], n_batches)
            c[moved] = c[moved] * np.clip(np.nan_to_num(z_margin, nan=0.0) / config.min_margin_se, 0.0, 1.0)
        if moved.size and np.isfinite(config.nearest_gis_raw_tolerance):
            backed = _pair_raw_backing(xp, u, p_idx[moved], top2[moved], gis, s_idx, config)
            c[moved] = np.where(backed, c[moved], np.minimum(c[moved], 0.5 * config.suspect_threshold))
    return answer, c, z_strength < config.min_strength_se


def _pair_raw_backing(xp: Any, u: Any, rows: np.ndarray, top2: np.ndarray, gis: np.ndarray, s_idx: np.ndarray,
                      config: PhaseConfig) -> np.ndarray:
    """Whether each change of phase-to-phase service ``rows`` (answered ``top2``) has raw backing.

    The answer and the GIS pair share one phase; the one only the answer has must be at least as close, in
    raw similarity to the ``config.nearest_gis_count`` nearest single-phase meters GIS files under it, as the
    one only the GIS label has (``config.nearest_gis_raw_tolerance``): the denoised space can mislead a
    service whose own load dominates its voltage. NaN (no such meter) is no backing.
    """
    letters = {v: k for k, v in _PAIR_NAMES.items()}
    near = np.full((rows.size, 3), np.nan)
    codes = np.full(u.shape[0], -1, dtype=np.int64)  # single-phase meters by GIS phase; none excluded
    codes[s_idx] = _phase_codes(gis[s_idx])
    q = xp.take(u, xp.asarray(rows), axis=0)
    everyone = np.zeros(u.shape[0], np.int64)
    for p, _, _, sim_p in _nearest_by_gis_phase(xp, q, np.full(rows.size, -1), u, everyone, codes,
                                                 config.nearest_gis_count):
        near[:, p] = sim_p.mean(axis=1)
    backed = np.ones(rows.size, dtype=bool)
    for j in range(rows.size):
        only_answer = set(top2[j].tolist()) - set(letters[gis[rows[j]]])
        only_gis = set(letters[gis[rows[j]]]) - set(top2[j].tolist())
        if len(only_answer) == 1 and len(only_gis) == 1:
            d = near[j, only_answer.pop()] - near[j, only_gis.pop()]
            backed[j] = bool(d >= -config.nearest_gis_raw_tolerance)
    return backed


def recommend(gis: Any, inferred: Any, phase_class: Any) -> np.ndarray:
    """The decision policy: the GIS label stays unless the evidence against it is confident.

    Parameters
    ----------
    gis : array of str, shape (n_meters,)
        GIS phase labels.
    inferred : array of str or None, shape (n_meters,)
        Raw inference (``identify_phases(...)["phase"]``); None where not identified.
    phase_class : array of str, shape (n_meters,)
        Class of the inference.

    Returns
    -------
    ndarray of object, shape (n_meters,)
        ``inferred`` where it is ``confident`` (or where GIS has no valid label), else ``gis``.
        A low or suspect disagreement never replaces the GIS label: it goes to the review list.
    """
    gis = np.asarray(gis, dtype=object)
    inferred = np.asarray(inferred, dtype=object)
    cls = np.asarray(phase_class, dtype=object)
    valid_gis = np.isin(gis, list(contract.SINGLE_PHASES) + list(contract.PAIR_PHASES) + [contract.THREE_PHASE])
    take = pd.notna(inferred) & ((cls == contract.CLASS_CONFIDENT) | ~valid_gis)
    return np.where(take, inferred, gis)
