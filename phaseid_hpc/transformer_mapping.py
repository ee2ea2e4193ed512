"""Meter-to-transformer verification: does each meter move with its GIS transformer group?

Labelled layer over :mod:`phaseid_hpc.kernels.transformer_grouping`. One call handles one block of whole
feeders; every feeder is scored on its own (candidates never cross a feeder).

Method (per feeder)
-------------------
1. Shape signal: differenced voltage, per-phase feeder common mode projected out, unit-norm rows
   (``differenced_signals``). Neighbouring transformers on one lateral share the common mode, not the
   residual, so the residual separates them.
2. Each meter's correlation with every candidate group's pooled signal, leaving the meter out of its own group
   (``group_correlations``: two GEMMs with a one-hot membership matrix; ``O(n_meters n_groups n_time)`` per
   feeder, no pairwise regressions). Candidates: same feeder, a group serving the meter's phase (the phase
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

Cost: per round two ``(n, T) x (T, g)`` GEMMs for correlation and two for level, per feeder; ckt5 (1,379
meters, 591 transformers, 14 days) takes about 1-2 s on 2 CPU cores, where one regression per customer pair
(~1 ms each, O(n^2) pairs) takes hours at 10,000 customers.
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


def _phase_str(v: Any) -> str | None:
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return None
    s = str(v).strip().upper()
    return s or None


def _norm_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _phase_mask(letters: frozenset) -> int:
    return sum(1 << k for k, c in enumerate("ABC") if c in letters)


def _haversine_m(lat1, lon1, lat2, lon2):
    r = 6_371_000.0
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dphi = p2 - p1
    dl = np.radians(lon2) - np.radians(lon1)
    a = np.sin(dphi / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * r * np.arcsin(np.sqrt(np.clip(a, 0, 1)))


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


def _map_feeder(
    feeder, idx, voltage, kw, kvar, m, cfg, xp, out_tx, out_conf, out_cls, out_reasons, tx_rows, diagnostics
):
    sub = m.iloc[idx]
    nf = len(idx)
    v = xp.asarray(voltage[idx])
    gis = sub["transformer_id"].astype(str).to_numpy()
    groups = np.array(sorted(set(gis)), dtype=object)
    n_g = len(groups)
    gis_index = np.searchsorted(groups, gis)

    # phases: inferred where present, else GIS
    ph_inf = [_phase_str(p) for p in (sub["phase"] if "phase" in sub else [None] * nf)]
    ph_gis = [_phase_str(p) for p in (sub["phase_gis"] if "phase_gis" in sub else [None] * nf)]
    phase = [a if a is not None else b for a, b in zip(ph_inf, ph_gis)]
    phase_code = np.array([_PHASE_CODE.get(p, -1) if p is not None else -1 for p in phase])
    phase_sets = [frozenset(p) if p is not None else frozenset() for p in phase]
    pmask = np.array([_phase_mask(ps) for ps in phase_sets], dtype=np.int64)

    # every GIS transformer counts once in its phase's common mode
    gsize = np.bincount(gis_index, minlength=n_g).astype(float)
    z, n_valid = tg.differenced_signals(
        v, xp.asarray(phase_code), 3, weights=xp.asarray(1.0 / gsize[gis_index])
    )
    z = xp.astype(z, xp.float32)  # correlations to ~1e-6: half the GEMM cost
    n_valid = to_numpy(n_valid)
    usable = sub["usable"].to_numpy(dtype=bool) if "usable" in sub else np.ones(nf, bool)
    usable = usable & (n_valid >= cfg.min_samples)
    se = 1.0 / np.sqrt(np.maximum(n_valid - 3 - 3, 10.0))

    current = None
    if kw is not None:
        kwf = np.asarray(to_numpy(kw[idx]), dtype=np.float64)
        p = (
            kwf
            if kvar is None
            else kwf + cfg.service_x_over_r * np.asarray(to_numpy(kvar[idx]), dtype=np.float64)
        )
        vv = np.asarray(to_numpy(v), dtype=np.float64)
        current = xp.asarray(1000.0 * p / np.where(vv > 0, vv, np.nan))

    # group phase from usable members (inferred phase), majority over letters
    def group_phase_sets(assign, w):
        sets = []
        for g in range(n_g):
            mem = np.flatnonzero((assign == g) & (w > 0))
            letters: dict[str, int] = {}
            for j in mem:
                for c in phase_sets[j]:
                    letters[c] = letters.get(c, 0) + 1
            if not letters:
                sets.append(frozenset())
                continue
            top = max(letters.values())
            sets.append(frozenset(c for c, k in letters.items() if k >= 0.5 * top))
        return sets

    # distance mask (static, from GIS membership centroids)
    dist_ok = np.ones((nf, n_g), bool)
    if {"lat", "lon"} <= set(sub.columns):
        lat = sub["lat"].to_numpy(dtype=float)
        lon = sub["lon"].to_numpy(dtype=float)
        if np.isfinite(lat).any():
            glat = np.array(
                [
                    np.nanmedian(lat[gis_index == g]) if np.isfinite(lat[gis_index == g]).any() else np.nan
                    for g in range(n_g)
                ]
            )
            glon = np.array(
                [
                    np.nanmedian(lon[gis_index == g]) if np.isfinite(lon[gis_index == g]).any() else np.nan
                    for g in range(n_g)
                ]
            )
            d = _haversine_m(lat[:, None], lon[:, None], glat[None, :], glon[None, :])
            dist_ok = ~(np.isfinite(d) & (d > cfg.max_distance_m))

    assign = gis_index.copy()
    # meters of a sub-group that does not move with the rest of its GIS group start outside the pools
    w = usable.astype(float) * ~_split_off(z, gis_index, usable, n_valid, cfg, xp)
    ar = np.arange(nf)
    for it in range(max(cfg.n_iterations, 2)):
        gsets = group_phase_sets(assign, w)
        gmask = np.array([_phase_mask(gs) for gs in gsets], dtype=np.int64)
        if cfg.use_phase:
            phase_ok = (
                ((pmask[:, None] & gmask[None, :]) != 0) | (pmask[:, None] == 0) | (gmask[None, :] == 0)
            )
        else:
            phase_ok = np.ones((nf, n_g), bool)
        allowed = phase_ok & dist_ok
        corr = to_numpy(tg.group_correlations(z, xp.asarray(assign), n_g, xp.asarray(w)))
        zc = np.arctanh(np.clip(corr, -0.999999, 0.999999))
        rms, _slope = tg.level_consistency(
            v, current, xp.asarray(assign), n_g, xp.asarray(w), dtype=xp.float32
        )
        rms = to_numpy(rms)
        kappa, _, _ = _member_coherence(zc, assign, w, n_g)
        mem_rows = np.flatnonzero(w > 0)
        lvl_ref_group = (
            pd.Series(rms[mem_rows, assign[mem_rows]])
            .groupby(assign[mem_rows])
            .median()
            .reindex(range(n_g))
            .to_numpy()
        )

        # "does it move with its GIS group" is asked of the GIS group's own remaining members only (meters
        # moved in from elsewhere shape the target pools, not this test)
        o = gis_index
        w_orig = w * (assign == gis_index)
        corr_orig = to_numpy(tg.group_correlations(z, xp.asarray(gis_index), n_g, xp.asarray(w_orig)))
        zc_orig = np.arctanh(np.clip(corr_orig, -0.999999, 0.999999))
        zo = zc_orig[ar, o]
        _, zsum, zcnt = _member_coherence(zc_orig, gis_index, w_orig, n_g)
        own_sz = (w_orig > 0) & np.isfinite(zo)
        rest = zcnt[o] - own_sz
        kappa_o_loo = np.where(rest > 0, (zsum[o] - np.where(own_sz, zo, 0.0)) / np.maximum(rest, 1), np.nan)
        alt = np.where(allowed, zc, np.nan)
        alt[ar, o] = np.nan
        alt_f = np.where(np.isfinite(alt), alt, -np.inf)
        b = np.argmax(alt_f, 1)
        zb = alt_f[ar, b]
        alt2 = alt_f.copy()
        alt2[ar, b] = -np.inf
        z2 = alt2.max(1)
        z2 = np.where(np.isfinite(z2), z2, 0.0)

        phase_mis = np.array(
            [
                bool(phase_sets[i]) and bool(gsets[o[i]]) and not (phase_sets[i] & gsets[o[i]])
                for i in range(nf)
            ]
        )
        has_own = np.isfinite(zo)
        weak_gis = phase_mis | (
            np.isfinite(zo) & (zo < cfg.unrelated_se * se) & (kappa_o_loo > cfg.min_corr_se * se)
        )
        margin = np.where(weak_gis, cfg.weak_gis_margin_se, cfg.flag_margin_se) * se
        sig_b = np.isfinite(zb) & (zb > cfg.min_corr_se * se)
        clear_b = (zb - z2) > cfg.ambiguity_se * se
        lvl_b = rms[ar, b]
        lvl_o = rms[ar, o]
        lvl_ref = np.where(np.isfinite(lvl_o), lvl_o, lvl_ref_group[b])
        level_ok = ~(np.isfinite(lvl_b) & np.isfinite(lvl_ref)) | (lvl_b <= cfg.level_tolerance * lvl_ref)
        # a target with one member has no coherence of its own to compare against: the meter must move with
        # it as the feeder's same-transformer pairs do (a fraction of their median Fisher-z)
        ref_pair = _pair_reference(zc / se[:, None], assign, w, n_g) * cfg.pair_fit_fraction
        n_members = np.bincount(assign[w > 0], minlength=n_g)
        lone_target_ok = (n_members[b] != 1) | (zb / se >= ref_pair)
        # a meter that moves with its GIS group as well as the group's other members do stays: if it also
        # moves with another group, the stray is on the other side (it will come over), or the two are one
        fits_own = (
            np.isfinite(zo)
            & (zo > cfg.min_corr_se * se)
            & (zo >= np.where(np.isfinite(kappa_o_loo), kappa_o_loo, -np.inf) - cfg.singleton_fit_se * se)
        )
        move_multi = (
            has_own
            & ~fits_own
            & sig_b
            & clear_b
            & ((zb - np.where(has_own, zo, 0)) > margin)
            & level_ok
            & lone_target_ok
        )
        # a lone meter joins only a group with a coherence to compare against (two or more members): a lone
        # light-load neighbour carries nothing but its lateral's signal, which every lone meter there shares
        fit_b = np.isfinite(kappa[b]) & (zb >= kappa[b] - cfg.singleton_fit_se * se)
        move_single = (
            (~has_own | phase_mis & (zo < cfg.unrelated_se * se)) & sig_b & clear_b & fit_b & level_ok
        )
        # a meter alone on its GIS transformer may only move once the strays of multi-meter groups have moved
        # (its lost sibling may be one of them and come back): never in the first round
        if it > 0 and move_single.any():
            # the lateral a transformer sits on moves every neighbour with it; a lone meter must share the
            # target's own signal: its correlation with the target, partialled on the runner-up's pool,
            # must be significant and like the target's members'
            c2 = np.argmax(alt2, 1)
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
    orphan = unrelated & cfg.propose_new_groups

    # orphans -> proposed new groups (connected components of significant pairwise correlation)
    final_id = groups[assign].astype(object)
    new_ids: dict[int, str] = {}
    oi = np.flatnonzero(orphan)
    if len(oi):
        zo_sig = to_numpy(tg.pairwise_correlations(xp.take(z, xp.asarray(oi), axis=0)))
        zz = np.arctanh(np.clip(zo_sig, -0.999999, 0.999999))
        thr = cfg.min_corr_se * np.maximum(se[oi][:, None], se[oi][None, :])
        link = zz > thr
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
    conf = np.zeros(nf)
    for i in range(nf):
        reasons: list[str] = []
        gi = idx[i]
        if not usable[i]:
            out_tx[gi] = gis[i]
            out_cls[gi] = contract.CLASS_INSUFFICIENT
            out_reasons[gi] = [contract.REASON_INSUFFICIENT_DATA]
            continue
        if phase_mis[i]:
            reasons.append(REASON_TX_PHASE_MISMATCH)
        if i in new_ids:
            reasons += [REASON_TX_UNRELATED, REASON_TX_NEW]
            d = (cfg.unrelated_se * se[i] - zo[i]) / se[i]
            d = min(d, (cfg.min_corr_se * se[i] - zb[i]) / se[i] if np.isfinite(zb[i]) else d)
        elif moved[i]:
            reasons.append(REASON_TX_MOVED)
            # the last round's evidence is about the final target unless the round limit cut in
            d = (zb[i] - max(z2[i], zo[i] if has_own[i] else -np.inf)) / se[i] if b[i] == assign[i] else 0.0
        elif has_own[i]:
            if zo[i] < cfg.unrelated_se * se[i]:
                reasons.append(REASON_TX_UNRELATED)
            elif sig_b[i] and zb[i] >= zo[i]:
                reasons.append(REASON_TX_AMBIGUOUS)
            # a meter that moves with its GIS group is a clean result: no reason code (the code stays
            # exported for readers of older outputs)
            d = (zo[i] - (zb[i] if np.isfinite(zb[i]) else 0.0)) / se[i]
        else:
            reasons.append(REASON_TX_SINGLETON)
            thr_b = (
                max(cfg.min_corr_se * se[i], kappa[b[i]] - cfg.singleton_fit_se * se[i])
                if np.isfinite(zb[i])
                else np.inf
            )
            d = (thr_b - zb[i]) / se[i] if np.isfinite(zb[i]) else 3.0
        conf[i] = _norm_cdf(float(d) / math.sqrt(2.0))
        out_tx[gi] = final_id[i]
        out_conf[gi] = conf[i]
        out_cls[gi] = (
            contract.CLASS_CONFIDENT
            if conf[i] >= cfg.confident_threshold
            else contract.CLASS_SUSPECT
            if conf[i] >= cfg.suspect_threshold
            else contract.CLASS_LOW
        )
        out_reasons[gi] = reasons

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
    all_ids = sorted(set(groups) | set(new_ids.values()))
    zfinal = _final_coherence(z, final_np, usable, xp)
    for tid in all_ids:
        in_gis = gis == tid
        in_inf = (final_np == tid) & usable | ((final_np == tid) & ~usable & in_gis)
        letters = sorted({c for j in np.flatnonzero(in_inf) for c in phase_sets[j]})
        tx_rows.append(
            {
                "transformer_id": tid,
                "feeder_id": feeder,
                "n_meters_gis": int(in_gis.sum()),
                "n_meters_inferred": int(in_inf.sum()),
                "phases": "".join(letters) if letters else None,
                "meters_changed": int((in_gis & ~in_inf).sum() + (in_inf & ~in_gis).sum()),
                "group_coherence": zfinal.get(tid, np.nan),
                "proposed_new": tid not in set(groups),
            }
        )


def _shares_own_signal(z, cand, b, c2, assign, w, se, cfg: TransformerConfig, xp) -> np.ndarray:
    """For candidate meters ``cand``: does the meter share group ``b``'s own signal beyond the runner-up's?"""
    ok = np.zeros(len(assign), bool)
    for i in cand:
        g, c = int(b[i]), int(c2[i])
        mem = np.flatnonzero((assign == g) & (w > 0))
        mem = mem[mem != i]
        cmem = np.flatnonzero((assign == c) & (w > 0))
        cmem = cmem[cmem != i]
        if len(cmem) == 0 or len(mem) == 0:
            continue
        zt = to_numpy(xp.take(z, xp.asarray(mem), axis=0)).astype(np.float64)
        pool_b = zt.sum(0)
        pool_c = to_numpy(xp.take(z, xp.asarray(cmem), axis=0)).astype(np.float64).sum(0)
        zi = to_numpy(xp.take(z, xp.asarray([int(i)]), axis=0)).astype(np.float64)
        r_i = float(tg.partial_correlations(zi, pool_b[None, :], pool_c[None, :])[0])
        if not np.isfinite(r_i) or np.arctanh(np.clip(r_i, -0.999999, 0.999999)) < cfg.min_corr_se * se[i]:
            continue
        if len(mem) >= 2:
            r_m = tg.partial_correlations(zt, pool_b[None, :] - zt, np.broadcast_to(pool_c, zt.shape))
            r_m = r_m[np.isfinite(r_m)]
            if len(r_m):
                ref = float(np.mean(np.arctanh(np.clip(r_m, -0.999999, 0.999999))))
                if np.arctanh(np.clip(r_i, -0.999999, 0.999999)) < ref - cfg.singleton_fit_se * se[i]:
                    continue
        ok[i] = True
    return ok


def _split_off(z, gis_index: np.ndarray, usable: np.ndarray, n_valid: np.ndarray, cfg: TransformerConfig, xp):
    """Meters of a GIS group that form a block of their own, uncorrelated with the rest of the group.

    A few meters of a transformer missing from GIS, labelled to one GIS transformer, prop each other up
    in the group's pool; the leave-one-out test does not see them. For every group of 4 or more usable
    meters the within-group correlation matrix (one small GEMM) is cut in two by its Fiedler vector; the
    smaller block is split off when the two blocks' pools are uncorrelated (Fisher-z below
    ``unrelated_se``) while each block is coherent (above ``min_corr_se``).
    """
    out = np.zeros(len(gis_index), bool)
    counts = np.bincount(gis_index[usable], minlength=int(gis_index.max()) + 1 if len(gis_index) else 0)
    for g in np.flatnonzero(counts >= 4):
        mem = np.flatnonzero((gis_index == g) & usable)
        zm = xp.take(z, xp.asarray(mem), axis=0)
        c = to_numpy(tg.pairwise_correlations(zm))
        n_eff = max(float(np.min(n_valid[mem])) - 6.0, 10.0)
        se = 1.0 / math.sqrt(n_eff)
        zz = np.arctanh(np.clip(c, -0.999999, 0.999999)) / se
        aff = np.clip(zz, 0.0, None)
        np.fill_diagonal(aff, 0.0)
        lap = np.diag(aff.sum(1)) - aff
        _, vec = np.linalg.eigh(lap)
        f = vec[:, 1]
        f = f * (1.0 if f[np.argmax(np.abs(f))] > 0 else -1.0)  # canonical sign
        order = np.argsort(f, kind="stable")
        gap = int(np.argmax(np.diff(f[order]))) + 1
        blocks = (order[:gap], order[gap:])
        small, large = sorted(blocks, key=len)
        if len(small) == len(large):
            continue
        csum = c.copy()
        s_small = csum[np.ix_(small, small)].sum()
        s_large = csum[np.ix_(large, large)].sum()
        s_cross = csum[np.ix_(small, large)].sum()
        r_between = s_cross / math.sqrt(max(s_small * s_large, 1e-12))
        if np.arctanh(np.clip(r_between, -0.999999, 0.999999)) / se >= cfg.unrelated_se:
            continue

        def coherent(block, c=c, se=se):
            if len(block) < 2:
                return True
            sub = c[np.ix_(block, block)]
            tot = sub.sum(0)  # z_j . pool, pool including j
            loo = (tot - 1.0) / np.sqrt(np.maximum(sub.sum() - 2 * tot + 1.0, 1e-12))
            return float(np.mean(np.arctanh(np.clip(loo, -0.999999, 0.999999)))) / se > cfg.min_corr_se

        if coherent(large) and coherent(small):
            out[mem[small]] = True
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


def _pair_reference(zs: np.ndarray, assign: np.ndarray, w: np.ndarray, n_g: int) -> float:
    """Median Fisher-z [std. errors] of members of two-meter groups (all groups when fewer than 5 pairs)."""
    n_members = np.bincount(assign[w > 0], minlength=n_g)
    rows = np.flatnonzero(w > 0)
    vals = zs[rows, assign[rows]]
    keep = np.isfinite(vals)
    pair = keep & (n_members[assign[rows]] == 2)
    use = vals[pair] if pair.sum() >= 10 else vals[keep]
    return float(np.median(use)) if len(use) else np.inf


def _member_coherence(zc: np.ndarray, assign: np.ndarray, w: np.ndarray, n_g: int):
    """Mean Fisher-z of each group's weighted members with their leave-one-out pool (and its sum, count)."""
    member = (assign[:, None] == np.arange(n_g)[None, :]) & (w[:, None] > 0) & np.isfinite(zc)
    zsum = np.where(member, zc, 0.0).sum(0)
    zcnt = member.sum(0)
    kappa = np.where(zcnt > 0, zsum / np.maximum(zcnt, 1), np.nan)
    return kappa, zsum, zcnt


def _final_coherence(z, final_id: np.ndarray, usable: np.ndarray, xp) -> dict[str, float]:
    """Mean leave-one-out correlation of a group's usable members with the group's pool (NaN: < 2)."""
    ids = np.array(sorted(set(final_id)), dtype=object)
    gi = np.searchsorted(ids, final_id)
    corr = to_numpy(tg.group_correlations(z, xp.asarray(gi), len(ids), xp.asarray(usable.astype(float))))
    out = {}
    for g, tid in enumerate(ids):
        mem = (gi == g) & usable
        c = corr[mem, g]
        c = c[np.isfinite(c)]
        out[tid] = (
            float(np.tanh(np.mean(np.arctanh(np.clip(c, -0.999999, 0.999999))))) if len(c) else float("nan")
        )
    return out
