"""Change points in a meter's correlation structure: per-window similarity with phase neighbourhoods.

A meter reconnected to another phase stops moving with the neighbourhood of its old phase and starts
moving with one of the new phase. The kernels here measure that per time window and find the split where
the answer changes persistently:

1. :func:`window_correlations`: correlation, in each window, of every meter's features with a template
   of its own (per phase: the summed features of its nearest meters of that phase, the meter left out);
   stacked over the phases they make the scores, shape (n_meters, n_windows, 3).
2. :func:`best_split`: the split of the windows, and the ordered pair of phases (before, after), for which
   the after-phase beats the before-phase after the split and loses to it before, both with the largest
   t statistic (the smaller of the two one-sided statistics, so one side alone never makes a change).

All functions take arrays of one namespace (NumPy, CuPy, array-api-strict) and return that namespace.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .._compat import array_namespace

__all__ = ["best_split", "window_correlations", "windowed"]


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


def window_correlations(u: Any, templates: Any, window: int) -> Any:
    """Per-window correlation of each meter with its own template row.

    Parameters
    ----------
    u : array, shape (n_meters, n_samples)
        Zero-mean features (standardised voltage differences), 0 where missing. [-]
    templates : array, shape (n_meters, n_samples)
        One template per meter (e.g. the summed features of its nearest meters of one phase), 0 where
        missing. [-]
    window : int
        Samples per window.

    Returns
    -------
    array, shape (n_meters, n_windows)
        Cosine similarity of each window of ``u`` with the same window of ``templates``; 0 where either is
        zero throughout the window.
    """
    xp = array_namespace(u, templates)
    uw, tw = windowed(u, window), windowed(templates, window)
    dot = xp.sum(uw * tw, axis=-1)
    den = xp.sqrt(xp.sum(uw * uw, axis=-1) * xp.sum(tw * tw, axis=-1))
    ok = den > 0
    return xp.where(ok, dot / xp.where(ok, den, xp.ones_like(den)), xp.zeros_like(den))


def best_split(scores: Any, min_before: int, min_after: int, min_sd: float = 0.0) -> tuple[Any, Any, Any, Any]:
    """The most significant persistent switch of the best-following phase, per meter.

    Parameters
    ----------
    scores : array, shape (n_meters, n_windows, n_phases)
        Per-window similarity with each phase (:func:`window_correlations`, one column per phase).
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
    throughout has ``d`` of one sign, so one of the two is negative. Every split is scored at once from
    running sums over the windows (float64); ties go to the first phase pair, then the earliest split.
    """
    xp = array_namespace(scores)
    n, n_w, n_p = scores.shape
    first, last = max(min_before, 1), n_w - max(min_after, 1)
    if first > last or n == 0:
        return (xp.full((n,), -1, dtype=xp.int64), xp.full((n,), -1, dtype=xp.int64),
                xp.full((n,), -1, dtype=xp.int64), xp.full((n,), -math.inf, dtype=scores.dtype))
    dof = max(n_w - 2, 1)
    ks = xp.asarray(np.arange(first, last + 1, dtype=np.float64))  # every split at once: (n_k,)
    # running sums over windows (float64): segment sums and sums of squares for every split
    x = xp.astype(scores, xp.float64)
    cs = xp.cumulative_sum(x, axis=1)  # (n, n_w, n_p)
    s_b = cs[:, first - 1 : last, :]  # windows < k, for k = first .. last
    s_a = cs[:, -1:, :] - s_b
    # the phase each segment follows best (mean score): a switch between two phases the meter does not
    # follow is noise
    top_b = xp.argmax(s_b / ks[None, :, None], axis=2)  # (n, n_k)
    top_a = xp.argmax(s_a / (n_w - ks)[None, :, None], axis=2)
    stats, ps, qs = [], [], []
    for p in range(n_p):
        for q in range(n_p):
            if p == q:
                continue
            d = x[:, :, q] - x[:, :, p]
            c1, c2 = xp.cumulative_sum(d, axis=1), xp.cumulative_sum(d * d, axis=1)
            b1, b2 = c1[:, first - 1 : last], c2[:, first - 1 : last]
            a1, a2 = c1[:, -1:] - b1, c2[:, -1:] - b2
            m_b, m_a = b1 / ks, a1 / (n_w - ks)
            ss = (b2 - b1 * m_b) + (a2 - a1 * m_a)
            sd = xp.clip(xp.sqrt(xp.clip(ss, 0.0, None) / dof), float(min_sd), None)
            sd = xp.where(sd > 0, sd, xp.full_like(sd, 1e-12))
            stat = xp.minimum(-m_b * xp.sqrt(ks) / sd, m_a * xp.sqrt(n_w - ks) / sd)
            stats.append(xp.where((top_b == p) & (top_a == q), stat, xp.full_like(stat, -math.inf)))
            ps.append(p)
            qs.append(q)
    # the first maximum in the order (p, q, split): as a loop that keeps only strictly better ones
    flat = xp.reshape(xp.stack(stats, axis=1), (n, -1))  # (n, n_pairs * n_k)
    j = xp.argmax(flat, axis=1)
    best_stat = xp.astype(xp.max(flat, axis=1), scores.dtype)
    n_k = last - first + 1
    pair, k = j // n_k, j % n_k + first
    found = best_stat > -math.inf
    none = xp.full((n,), -1, dtype=xp.int64)
    best_k = xp.where(found, xp.astype(k, xp.int64), none)
    best_p = xp.where(found, xp.take(xp.asarray(np.array(ps, dtype=np.int64)), pair), none)
    best_q = xp.where(found, xp.take(xp.asarray(np.array(qs, dtype=np.int64)), pair), none)
    return best_k, best_p, best_q, best_stat
