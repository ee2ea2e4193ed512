"""Meter PT deviation: flag a meter whose reported voltage level its siblings and its own load do not explain.

A meter's internal potential transformer (PT) that drifts makes every reading ``(1 + d)`` times the true
service voltage; above 1% the meter needs replacement. Phase and transformer identification work on the
shape of the voltage (each series over its own mean) and do not see it; this stage compares LEVELS.

For each feeder of a block (meters of one feeder are compared with each other only):

* meters of one transformer and phase, at least ``[pt] min_group_size`` of them, share the secondary
  voltage: each meter's level, with its own service drop ``k P`` added back (``k`` fitted per meter on the
  differenced series, so free of ``d``), is compared with the group's median level;
* a meter alone (or one of two) on its transformer and phase is compared with the ``n_neighbours`` meters
  of other transformers whose drop-corrected voltage shape is nearest, and its reason says so
  (:data:`~phaseid_hpc.contract.REASON_PT_DEVIATION_NEIGHBOURS`); such a meter's slope reference is the
  meters elsewhere most correlated with the part of its differenced level that its own load does not
  explain (picked on the whole of it, a heavily loaded meter's references would follow its load, and its
  slope come out biased towards 0); meters whose voltage does not follow their own load (slope below
  ``min_load_response`` of the feeder's median: a large, stiff service), unless their mean load drops
  them by ``idle_drop_share`` of ``threshold_pct`` at most at that median (idle: their level needs no
  drop correction), are never anyone's neighbour and get a flag level of their own, from the scatter of their
  comparison (tight where they are merely lightly loaded, wide where they sit at another level, as the
  large services of IEEE 8500 do, 1-2.5% below); where ``cohort_load_neighbours`` of them carry a like
  mean load (within ``cohort_load_ratio``), a meter's deviation is taken relative to their median (a
  steady load's own drop sets the level) and those so matched get the flag level of their own scatter;
  fewer than 10 of them on a feeder: not estimable (NaN);
* a meter with exactly one sibling is flagged only where the two also differ by ``threshold_pct`` (a
  transformer tap moves both, a failing PT one);
* the deviation must exceed ``threshold_pct`` in each of ``n_windows`` consecutive windows, with one sign;
  for meters compared with neighbours only, the level is widened to ``neighbour_spread_factor`` times the
  robust spread of that comparison on the feeder where it scatters more (a healthy meter there cannot be
  told from a 1% PT error).

The array maths is in :mod:`phaseid_hpc.kernels.pt_deviation` (named steps, units, equations).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from . import contract
from ._compat import to_numpy
from .config import PTConfig
from .kernels import pt_deviation as kern
from .kernels.neighbours import top_k_neighbours

__all__ = ["detect_pt_deviation"]

_DEFAULT_CONFIG = PTConfig()
#: Fewest meters that do not follow their own load for them to be compared as a cohort [-].
_MIN_COHORT = 10
#: Standard service voltages [V] a meter without ``nominal_v`` is snapped to (its median reading's nearest).
_STANDARD_V = np.array([120.0, 208.0, 230.0, 240.0, 277.0, 347.0, 400.0, 480.0])


def _nominal(voltage: np.ndarray, table_nominal: np.ndarray) -> np.ndarray:
    """The table's ``nominal_v`` where usable, else the standard voltage nearest the meter's median [V]."""
    out = np.asarray(table_nominal, dtype=np.float64).copy()
    bad = ~(out > 0)
    if bad.any():
        with np.errstate(all="ignore"):
            med = (
                np.nanmedian(np.where(voltage[bad] > 0, voltage[bad], np.nan), axis=1)
                if voltage.shape[1]
                else np.full(int(bad.sum()), np.nan)
            )
        snap = _STANDARD_V[
            np.argmin(np.abs(np.nan_to_num(med, nan=240.0)[:, None] - _STANDARD_V[None, :]), axis=1)
        ]
        out[bad] = snap
    return out


def _slope_reference(
    y: np.ndarray, kw: np.ndarray, tx_code: np.ndarray, group: np.ndarray, big: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each meter's slope reference as (index, weight) arrays (n, m): its group's other meters where the
    group is big enough, else the ``k`` meters of other transformers whose differenced level is most
    correlated with the part of the meter's own that its own load does not explain; weights equal and
    summing to 1 per row (0 padding).

    Picked on the whole differenced level, a heavily loaded meter's references are those whose swings
    happen to follow its load (a like load shape, or noise); the reference then takes part of its drop
    away and its slope comes out biased low, near 0 or below (a 14 kW service judged not to follow its
    load). The meter's own load is first projected out
    (:func:`~phaseid_hpc.kernels.pt_deviation.unexplained_by_own_load`), so the references are picked on
    what the meter shares with the feeder.
    """
    n = y.shape[0]
    members = pd.Series(np.arange(n)).groupby(group).apply(list).to_dict() if n else {}
    width = max([k] + [len(v) - 1 for v in members.values()]) if n else 1
    idx = np.zeros((n, max(width, 1)), dtype=np.int64)
    w = np.zeros((n, max(width, 1)))
    for i in np.flatnonzero(big):
        others = [j for j in members[group[i]] if j != i]
        idx[i, : len(others)] = others
        w[i, : len(others)] = 1.0
    small = np.flatnonzero(~big)
    if small.size and n > 1:
        dy = np.diff(y[small], axis=1)
        dy_all = np.diff(y, axis=1)
        for arr in (dy, dy_all):
            if arr.shape[1]:
                arr -= np.nanmean(arr, axis=1, keepdims=True)
        u = kern.unexplained_by_own_load(dy, np.diff(kw[small], axis=1))  # step 2a
        u /= np.where(np.linalg.norm(u, axis=1, keepdims=True) > 0, np.linalg.norm(u, axis=1, keepdims=True), 1.0)
        c = np.nan_to_num(dy_all)
        c /= np.where(np.linalg.norm(c, axis=1, keepdims=True) > 0, np.linalg.norm(c, axis=1, keepdims=True), 1.0)
        nb, sim = top_k_neighbours(u, tx_code[small], k, candidates=c, candidate_group=tx_code)
        ok = np.isfinite(sim)
        idx[small, : nb.shape[1]] = np.where(ok, nb, 0)
        w[small, : nb.shape[1]] = ok.astype(np.float64)
    s = w.sum(axis=1, keepdims=True)
    return idx, w / np.where(s > 0, s, 1.0)


