"""Phase identification of smart meters from AMI voltage: one block of whole feeders at a time.

Method (per feeder; no cross-feeder pairs are ever formed):

1. **Features.** Per-unit voltage, first difference (removes the shared daily shape), row
   standardisation with outlier clipping, and removal of the feeder-wide common mode (source / LTC
   variations shared by all phases) by per-meter least squares.
2. **Clustering.** Batched spherical k-means (k = 3) of the single-phase meters' unit-norm signals, with
   seeded k-means++ restarts (lowest inertia) and one start from the GIS labels' phase templates; the
   partition that agrees best with GIS after naming wins (inertia breaks ties). k drops to 2 (1) when two
   clusters share a GIS majority (a feeder with fewer phases).
3. **Naming.** Clusters get phase names by the majority of GIS labels (an assignment on the count
   matrix: robust while each phase keeps a plurality of correct labels). Feeder-head references name the
   clusters instead when GIS gives no majority and the references are separable (their common-mode-free
   differenced signals must each match one cluster; with an LTC all three correlate 0.995+ and carry no
   phase information, so they are not trusted).
4. **Refinement.** Phase templates (unit-norm cluster means) are rebuilt and every meter is scored by
   NaN-aware correlation with them. Each meter is finally scored against templates built without its
   own GIS transformer group (no self-bias). Meters of one GIS transformer are pooled robustly: a meter joins its
   group's pooled signal only when it correlates with the leave-one-out mean of the group more than with
   its best phase template (a wrongly labelled meter on another phase does not). Repeated to a fixed point.
5. **Phase-to-phase and 3-phase services** (GIS ``AB/BC/CA`` or service type ``2ph*``; ``ABC`` or
   ``3ph*``) are scored against the sums of two templates; three-phase services keep ``ABC``.
6. **Confidence.** ``p_err`` is the probability that white residual noise alone made the best template
   beat another one (margin over its standard error, union bound; on ckt5 it is calibrated within a
   factor ~1.5 from 1e-3 to 0.5). ``phase_confidence = min(1, -log10(p_err) / config.confidence_decades)``:
   one decade of error odds per 0.25 by default. A meter whose voltage level correlates below
   ``low_correlation`` with every phase's mean level matches no phase (reason code, confidence 0).

References: Olivier et al., "Phase identification of smart meters by clustering voltage measurements",
PSCC 2018; Blakely & Reno, "Phase identification using co-association matrix ensemble clustering",
IET SMT 2020 (ckt5 figures).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from . import contract
from ._compat import array_namespace, to_numpy
from .config import PhaseConfig
from .errors import ContractError
from .kernels.correlation import nan_corr_counts
from .kernels.kmeans import batched_kmeans
from .kernels.phase_clustering import (
    leave_group_out_scores,
    margin_error_probability,
    one_hot,
    phase_templates,
    pool_by_transformer,
    template_scores,
)
from .kernels.preprocess import per_unit_differences, remove_common_mode, standardize_rows, unit_rows

__all__ = ["RESULT_COLUMNS", "identify_phases"]

RESULT_COLUMNS: tuple[str, ...] = ("phase", "phase_confidence", "phase_class", "reasons")
_PHASES = contract.SINGLE_PHASES
#: Candidate labels of a phase-to-phase service, as pairs of template indices.
_PAIRS = ((0, 1), (1, 2), (2, 0))
_REQUIRED = ("meter_id", "feeder_id", "transformer_id", "phase_gis")


def _service_kind(phase_gis: Any, service_type: Any) -> str:
    st = str(service_type).lower() if isinstance(service_type, str) else ""
    if phase_gis == contract.THREE_PHASE or st.startswith("3ph"):
        return "three"
    if phase_gis in contract.PAIR_PHASES or st.startswith("2ph"):
        return "pair"
    return "single"


def identify_phases(
    voltage: Any,
    meters: pd.DataFrame,
    config: PhaseConfig = PhaseConfig(),  # noqa: B008 - frozen dataclass, safe as a default
    *,
    references: tuple[pd.DataFrame, Any] | None = None,
    interval_s: float = 900,
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
        Used only to name clusters where GIS gives no majority and the references are separable.
    interval_s : float
        Sampling interval. [s] (kept for the record; the method is scale-free in time.)
    xp : module, optional
        Array namespace; default: that of ``voltage`` (NumPy, CuPy).

    Returns
    -------
    DataFrame, index of ``meters``, columns
        ``phase`` (``A/B/C``, ``AB/BC/CA``, ``ABC``; None when unusable), ``phase_confidence`` in [0, 1],
        ``phase_class`` (``confident`` >= ``config.confident_threshold`` > ``suspect`` >=
        ``config.suspect_threshold`` > ``low``; ``insufficient_data`` when unusable) and ``reasons``
        (list of contract reason codes).
    """
    missing = [c for c in _REQUIRED if c not in meters.columns]
    if missing:
        raise ContractError(f"identify_phases: meters table lacks column(s) {missing}; expected {list(_REQUIRED)}")
    xp = array_namespace(voltage) if xp is None else xp
    v = xp.asarray(voltage, dtype=xp.float64)
    n_m = len(meters)
    if v.ndim != 2 or v.shape[0] != n_m:
        raise ContractError(
            f"identify_phases: voltage must have shape (n_meters={n_m}, n_time), got {tuple(v.shape)}"
        )
    if references is not None:
        if not (isinstance(references, tuple) and len(references) == 2):
            raise ContractError("identify_phases: references must be a tuple (table, reference_voltage)")
        ref_table, reference_voltage = references
        if len(ref_table) != reference_voltage.shape[0] or reference_voltage.shape[-1] != v.shape[1]:
            raise ContractError(
                f"identify_phases: reference_voltage must have shape (n_refs={len(ref_table)}, "
                f"n_time={v.shape[1]}), got {tuple(reference_voltage.shape)}"
            )

    out_phase = np.full(n_m, None, dtype=object)
    out_conf = np.zeros(n_m)
    out_class = np.full(n_m, contract.CLASS_INSUFFICIENT, dtype=object)
    out_reasons: list[list[str]] = [[] for _ in range(n_m)]

    feeders = meters["feeder_id"].astype(str).to_numpy()
    for feeder in sorted(set(feeders)):
        rows = np.flatnonzero(feeders == feeder)
        ref_v = None
        if references is not None and config.use_references:
            rsel = np.flatnonzero(ref_table["feeder_id"].astype(str).to_numpy() == feeder)
            phases = ref_table["phase"].to_numpy()[rsel]
            if sorted(phases.tolist()) == sorted(_PHASES):
                order = [int(rsel[list(phases).index(p)]) for p in _PHASES]
                rv = xp.asarray(reference_voltage, dtype=xp.float64)
                ref_v = xp.stack([rv[i, :] for i in order], axis=0)
        res = _identify_feeder(xp, _take_rows(xp, v, rows), meters.iloc[rows], config, ref_v)
        for j, i in enumerate(rows):
            out_phase[i], out_conf[i], out_class[i], out_reasons[i] = res[0][j], res[1][j], res[2][j], res[3][j]
    return pd.DataFrame(
        {
            "phase": pd.Series(out_phase, index=meters.index, dtype=object),  # None stays None
            "phase_confidence": pd.Series(out_conf, index=meters.index),
            "phase_class": pd.Series(out_class, index=meters.index, dtype=object),
            "reasons": pd.Series(out_reasons, index=meters.index, dtype=object),
        },
        index=meters.index,
    )


