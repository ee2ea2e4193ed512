"""Phase identification of smart meters from AMI voltage: one block of whole feeders at a time.

Method (per feeder; no cross-feeder pairs are ever formed):

1. **Features.** Per-unit voltage, first difference (removes the shared daily shape), row
   standardisation with outlier clipping, and removal of the feeder-wide common mode (source / LTC
   variations shared by all phases) by per-meter least squares.
2. **Clustering.** Batched spherical k-means (k = 3) of the single-phase meters' unit-norm signals (in the
   coordinates of their top principal subspace plus the GIS phase templates: a few GEMMs, then k-means
   on ~15 columns instead of the full time series), with
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
   All pooled and leave-group-out cosines are computed from dot products (template sums, and the Gram
   matrix within each transformer, computed once), so an iteration costs two passes over the signals.
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
    margin_error_probability,
    one_hot,
    phase_templates,
    within_group_gram,
)
from .kernels.preprocess import (
    common_mode_residual,
    per_unit_differences,
    remove_common_mode,
    standardize_rows,
    standardized_differences,
    unit_rows,
)

__all__ = ["RESULT_COLUMNS", "identify_phases"]

RESULT_COLUMNS: tuple[str, ...] = ("phase", "phase_confidence", "phase_class", "reasons")
_PHASES = contract.SINGLE_PHASES
#: Candidate labels of a phase-to-phase service, as pairs of template indices.
_PAIRS = ((0, 1), (1, 2), (2, 0))
_REQUIRED = ("meter_id", "feeder_id", "transformer_id", "phase_gis")
#: Principal coordinates kept for the k-means of the phase clustering.
_KMEANS_RANK = 12
#: Power iterations of the randomized range finder of that subspace.
_POWER_ITERATIONS = 1


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
        out_phase[rows], out_conf[rows], out_class[rows] = res[0], res[1], res[2]
        for j, i in enumerate(rows):
            out_reasons[i] = res[3][j]
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
    st_low = pd.Series(st, dtype=object).where(pd.Series(st, dtype=object).map(type) == str, "").str.lower()
    kind = np.where(
        (gis == contract.THREE_PHASE) | st_low.str.startswith("3ph").to_numpy(dtype=bool), "three",
        np.where(np.isin(gis, list(contract.PAIR_PHASES)) | st_low.str.startswith("2ph").to_numpy(dtype=bool),
                 "pair", "single"),
    )
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

    # per_unit_differences + standardize_rows + remove_common_mode, kept zero-filled with the mask
    z, observed, n_obs = standardized_differences(v, xp.asarray(nominal))
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
    feat, _ = common_mode_residual(z, observed, w_single)  # zero where missing
    norm = xp.sqrt(xp.vecdot(feat, feat, axis=-1))
    u = feat / xp.where(norm > 0, norm, xp.ones_like(norm))[:, None]  # = unit_rows(features)

    # --- 2-4. clustering of single-phase meters, naming, refinement. k drops while two clusters share a
    # GIS majority, or while a phase keeps fewer than min_phase_meters after refinement (a spurious
    # cluster of a few wrong GIS labels dissolves once templates exclude the scored meters).
    s_idx = np.flatnonzero(single)
    us = xp.take(u, xp.asarray(s_idx), axis=0)
    gis_code = pd.Series(gis, dtype=object).map({p: i for i, p in enumerate(_PHASES)}).fillna(-1).to_numpy(np.int64)
    tr_codes, _ = pd.factorize(meters["transformer_id"].astype(str), sort=True)
    tr_codes = np.where(single, tr_codes, -1)
    refine_inputs = _RefineInputs(xp, feat, observed, u, tr_codes)
    # k-means runs on the top principal coordinates of the unit signals (the phase structure lives in a
    # few dimensions); refinement below works on the full-length signals.
    # GIS phase templates (3, T) of the unit signals (zero row: no label); = phase_templates(us, W_gis)
    gis_templates = unit_rows(xp.permute_dims(one_hot(xp.asarray(gis_code[s_idx]), 3), (1, 0)) @ us)
    basis = _principal_basis(xp, us, _KMEANS_RANK, config.random_state, gis_templates)
    coords = us @ basis
    min_size = max(config.min_phase_meters, int(np.ceil(config.min_phase_share * s_idx.size)))
    for k in (3, 2, 1):
        labels, name, decided = _cluster_and_name(xp, us, coords, gis_templates @ basis, gis_code[s_idx], k,
                                                   config, ref_v)
        if not decided:
            continue
        present = np.unique(name)  # phase indices that exist on this feeder, ascending
        code = np.full(n, -1, dtype=np.int64)
        code[s_idx] = name[labels]
        code, templates, scores, span_scores = _refine(xp, refine_inputs, code, present, single)
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
    lobs = ~xp.isnan(level)
    if bool(xp.all(lobs)):  # fully observed: no mask GEMM
        lsum = xp.permute_dims(lw, (1, 0)) @ level
        lcnt = xp.sum(lw, axis=0)[:, None] * xp.ones((1, level.shape[1]), dtype=xp.float64)
    else:
        lsum = xp.permute_dims(lw, (1, 0)) @ xp.where(lobs, level, xp.zeros((), dtype=xp.float64))
        lcnt = xp.permute_dims(lw, (1, 0)) @ xp.astype(lobs, xp.float64)
    nanv = xp.full_like(lsum, float("nan"))
    ltemp = xp.where(lcnt > 0, lsum / xp.where(lcnt > 0, lcnt, xp.ones_like(lcnt)), nanv)
    lpair = xp.stack([ltemp[a, :] + ltemp[b, :] for a, b in _PAIRS], axis=0)
    lthree = xp.sum(xp.where(xp.isnan(ltemp), xp.zeros_like(ltemp), ltemp), axis=0)[None, :]  # present phases
    lall = xp.concat([ltemp, lpair, lthree], axis=0)
    lcorr, _ = nan_corr_counts(level, lall)
    lcorr_h = to_numpy(lcorr)
    lcorr_h = np.where(np.isnan(lcorr_h), -1.0, lcorr_h)

    names = np.array(_PHASES, dtype=object)
    p_all = np.zeros(n)
    lc_all = lcorr_h[:, 6].copy()  # three-phase services
    is_single, is_pair = ok & (kind == "single"), ok & (kind == "pair")
    phase[ok & (kind == "three")] = contract.THREE_PHASE
    phase[is_single] = names[best_h[is_single]]
    p_all[is_single] = p_err_h[is_single]
    lc_all[is_single] = lcorr_h[is_single, :3].max(axis=1)
    if pairs:
        pair_names = np.array([_PHASES[a] + _PHASES[b] for a, b in pairs], dtype=object)
        pair_cols = np.array([3 + _PAIRS.index(ab) for ab in pairs])
        phase[is_pair] = pair_names[pbest_h[is_pair]]
        p_all[is_pair] = pp_err_h[is_pair]
        lc_all[is_pair] = lcorr_h[is_pair, pair_cols[pbest_h[is_pair]]]
    scored = ok & ((kind != "pair") | bool(pairs))
    conf[scored] = _confidence(p_all[scored], config.confidence_decades)
    low_corr = scored & (lc_all < config.low_correlation)
    conf[low_corr] = np.minimum(conf[low_corr], 0.0)
    cls[scored] = np.where(conf[scored] >= config.confident_threshold, contract.CLASS_CONFIDENT,
                           np.where(conf[scored] >= config.suspect_threshold, contract.CLASS_SUSPECT,
                                    contract.CLASS_LOW))
    for i in np.flatnonzero(low_corr):
        reasons[i].append(contract.REASON_LOW_CORRELATION)
    unpaired = is_pair & ~scored  # pair services on a feeder without two phases: keep GIS, low
    phase[unpaired], conf[unpaired], cls[unpaired] = gis[unpaired], 0.0, contract.CLASS_LOW
    return phase, conf, cls, reasons


class _RefineInputs:
    """What the refinement needs of the features, computed once per feeder (independent of k).

    ``u`` (n, T) unit-norm zero-filled features; per-row moments of the zero-filled features for the
    NaN-aware correlation with (NaN-free) templates; the observation mask of the rows with missing
    samples only; and the within-transformer Gram of ``u`` as pairs (``within_group_gram``).
    """

    def __init__(self, xp: Any, feat: Any, observed: Any, u: Any, tr_codes: np.ndarray):
        """``feat`` (n, T): features, 0 where missing; ``observed`` (n, T) bool; ``u = unit_rows(feat)``."""
        obs = observed
        self.n_obs = to_numpy(xp.astype(xp.count_nonzero(obs, axis=1), xp.float64))
        self.sx = to_numpy(xp.sum(feat, axis=1))
        self.sxx = to_numpy(xp.vecdot(feat, feat, axis=-1))
        self.xnorm = np.sqrt(self.sxx)
        self.partial = np.flatnonzero(self.n_obs < feat.shape[1])
        self.mask_partial = (
            xp.astype(xp.take(obs, xp.asarray(self.partial), axis=0), xp.float64) if self.partial.size else None
        )
        self.u = u
        self.group = tr_codes
        self.n_groups = int(tr_codes.max()) + 1 if (tr_codes >= 0).any() else 1
        self.rows, self.cols, self.gram = within_group_gram(u, tr_codes)
        self.diag = np.bincount(self.rows, weights=self.gram * (self.rows == self.cols), minlength=u.shape[0])
        self.diag = np.where(tr_codes >= 0, self.diag, (self.xnorm > 0).astype(np.float64))


def _refine(xp: Any, inp: _RefineInputs, code: np.ndarray, present: np.ndarray, single: np.ndarray):
    """Templates, robust transformer pooling and leave-group-out scores, iterated to a fixed point.

    Returns ``(code, templates, scores, span_scores)``: phase index per meter (-1: not single-phase), unit
    templates (k, n_samples) of the ``present`` phases, the final leave-group-out scores (n_meters, k) and
    the scores of the same (pooled) signals against ``templates`` themselves (for R^2).

    Notes
    -----
    Computes what ``template_scores``, ``pool_by_transformer`` and ``leave_group_out_scores`` compute, but
    every group sum enters only through dot products: with ``S = W^T u`` (template sums), ``Q = u S^T`` and
    the within-transformer Gram ``B``, all pooled and leave-group-out cosines are sums of ``Q`` and ``B``
    over group members. One iteration costs two passes over ``u`` (``S`` and ``Q``) plus O(n_pairs) on the
    host, instead of dense (n_meters x n_transformers) one-hot GEMMs over full-length signals.
    """
    u, grp, G = inp.u, inp.group, inp.n_groups
    n = u.shape[0]
    k = present.size
    local = np.full(3, -1, dtype=np.int64)
    local[present] = np.arange(k)
    rows, cols, gram, diag = inp.rows, inp.cols, inp.gram, inp.diag
    grouped = grp >= 0
    gi = np.where(grouped, grp, 0)
    pair_g = grp[rows]

    def per_group(weights: np.ndarray) -> np.ndarray:  # sum over each group's members, (G,)
        return np.bincount(gi[grouped], weights=weights[grouped], minlength=G)

    def pair_group_sum(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # (sum_j a_j u_j).(sum_l b_l u_l), (G,)
        return np.bincount(pair_g, weights=a[rows] * b[cols] * gram, minlength=G)

    def row_dot_group(b: np.ndarray) -> np.ndarray:  # u_i . (sum_{l in g(i)} b_l u_l), (n,)
        return np.bincount(rows, weights=b[cols] * gram, minlength=n)

    def safe_div(num: np.ndarray, sq: np.ndarray) -> np.ndarray:
        return np.where(sq > 1e-12, num / np.sqrt(np.where(sq > 1e-12, sq, 1.0)), num)

    for _ in range(5):
        lab = np.where(code >= 0, local[np.maximum(code, 0)], -1)
        w = ((lab[:, None] == np.arange(k)[None, :]) & single[:, None]).astype(np.float64)
        s_sum = xp.permute_dims(xp.asarray(w), (1, 0)) @ u  # (k, T)
        s_sq = to_numpy(xp.sum(s_sum * s_sum, axis=1))
        s_norm = np.where(s_sq > 0, np.sqrt(s_sq), 1.0)
        q = to_numpy(u @ xp.permute_dims(s_sum, (1, 0)))  # (n, k): u_i . S_p
        templates = s_sum / xp.asarray(s_norm)[:, None]

        # template_scores: NaN-aware correlation of the features with the (NaN-free) templates
        sy = np.broadcast_to(to_numpy(xp.sum(templates, axis=1)), (n, k)).copy()
        syy = np.broadcast_to(to_numpy(xp.sum(templates * templates, axis=1)), (n, k)).copy()
        if inp.partial.size:
            sy[inp.partial] = to_numpy(inp.mask_partial @ xp.permute_dims(templates, (1, 0)))
            syy[inp.partial] = to_numpy(inp.mask_partial @ xp.permute_dims(templates * templates, (1, 0)))
        nn, sx, sxx = inp.n_obs[:, None], inp.sx[:, None], inp.sxx[:, None]
        sxy = inp.xnorm[:, None] * q / s_norm[None, :]
        vx, vy, cov = nn * sxx - sx * sx, nn * syy - sy * sy, nn * sxy - sx * sy
        good = (nn >= 3) & (vx > 0) & (vy > 0)
        r = np.clip(cov / np.sqrt(np.where(good, vx, 1.0) * np.where(good, vy, 1.0)), -1.0, 1.0)
        own_best = np.where(good, r, 0.0).max(axis=1)

        # pool_by_transformer (two screening passes, then membership)
        active = np.ones(n)
        for _ in range(2):
            dot_g = row_dot_group(active)  # u_i . gsum_g
            g_sq = pair_group_sum(active, active)
            size = per_group(active)
            loo_dot = dot_g - active * diag
            loo_sq = g_sq[gi] - 2.0 * active * dot_g + active * active * diag
            in_group = grouped & (active > 0) & (size[gi] - active >= 1)
            loo_corr = np.where(in_group & (loo_sq > 1e-12), loo_dot / np.sqrt(np.where(loo_sq > 1e-12, loo_sq, 1.0)),
                                0.0)
            active = (in_group & (loo_corr > 0.5 * own_best)).astype(np.float64)
        member = in_group & (loo_corr > own_best)
        m = member.astype(np.float64)
        m_sq = pair_group_sum(m, m)[gi]  # |msum_g|^2 for members

        # leave_group_out_scores of the pooled signals
        scores = np.empty((n, k))
        span = np.empty((n, k))
        for p in range(k):
            wp, qp = w[:, p], q[:, p]
            pooled_s = np.where(member, safe_div(per_group(m * qp)[gi], m_sq), qp)  # pooled_i . S_p
            s_own = np.where(grouped, per_group(wp * qp)[gi], wp * qp)  # S_p . own_ip
            own_sq = np.where(grouped, pair_group_sum(wp, wp)[gi], wp * wp * diag)
            pooled_own = np.where(
                member, safe_div(pair_group_sum(m, wp)[gi], m_sq), np.where(grouped, row_dot_group(wp), wp * diag)
            )
            excl_sq = s_sq[p] - 2.0 * s_own + own_sq
            scores[:, p] = safe_div(pooled_s - pooled_own, excl_sq)
            span[:, p] = pooled_s / s_norm[p]
        new = present[np.argmax(scores, axis=1).astype(np.int64)]
        new = np.where(single, new, -1)
        if np.array_equal(new, code):
            break
        code = new
    return code, templates, xp.asarray(scores), xp.asarray(span)


def _principal_basis(xp: Any, x: Any, rank: int, random_state: int, extra: Any) -> Any:
    """Orthonormal basis (T, rank + m) of the top-``rank`` right singular subspace of ``x`` (n, T) and of
    the ``extra`` directions (m, T) (e.g. the GIS phase templates, so that the GIS start of k-means lies
    exactly in the subspace).

    Randomized range finder (Halko, Martinsson & Tropp 2011) with ``_POWER_ITERATIONS`` power iterations
    and a seeded Gaussian test matrix drawn on the host: a few thin GEMMs over ``x``, deterministic for a
    given seed.
    """
    n, t = x.shape
    ell = min(rank + 8, n, t)
    omega = np.random.default_rng(random_state).standard_normal((t, ell))
    xt = xp.permute_dims(x, (1, 0))
    q, _ = xp.linalg.qr(x @ xp.asarray(omega))
    for _ in range(_POWER_ITERATIONS):
        z, _ = xp.linalg.qr(xt @ q)
        q, _ = xp.linalg.qr(x @ z)
    small = xp.permute_dims(q, (1, 0)) @ x  # (ell, T)
    _, _, vt = xp.linalg.svd(small, full_matrices=False)
    r = min(rank, ell)
    basis = xp.concat([vt[:r, :], extra], axis=0) if extra is not None else vt[:r, :]
    basis, _ = xp.linalg.qr(xp.permute_dims(basis, (1, 0)))
    return basis


def _cluster_and_name(xp: Any, us: Any, coords: Any, gis_start: Any, gis_code: np.ndarray, k: int,
                      config: PhaseConfig, ref_v: Any | None):
    """k-means of unit-norm single-phase signals and cluster names (global phase indices).

    ``us`` (n, T) are the signals, ``coords = us @ basis`` (n, r) their coordinates in an orthonormal
    basis (T, r) of their principal subspace plus the GIS phase templates, and ``gis_start`` (3, r) the
    GIS phase templates in the same coordinates (exact: they lie in the basis' span).

    Returns ``(labels, name, decided)``: ``decided`` is False when two clusters have the same GIS majority
    (one phase split in two: the caller retries with k - 1).
    """
    support = np.bincount(gis_code[gis_code >= 0], minlength=3)
    candidates = [batched_kmeans(coords, k, random_state=config.random_state, n_init=config.n_init)]
    if k == 3 and np.all(support > 0):
        init = gis_start[None, :, :]
        candidates.insert(0, batched_kmeans(coords, k, random_state=config.random_state, n_init=0, init=init))
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
    np.add.at(counts, (labels[gis_code >= 0], gis_code[gis_code >= 0]), 1)
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


def _confidence(p_err: np.ndarray, decades: float) -> np.ndarray:
    """Evidence score ``min(1, -log10(p_err) / decades)`` in [0, 1]."""
    return np.clip(-np.log10(np.maximum(p_err, 1e-300)) / decades, 0.0, 1.0)


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
