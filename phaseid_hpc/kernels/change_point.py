"""Change points in a meter's correlation structure: per-window similarity with phase neighbourhoods.

A meter reconnected to another phase stops moving with the neighbourhood of its old phase and starts
moving with one of the new phase. The kernels here measure that per time window and find the split where
the answer changes persistently:

1. :func:`window_zone_correlations`: correlation, in each window, of every meter's features with the
   summed features of each zone (a neighbourhood of one phase), leaving the meter itself out of its own
   zone.
2. :func:`phase_window_scores`: for each phase, the zone of that phase the meter follows best over the
   whole period, and its per-window correlations, shape (n_meters, n_windows, 3).
3. :func:`best_split`: the split of the windows, and the ordered pair of phases (before, after), for which
   the after-phase beats the before-phase after the split and loses to it before, both with the largest
   t statistic (the smaller of the two one-sided statistics, so one side alone never makes a change).

All functions take arrays of one namespace (NumPy, CuPy, array-api-strict) and return that namespace.
"""

from __future__ import annotations

import math
from typing import Any

from .._compat import array_namespace

__all__ = ["best_split", "phase_window_scores", "window_zone_correlations", "windowed"]


def windowed(x: Any, window: int) -> Any:
    """Rows of ``x`` cut into whole windows; a remainder at the end is dropped.

    Parameters
    ----------
    x : array, shape (n_rows, n_samples)
    window : int
        Samples per window.

    Returns
    -------
    array, shape (n_rows, n_windows, window)
    """
    xp = array_namespace(x)
    if window < 1:
        raise ValueError(f"window must be >= 1 sample, got {window}")
    n_w = x.shape[1] // window
    return xp.reshape(x[:, : n_w * window], (x.shape[0], n_w, window))


def window_zone_correlations(u: Any, zone: Any, n_zones: int, window: int) -> tuple[Any, Any]:
    """Per-window correlation of each meter with each zone's summed signal (the meter left out).

    Parameters
    ----------
    u : array, shape (n_meters, n_samples)
        Zero-mean features (standardised voltage differences), 0 where missing. [-]
    zone : array of int, shape (n_meters,)
        Zone of each meter, ``-1`` for none (the meter is scored but adds to no template).
    n_zones : int
        Number of zones (codes ``0 .. n_zones - 1``).
    window : int
        Samples per window.

    Returns
    -------
    corr : array, shape (n_meters, n_windows, n_zones)
        Cosine similarity of the meter's window with the zone template's window; 0 where either is zero.
    dots : array, shape (n_meters, n_windows, n_zones)
        The numerators (leave-one-out dot products), for sums over windows.

    Notes
    -----
    With ``Z_z`` the sum of the member rows of zone ``z``, the leave-one-out template of meter ``i`` in its
    own zone is ``Z_z - u_i``: its dot product with ``u_i`` is ``<u_i, Z_z> - |u_i|^2`` and its squared norm
    ``|Z_z|^2 - 2 <u_i, Z_z> + |u_i|^2``, all per window, so no template is formed per meter.
    """
    xp = array_namespace(u)
    zone = xp.asarray(zone)
    member = xp.astype(zone[:, None] == xp.arange(n_zones, dtype=zone.dtype)[None, :], u.dtype)  # (n, k)
    templates = xp.permute_dims(member, (1, 0)) @ u  # (k, T)
    uw = windowed(u, window)  # (n, W, L)
    tw = windowed(templates, window)  # (k, W, L)
    dots = xp.permute_dims(xp.permute_dims(uw, (1, 0, 2)) @ xp.permute_dims(tw, (1, 2, 0)), (1, 0, 2))  # (n, W, k)
    own = xp.sum(uw * uw, axis=-1)  # (n, W)
    tnorm = xp.permute_dims(xp.sum(tw * tw, axis=-1), (1, 0))  # (W, k)
    is_own = member[:, None, :]  # (n, 1, k)
    loo_dot = dots - is_own * own[:, :, None]
    loo_norm2 = tnorm[None, :, :] - is_own * (2.0 * dots - own[:, :, None])
    denom = xp.sqrt(xp.clip(loo_norm2, 0.0, None) * own[:, :, None])
    ok = denom > 1e-12 * (1.0 + xp.abs(loo_dot))
    corr = xp.where(ok, loo_dot / xp.where(ok, denom, xp.ones_like(denom)), xp.zeros_like(denom))
    return corr, loo_dot


