"""Meter-to-transformer verification: does each meter move with its GIS transformer group?

Labelled layer over :mod:`phaseid_hpc.kernels.transformer_grouping`. One call handles one block of whole
feeders; every feeder is scored on its own (candidates never cross a feeder).

Method (per feeder)
-------------------
1. Shape signal: differenced voltage, per-phase feeder common mode projected out, unit-norm rows
   (``differenced_signals``). Neighbouring transformers on one lateral share the common mode, not the
   residual, so the residual separates them.
2. Each meter's correlation with every candidate group's pooled signal, leaving the meter out of its own group
   (what ``group_correlations`` computes, here kept up to date round by round, see Cost; no pairwise
   regressions). Candidates: same feeder, a group serving the meter's phase (the phase
   result), within ``max_distance_m`` when lat/lon exist.
3. Decision in Fisher-z units of one standard error ``se = 1 / sqrt(n - 6)``:

   * a meter **moves** to transformer ``b`` when ``b`` beats the GIS group by ``flag_margin_se``
     (``weak_gis_margin_se`` when the GIS label is already in doubt: phase mismatch, or no correlation with
     an otherwise coherent GIS group), is significant (``min_corr_se``), clearly beats the runner-up
     (``ambiguity_se``), and the level check (service drop ``V_meter - V_transformer ~ -(R P + X Q) / V``,
     ``level_consistency``) is no worse than ``level_tolerance`` times the reference. A meter that moves
     with its GIS group as well as the group's other members do never moves (the stray is on the other
     side). A target with one meter must be matched like the feeder's same-transformer pairs
     (``pair_fit_fraction``);
   * a meter **alone on its GIS transformer** has no group to be tested against: from the second round on
     (after strays of multi-meter groups, possibly its lost sibling, have moved) it joins a group of two or
     more only when it fits it as the group's own members do (``singleton_fit_se``), also after the
     runner-up's pool is partialled out (``partial_correlations``: sharing the lateral is not enough), and
     passes the level check;
   * a meter that does **not move with its GIS group** (own-group z below ``unrelated_se`` while the rest of
     the group is coherent, or split off by the group's Fiedler cut) and fits no GIS transformer is an
     orphan; orphans of one phase that move together, or a lone orphan whose phase differs from its GIS
     group's, form a transformer missing from GIS (``{feeder}-NEW{k:03d}``, numbered by smallest meter id).
     A lone orphan without that keeps its label, with the reason and a low confidence.

   Moves are applied greedily, strongest first, never two that rely on each other in one round; pools are
   rebuilt and everything re-judged, up to ``n_iterations`` rounds, so swapped pairs and strays clean up.
4. Confidence: ``Phi(d / sqrt 2)`` with ``d`` the assigned group's Fisher-z lead over the best alternative
   (or over the threshold it would need) in standard errors; classes from ``confident_threshold`` and
   ``suspect_threshold``.

Cost (``_Pools``): signals are float32 and built row block by row block (``differenced_signals``,
``level_signals``). Group pools are sums over members (``group_sums``, ``O(n T)``), not a dense one-hot GEMM.
The only ``O(n g T)`` term, the meter-by-group dot products ``S = z P^T`` that pick each meter's best and
runner-up candidate, is computed once on the phase-compatible blocks (meters of phase p x groups serving p:
about a third of the full product), and after that only for the columns of groups whose membership changed
in the round. The leave-one-out correction, the test against the GIS group and the level check need only a
few (meter, group) pairs each (``pair_dots``, ``level_consistency_pairs``); the level check is evaluated only
where it can decide a move. A 3,000-meter feeder with 30 days at 15 min (2,880 samples) takes about 0.4 s of
CPU time on one core (~120-180 us per meter, more when more labels are wrong); ckt5 (1,379 meters, 14 days)
about 0.15 s. One regression per customer pair (~1 ms each, O(n^2) pairs) takes hours at 10,000 customers.
Benchmark: ``benchmarks/transformer_speed.py``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from . import contract
from ._compat import to_numpy
from .config import TransformerConfig
from .kernels import transformer_grouping as tg

__all__ = [
    "recommend_transformers",
    "REASON_TX_AMBIGUOUS",
    "REASON_TX_CONSISTENT",
    "REASON_TX_MOVED",
    "REASON_TX_NEW",
    "REASON_TX_PHASE_MISMATCH",
    "REASON_TX_SINGLETON",
    "REASON_TX_UNRELATED",
    "map_transformers",
]

REASON_TX_CONSISTENT = "Moves With GIS Transformer Group"
REASON_TX_MOVED = "Moves With Another Transformer"
REASON_TX_NEW = "Transformer Missing From GIS (New Group Proposed)"
REASON_TX_UNRELATED = "Does Not Move With GIS Transformer Group"
REASON_TX_SINGLETON = "Alone On GIS Transformer (Checked Against Neighbours Only)"
REASON_TX_PHASE_MISMATCH = "Phase Differs From GIS Transformer Phase"
REASON_TX_AMBIGUOUS = "Ambiguous Between Transformers"

_PHASE_CODE = {"A": 0, "B": 1, "C": 2}


def _phase_column(sub: pd.DataFrame, col: str) -> np.ndarray:
    """Phase letters of a column as an object array, stripped and upper-cased; NaN where missing or empty."""
    if col not in sub:
        return np.full(len(sub), np.nan, dtype=object)
    x = sub[col].astype(object)
    txt = x.where(x.isna(), x.astype(str)).astype("string").str.strip().str.upper()
    return txt.where(txt.notna() & (txt != ""), np.nan).astype(object).to_numpy()


def _norm_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _contract_phase_name(letters) -> str | None:
    """Contract label of a set of phase letters (pairs as ``AB``, ``BC``, ``CA``); ``None`` when empty."""
    key = "".join(sorted(letters))
    return {"AC": "CA"}.get(key, key) or None


def _phase_mask(letters: frozenset) -> int:
    return sum(1 << k for k, c in enumerate("ABC") if c in letters)


def map_transformers(
    voltage: Any,
    meters: pd.DataFrame,
    config: TransformerConfig = TransformerConfig(),  # noqa: B008 (frozen, immutable default)
    *,
    kw: Any | None = None,
    kvar: Any | None = None,
    interval_s: float = 900,
    xp: Any | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Verify every meter's transformer and propose the right one, for a block of whole feeders.

    Parameters
    ----------
    voltage : array, shape (n_meters, n_time)
        Meter voltage, NaN where missing. [V]
    meters : DataFrame, rows aligned with ``voltage``
        ``meter_id, feeder_id, transformer_id`` (GIS), ``phase`` (phase-identification result, may be
        None), ``phase_gis``, ``usable`` (bool); optional ``lat, lon`` [deg].
    config : TransformerConfig
    kw, kvar : array, shape (n_meters, n_time), optional
        Meter active / reactive load, NaN where missing. [kW], [kvar]
    interval_s : float
        Sampling interval (kept for the record; the method is interval-agnostic). [s]
    xp : array namespace, optional
        Namespace for the kernels (``numpy``, ``cupy``); default: that of ``voltage``.

    Returns
    -------
    meters_result : DataFrame, index and rows aligned with ``meters``
        ``transformer`` (proposed), ``transformer_confidence`` [-], ``transformer_class``
        (``confident``/``suspect``/``low``/``insufficient_data``), ``transformer_changed`` (bool),
        ``reasons`` (list[str]).
    transformers_result : DataFrame, one row per transformer (GIS and proposed), sorted by feeder, id
        ``transformer_id, feeder_id, n_meters_gis, n_meters_inferred, phases, meters_changed,
        group_coherence, proposed_new``.
    """
    n = len(meters)
    if voltage.shape[0] != n:
        raise ValueError(f"voltage has {voltage.shape[0]} rows but meters has {n}; they must be aligned")
    if xp is None:
        from ._compat import array_namespace

        xp = array_namespace(voltage)
    m = meters.reset_index(drop=True)
    out_tx = m["transformer_id"].astype(object).to_numpy(copy=True)
    out_conf = np.zeros(n)
    out_cls = np.array([contract.CLASS_INSUFFICIENT] * n, dtype=object)
    out_reasons: list[list[str]] = [[] for _ in range(n)]
    tx_rows: list[dict[str, Any]] = []
    diagnostics: list[pd.DataFrame] = []

    feeders = m["feeder_id"].astype(str).to_numpy()
    for feeder in sorted(set(feeders)):
        idx = np.flatnonzero(feeders == feeder)
        _map_feeder(
            feeder,
            idx,
            voltage,
            kw,
            kvar,
            m,
            config,
            xp,
            out_tx,
            out_conf,
            out_cls,
            out_reasons,
            tx_rows,
            diagnostics,
        )

    gis = m["transformer_id"].astype(object).to_numpy()
    meters_result = pd.DataFrame(
        {
            "transformer": out_tx,
            "transformer_confidence": out_conf,
            "transformer_class": out_cls,
            "transformer_changed": out_tx != gis,
            "reasons": out_reasons,
        },
        index=meters.index,
    )
    # per-meter evidence in standard errors (z_*: Fisher-z / se), for audit; not part of the contract
    meters_result.attrs["diagnostics"] = (
        pd.concat(diagnostics, ignore_index=True) if diagnostics else pd.DataFrame()
    )
    cols = [
        "transformer_id",
        "feeder_id",
        "n_meters_gis",
        "n_meters_inferred",
        "phases",
        "meters_changed",
        "group_coherence",
        "proposed_new",
    ]
    tx = pd.DataFrame(tx_rows, columns=cols)
    if len(tx):
        tx = tx.sort_values(["feeder_id", "transformer_id"], kind="stable").reset_index(drop=True)
        tx = tx.astype({"n_meters_gis": "int64", "n_meters_inferred": "int64", "meters_changed": "int64"})
    return meters_result, tx