def _take_rows(xp: Any, v: Any, rows: np.ndarray) -> Any:
    if rows.size and np.all(np.diff(rows) == 1):
        return v[int(rows[0]) : int(rows[-1]) + 1, :]
    return xp.take(v, xp.asarray(rows), axis=0)


def _identify_feeder(xp: Any, v: Any, meters: pd.DataFrame, config: PhaseConfig, ref_v: Any | None):
    n = len(meters)
    gis = meters["phase_gis"].to_numpy(dtype=object)
    st = meters["service_type"].to_numpy(dtype=object) if "service_type" in meters else np.full(n, None)
    kind = np.array([_service_kind(g, s) for g, s in zip(gis, st)])
    usable = meters["usable"].to_numpy(dtype=bool) if "usable" in meters else np.ones(n, dtype=bool)
    nominal = (
        meters["nominal_v"].to_numpy(dtype=np.float64) if "nominal_v" in meters else np.full(n, np.nan)
    )
    # Pair services measure line-to-line voltage: the nominal rescales it; nothing else changes.
    phase = np.full(n, None, dtype=object)
    conf = np.zeros(n)
    cls = np.full(n, contract.CLASS_INSUFFICIENT, dtype=object)
    reasons: list[list[str]] = [[] for _ in range(n)]

    if v.shape[1] < 2:
        for i in range(n):
            reasons[i].append(contract.REASON_INSUFFICIENT_DATA)
        return phase, conf, cls, reasons

    x = per_unit_differences(v, xp.asarray(nominal))
    z, n_obs = standardize_rows(x)
    n_obs_h = to_numpy(n_obs)
    ok = usable & (n_obs_h >= config.min_samples)
    single = ok & (kind == "single")
    for i in np.flatnonzero(~ok):
        reasons[i].append(contract.REASON_INSUFFICIENT_DATA)
    if single.sum() < 3:
        # Too few meters to form phase clusters: keep GIS, flag low confidence.
        for i in np.flatnonzero(ok):
            phase[i], conf[i], cls[i] = gis[i], 0.0, contract.CLASS_LOW
        return phase, conf, cls, reasons

    w_single = xp.asarray(single.astype(np.float64))
    feat, _ = remove_common_mode(z, w_single)
    u = unit_rows(feat)

    # --- 2-4. clustering of single-phase meters, naming, refinement. k drops while two clusters share a
    # GIS majority, or while a phase keeps fewer than min_phase_meters after refinement (a spurious
    # cluster of a few wrong GIS labels dissolves once templates exclude the scored meters).
    s_idx = np.flatnonzero(single)
    us = xp.take(u, xp.asarray(s_idx), axis=0)
    gis_code = np.array([_PHASES.index(g) if g in _PHASES else -1 for g in gis])
    tr_codes, _ = pd.factorize(meters["transformer_id"].astype(str), sort=True)
    tr_codes = np.where(single, tr_codes, -1)
    n_groups = int(tr_codes.max()) + 1 if (tr_codes >= 0).any() else 1
    min_size = max(config.min_phase_meters, int(np.ceil(config.min_phase_share * s_idx.size)))
    for k in (3, 2, 1):
        labels, name, decided = _cluster_and_name(xp, us, gis_code[s_idx], k, config, ref_v)
        if not decided:
            continue
        present = np.unique(name)  # phase indices that exist on this feeder, ascending
        code = np.full(n, -1, dtype=np.int64)
        code[s_idx] = name[labels]
        code, templates, scores, span_scores = _refine(xp, feat, code, present, single, tr_codes, n_groups)
        sizes = np.array([(code == p).sum() for p in present])
        if k == 1 or sizes.min() >= min_size:
            break
    k = present.size
    local = np.full(3, -1, dtype=np.int64)
    local[present] = np.arange(k)

    gram = templates @ xp.permute_dims(templates, (1, 0))
    n_eff = xp.asarray(n_obs_h)
    if k > 1:
        best, p_err, _ = margin_error_probability(scores, gram, n_eff, span_scores)
        p_err_h = to_numpy(p_err)
        best_h = present[to_numpy(best)]
    else:  # one phase on the feeder: nothing to tell apart, GIS-consistent but unverifiable
        p_err_h = np.full(n, 0.5)
        best_h = np.full(n, present[0])

    # phase-to-phase services: templates are sums of two phase templates
    pairs = [(a, b) for a, b in _PAIRS if a in present and b in present]
    if pairs:
        pair_t = unit_rows(xp.stack([templates[int(local[a]), :] + templates[int(local[b]), :] for a, b in pairs]))
        pscores = u @ xp.permute_dims(pair_t, (1, 0))
        if len(pairs) > 1:
            pbest, pp_err, _ = margin_error_probability(pscores, pair_t @ xp.permute_dims(pair_t, (1, 0)), n_eff)
            pbest_h, pp_err_h = to_numpy(pbest), to_numpy(pp_err)
        else:
            pbest_h, pp_err_h = np.zeros(n, dtype=np.int64), np.full(n, 0.5)

    # level correlation: does the meter match any phase at all?
    level = v / xp.asarray(np.where(nominal > 0, nominal, 1.0))[:, None]
    lw = one_hot(xp.asarray(np.where(single, best_h, -1)), 3)  # global phase index
    lvl0 = xp.where(xp.isnan(level), xp.zeros_like(level), level)
    lobs = xp.astype(~xp.isnan(level), xp.float64)
    lsum = xp.permute_dims(lw, (1, 0)) @ lvl0
    lcnt = xp.permute_dims(lw, (1, 0)) @ lobs
    nanv = xp.full_like(lsum, float("nan"))
    ltemp = xp.where(lcnt > 0, lsum / xp.where(lcnt > 0, lcnt, xp.ones_like(lcnt)), nanv)
    lpair = xp.stack([ltemp[a, :] + ltemp[b, :] for a, b in _PAIRS], axis=0)
    lthree = xp.sum(xp.where(xp.isnan(ltemp), xp.zeros_like(ltemp), ltemp), axis=0)[None, :]  # present phases
    lall = xp.concat([ltemp, lpair, lthree], axis=0)
    lcorr, _ = nan_corr_counts(level, lall)
    lcorr_h = to_numpy(lcorr)
    lcorr_h = np.where(np.isnan(lcorr_h), -1.0, lcorr_h)

    for i in np.flatnonzero(ok):
        if kind[i] == "single":
            phase[i], p, lc = _PHASES[best_h[i]], p_err_h[i], lcorr_h[i, :3].max()
        elif kind[i] == "pair":
            if not pairs:
                phase[i], conf[i], cls[i] = gis[i], 0.0, contract.CLASS_LOW
                continue
            a, b = pairs[pbest_h[i]]
            phase[i], p, lc = _PHASES[a] + _PHASES[b], pp_err_h[i], lcorr_h[i, 3 + _PAIRS.index((a, b))]
        else:
            phase[i], p, lc = contract.THREE_PHASE, 0.0, lcorr_h[i, 6]
        conf[i] = _confidence(p, config.confidence_decades)
        if lc < config.low_correlation:
            reasons[i].append(contract.REASON_LOW_CORRELATION)
            conf[i] = min(conf[i], 0.0)
        if conf[i] >= config.confident_threshold:
            cls[i] = contract.CLASS_CONFIDENT
        elif conf[i] >= config.suspect_threshold:
            cls[i] = contract.CLASS_SUSPECT
        else:
            cls[i] = contract.CLASS_LOW
    return phase, conf, cls, reasons