def phase_window_scores(u: Any, zone: Any, zone_phase: Any, window: int) -> tuple[Any, Any]:
    """Per-window correlation of each meter with its best-following zone of each phase.

    Parameters
    ----------
    u : array, shape (n_meters, n_samples)
        Zero-mean features, 0 where missing. [-]
    zone : array of int, shape (n_meters,)
        Zone per meter (``-1``: none).
    zone_phase : array of int, shape (n_zones,)
        Phase code (0, 1, 2 for A, B, C) of each zone.
    window : int
        Samples per window.

    Returns
    -------
    scores : array, shape (n_meters, n_windows, 3)
        Correlation with the chosen zone of each phase per window; 0 where a phase has no zone.
    chosen : array of int, shape (n_meters, 3)
        The zone chosen per phase (``-1`` where the phase has none): the one whose whole-period
        correlation (sums over windows) with the meter is largest.
    """
    xp = array_namespace(u)
    zone_phase = xp.asarray(zone_phase)
    n_zones = int(zone_phase.shape[0])
    corr, dots = window_zone_correlations(u, zone, n_zones, window)
    # whole-period correlation up to a per-meter factor: sum of dots over the template's whole norm
    uw = windowed(u, window)
    zone = xp.asarray(zone)
    member = xp.astype(zone[:, None] == xp.arange(n_zones, dtype=zone.dtype)[None, :], u.dtype)
    tw = windowed(xp.permute_dims(member, (1, 0)) @ u, window)
    own = xp.sum(uw * uw, axis=(1, 2))
    tn = xp.sum(tw * tw, axis=(1, 2))
    total_dot = xp.sum(dots, axis=1)  # (n, k)
    total_norm2 = tn[None, :] - member * (2.0 * (total_dot + member * own[:, None]) - own[:, None])
    whole = total_dot / xp.sqrt(xp.clip(total_norm2, 1e-300, None))
    n = u.shape[0]
    scores, chosen = [], []
    for p in range(3):
        of_p = zone_phase == p
        if not bool(xp.any(of_p)):
            scores.append(xp.zeros((n, corr.shape[1]), dtype=u.dtype))
            chosen.append(xp.full((n,), -1, dtype=xp.int64))
            continue
        masked = xp.where(of_p[None, :], whole, xp.full_like(whole, -math.inf))
        best = xp.argmax(masked, axis=1)  # (n,)
        pick = xp.astype(best[:, None] == xp.arange(n_zones, dtype=best.dtype)[None, :], u.dtype)  # (n, k)
        scores.append(xp.sum(corr * pick[:, None, :], axis=-1))
        chosen.append(xp.astype(best, xp.int64))
    return xp.stack(scores, axis=-1), xp.stack(chosen, axis=-1)


def best_split(scores: Any, min_before: int, min_after: int, min_sd: float = 0.0) -> tuple[Any, Any, Any, Any]:
    """The most significant persistent switch of the best-following phase, per meter.

    Parameters
    ----------
    scores : array, shape (n_meters, n_windows, n_phases)
        Per-window similarity with each phase (:func:`phase_window_scores`).
    min_before, min_after : int
        Fewest windows before and after a split. [windows]
    min_sd : float
        Floor of the within-segment standard deviation of a score difference (one window's sampling error
        of a correlation, about ``1 / sqrt(window)``): a perfectly smooth series cannot make a huge
        statistic. [-]

    Returns
    -------
    split : array of int, shape (n_meters,)
        First window after the change (``-1`` when no split is possible).
    before, after : array of int, shape (n_meters,)
        Phase codes followed before and after the split.
    statistic : array, shape (n_meters,)
        ``min(t_before, t_after)``: ``t_before`` is how far (in standard errors) the before-phase beats the
        after-phase before the split, ``t_after`` the reverse after it; ``-inf`` where no split fits.

    Notes
    -----
    Only splits where ``p`` is the best-followed phase (highest mean score) before and ``q`` after count.
    For the difference ``d_w = s_w[q] - s_w[p]`` and a split at ``k``, with means ``m_b`` (windows ``< k``)
    and ``m_a`` and the pooled within-segment standard deviation ``s`` (at least ``min_sd``):
    ``t_before = -m_b sqrt(k) / s`` and ``t_after = m_a sqrt(W - k) / s``. A meter that follows one phase
    throughout has ``d`` of one sign, so one of the two is negative.
    """
    xp = array_namespace(scores)
    n, n_w, n_p = scores.shape
    best_stat = xp.full((n,), -math.inf, dtype=scores.dtype)
    best_k = xp.full((n,), -1, dtype=xp.int64)
    best_p = xp.full((n,), -1, dtype=xp.int64)
    best_q = xp.full((n,), -1, dtype=xp.int64)
    dof = max(n_w - 2, 1)
    splits = range(max(min_before, 1), n_w - max(min_after, 1) + 1)
    # the phase each segment follows best (mean score): a switch between two phases the meter does not
    # follow is noise
    top_b = {k: xp.argmax(xp.mean(scores[:, :k, :], axis=1), axis=1) for k in splits}
    top_a = {k: xp.argmax(xp.mean(scores[:, k:, :], axis=1), axis=1) for k in splits}
    for p in range(n_p):
        for q in range(n_p):
            if p == q:
                continue
            d = scores[:, :, q] - scores[:, :, p]
            for k in splits:
                b, a = d[:, :k], d[:, k:]
                m_b, m_a = xp.mean(b, axis=1), xp.mean(a, axis=1)
                ss = xp.sum((b - m_b[:, None]) ** 2, axis=1) + xp.sum((a - m_a[:, None]) ** 2, axis=1)
                sd = xp.clip(xp.sqrt(ss / dof), float(min_sd), None)
                sd = xp.where(sd > 0, sd, xp.full_like(sd, 1e-12))
                stat = xp.minimum(-m_b * math.sqrt(k) / sd, m_a * math.sqrt(n_w - k) / sd)
                stat = xp.where((top_b[k] == p) & (top_a[k] == q), stat, xp.full_like(stat, -math.inf))
                better = stat > best_stat
                best_stat = xp.where(better, stat, best_stat)
                best_k = xp.where(better, xp.full_like(best_k, k), best_k)
                best_p = xp.where(better, xp.full_like(best_p, p), best_p)
                best_q = xp.where(better, xp.full_like(best_q, q), best_q)
    return best_k, best_p, best_q, best_stat