def _rows_of(x, idx):
    """Rows ``idx`` of ``x``: a view when they are one contiguous run (a whole-feeder block), else a copy."""
    if len(idx) and idx[-1] - idx[0] + 1 == len(idx):
        return x[int(idx[0]) : int(idx[-1]) + 1]
    return x[idx]


class _Pools:
    """Pooled signal (and level) sums of every group for the current assignment, rebuilt only where it changed.

    Holds ``P_g = sum_j w_j z_j`` and ``L_g = sum_j w_j vc_j`` (rows: groups), every meter's dot with its
    own group's pool, and, when ``row_blocks`` are given, the meter-by-group dot products ``S = z P^T`` on
    the phase-compatible (meter, group) blocks. After meters move only the groups that gained or lost a meter
    (or a pool weight) are re-summed and only their columns of ``S`` recomputed: a round costs
    ``O(n_meters n_time n_changed)`` instead of ``O(n_meters n_time n_groups)``.
    """

    def __init__(self, z, vc, n_g, row_blocks, xp, ic=None, row_stats=None):
        self.z, self.vc, self.ic, self.n_g, self.xp = z, vc, ic, n_g, xp  # vc None: no level sums
        self.row_stats = row_stats
        self.ln2 = None
        self.row_blocks = row_blocks  # [(phase bit or 0, meter rows, z rows taken once)]
        n = z.shape[0]
        self.s = np.full((n, n_g), np.nan, dtype=np.float32) if row_blocks else None
        self.own = np.full(n, np.nan)
        self.pn2 = np.zeros(n_g)
        self.lcnt = np.zeros(n_g)
        self.pool = None
        self.lsum = None
        self.assign = None
        self.w = None

    def update(self, assign, w, gmask, same_as=None, dots=True):
        """Rebuild for assignment ``assign`` and pool weights ``w``; ``same_as``: pools already built for them.

        ``dots=False``: only the own-group dots are kept current (``S`` is dropped).
        """
        if not dots:
            self.s = None
        xp, n_g = self.xp, self.n_g
        if self.assign is None:
            dirty = np.arange(n_g)
        else:
            ch = (assign != self.assign) | (w != self.w)
            dirty = np.unique(np.concatenate([assign[ch], self.assign[ch]]))
        self.assign, self.w = assign.copy(), w.copy()
        self.lcnt = np.bincount(assign, weights=w, minlength=n_g).astype(float)
        ar = np.arange(len(assign))
        if len(dirty):
            if same_as is not None and self.pool is None and self.vc is None:
                self.pool = xp.asarray(same_as.pool, copy=True)
                self.pn2 = same_as.pn2.copy()
                self.own = same_as.own.copy()
                return dirty
            gi, wx, cols = xp.asarray(assign), xp.asarray(w), xp.asarray(dirty)
            p = tg.group_sums(self.z, gi, n_g, wx, columns=cols)
            lv = None if self.vc is None else tg.group_sums(self.vc, gi, n_g, wx, columns=cols)
            if self.pool is None:
                self.pool, self.lsum = p, lv
            else:
                self.pool[cols] = p
                if lv is not None:
                    self.lsum[cols] = lv
            self.pn2[dirty] = to_numpy(xp.vecdot(p, p, axis=-1))
            if lv is not None:
                ln2 = xp.vecdot(lv, lv, axis=-1)
                if self.ln2 is None:
                    self.ln2 = ln2
                else:
                    self.ln2[cols] = ln2
            if self.s is not None:
                self.s[:, dirty] = np.nan
                for bit, rows, zrows in self.row_blocks:
                    c = dirty if bit == 0 else dirty[((gmask[dirty] & bit) != 0) | (gmask[dirty] == 0)]
                    if len(c):
                        self.s[np.ix_(rows, c)] = to_numpy(
                            zrows @ xp.take(self.pool, xp.asarray(c), axis=0).T
                        )
                self.own = self.s[ar, assign].astype(float)
            flag = np.zeros(n_g, bool)
            flag[dirty] = True
            redo = np.flatnonzero(flag[assign] & np.isnan(self.own) if self.s is not None else flag[assign])
        else:
            redo = np.zeros(0, np.int64)
        # every meter's dot with its own group, also where the pair is not phase-compatible
        if len(redo):
            rows = None if len(redo) == len(assign) else xp.asarray(redo)
            self.own[redo] = to_numpy(tg.pair_dots(self.z, self.pool, rows, xp.asarray(assign[redo])))
            if self.s is not None:
                self.s[redo, assign[redo]] = self.own[redo]
        return dirty

    def level(self, rows, cols):
        """Level residual [V] of meters ``rows`` (``None``: all) against groups ``cols``."""
        xp = self.xp
        cols = np.asarray(cols, dtype=np.int64)
        if len(cols) == 0:
            return np.zeros(0)
        own = (self.assign if rows is None else self.assign[rows]) == cols
        rms, _slope = tg.level_consistency_pairs(
            self.vc,
            self.ic,
            self.lsum,
            xp.asarray(self.lcnt),
            None if rows is None else xp.asarray(np.asarray(rows, dtype=np.int64)),
            xp.asarray(cols),
            xp.asarray(own),
            xp.asarray(self.w),
            row_stats=self.row_stats,
            sums_norm2=self.ln2,
        )
        return to_numpy(rms).astype(float)


