"""Phase clustering kernels: phase templates, template scores, robust transformer pooling, confidence.

Clustering of *meters* lives here; ``phaseid_hpc.cluster`` is Dask deployment.
All inputs are ``(n_meters, n_samples)`` feature arrays (standardised, common mode removed, NaN where
missing) and integer codes; outputs stay in the input's array namespace.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .._compat import array_namespace, to_numpy
from .correlation import nan_corr_counts
from .preprocess import unit_rows

__all__ = [
    "group_pairs",
    "leave_group_out_scores",
    "margin_error_probability",
    "one_hot",
    "phase_templates",
    "pool_by_transformer",
    "template_scores",
    "within_group_gram",
]


def one_hot(codes: Any, n_classes: int, dtype: Any = None) -> Any:
    """One-hot matrix, shape (n, n_classes); negative codes give an all-zero row."""
    xp = array_namespace(codes)
    dtype = xp.float64 if dtype is None else dtype
    return xp.astype(codes[:, None] == xp.arange(n_classes)[None, :], dtype)


def phase_templates(features: Any, weights: Any) -> Any:
    """Unit-norm mean signal of each phase.

    Parameters
    ----------
    features : array, shape (n_meters, n_samples)
        NaN where missing.
    weights : array, shape (n_meters, n_phases)
        Membership weights (one-hot labels, or 0 to exclude a meter).

    Returns
    -------
    array, shape (n_phases, n_samples)
        ``normalise(W^T unit_rows(x))``: every meter counts once whatever its variance. [-]
    """
    xp = array_namespace(features, weights)
    u = unit_rows(features)
    return unit_rows(xp.permute_dims(weights, (1, 0)) @ u)


def template_scores(features: Any, templates: Any) -> tuple[Any, Any]:
    """NaN-aware correlation of each meter with each template.

    Returns
    -------
    scores : array, shape (n_meters, n_templates)
        Correlations; NaN rows become 0. [-]
    n_joint : array, shape (n_meters, n_templates)
        Samples used.
    """
    xp = array_namespace(features, templates)
    r, n = nan_corr_counts(features, templates)
    return xp.where(xp.isnan(r), xp.zeros_like(r), r), n


def pool_by_transformer(features: Any, group: Any, n_groups: int, own_best: Any) -> tuple[Any, Any, Any]:
    """Robust pooling of meters that share a (GIS) transformer.

    Parameters
    ----------
    features : array, shape (n_meters, n_samples)
        NaN where missing.
    group : array, shape (n_meters,), int
        Transformer code in ``[0, n_groups)``; ``-1`` excludes a meter from pooling.
    n_groups : int
    own_best : array, shape (n_meters,)
        Each meter's best correlation with a phase template. [-]

    Returns
    -------
    member : array, shape (n_meters,), bool
        True where the meter correlates with the leave-one-out mean of its group more than with its best
        phase template: it then shares the group's secondary and is pooled. A meter with a wrong
        transformer label on another phase resembles its true phase more than the group and stays alone.
        The leave-one-out mean excludes mates that a first pass found clearly unrelated (correlation below
        half of their best template correlation), so a wrong mate does not dilute it.
    loo_corr : array, shape (n_meters,)
        Correlation with the leave-one-out pooled signal (0 for singletons). [-]
    pooled : array, shape (n_meters, n_samples)
        For members, the unit-norm mean of all members of the group; for the others their own
        unit-norm signal (no NaN).
    """
    xp = array_namespace(features, group)
    u = unit_rows(features)
    g = one_hot(group, n_groups, u.dtype)  # (n, g)
    active = xp.ones(u.shape[0], dtype=u.dtype)
    for _ in range(2):
        # Pass 1 screens out meters clearly unrelated to their group (LOO corr below half their best
        # template corr) so that one wrong meter does not dilute the pooled signal; pass 2 decides.
        ga = g * active[:, None]
        gsum = xp.permute_dims(ga, (1, 0)) @ u  # (g, T)
        size = xp.sum(ga, axis=0)
        loo = g @ gsum - u * active[:, None]  # (n, T)
        loo_corr = xp.sum(u * unit_rows(loo), axis=1)
        in_group = (active > 0) & ((g @ size) - active >= 1)
        loo_corr = xp.where(in_group, loo_corr, xp.zeros_like(loo_corr))
        active = xp.astype(in_group & (loo_corr > 0.5 * own_best), u.dtype)
    member = in_group & (loo_corr > own_best)
    mf = xp.astype(member, u.dtype)
    msum = xp.permute_dims(g * mf[:, None], (1, 0)) @ u  # (g, T)
    pooled = unit_rows(g @ msum)
    pooled = xp.where(member[:, None], pooled, u)
    return member, loo_corr, pooled


def leave_group_out_scores(signals: Any, features: Any, weights: Any, group: Any, n_groups: int) -> Any:
    """Cosine of each signal with phase templates built *without* the meter's own transformer group.

    Parameters
    ----------
    signals : array, shape (n_meters, n_samples)
        Unit-norm signals to score (e.g. the pooled ones), no NaN.
    features : array, shape (n_meters, n_samples)
        Features the templates are built from (NaN where missing).
    weights : array, shape (n_meters, k)
        Phase membership of each meter in the templates.
    group : array, shape (n_meters,), int
        Transformer code; ``-1``: the meter is excluded alone.
    n_groups : int

    Returns
    -------
    array, shape (n_meters, k) [-]

    Notes
    -----
    A template that contains the scored meters themselves is biased towards them; on a small phase a
    whole transformer with a wrong GIS phase can pull the template its way and then match it with high
    confidence. With ``S_p`` the template sum and ``G_gp`` the sum of group ``g`` in phase ``p``, the
    score is ``x . (S_p - G_gp) / |S_p - G_gp|`` (self only for ungrouped meters), all by GEMMs.
    """
    xp = array_namespace(signals, features, weights, group)
    u = unit_rows(features)
    w = weights
    s_sum = xp.permute_dims(w, (1, 0)) @ u  # (k, T)
    g = one_hot(group, n_groups, u.dtype)  # (n, g)
    alone = xp.astype(group < 0, u.dtype)
    cols = []
    for p in range(w.shape[1]):
        gp = xp.permute_dims(g * w[:, p : p + 1], (1, 0)) @ u  # (g, T): group sums within phase p
        own = g @ gp + (alone * w[:, p])[:, None] * u  # (n, T): what the meter's group adds to S_p
        excl = s_sum[p : p + 1, :] - own
        norm = xp.sqrt(xp.sum(excl * excl, axis=1))
        dot = xp.sum(signals * excl, axis=1)
        cols.append(dot / xp.where(norm > 0, norm, xp.ones_like(norm)))
    return xp.stack(cols, axis=1)


def margin_error_probability(
    scores: Any, template_gram: Any, n_obs: Any, span_scores: Any | None = None
) -> tuple[Any, Any, Any]:
    """Best template, and the probability that noise alone made it beat the others.

    Parameters
    ----------
    scores : array, shape (n_meters, k)
        Correlations of unit-norm signals with unit-norm templates. [-]
    template_gram : array, shape (k, k)
        Correlations among the templates. [-]
    n_obs : array, shape (n_meters,)
        Effective number of independent samples behind each score.
    span_scores : array, shape (n_meters, k), optional
        Cosines of the same signals with exactly the templates of ``template_gram``, for R^2; give them
        when ``scores`` come from slightly different (e.g. leave-group-out) templates, whose scores need
        not lie in the range of the Gram matrix (after common-mode removal it is near singular).

    Returns
    -------
    best : array, shape (n_meters,), int
    p_err : array, shape (n_meters,)
        ``sum_q Phi(-z_q)`` with ``z_q = (r_best - r_q) / se_q`` (union bound). [-]
    explained : array, shape (n_meters,)
        Share of each signal's variance explained by the templates (R^2, capped at 0.99). [-]

    Notes
    -----
    For a unit signal ``x = s + e`` with white residual ``e`` of variance ``(1 - R^2)/n`` per sample,
    ``r_best - r_q = x . (t_best - t_q)`` has noise s.d. ``sqrt((1 - R^2) * 2 (1 - rho_bq) / n)``,
    where ``rho_bq`` is the correlation of the two templates.
    """
    xp = array_namespace(scores, template_gram)
    k = scores.shape[1]
    best = xp.argmax(scores, axis=1)
    r_best = xp.max(scores, axis=1)
    # R^2 of the least-squares fit of x on the templates: r^T G^+ r (G well-conditioned after common mode).
    eye = xp.eye(k, dtype=scores.dtype)
    ginv = xp.linalg.inv(template_gram + 1e-6 * eye)
    rs = scores if span_scores is None else span_scores
    r2 = xp.sum((rs @ ginv) * rs, axis=1)
    r2 = xp.clip(r2, 0.0, 0.99)
    rho_best = xp.take(template_gram, best, axis=0)  # (n, k)
    var = (1.0 - r2)[:, None] * 2.0 * xp.clip(1.0 - rho_best, 1e-6, None) / xp.clip(n_obs, 1.0, None)[:, None]
    z = (r_best[:, None] - scores) / xp.sqrt(var)
    # Phi(-z) via erfc; the best template itself is excluded.
    p = 0.5 * _erfc(xp, z / math.sqrt(2.0))
    p = xp.where(one_hot(best, k, p.dtype) > 0, xp.zeros_like(p), p)
    return best, xp.clip(xp.sum(p, axis=1), 0.0, 1.0), r2


def _erfc(xp: Any, x: Any) -> Any:
    """Complementary error function (Numerical Recipes erfcc, relative error < 1.2e-7)."""
    z = xp.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (
            -0.82215223 + t * 0.17087277))))))))
    ans = t * xp.exp(poly)
    return xp.where(x >= 0, ans, 2.0 - ans)


def group_pairs(group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All ordered pairs ``(i, j)`` of rows in the same group (``i == j`` included), on the host.

    Parameters
    ----------
    group : ndarray, shape (n_meters,), int
        Group code; ``-1`` rows belong to no group and form no pair.

    Returns
    -------
    rows, cols : ndarray, shape (n_pairs,), int64
        ``n_pairs = sum_g size_g**2``, ordered by group, then ``rows``, then ``cols`` (stable).
    """
    group = np.asarray(group, dtype=np.int64)
    member = np.flatnonzero(group >= 0)
    order = member[np.argsort(group[member], kind="stable")]
    _, start, size = np.unique(group[order], return_index=True, return_counts=True)
    per_elem_start = np.repeat(start, size)
    per_elem_size = np.repeat(size, size)
    rows = np.repeat(order, per_elem_size)
    first = np.repeat(np.cumsum(per_elem_size) - per_elem_size, per_elem_size)
    cols = order[np.repeat(per_elem_start, per_elem_size) + (np.arange(rows.size) - first)]
    return rows, cols