def _one_feeder(
    voltage: np.ndarray,
    kw: np.ndarray | None,
    nominal: np.ndarray,
    tx: np.ndarray,
    phase: np.ndarray,
    config: PTConfig,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One feeder: deviation [%] (NaN where not estimable), flagged against neighbours, flagged in a group."""
    n = voltage.shape[0]
    tx_code = pd.factorize(pd.Series(tx, dtype=object).fillna("\0none"))[0]
    group, groups = pd.factorize(
        pd.Series(tx, dtype=object).fillna("\0none").astype(str)
        + "|"
        + pd.Series(phase, dtype=object).fillna("").astype(str)
    )
    y = kern.relative_level_pct(voltage, nominal)  # step 1
    size_guess = np.bincount(group, minlength=len(groups))[group]
    big = size_guess >= config.min_group_size
    if kw is None:
        slope = np.zeros(n)
        p = np.zeros_like(y)
    else:
        p = np.asarray(kw, dtype=np.float64)
        ref_index, ref_weight = _slope_reference(y, p, tx_code, group, big, config.n_neighbours)
        slope = kern.drop_slope(y, p, ref_index, ref_weight)  # step 2
    level = kern.drop_corrected_level(y, p, slope)  # step 3
    # at most half a window's samples are required (hourly data has fewer samples per window)
    need = min(config.min_samples, max(1, level.shape[1] // (2 * config.n_windows)))
    levels = kern.window_levels(level, config.n_windows, min_samples=need)
    dev_group, size = kern.group_median_deviation(levels, group, len(groups))  # step 4
    big = size >= config.min_group_size
    # a meter whose voltage does not follow its own load (a large, stiff service) has a level that its
    # neighbours do not explain (on ieee8500 such services sit ~2% below their neighbours, and not
    # consistently among themselves): not estimable, and no one's neighbour; a meter whose load is too
    # small for its drop to matter (idle) is explained whatever its slope
    comparable = np.ones(n, dtype=bool)
    if kw is not None:
        median_slope = float(np.median(slope)) if n else 0.0
        comparable = (slope >= config.min_load_response * median_slope) | kern.negligible_drop(
            p, median_slope, config.idle_drop_share * config.threshold_pct)
    shape = np.nan_to_num(level - np.nanmean(level, axis=1, keepdims=True) if level.shape[1] else level)
    alone = np.flatnonzero(~big)  # only meters without a big enough group need neighbours
    lone = np.flatnonzero(~big & comparable)
    stiff = np.flatnonzero(~big & ~comparable)
    nb = np.full((n, max(1, min(config.n_neighbours, n))), -1, dtype=np.int64)
    if alone.size:
        nb[alone] = kern.nearest_shape_neighbours(shape, tx_code, config.n_neighbours, allowed=comparable,
                                                  queries=alone)  # step 5
    dev_nb = kern.neighbour_deviation(levels, nb)
    # a feeder whose neighbour comparison scatters (taps, regulator zones, long secondaries) gets a wider
    # flag level for the meters compared with neighbours only
    thr_nb = np.full(n, kern.neighbour_threshold(dev_nb[lone], config.threshold_pct,
                                                 config.neighbour_spread_factor,
                                                 tail_factor=config.neighbour_tail_factor))
    # meters whose voltage does not follow their own load: their level is not explained by the drop model;
    # they are compared with their neighbours as a cohort of their own, whose scatter sets their flag level
    # (tight where such meters are just lightly loaded, wide where they sit at another level, as on
    # ieee8500); too few of them for a spread: not estimable
    if stiff.size >= _MIN_COHORT:
        thr_nb[stiff] = kern.neighbour_threshold(dev_nb[stiff], config.threshold_pct,
                                                 config.neighbour_spread_factor,
                                                 tail_factor=config.neighbour_tail_factor,
                                                 min_meters=_MIN_COHORT)
        # a constant load's own drop sets such a meter's level: where enough of them carry a like load,
        # the level is taken relative to theirs, and those so matched get the flag level of their scatter
        if kw is not None and config.cohort_load_neighbours > 0:
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN row: no estimate
                mean_kw = np.nanmean(np.asarray(kw, dtype=np.float64)[stiff], axis=1)
                ref = kern.load_matched_reference(np.nanmean(dev_nb[stiff], axis=1), mean_kw,
                                                  config.cohort_load_neighbours, config.cohort_load_ratio)
            matched = stiff[np.isfinite(ref)]
            if matched.size >= _MIN_COHORT:
                dev_nb[matched] = dev_nb[matched] - ref[np.isfinite(ref)][:, None]
                thr_nb[matched] = kern.neighbour_threshold(dev_nb[matched], config.threshold_pct,
                                                           config.neighbour_spread_factor,
                                                           tail_factor=config.neighbour_tail_factor,
                                                           min_meters=_MIN_COHORT)
    else:
        dev_nb[stiff] = np.nan
    dev = np.where(big[:, None], dev_group, dev_nb)
    # the same for groups: customers along a long LV feeder of one transformer sit at different levels
    thr_group = kern.neighbour_threshold(dev_group[big], config.threshold_pct, config.neighbour_spread_factor)
    est, flagged = kern.persistent_deviation(dev, np.where(big, thr_group, thr_nb))  # step 6
    # a meter with one sibling: a transformer tap moves both, a failing PT one; the pair must differ too
    pair = np.flatnonzero(flagged & (size == 2))
    if pair.size:
        order = np.argsort(group, kind="stable")
        first = np.searchsorted(group[order], group[pair])
        mate = np.where(order[first] == pair, order[first + 1], order[first])
        _, apart = kern.persistent_deviation(levels[pair] - levels[mate], config.threshold_pct)
        flagged[pair] &= np.asarray(apart, dtype=bool)
    return est, flagged & ~big, flagged & big


def detect_pt_deviation(
    voltage: np.ndarray,
    kw: np.ndarray | None,
    meters: pd.DataFrame,
    config: PTConfig = _DEFAULT_CONFIG,
    *,
    interval_s: float = 900.0,
) -> pd.DataFrame:
    """Estimate each meter's PT deviation and flag those above ``config.threshold_pct`` persistently.

    Parameters
    ----------
    voltage : ndarray, shape (n_meters, n_time)
        Meter voltage (cleaned), NaN where missing. [V]
    kw : ndarray, shape (n_meters, n_time), optional
        Each meter's active power, NaN where missing [kW]; ``None``: no drop correction.
    meters : DataFrame, n_meters rows aligned with the arrays
        ``feeder_id``, ``transformer_id`` (the recommended one), ``phase``; optional ``nominal_v`` [V]
        (missing: the standard voltage nearest the meter's median reading).
    config : PTConfig

    Returns
    -------
    DataFrame
        Index of ``meters``; ``pt_deviation_pct``: estimated gain error of the meter's PT [%] (reported
        minus explained level; NaN where not estimable), ``reasons``: list of reason codes
        (:data:`~phaseid_hpc.contract.REASON_PT_DEVIATION`, or
        :data:`~phaseid_hpc.contract.REASON_PT_DEVIATION_NEIGHBOURS` for a meter compared with its feeder
        neighbours only).

    Notes
    -----
    Readings are first averaged to ``config.aggregate_s`` (``interval_s`` is their step): levels and load
    slopes need no finer time resolution, and the cost falls in proportion.
    """
    factor = max(1, round(config.aggregate_s / interval_s)) if interval_s > 0 else 1
    # averaged where the arrays live (NumPy, CuPy), then the (factor times smaller) means come to the host
    v = to_numpy(kern.aggregate_means(voltage, factor))
    kw = None if kw is None else to_numpy(kern.aggregate_means(kw, factor))
    n = v.shape[0]
    if len(meters) != n:
        raise ValueError(
            f"detect_pt_deviation: voltage has {n} rows, meters {len(meters)}; expected the same"
        )
    est = np.full(n, np.nan)
    by_nb = np.zeros(n, dtype=bool)
    by_group = np.zeros(n, dtype=bool)
    nominal = _nominal(
        v, meters["nominal_v"].to_numpy(dtype=np.float64) if "nominal_v" in meters else np.full(n, np.nan)
    )
    feeder = meters["feeder_id"].astype(str).to_numpy()
    tx = meters["transformer_id"].to_numpy(dtype=object)
    phase = meters["phase"].to_numpy(dtype=object)
    p = None if kw is None else np.asarray(kw, dtype=np.float64)
    if v.shape[1] >= 2:
        for f in pd.unique(feeder):
            rows = np.flatnonzero(feeder == f)
            est[rows], by_nb[rows], by_group[rows] = _one_feeder(
                v[rows], None if p is None else p[rows], nominal[rows], tx[rows], phase[rows], config
            )
    reasons = [
        [contract.REASON_PT_DEVIATION] if g else [contract.REASON_PT_DEVIATION_NEIGHBOURS] if b else []
        for g, b in zip(by_group, by_nb)
    ]
    return pd.DataFrame({"pt_deviation_pct": est, "reasons": reasons}, index=meters.index)