def _group_medians(values, groups, n_g):
    """NaN-skipping median of ``values`` per group ``0 .. n_g - 1`` (NaN for a group without a value)."""
    return pd.Series(values).groupby(groups).median().reindex(range(n_g)).to_numpy(dtype=float)


def _map_feeder(
    feeder, idx, voltage, kw, kvar, m, cfg, xp, out_tx, out_conf, out_cls, out_reasons, tx_rows, diagnostics
):
    sub = m.iloc[idx]
    nf = len(idx)
    v = xp.asarray(_rows_of(voltage, idx))
    f32 = xp.float32
    gis = sub["transformer_id"].astype(str).to_numpy()
    groups = np.array(sorted(set(gis)), dtype=object)
    n_g = len(groups)
    gis_index = np.searchsorted(groups, gis)

    # phases: inferred where present, else GIS
    ph_inf = _phase_column(sub, "phase")
    ph_gis = _phase_column(sub, "phase_gis")
    phase = np.where(pd.isna(ph_inf), ph_gis, ph_inf)
    codes, uniq = pd.factorize(phase, use_na_sentinel=True)  # NaN/None: -1
    uniq_sets = [frozenset(u) for u in uniq] + [frozenset()]  # index -1: no phase
    phase_code = np.array([_PHASE_CODE.get(u, -1) for u in uniq] + [-1], dtype=np.int64)[codes]
    pmask = np.array([_phase_mask(ps) for ps in uniq_sets], dtype=np.int64)[codes]
    phase_sets = [uniq_sets[k] for k in codes]
    letters = (pmask[:, None] >> np.arange(3)[None, :]) & 1  # (n, 3) meter serves A, B, C

    # every GIS transformer counts once in its phase's common mode; float32 signals: correlations to ~1e-6
    gsize = np.bincount(gis_index, minlength=n_g).astype(float)
    z, n_valid = tg.differenced_signals(
        v, xp.asarray(phase_code), 3, weights=xp.asarray(1.0 / gsize[gis_index]), dtype=f32
    )
    n_valid = to_numpy(n_valid)
    usable = sub["usable"].to_numpy(dtype=bool) if "usable" in sub else np.ones(nf, bool)
    usable = usable & (n_valid >= cfg.min_samples)
    se = 1.0 / np.sqrt(np.maximum(n_valid - 3 - 3, 10.0))
    zz = to_numpy(xp.vecdot(z, z, axis=-1)).astype(float)

    # level signals, centred once: voltage and the load current proxy 1000 (P + Q X/R) / V
    vc, ic, level_stats = tg.level_signals(
        v,
        None if kw is None else _rows_of(kw, idx),
        None if kw is None or kvar is None else _rows_of(kvar, idx),
        x_over_r=cfg.service_x_over_r,
        dtype=f32,
    )

    # group phase from usable members (inferred phase), majority over letters
    def group_phase_mask(assign, w):
        mem = w > 0
        cnt = np.stack(
            [np.bincount(assign[mem], weights=letters[mem, k], minlength=n_g) for k in range(3)], 1
        )
        top = cnt.max(1, keepdims=True)
        keep = (cnt > 0) & (cnt >= 0.5 * top)
        return (keep * (1 << np.arange(3))[None, :]).sum(1).astype(np.int64)

    # distance mask (static, from GIS membership centroids): d > D  <=>  haversine a > sin^2(D / 2r)
    dist_pen = None
    if {"lat", "lon"} <= set(sub.columns):
        lat = sub["lat"].to_numpy(dtype=float)
        lon = sub["lon"].to_numpy(dtype=float)
        if np.isfinite(lat).any():
            glat = np.radians(_group_medians(lat, gis_index, n_g))
            glon = np.radians(_group_medians(lon, gis_index, n_g))
            p1, l1 = np.radians(lat), np.radians(lon)
            u_m = np.stack([np.cos(p1) * np.cos(l1), np.cos(p1) * np.sin(l1), np.sin(p1)], 1)
            u_g = np.stack([np.cos(glat) * np.cos(glon), np.cos(glat) * np.sin(glon), np.sin(glat)], 1)
            # haversine: sin^2(d / 2r) = (1 - u_m . u_g) / 2, so d > D  <=>  u_m . u_g < cos(D / r)
            far = (u_m @ u_g.T) < math.cos(min(cfg.max_distance_m / 6_371_000.0, math.pi))
            if far.any():
                dist_pen = np.where(far, np.float32(np.nan), np.float32(0.0))

    # meter blocks of one phase (a meter of unknown phase is in every block); S is computed on
    # (phase block rows) x (groups serving that phase) only
    if cfg.use_phase:
        row_blocks = []
        for k in range(3):
            rows = np.flatnonzero(((pmask >> k) & 1 == 1) | (pmask == 0))
            if len(rows):
                row_blocks.append((1 << k, rows, xp.take(z, xp.asarray(rows), axis=0)))
    else:
        row_blocks = [(0, np.arange(nf), z)]
    pools = _Pools(z, vc, n_g, row_blocks, xp, ic=ic, row_stats=level_stats)
    pools_orig = _Pools(z, None, n_g, [], xp)

    assign = gis_index.copy()
    # meters of a sub-group that does not move with the rest of its GIS group start outside the pools
    w = usable.astype(float) * ~_split_off(z, gis_index, usable, n_valid, cfg, xp)
    ar = np.arange(nf)
    o = gis_index
    sq = np.sqrt
    for it in range(max(cfg.n_iterations, 2)):
        gmask = group_phase_mask(assign, w)
        pools.update(assign, w, gmask)
        s_own = pools.own
        corr_own = np.clip(to_numpy(tg.loo_correlations(s_own, pools.pn2[assign], True, w, zz)), -1, 1)
        zc_own = np.arctanh(np.clip(corr_own, -0.999999, 0.999999))
        member = (w > 0) & np.isfinite(zc_own)
        zsum_a = np.bincount(assign[member], weights=zc_own[member], minlength=n_g)
        zcnt_a = np.bincount(assign[member], minlength=n_g)
        kappa = np.where(zcnt_a > 0, zsum_a / np.maximum(zcnt_a, 1), np.nan)

        # candidates: correlation with every other group's whole pool (the meter is in none of them); the
        # Fisher z is monotone, so the best two are found on the correlations
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = np.where(pools.pn2 > 1e-5 * np.maximum(pools.pn2, 1.0), 1.0 / sq(pools.pn2), np.nan)
        alt = pools.s * inv.astype(np.float32)[None, :]
        alt[ar, assign] = corr_own
        if dist_pen is not None:
            alt += dist_pen
        if cfg.use_phase:
            # own-group entries exist also where the phase is incompatible: not candidates there
            ok_a = ((pmask & gmask[assign]) != 0) | (pmask == 0) | (gmask[assign] == 0)
            alt[ar[~ok_a], assign[~ok_a]] = np.nan
        alt[zz <= 0] = np.nan
        alt[ar, o] = np.nan
        np.fmax(alt, -np.inf, out=alt)  # NaN (no candidate) -> -inf
        b = np.argmax(alt, 1)
        cb = alt[ar, b].astype(float)
        alt[ar, b] = -np.inf
        c2 = np.argmax(alt, 1)
        c2v = alt[ar, c2].astype(float)
        zb = np.where(np.isfinite(cb), np.arctanh(np.clip(cb, -0.999999, 0.999999)), -np.inf)
        z2 = np.where(np.isfinite(c2v), np.arctanh(np.clip(c2v, -0.999999, 0.999999)), 0.0)

        # "does it move with its GIS group" is asked of the GIS group's own remaining members only (meters
        # moved in from elsewhere shape the target pools, not this test)
        w_orig = w * (assign == gis_index)
        pools_orig.update(gis_index, w_orig, gmask, same_as=pools if it == 0 else None)
        so = pools_orig.own
        corr_o = np.clip(to_numpy(tg.loo_correlations(so, pools_orig.pn2[o], True, w_orig, zz)), -1, 1)
        zo = np.arctanh(np.clip(corr_o, -0.999999, 0.999999))
        own_sz = (w_orig > 0) & np.isfinite(zo)
        zsum = np.bincount(o[own_sz], weights=zo[own_sz], minlength=n_g)
        zcnt = np.bincount(o[own_sz], minlength=n_g)
        rest = zcnt[o] - own_sz
        kappa_o_loo = np.where(rest > 0, (zsum[o] - np.where(own_sz, zo, 0.0)) / np.maximum(rest, 1), np.nan)

        gm_o = gmask[o]
        phase_mis = (pmask != 0) & (gm_o != 0) & ((pmask & gm_o) == 0)
        has_own = np.isfinite(zo)
        weak_gis = phase_mis | (
            np.isfinite(zo) & (zo < cfg.unrelated_se * se) & (kappa_o_loo > cfg.min_corr_se * se)
        )
        margin = np.where(weak_gis, cfg.weak_gis_margin_se, cfg.flag_margin_se) * se
        sig_b = np.isfinite(zb) & (zb > cfg.min_corr_se * se)
        clear_b = (zb - z2) > cfg.ambiguity_se * se
        # a target with one member has no coherence of its own to compare against: the meter must move with
        # it as the feeder's same-transformer pairs do (a fraction of their median Fisher-z)
        ref_pair = _pair_reference(zc_own / se, assign, w, n_g) * cfg.pair_fit_fraction
        n_members = np.bincount(assign[w > 0], minlength=n_g)
        lone_target_ok = (n_members[b] != 1) | (zb / se >= ref_pair)
        # a meter that moves with its GIS group as well as the group's other members do stays: if it also
        # moves with another group, the stray is on the other side (it will come over), or the two are one
        fits_own = (
            np.isfinite(zo)
            & (zo > cfg.min_corr_se * se)
            & (zo >= np.where(np.isfinite(kappa_o_loo), kappa_o_loo, -np.inf) - cfg.singleton_fit_se * se)
        )
        with np.errstate(invalid="ignore"):
            cand_multi = (
                has_own
                & ~fits_own
                & sig_b
                & clear_b
                & ((zb - np.where(has_own, zo, 0)) > margin)
                & lone_target_ok
            )
        # a lone meter joins only a group with a coherence to compare against (two or more members): a lone
        # light-load neighbour carries nothing but its lateral's signal, which every lone meter there shares
        fit_b = np.isfinite(kappa[b]) & (zb >= kappa[b] - cfg.singleton_fit_se * se)
        cand_single = (~has_own | phase_mis & (zo < cfg.unrelated_se * se)) & sig_b & clear_b & fit_b
        # level check (service drop), only where it can decide a move: the residual against the target may
        # exceed the reference (the GIS group's, else the target members' median) by ``level_tolerance``
        need = np.flatnonzero(usable & (cand_multi | cand_single & (it > 0)))
        level_ok = np.ones(nf, bool)
        if len(need):
            lvl_b, lvl_ref = _level_evidence(pools, need, b, o, assign, w, n_g)
            level_ok[need] = ~(np.isfinite(lvl_b) & np.isfinite(lvl_ref)) | (
                lvl_b <= cfg.level_tolerance * lvl_ref
            )
        move_multi = cand_multi & level_ok
        move_single = cand_single & level_ok
        # a meter alone on its GIS transformer may only move once the strays of multi-meter groups have moved
        # (its lost sibling may be one of them and come back): never in the first round
        if it > 0 and move_single.any():
            # the lateral a transformer sits on moves every neighbour with it; a lone meter must share the
            # target's own signal: its correlation with the target, partialled on the runner-up's pool,
            # must be significant and like the target's members'
            move_single &= _shares_own_signal(z, np.flatnonzero(move_single), b, c2, assign, w, se, cfg, xp)
        move = usable & (move_multi | (move_single & (it > 0)))
        unrelated = (
            usable & has_own & ~move & (zo < cfg.unrelated_se * se) & (kappa_o_loo > cfg.min_corr_se * se)
        )
        desired = np.where(move, b, gis_index)
        new_assign = _apply_moves(assign, desired, (zb - np.where(has_own, zo, 0.0)) / se)
        new_w = np.where(unrelated, 0.0, usable.astype(float))
        if it > 0 and np.array_equal(new_assign, assign) and np.array_equal(new_w, w):
            assign, w = new_assign, new_w
            break
        assign, w = new_assign, new_w
    # audit evidence of the last round (pools still hold that round's assignment)
    lvl_b, lvl_ref = _level_evidence(pools, None, b, o, pools.assign, pools.w, n_g)
    orphan = unrelated & cfg.propose_new_groups

    # orphans -> proposed new groups (connected components of significant pairwise correlation)
    final_id = groups[assign].astype(object)
    new_ids: dict[int, str] = {}
    oi = np.flatnonzero(orphan)
    if len(oi):
        zo_sig = to_numpy(tg.pairwise_correlations(xp.take(z, xp.asarray(oi), axis=0)))
        z_pair = np.arctanh(np.clip(zo_sig, -0.999999, 0.999999))
        thr = cfg.min_corr_se * np.maximum(se[oi][:, None], se[oi][None, :])
        link = z_pair > thr
        for a_ in range(len(oi)):
            for b_ in range(len(oi)):
                if (
                    a_ != b_
                    and phase_sets[oi[a_]]
                    and phase_sets[oi[b_]]
                    and not (phase_sets[oi[a_]] & phase_sets[oi[b_]])
                ):
                    link[a_, b_] = False
        np.fill_diagonal(link, True)
        comp = -np.ones(len(oi), int)
        ncomp = 0
        for s in range(len(oi)):
            if comp[s] >= 0:
                continue
            stack = [s]
            comp[s] = ncomp
            while stack:
                u = stack.pop()
                for v_ in np.flatnonzero(link[u] & (comp < 0)):
                    comp[v_] = ncomp
                    stack.append(v_)
            ncomp += 1
        meter_ids = sub["meter_id"].astype(str).to_numpy()
        # a lone orphan has only negative evidence (it does not move with its GIS group; a weak meter may
        # not either): it founds a new group only when its phase also differs from the GIS group's
        keep = [c for c in range(ncomp) if (comp == c).sum() >= 2 or phase_mis[oi[comp == c]].all()]
        first = {c: min(meter_ids[oi[comp == c]]) for c in keep}
        order = sorted(keep, key=lambda c: first[c])
        for k, c in enumerate(order, start=1):
            tid = f"{feeder}-NEW{k:03d}"
            for j in oi[comp == c]:
                final_id[j] = tid
                new_ids[j] = tid

    # confidence and reasons
    moved = assign != gis_index
    is_new = np.zeros(nf, bool)
    is_new[list(new_ids)] = True
    fin_b = np.isfinite(zb)
    with np.errstate(invalid="ignore"):
        d_new = (cfg.unrelated_se * se - zo) / se
        d_new = np.where(fin_b, np.minimum(d_new, (cfg.min_corr_se * se - zb) / se), d_new)
        d_moved = np.where(b == assign, (zb - np.maximum(z2, np.where(has_own, zo, -np.inf))) / se, 0.0)
        d_own = (zo - np.where(fin_b, zb, 0.0)) / se
        thr_b = np.where(fin_b, np.fmax(cfg.min_corr_se * se, kappa[b] - cfg.singleton_fit_se * se), np.inf)
        d_single = np.where(fin_b, (thr_b - zb) / se, 3.0)
        d = np.select([is_new, moved, has_own], [d_new, d_moved, d_own], d_single)
        unrel_r = has_own & (zo < cfg.unrelated_se * se)
        ambig_r = has_own & ~unrel_r & sig_b & (zb >= zo)
    conf = np.array([_norm_cdf(float(x) / math.sqrt(2.0)) for x in d])
    cls = np.where(
        conf >= cfg.confident_threshold,
        contract.CLASS_CONFIDENT,
        np.where(conf >= cfg.suspect_threshold, contract.CLASS_SUSPECT, contract.CLASS_LOW),
    ).astype(object)
    conf[~usable] = 0.0
    cls[~usable] = contract.CLASS_INSUFFICIENT
    out_conf[idx] = conf
    out_cls[idx] = cls
    out_tx[idx] = np.where(usable, final_id, gis.astype(object))
    for i in range(nf):
        if not usable[i]:
            out_reasons[idx[i]] = [contract.REASON_INSUFFICIENT_DATA]
            continue
        reasons = [REASON_TX_PHASE_MISMATCH] if phase_mis[i] else []
        if is_new[i]:
            reasons += [REASON_TX_UNRELATED, REASON_TX_NEW]
        elif moved[i]:
            reasons.append(REASON_TX_MOVED)
        elif has_own[i]:
            # a meter that moves with its GIS group is a clean result: no reason code (the code stays
            # exported for readers of older outputs)
            if unrel_r[i]:
                reasons.append(REASON_TX_UNRELATED)
            elif ambig_r[i]:
                reasons.append(REASON_TX_AMBIGUOUS)
        else:
            reasons.append(REASON_TX_SINGLETON)
        out_reasons[idx[i]] = reasons

    diag = pd.DataFrame(
        {
            "meter_id": sub["meter_id"].to_numpy(),
            "z_gis": zo / se,
            "z_best": zb / se,
            "z_runner_up": z2 / se,
            "best": groups[b],
            "kappa_best": kappa[b] / se,
            "kappa_gis_loo": kappa_o_loo / se,
            "level_rms_best": lvl_b,
            "level_rms_ref": lvl_ref,
            "phase_mismatch": phase_mis,
        }
    )
    diagnostics.append(diag)

    # transformer table
    final_np = np.asarray(final_id, dtype=object)
    all_ids = np.array(sorted(set(groups) | set(new_ids.values())), dtype=object)
    n_all = len(all_ids)
    # coherence of the final groups: the last round's pools updated to the final membership (GIS ids), and
    # the proposed new groups on their own
    w_fin = (usable & ~is_new).astype(float)
    pools.update(assign, w_fin, None, dots=False)
    corr_fin = to_numpy(tg.loo_correlations(pools.own, pools.pn2[assign], True, w_fin, zz))
    zc_fin = np.arctanh(np.clip(corr_fin, -0.999999, 0.999999))
    ok_fin = (w_fin > 0) & np.isfinite(zc_fin)
    zsum_f = np.bincount(assign[ok_fin], weights=zc_fin[ok_fin], minlength=n_g)
    zcnt_f = np.bincount(assign[ok_fin], minlength=n_g)
    coh = np.where(zcnt_f > 0, np.tanh(zsum_f / np.maximum(zcnt_f, 1)), np.nan)
    zfinal = {groups[g]: float(coh[g]) for g in range(n_g)}
    if is_new.any():
        rows_new = np.flatnonzero(is_new)
        zfinal.update(
            _final_coherence(
                xp.take(z, xp.asarray(rows_new), axis=0), final_np[rows_new], usable[rows_new], xp
            )
        )
    g_ix = np.searchsorted(all_ids, gis.astype(object))
    f_ix = np.searchsorted(all_ids, final_np)
    changed = f_ix != g_ix
    inferred = usable | ~changed  # an unusable meter counts where GIS has it (its label is kept)
    n_gis = np.bincount(g_ix, minlength=n_all)
    n_inf = np.bincount(f_ix[inferred], minlength=n_all)
    n_changed = np.bincount(g_ix[changed], minlength=n_all) + np.bincount(
        f_ix[changed & inferred], minlength=n_all
    )
    pairs = np.unique(np.stack([f_ix[inferred], codes[inferred]], 1), axis=0)
    tx_letters: list[set] = [set() for _ in range(n_all)]
    for g_, c_ in pairs:
        tx_letters[g_] |= uniq_sets[c_]
    gis_set = set(groups)
    for k, tid in enumerate(all_ids):
        letters = sorted(tx_letters[k])
        tx_rows.append(
            {
                "transformer_id": tid,
                "feeder_id": feeder,
                "n_meters_gis": int(n_gis[k]),
                "n_meters_inferred": int(n_inf[k]),
                "phases": _contract_phase_name(letters),
                "meters_changed": int(n_changed[k]),
                "group_coherence": zfinal.get(tid, np.nan),
                "proposed_new": tid not in gis_set,
            }
        )