def within_group_gram(u: Any, group: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dot products of every pair of rows that share a group, by batched GEMMs.

    Parameters
    ----------
    u : array, shape (n_meters, n_samples)
        Signals (no NaN), e.g. unit-norm features.
    group : ndarray, shape (n_meters,), int
        Group code (host array); ``-1``: no group.

    Returns
    -------
    rows, cols : ndarray, shape (n_pairs,), int64
        The pairs of :func:`group_pairs`.
    gram : ndarray, shape (n_pairs,)
        ``u[rows] . u[cols]`` (host array).

    Notes
    -----
    Groups are bucketed by size (next power of two) and each bucket is one batched GEMM of
    zero-padded ``(n_groups_b, size_b, n_samples)`` blocks, so the cost is about one pass over ``u`` plus
    ``sum_g size_g**2 * n_samples`` multiply-adds, with no Python loop over groups.
    """
    xp = array_namespace(u)
    rows, cols = group_pairs(group)
    gram = np.zeros(rows.size)
    if rows.size == 0:
        return rows, cols, gram
    group = np.asarray(group, dtype=np.int64)
    member = np.flatnonzero(group >= 0)
    order = member[np.argsort(group[member], kind="stable")]
    codes, start, size = np.unique(group[order], return_index=True, return_counts=True)
    pos = np.empty(group.size, dtype=np.int64)  # position of each meter within its group
    pos[order] = np.arange(order.size) - np.repeat(start, size)
    slot = np.full(int(codes.max()) + 1, -1, dtype=np.int64)  # group code -> slot in its bucket
    bucket_of = np.full(int(codes.max()) + 1, -1, dtype=np.int64)
    width = 1 << np.ceil(np.log2(size)).astype(np.int64)
    pair_group = group[rows]
    for b in np.unique(width):
        sel = np.flatnonzero(width == b)
        slot[codes[sel]] = np.arange(sel.size)
        bucket_of[codes[sel]] = b
        idx = np.repeat(order[start[sel]][:, None], b, axis=1)  # pad with the group's first member
        within = np.arange(b)[None, :] < size[sel][:, None]
        idx[within] = order[(start[sel][:, None] + np.arange(b)[None, :])[within]]
        blocks = xp.reshape(xp.take(u, xp.asarray(idx.ravel()), axis=0), (sel.size, int(b), u.shape[1]))
        bg = to_numpy(xp.matmul(blocks, xp.permute_dims(blocks, (0, 2, 1))))  # (groups, b, b)
        psel = np.flatnonzero(bucket_of[pair_group] == b)
        gram[psel] = np.asarray(bg)[slot[pair_group[psel]], pos[rows[psel]], pos[cols[psel]]]
    return rows, cols, gram
