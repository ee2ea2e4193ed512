"""Meter PT deviation kernels: the voltage level a meter reports against the level its siblings explain.

A meter whose internal potential transformer (PT) drifts reports ``(1 + d) V`` instead of ``V``: a gain
error, the same at every sample. Meters on one transformer and phase see the same secondary voltage
``U(t)`` less their own service drop, so in percent of nominal

    y_i(t) = 100 ln(V_i(t) / V_nom,i) ~= 100 d_i + u_g(t) - k_i P_i(t),      k_i ~= 100 (R_i + X_i tan phi) / V^2

(``P_i``: the meter's own load [kW]; ``k_i`` [%/kW] the slope of its drop). The method, one function
per step:

1. :func:`relative_level_pct`: ``y = 100 ln(V / V_nom)`` [%].
2. :func:`drop_slope`: ``k_i`` from the DIFFERENCED series (free of any level offset, so of ``d``):
   least squares of ``dy_i - dy_ref,i`` on ``-dP_i`` against a reference made of the meter's siblings
   (leave-one-out mean) or, for a meter without enough siblings, the meters elsewhere most correlated
   with :func:`unexplained_by_own_load` (its differenced level less its own load's part); where the
   meter's load does not vary, the median slope of the others. :func:`negligible_drop` marks the meters
   whose load is too small for the slope to matter.
3. :func:`drop_corrected_level` and :func:`window_levels`: the drop-corrected level ``z = y + k P`` less
   the feeder's common level, averaged in ``n_windows`` consecutive windows [%].
4. :func:`group_median_deviation`: for a meter in a group of at least ``min_group_size`` meters (same
   transformer and phase), its level minus the group's median level (robust to one failing PT).
5. :func:`nearest_shape_neighbours` and :func:`neighbour_deviation`: for the others (alone, or one of a
   pair), the median of its level minus the levels of the meters whose drop-corrected voltage SHAPE is
   nearest (root mean square of the centred difference; never its own transformer's meters).
6. :func:`persistent_deviation`: the estimate is the mean over windows; it is flagged when every window's
   estimate exceeds the threshold with the same sign.

Functions of arrays only; the namespace (NumPy, CuPy, array-api-strict) is taken from the inputs. Missing
samples are NaN.

References
----------
Issue 15 of this project ("a meter whose reading deviates from the true service voltage by more than 1% has
a failing internal PT"); ANSI C12.20 accuracy classes (class 0.5: +/-0.5% of reading).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .._compat import array_namespace, to_numpy
from .neighbours import _top_k_columns, neighbour_sums

__all__ = [
    "drop_corrected_level",
    "drop_slope",
    "group_median_deviation",
    "nearest_shape_neighbours",
    "negligible_drop",
    "neighbour_deviation",
    "neighbour_threshold",
    "persistent_deviation",
    "relative_level_pct",
    "unexplained_by_own_load",
    "window_levels",
]


def _nan_row_mean(xp: Any, x: Any) -> tuple[Any, Any]:
    """Mean over axis 1 of the finite entries and their count (NaN where there is none)."""
    ok = xp.isfinite(x)
    cnt = xp.sum(xp.astype(ok, x.dtype), axis=1)
    s = xp.sum(xp.where(ok, x, xp.zeros_like(x)), axis=1)
    return xp.where(cnt > 0, s / xp.where(cnt > 0, cnt, xp.ones_like(cnt)), xp.full_like(cnt, xp.nan)), cnt


def relative_level_pct(voltage: Any, nominal_v: Any) -> Any:
    """Step 1: ``100 ln(V / V_nom)`` per sample.

    Parameters
    ----------
    voltage : array, shape (n_meters, n_time)
        Meter voltage, NaN or <= 0 where missing. [V]
    nominal_v : array, shape (n_meters,)
        Nominal voltage of each meter's service. [V]

    Returns
    -------
    array, shape (n_meters, n_time)
        Level in percent of nominal (a log, so gains add) [%]; NaN where missing.
    """
    xp = array_namespace(voltage, nominal_v)
    ok = xp.isfinite(voltage) & (voltage > 0)
    ratio = xp.where(ok, voltage, xp.ones_like(voltage)) / nominal_v[:, None]
    return xp.where(ok, 100.0 * xp.log(ratio), xp.full_like(voltage, xp.nan))


def drop_slope(y: Any, kw: Any, ref_index: Any, ref_weight: Any, *, min_kw_variation: float = 1e-3) -> Any:
    """Step 2: slope of each meter's own voltage drop with its load, from differenced series.

    Parameters
    ----------
    y : array, shape (n_meters, n_time)
        Levels from :func:`relative_level_pct` [%].
    kw : array, shape (n_meters, n_time)
        Each meter's active power, NaN where missing. [kW]
    ref_index, ref_weight : arrays, shape (n_meters, m)
        Row ``i``: the meters forming meter ``i``'s reference and their non-negative weights (0: padding;
        never ``i`` itself; weights summing to 1, or all zero for no reference).
    min_kw_variation : float
        A meter whose differenced load has a root mean square below this has no estimable slope. [kW]

    Returns
    -------
    array, shape (n_meters,)
        ``k_i`` [%/kW] with ``dy_i - sum_m w_im dy_{j_im} ~= -k_i dP_i``; where not estimable (no reference,
        no load variation), the median of the estimable slopes (0 when none is).

    Notes
    -----
    Differencing removes every constant offset, so the PT gain error (a level) does not enter the slope.
    The reference sums are one sparse product (``n_meters * m * n_time``), not a dense ``n x n`` GEMM.
    """
    xp = array_namespace(y, kw, ref_weight)
    dy = y[:, 1:] - y[:, :-1]
    dp = kw[:, 1:] - kw[:, :-1]
    ok_y = xp.isfinite(dy)
    dy0 = xp.where(ok_y, dy, xp.zeros_like(dy))
    # reference mean over the meters valid at each sample
    num = neighbour_sums(dy0, ref_index, ref_weight)
    den = neighbour_sums(xp.astype(ok_y, dy.dtype), ref_index, ref_weight)
    ref = xp.where(den > 0.5, num / xp.where(den > 0, den, xp.ones_like(den)), xp.full_like(num, xp.nan))
    e = dy - ref
    ok = xp.isfinite(e) & xp.isfinite(dp)
    e0 = xp.where(ok, e, xp.zeros_like(e))
    p0 = xp.where(ok, dp, xp.zeros_like(dp))
    spp = xp.sum(p0 * p0, axis=1)
    cnt = xp.sum(xp.astype(ok, dy.dtype), axis=1)
    good = (cnt > 0) & (spp > cnt * min_kw_variation**2) & (xp.sum(ref_weight, axis=1) > 0)
    k = xp.where(
        good, -xp.sum(e0 * p0, axis=1) / xp.where(good, spp, xp.ones_like(spp)), xp.full_like(spp, xp.nan)
    )
    kk = xp.sort(xp.where(good, k, xp.full_like(k, xp.inf)))
    n_good = int(xp.sum(xp.astype(good, xp.int64)))
    fill = 0.0 if n_good == 0 else float(0.5 * (kk[(n_good - 1) // 2] + kk[n_good // 2]))
    return xp.where(good, k, xp.full_like(k, fill))


def unexplained_by_own_load(dy: Any, dkw: Any) -> Any:
    """Step 2a: the part of each meter's differenced level that its own differenced load does not explain.

    Parameters
    ----------
    dy : array, shape (n_meters, n_time - 1)
        Differenced levels [%], NaN where missing.
    dkw : array, shape (n_meters, n_time - 1)
        The same meters' differenced active power [kW], NaN where missing.

    Returns
    -------
    array, shape (n_meters, n_time - 1)
        ``dy_i - b_i (dP_i - mean dP_i)`` with ``b_i`` the least-squares slope over the samples where both
        are finite [%]; ``dy_i`` itself where ``dP_i`` is missing (or does not vary), 0 where ``dy_i`` is
        missing.

    Notes
    -----
    What a meter without siblings shares with the feeder (upstream voltage swings) is in this residual;
    its own drop, ``-k_i dP_i``, is not. Its slope reference (:func:`drop_slope`) is picked by correlation
    with the residual, so that meters whose swings merely follow its load (a like load shape; noise, where
    its own drop dominates) are not favoured: taken as its reference they would take part of its drop
    away and bias ``k_i`` low.
    """
    xp = array_namespace(dy, dkw)
    ok = xp.isfinite(dy) & xp.isfinite(dkw)
    dp_mean, _ = _nan_row_mean(xp, xp.where(ok, dkw, xp.full_like(dkw, xp.nan)))
    dp = xp.where(ok, dkw - dp_mean[:, None], xp.zeros_like(dkw))
    dy0 = xp.where(xp.isfinite(dy), dy, xp.zeros_like(dy))
    spp = xp.sum(dp * dp, axis=1)
    b = xp.where(spp > 0, xp.sum(dy0 * dp, axis=1) / xp.where(spp > 0, spp, xp.ones_like(spp)),
                 xp.zeros_like(spp))
    return xp.where(xp.isfinite(dy), dy0 - b[:, None] * dp, xp.zeros_like(dy0))


def negligible_drop(kw: Any, slope: Any, limit_pct: float) -> Any:
    """Step 2b: meters whose mean load, at the given drop slope, drops the voltage by ``limit_pct`` at most.

    Parameters
    ----------
    kw : array, shape (n_meters, n_time)
        Active power, NaN where missing [kW].
    slope : float
        Drop slope [%/kW] (the feeder's median ``k`` from :func:`drop_slope`).
    limit_pct : float
        Largest drop counted negligible [%].

    Returns
    -------
    array of bool, shape (n_meters,)
        ``slope * mean |P_i| <= limit_pct``; False where the meter has no load sample.

    Notes
    -----
    An idle or lightly loaded meter's differenced voltage hardly moves with its load, so its own slope
    is noise and can come out near 0 or below: it then looks like a stiff service whose level the drop
    model does not explain. Its level is explained all the same: the drop it could be missing is no more
    than a few times ``slope * mean |P_i|``.
    """
    xp = array_namespace(kw)
    mean_kw, _ = _nan_row_mean(xp, xp.abs(kw))
    return xp.isfinite(mean_kw) & (slope * mean_kw <= limit_pct)


def drop_corrected_level(y: Any, kw: Any, slope: Any) -> Any:
    """Step 3a: the level with the meter's own drop added back, relative to the feeder's common level.

    Parameters
    ----------
    y : array, shape (n_meters, n_time)
        Levels [%].
    kw : array, shape (n_meters, n_time)
        Active power [kW]; NaN samples count as the meter's mean load.
    slope : array, shape (n_meters,)
        ``k`` from :func:`drop_slope` [%/kW].

    Returns
    -------
    array, shape (n_meters, n_time)
        ``z_i(t) - c(t)`` with ``z = y + k P`` and ``c`` the mean of ``z`` over the meters valid at ``t``
        [%]; NaN where ``y`` is.
    """
    xp = array_namespace(y, kw, slope)
    p_mean, _ = _nan_row_mean(xp, kw)
    p_mean = xp.where(xp.isfinite(p_mean), p_mean, xp.zeros_like(p_mean))
    p = xp.where(xp.isfinite(kw), kw, p_mean[:, None])
    z = y + slope[:, None] * p
    ok = xp.isfinite(z)
    z0 = xp.where(ok, z, xp.zeros_like(z))
    cnt = xp.sum(xp.astype(ok, z.dtype), axis=0)
    c = xp.sum(z0, axis=0) / xp.where(cnt > 0, cnt, xp.ones_like(cnt))
    return xp.where(ok, z - c[None, :], xp.full_like(z, xp.nan))


def window_levels(level: Any, n_windows: int, *, min_samples: int = 1) -> Any:
    """Step 3b: mean level in ``n_windows`` consecutive windows.

    Parameters
    ----------
    level : array, shape (n_meters, n_time)
        From :func:`drop_corrected_level` [%], NaN where missing.
    n_windows : int
        Windows of equal length (the last one takes the remainder).
    min_samples : int
        Fewest valid samples for a window's level (else NaN).

    Returns
    -------
    array, shape (n_meters, n_windows)
        [%]
    """
    xp = array_namespace(level)
    n_t = level.shape[1]
    n_w = max(int(n_windows), 1)
    w = max(n_t // n_w, 1)
    cols = []
    for j in range(n_w):
        a = min(j * w, n_t)
        b = n_t if j == n_w - 1 else min((j + 1) * w, n_t)
        m, n_ok = _nan_row_mean(xp, level[:, a:b])
        cols.append(xp.where(n_ok >= min_samples, m, xp.full_like(m, xp.nan)))
    return xp.stack(cols, axis=1)


def group_median_deviation(levels: Any, group: Any, n_groups: int) -> tuple[Any, Any]:
    """Step 4: each meter's level minus the median level of its group (itself included).

    Parameters
    ----------
    levels : array, shape (n_meters, n_windows)
        From :func:`window_levels` [%].
    group : array of int, shape (n_meters,)
        Group code (transformer and phase) in ``0 .. n_groups - 1``.
    n_groups : int

    Returns
    -------
    deviation : array, shape (n_meters, n_windows)
        ``level_i - median_{j in group(i)} level_j`` [%]; NaN where the level is NaN.
    size : array of int, shape (n_meters,)
        Meters of the group with a finite level in every window.

    Notes
    -----
    With three meters or more the median is a healthy meter's level (or the mean of two) even when one PT
    fails, so a failing PT does not spill over to its siblings.
    """
    xp = array_namespace(levels, group)
    member = group[None, :] == xp.arange(n_groups, dtype=group.dtype)[:, None]  # (G, n)
    finite_all = xp.all(xp.isfinite(levels), axis=1)
    size_g = xp.sum(xp.astype(member & finite_all[None, :], xp.int64), axis=1)
    size = xp.take(size_g, group, axis=0)
    cols = []
    inf = xp.asarray(xp.inf, dtype=levels.dtype)
    rows = xp.arange(n_groups)
    for j in range(levels.shape[1]):
        lv = levels[:, j]
        ok = member & xp.isfinite(lv)[None, :]
        s = xp.sort(xp.where(ok, lv[None, :], inf), axis=1)  # (G, n), +inf last
        nv = xp.sum(xp.astype(ok, xp.int64), axis=1)
        lo = xp.where(nv > 0, (nv - 1) // 2, xp.zeros_like(nv))
        hi = xp.where(nv > 0, nv // 2, xp.zeros_like(nv))
        n = s.shape[1]
        flat = xp.reshape(s, (-1,))
        med = 0.5 * (xp.take(flat, rows * n + lo, axis=0) + xp.take(flat, rows * n + hi, axis=0))
        med = xp.where(nv > 0, med, xp.full_like(med, xp.nan))
        cols.append(lv - xp.take(med, group, axis=0))
    return xp.stack(cols, axis=1), size


def nearest_shape_neighbours(
    shape: Any, exclude_group: Any, k: int, *, allowed: Any | None = None, queries: Any | None = None,
    chunk: int = 2048,
) -> Any:
    """Step 5a: the ``k`` meters whose (centred) series is nearest to each meter's, outside its group.

    Parameters
    ----------
    shape : array, shape (n_meters, n_time)
        Centred drop-corrected levels, 0 where missing [%].
    exclude_group : array of int, shape (n_meters,)
        Group code (the transformer); meters of the same group are never neighbours.
    k : int
        Neighbours per meter (clipped to the candidates).
    allowed : array of bool, shape (n_meters,), optional
        Meters that may be neighbours at all (e.g. those whose level is comparable).
    queries : array of int, shape (n_queries,), optional
        The meters whose neighbours are wanted (default: all); the cost is ``n_queries * n_meters``.
    chunk : int
        Rows per distance block (memory ``chunk * n_meters`` floats).

    Returns
    -------
    index : array of int, shape (n_queries, k)
        Nearest first; ``-1`` where a meter has fewer than ``k`` candidates.
    """
    xp = array_namespace(shape, exclude_group)
    n = shape.shape[0]
    k = max(1, min(int(k), n))
    sq = xp.sum(shape * shape, axis=1)
    st = xp.permute_dims(shape, (1, 0))
    q_rows = xp.arange(n) if queries is None else queries
    q_shape, q_sq, q_group = (xp.take(a, q_rows, axis=0) for a in (shape, sq, exclude_group))
    parts = []
    inf = xp.asarray(xp.inf, dtype=shape.dtype)
    for a in range(0, q_shape.shape[0], chunk):
        b = min(a + chunk, q_shape.shape[0])
        d = q_sq[a:b, None] + sq[None, :] - 2.0 * (q_shape[a:b, :] @ st)
        excluded = q_group[a:b, None] == exclude_group[None, :]
        if allowed is not None:
            excluded = excluded | ~allowed[None, :]
        d = xp.where(excluded, inf, d)
        order = _top_k_columns(xp, -d, k)  # nearest first (selection, then a sort of k)
        dist = xp.take_along_axis(d, order, axis=1)
        parts.append(xp.where(xp.isfinite(dist), order, xp.full_like(order, -1)))
    if not parts:
        return xp.zeros((0, k), dtype=xp.int64)
    return xp.concat(parts, axis=0)


def neighbour_deviation(levels: Any, index: Any) -> Any:
    """Step 5b: median over neighbours of the meter's level minus the neighbour's level.

    Parameters
    ----------
    levels : array, shape (n_meters, n_windows)
        From :func:`window_levels` [%].
    index : array of int, shape (n_meters, k)
        From :func:`nearest_shape_neighbours` (``-1``: none).

    Returns
    -------
    array, shape (n_meters, n_windows)
        [%]; NaN where the meter has no neighbour with a finite level.
    """
    xp = array_namespace(levels, index)
    n, k = index.shape
    safe = xp.reshape(xp.where(index >= 0, index, xp.zeros_like(index)), (-1,))
    inf = xp.asarray(xp.inf, dtype=levels.dtype)
    cols = []
    rows = xp.arange(n)
    for j in range(levels.shape[1]):
        lv = levels[:, j]
        nb = xp.reshape(xp.take(lv, safe, axis=0), (n, k))
        diff = lv[:, None] - nb
        ok = (index >= 0) & xp.isfinite(diff)
        s = xp.sort(xp.where(ok, diff, inf), axis=1)
        nv = xp.sum(xp.astype(ok, xp.int64), axis=1)
        lo = xp.where(nv > 0, (nv - 1) // 2, xp.zeros_like(nv))
        hi = xp.where(nv > 0, nv // 2, xp.zeros_like(nv))
        flat = xp.reshape(s, (-1,))
        med = 0.5 * (xp.take(flat, rows * k + lo, axis=0) + xp.take(flat, rows * k + hi, axis=0))
        cols.append(xp.where(nv > 0, med, xp.full_like(med, xp.nan)))
    return xp.stack(cols, axis=1)


def persistent_deviation(deviation: Any, threshold_pct: Any) -> tuple[Any, Any]:
    """Step 6: the deviation estimate and whether it exceeds the threshold in every window, same sign.

    Parameters
    ----------
    deviation : array, shape (n_meters, n_windows)
        Per-window deviation estimates [%].
    threshold_pct : float or array, shape (n_meters,)
        Flag level, one for all meters or one per meter [%].

    Returns
    -------
    estimate : array, shape (n_meters,)
        Mean over windows [%]; NaN where any window is NaN.
    flagged : array of bool, shape (n_meters,)
    """
    xp = array_namespace(deviation)
    est = xp.mean(deviation, axis=1)
    thr = xp.asarray(threshold_pct, dtype=deviation.dtype)
    thr = thr[:, None] if thr.ndim == 1 else thr
    up = xp.all(deviation > thr, axis=1)
    down = xp.all(deviation < -thr, axis=1)
    return est, (up | down) & xp.isfinite(est)


def neighbour_threshold(deviation: Any, threshold_pct: float, spread_factor: float,
                        min_meters: int = 10, tail_factor: float = 0.0) -> float:
    """Flag level of the neighbour-only comparison of one feeder: the set one, or wider where the
    comparison itself scatters [%].

    A meter without siblings is compared with the level of its nearest meters of other transformers;
    secondary drops, transformer taps and regulator zones make that comparison scatter even where every
    PT is healthy. With at least ``min_meters`` compared meters, the level is
    ``max(threshold_pct, spread_factor * s, tail_factor * q90)`` with ``s`` the robust spread (1.4826
    median absolute deviation) of their mean deviations and ``q90`` the 90th percentile of their distance
    from the median: a feeder where healthy meters scatter by 1% cannot show a 1% PT error, and one where a
    minority of transformers sit on another tap (+-2.5%: a mixture the median absolute deviation does not
    see) cannot show a 3% one. Failing PTs are rare (well under 10% of meters), so they move neither.

    Parameters
    ----------
    deviation : array, shape (n_compared, n_windows)
        Per-window deviation estimates of the meters compared with neighbours only [%].
    threshold_pct : float
        The configured flag level [%].
    spread_factor : float
        Multiple of the robust spread below which nothing is flagged [-].
    min_meters : int
        Fewest compared meters (finite estimates) for a spread [-].
    tail_factor : float
        Multiple of the 90th percentile of the distance from the median below which nothing is flagged
        (0: not used) [-].

    Returns
    -------
    float
        The flag level [%].
    """
    xp = array_namespace(deviation)
    est = xp.mean(xp.asarray(deviation, dtype=xp.float64), axis=1)
    est = est[xp.isfinite(est)]
    if est.shape[0] < min_meters or spread_factor <= 0:
        return float(threshold_pct)
    h = np.sort(np.asarray(to_numpy(est)))
    med = float(np.median(h))
    dist = np.abs(h - med)
    spread = 1.4826 * float(np.median(dist))
    return max(float(threshold_pct), spread_factor * spread, tail_factor * float(np.quantile(dist, 0.9)))


def load_matched_reference(deviation: np.ndarray, mean_kw: np.ndarray, k: int, ratio: float) -> np.ndarray:
    """Median deviation of the meters of like mean load, for each meter (itself left out) [%].

    Parameters
    ----------
    deviation : ndarray, shape (m,)
        Mean deviation of each meter from its neighbours [%].
    mean_kw : ndarray, shape (m,)
        Mean active power of each meter [kW].
    k : int
        Fewest meters of like load for a reference [-].
    ratio : float
        Largest ratio of two mean loads counted alike [-].

    Returns
    -------
    ndarray of float, shape (m,)
        NaN where fewer than ``k`` other meters (with a finite deviation) have a mean load within ``ratio``.
    """
    dev = np.asarray(deviation, dtype=np.float64)
    logp = np.log(np.maximum(np.asarray(mean_kw, dtype=np.float64), 1e-6))
    out = np.full(dev.size, np.nan)
    if k < 1:
        return out
    ok = np.isfinite(dev) & np.isfinite(logp)
    lim = math.log(ratio) + 1e-12
    for i in range(dev.size):
        alike = ok & (np.abs(logp - logp[i]) <= lim)
        alike[i] = False
        if alike.sum() >= k:
            out[i] = float(np.median(dev[alike]))
    return out


def aggregate_means(x: Any, factor: int) -> Any:
    """Means of consecutive ``factor`` samples of each row, NaN-aware (a trailing partial block dropped).

    Parameters
    ----------
    x : array, shape (n_meters, n_time)
        Readings, NaN where missing (any unit).
    factor : int
        Samples per mean; 1 (or fewer than ``2 * factor`` samples) returns ``x`` as float64.

    Returns
    -------
    array, shape (n_meters, n_time // factor), float64
        NaN where a block has no finite sample.
    """
    xp = array_namespace(x)
    x = xp.asarray(x, dtype=xp.float64)
    if factor <= 1 or x.shape[1] < 2 * factor:
        return x
    m = x.shape[1] // factor
    blocks = xp.reshape(x[:, : m * factor], (x.shape[0], m, factor))
    # one summing pass; only rows where a sum came out non-finite (a NaN or inf inside) are redone with
    # the mask (the same sums where every sample is finite)
    total = xp.sum(blocks, axis=2)
    out = total / float(factor)
    bad = ~xp.isfinite(total)
    if not bool(xp.any(bad)):
        return out
    row_bad = xp.any(bad, axis=1)
    sub = xp.take(blocks, xp.nonzero(row_bad)[0], axis=0)
    ok = xp.isfinite(sub)
    cnt = xp.sum(xp.astype(ok, xp.int64), axis=2)
    part = xp.sum(xp.where(ok, sub, 0.0), axis=2)
    part = xp.where(cnt > 0, part / xp.astype(xp.maximum(cnt, xp.ones_like(cnt)), xp.float64), xp.nan)
    # row i of the result: part[(number of redone rows before i)] where redone, else out[i]
    pos = xp.cumulative_sum(xp.astype(row_bad, xp.int64)) - 1
    redone = xp.take(part, xp.clip(pos, 0, None), axis=0)
    return xp.where(row_bad[:, None], redone, out)