def _shares_own_signal(z, cand, b, c2, assign, w, se, cfg: TransformerConfig, xp) -> np.ndarray:
    """For candidate meters ``cand``: does the meter share group ``b``'s own signal beyond the runner-up's?

    The partial correlations (:func:`phaseid_hpc.kernels.transformer_grouping.partial_correlations`) are
    taken from dot products in float64: the member rows of every group involved are gathered once.
    """
    ok = np.zeros(len(assign), bool)
    cand = np.asarray(cand)
    if not len(cand):
        return ok
    rows = np.flatnonzero(w > 0)
    order = rows[np.argsort(assign[rows], kind="stable")]
    a_sorted = assign[order]
    need_g = np.unique(np.concatenate([b[cand], c2[cand]]))
    lo = np.searchsorted(a_sorted, need_g)
    hi = np.searchsorted(a_sorted, need_g, side="right")
    involved = np.unique(np.concatenate([cand, *[order[l_:h_] for l_, h_ in zip(lo, hi)]]))
    zrow = to_numpy(xp.take(z, xp.asarray(involved), axis=0)).astype(np.float64)
    nrm2 = np.einsum("ij,ij->i", zrow, zrow)
    members = {}
    for g, l_, h_ in zip(need_g, lo, hi):
        k = np.searchsorted(involved, order[l_:h_])
        members[int(g)] = (order[l_:h_], k, zrow[k].sum(0))
    for i in cand:
        g, c = int(b[i]), int(c2[i])
        mem, kb, pool_b = members[g]
        cmem, _kc, pool_c = members[c]
        ki = int(np.searchsorted(involved, i))
        zi = zrow[ki]
        if i in mem:
            kb = kb[mem != i]
            pool_b = pool_b - zi
        if i in cmem:
            cmem = cmem[cmem != i]
            pool_c = pool_c - zi
        if len(cmem) == 0 or len(kb) == 0:
            continue
        bb, cc, bc = pool_b @ pool_b, pool_c @ pool_c, pool_b @ pool_c
        r_i = _partial_from_dots(zi @ pool_b, zi @ pool_c, bc, nrm2[ki], bb, cc)
        if not np.isfinite(r_i) or np.arctanh(np.clip(r_i, -0.999999, 0.999999)) < cfg.min_corr_se * se[i]:
            continue
        if len(kb) >= 2:
            zt = zrow[kb]
            xb, xc, xx = zt @ pool_b, zt @ pool_c, nrm2[kb]
            # member j against its group's pool without it: target pool_b - z_j, control pool_c
            r_m = _partial_from_dots(xb - xx, xc, bc - xc, xx, bb - 2 * xb + xx, cc)
            r_m = r_m[np.isfinite(r_m)]
            if len(r_m):
                ref = float(np.mean(np.arctanh(np.clip(r_m, -0.999999, 0.999999))))
                if np.arctanh(np.clip(r_i, -0.999999, 0.999999)) < ref - cfg.singleton_fit_se * se[i]:
                    continue
        ok[i] = True
    return ok