def _refine(xp: Any, feat: Any, code: np.ndarray, present: np.ndarray, single: np.ndarray,
            tr_codes: np.ndarray, n_groups: int):
    """Templates, robust transformer pooling and leave-group-out scores, iterated to a fixed point.

    Returns ``(code, templates, scores, span_scores)``: phase index per meter (-1: not single-phase), unit
    templates (k, n_samples) of the ``present`` phases, the final leave-group-out scores (n_meters, k) and
    the scores of the same (pooled) signals against ``templates`` themselves (for R^2).
    """
    k = present.size
    local = np.full(3, -1, dtype=np.int64)
    local[present] = np.arange(k)
    s_mask = xp.astype(xp.asarray(single), xp.float64)
    group = xp.asarray(tr_codes)
    for _ in range(5):
        w = one_hot(xp.asarray(np.where(code >= 0, local[np.maximum(code, 0)], -1)), k) * s_mask[:, None]
        templates = phase_templates(feat, w)
        own, _ = template_scores(feat, templates)
        _, _, pooled = pool_by_transformer(feat, group, n_groups, xp.max(own, axis=1))
        scores = leave_group_out_scores(pooled, feat, w, group, n_groups)
        new = present[to_numpy(xp.argmax(scores, axis=1)).astype(np.int64)]
        new = np.where(single, new, -1)
        if np.array_equal(new, code):
            break
        code = new
    return code, templates, scores, pooled @ xp.permute_dims(templates, (1, 0))