def _partial_from_dots(xt, xc, tc, xx, tt, cc):
    """Partial correlation of x with t given c, from dot products ``x.t, x.c, t.c, x.x, t.t, c.c``."""
    xt, xc, tc, xx, tt, cc = (np.asarray(a, dtype=np.float64) for a in (xt, xc, tc, xx, tt, cc))

    def _r(ab, aa, bb_):
        ok = (aa > 0) & (bb_ > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(ok, ab / np.sqrt(np.where(ok, aa * bb_, 1.0)), np.nan)

    r_xt, r_xc, r_tc = _r(xt, xx, tt), _r(xc, xx, cc), _r(tc, tt, cc)
    den = (1.0 - r_xc * r_xc) * (1.0 - r_tc * r_tc)
    ok = den > 1e-12
    with np.errstate(invalid="ignore"):
        return np.where(ok, (r_xt - r_xc * r_tc) / np.sqrt(np.where(ok, den, 1.0)), np.nan)


def _split_off(z, gis_index: np.ndarray, usable: np.ndarray, n_valid: np.ndarray, cfg: TransformerConfig, xp):
    """Meters of a GIS group that form a block of their own, uncorrelated with the rest of the group.

    A few meters of a transformer missing from GIS, labelled to one GIS transformer, prop each other up
    in the group's pool; the leave-one-out test does not see them. For every group of 4 or more usable
    meters the within-group correlation matrix (one small GEMM) is cut in two by its Fiedler vector; the
    smaller block is split off when the two blocks' pools are uncorrelated (Fisher-z below
    ``unrelated_se``) while each block is coherent (above ``min_corr_se``). Groups of one size are done
    together (batched GEMM and eigensolver).
    """
    out = np.zeros(len(gis_index), bool)
    if not len(gis_index):
        return out
    rows_u = np.flatnonzero(usable)
    order = rows_u[np.argsort(gis_index[rows_u], kind="stable")]  # usable meters by group, then position
    g_sorted = gis_index[order]
    counts = np.bincount(g_sorted, minlength=int(gis_index.max()) + 1)
    big = np.flatnonzero(counts >= 4)
    for k in np.unique(counts[big]):
        gs = big[counts[big] == k]
        mem = order[np.searchsorted(g_sorted, gs)[:, None] + np.arange(k)[None, :]]  # (B, k)
        zm = xp.reshape(xp.take(z, xp.asarray(mem.reshape(-1)), axis=0), (len(gs), int(k), z.shape[1]))
        c = to_numpy(zm @ xp.matrix_transpose(zm))  # (B, k, k)
        se = 1.0 / np.sqrt(np.maximum(n_valid[mem].min(1) - 6.0, 10.0))  # (B,)
        zz = np.arctanh(np.clip(c, -0.999999, 0.999999)) / se[:, None, None].astype(c.dtype)
        aff = np.clip(zz, 0.0, None)
        aff[:, np.arange(k), np.arange(k)] = 0.0
        lap = -aff
        lap[:, np.arange(k), np.arange(k)] = aff.sum(2)
        _, vec = np.linalg.eigh(lap)
        f = vec[:, :, 1]
        big_abs = f[np.arange(len(gs)), np.argmax(np.abs(f), 1)]
        f = f * np.where(big_abs > 0, 1.0, -1.0).astype(f.dtype)[:, None]  # canonical sign
        rank_order = np.argsort(f, 1, kind="stable")
        gap = np.argmax(np.diff(np.take_along_axis(f, rank_order, 1), axis=1), 1) + 1  # (B,)
        # side of the cut of every member: first ``gap`` in Fiedler order, or the rest
        first = np.zeros((len(gs), k), bool)
        np.put_along_axis(first, rank_order, np.arange(k)[None, :] < gap[:, None], 1)
        small_is_first = gap < k - gap
        small = np.where(small_is_first[:, None], first, ~first)
        cand = np.flatnonzero(gap != k - gap)
        if not len(cand):
            continue
        cs = c[cand].astype(np.float64)
        sm = small[cand].astype(np.float64)
        lg = 1.0 - sm
        s_small = np.einsum("bi,bij,bj->b", sm, cs, sm)
        s_large = np.einsum("bi,bij,bj->b", lg, cs, lg)
        s_cross = np.einsum("bi,bij,bj->b", sm, cs, lg)
        r_between = s_cross / np.sqrt(np.maximum(s_small * s_large, 1e-12))
        split = np.arctanh(np.clip(r_between, -0.999999, 0.999999)) / se[cand] < cfg.unrelated_se
        for j in cand[split]:
            cj = c[j]

            def coherent(block, c=cj, se=se[j]):
                if len(block) < 2:
                    return True
                sub = c[np.ix_(block, block)]
                tot = sub.sum(0)  # z_j . pool, pool including j
                loo = (tot - 1.0) / np.sqrt(np.maximum(sub.sum() - 2 * tot + 1.0, 1e-12))
                return float(np.mean(np.arctanh(np.clip(loo, -0.999999, 0.999999)))) / se > cfg.min_corr_se

            s_idx, l_idx = np.flatnonzero(small[j]), np.flatnonzero(~small[j])
            # block order as the one-group cut listed it (Fiedler order)
            s_idx = rank_order[j][np.isin(rank_order[j], s_idx)]
            l_idx = rank_order[j][np.isin(rank_order[j], l_idx)]
            if coherent(l_idx) and coherent(s_idx):
                out[mem[j][s_idx]] = True
    return out


def _apply_moves(assign: np.ndarray, desired: np.ndarray, strength: np.ndarray) -> np.ndarray:
    """Apply wanted moves greedily, strongest first, without letting two moves rely on each other.

    A group that receives a meter is frozen for the rest of the round (no further arrivals or departures),
    and a group that lost a meter receives none: of two meters that would swap into each other's group only
    the stronger moves, and the pools are rebuilt before the other is judged again. A group may lose several
    strays in one round.
    """
    out = assign.copy()
    change = np.flatnonzero(desired != assign)
    order = change[np.lexsort((change, -np.nan_to_num(strength[change], nan=-np.inf)))]
    received: set[int] = set()
    lost: set[int] = set()
    for i in order:
        src, dst = int(assign[i]), int(desired[i])
        if src in received or dst in received or dst in lost:
            continue
        out[i] = dst
        received.add(dst)
        lost.add(src)
    return out


def _level_evidence(pools: _Pools, rows, b, o, assign, w, n_g):
    """Level residual [V] of meters ``rows`` at their best target ``b`` and the reference to compare it with.

    The reference is the residual at the GIS group ``o``; where that is undefined (the meter is alone on it),
    the median residual of the target's own members.
    """
    b_r, o_r = (b, o) if rows is None else (b[rows], o[rows])
    lvl_b = pools.level(rows, b_r)
    lvl_o = pools.level(rows, o_r)
    lvl_ref = lvl_o
    lack = ~np.isfinite(lvl_o)
    if lack.any():
        flag = np.zeros(n_g, bool)
        flag[b_r[lack]] = True
        mem = np.flatnonzero((w > 0) & flag[assign])
        if rows is None:
            # a member still on its GIS group has that residual already (lvl_o)
            at_o = assign[mem] == o[mem]
            lvl_mem = np.empty(len(mem))
            lvl_mem[at_o] = lvl_o[mem[at_o]]
            lvl_mem[~at_o] = pools.level(mem[~at_o], assign[mem[~at_o]])
        else:
            lvl_mem = pools.level(mem, assign[mem])
        med = _group_medians(lvl_mem, assign[mem], n_g)
        lvl_ref = np.where(lack, med[b_r], lvl_o)
    return lvl_b, lvl_ref


def _pair_reference(zs_own: np.ndarray, assign: np.ndarray, w: np.ndarray, n_g: int) -> float:
    """Median Fisher-z [std. errors] of members of two-meter groups (all groups when fewer than 5 pairs).

    ``zs_own``: each meter's Fisher-z with its own group's leave-one-out pool [std. errors].
    """
    n_members = np.bincount(assign[w > 0], minlength=n_g)
    rows = np.flatnonzero(w > 0)
    vals = zs_own[rows]
    keep = np.isfinite(vals)
    pair = keep & (n_members[assign[rows]] == 2)
    use = vals[pair] if pair.sum() >= 10 else vals[keep]
    return float(np.median(use)) if len(use) else np.inf


def _final_coherence(z, final_id: np.ndarray, usable: np.ndarray, xp) -> dict[str, float]:
    """Mean leave-one-out correlation of a group's usable members with the group's pool (NaN: < 2)."""
    ids = np.array(sorted(set(final_id)), dtype=object)
    gi = np.searchsorted(ids, final_id)
    wts = usable.astype(float)
    pooled = tg.group_sums(z, xp.asarray(gi), len(ids), xp.asarray(wts))
    pn2 = to_numpy(xp.vecdot(pooled, pooled, axis=-1)).astype(float)
    s_own = to_numpy(tg.pair_dots(z, pooled, None, xp.asarray(gi))).astype(float)
    zz = to_numpy(xp.vecdot(z, z, axis=-1)).astype(float)
    corr = to_numpy(tg.loo_correlations(s_own, pn2[gi], True, wts, zz))
    zc = np.arctanh(np.clip(corr, -0.999999, 0.999999))
    ok = usable & np.isfinite(zc)
    zsum = np.bincount(gi[ok], weights=zc[ok], minlength=len(ids))
    zcnt = np.bincount(gi[ok], minlength=len(ids))
    mean = np.where(zcnt > 0, np.tanh(zsum / np.maximum(zcnt, 1)), np.nan)
    return {tid: float(mean[g]) for g, tid in enumerate(ids)}


def recommend_transformers(
    meters: pd.DataFrame, inferred: Any, transformer_class: Any, config: TransformerConfig
) -> np.ndarray:
    """The decision policy for transformers: the GIS label stays unless the evidence is confident.

    Parameters
    ----------
    meters : DataFrame
        ``feeder_id``, ``transformer_id`` (GIS) per meter.
    inferred : array of str, shape (n_meters,)
        Inferred transformer per meter (``map_transformers(...)["transformer"]``).
    transformer_class : array of str, shape (n_meters,)
        Class of that inference.
    config : TransformerConfig
        ``min_sibling_share``: feeders where fewer meters than this share a GIS transformer with another
        meter get no transformer corrections at all.

    Returns
    -------
    ndarray of object, shape (n_meters,)
        The recommended transformer: ``inferred`` where it is ``confident``, on a feeder with siblings, and
        a transformer GIS knows on that feeder (a proposed new transformer goes to the review list), else
        the GIS transformer.
    """
    gis = meters["transformer_id"].astype(object).to_numpy()
    feeder = meters["feeder_id"].astype(str).to_numpy()
    size = meters.groupby(["feeder_id", "transformer_id"], sort=False)["transformer_id"].transform("size")
    has_sibling = pd.Series(size.to_numpy() >= 2, index=meters.index)
    share = has_sibling.groupby(feeder).transform("mean").to_numpy()
    inferred = np.asarray(inferred, dtype=object)
    take = (np.asarray(transformer_class, dtype=object) == contract.CLASS_CONFIDENT) & pd.notna(inferred)
    take &= share >= config.min_sibling_share
    # a transformer missing from GIS is a field survey item, not a correction GIS can take: review list
    known = set(zip(feeder, gis.astype(str)))
    take &= np.array([(f, str(t)) in known for f, t in zip(feeder, inferred)], dtype=bool)
    return np.where(take, inferred, gis)