def _cluster_and_name(xp: Any, us: Any, gis_code: np.ndarray, k: int, config: PhaseConfig, ref_v: Any | None):
    """k-means of unit-norm single-phase signals and cluster names (global phase indices).

    Returns ``(labels, name, decided)``: ``decided`` is False when two clusters have the same GIS majority
    (one phase split in two: the caller retries with k - 1).
    """
    gis_w = one_hot(xp.asarray(gis_code), 3)
    support = np.bincount(gis_code[gis_code >= 0], minlength=3)
    candidates = [batched_kmeans(us, k, random_state=config.random_state, n_init=config.n_init)]
    if k == 3 and np.all(support > 0):
        init = phase_templates(us, gis_w)[None, :, :]
        candidates.insert(0, batched_kmeans(us, k, random_state=config.random_state, n_init=0, init=init))
    # Among the GIS start and the k-means++ restarts, keep the partition that agrees best with GIS after
    # naming (inertia breaks ties): a small phase (a few % of meters) is otherwise lost to a split of a
    # large one, which has lower inertia.
    best = None
    for cand_labels, _, inertia in candidates:
        cand_labels = to_numpy(cand_labels)
        cnt = np.zeros((k, 3))
        np.add.at(cnt, (cand_labels[gis_code >= 0], gis_code[gis_code >= 0]), 1)
        row, col = linear_sum_assignment(-cnt)
        key = (-cnt[row, col].sum(), inertia)
        if best is None or key < best[0]:
            best = (key, cand_labels)
    labels = best[1]
    counts = np.zeros((k, 3))
    for c, g in zip(labels, gis_code):
        if g >= 0:
            counts[c, g] += 1
    if k == 3 and ref_v is not None and config.use_references:
        frac = counts.max(axis=1) / np.maximum(counts.sum(axis=1), 1)
        if np.any(frac < 0.5):
            ref_name = _name_by_references(xp, ref_v, us, labels)
            if ref_name is not None:
                return labels, ref_name, True
    if counts.sum() == 0:  # no GIS labels and no usable references: canonical names A, B, C
        return labels, np.arange(k), True
    majority = counts.argmax(axis=1)
    if k > 1 and np.unique(majority).size < k:
        return labels, majority, False
    return labels, majority, True


def _confidence(p_err: float, decades: float) -> float:
    """Evidence score ``min(1, -log10(p_err) / decades)`` in [0, 1]."""
    return float(np.clip(-np.log10(max(p_err, 1e-300)) / decades, 0.0, 1.0))


def _name_by_references(xp: Any, ref_v: Any, us: Any, labels: np.ndarray) -> np.ndarray | None:
    """Cluster names from feeder-head references (A, B, C rows), or None when they are not separable."""
    nominal = xp.asarray(np.full(3, np.nan))
    rz, _ = standardize_rows(per_unit_differences(ref_v, nominal))
    raw = to_numpy(nan_corr_counts(rz)[0])
    if np.nanmax(raw - 2 * np.eye(3)) > 0.995:  # an LTC makes the three heads move together
        return None
    rfeat, _ = remove_common_mode(rz)
    w = one_hot(xp.asarray(labels), 3)
    templates = phase_templates(us, w)
    r = to_numpy(nan_corr_counts(rfeat, templates)[0])  # (ref phase, cluster)
    if np.isnan(r).any():
        return None
    row, col = linear_sum_assignment(-r)
    if r[row, col].min() < 0.3:
        return None
    name = np.empty(3, dtype=np.int64)
    name[col] = row
    return name
