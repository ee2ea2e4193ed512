"""Neighbour graph kernels of phase identification: top-k correlated meters and label votes.

Meters on one phase of one lateral (or regulator zone, or branch) see the same voltage fluctuations, so
the meters most correlated with a meter share its phase, whatever the structure of the rest of the feeder:
a vote of their (noisy) labels needs no assumption of three global clusters. Functions of arrays only;
the namespace (NumPy, CuPy, array-api-strict) is taken from the inputs.

References
----------
Blakely & Reno, "Phase identification using co-association matrix ensemble clustering", IET Smart Grid
2020 (clusters named by the majority of the existing labels); issue 10 of this project (a vote of the GIS
labels of each meter's most correlated meters beats three global clusters on regulator and LTC feeders).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._compat import array_namespace

__all__ = [
    "clock_lag",
    "neighbour_sums",
    "neighbour_votes",
    "pooled_neighbour_correlation",
    "principal_basis",
    "top_k_neighbours",
]


def principal_basis(x: Any, rank: int, *, random_state: int = 0, power_iterations: int = 1) -> Any:
    """Orthonormal basis (n_time, rank) of the top-``rank`` right singular subspace of ``x``.

    Randomized range finder (Halko, Martinsson & Tropp 2011, algorithm 4.4) with a seeded Gaussian test
    matrix drawn on the host: a few thin GEMMs over ``x``, the same on NumPy and CuPy, deterministic for a
    given seed (scikit-learn's ``randomized_svd`` does the same on NumPy only).

    Parameters
    ----------
    x : array, shape (n_meters, n_time)
        Signals (rows) [-].
    rank : int
        Directions kept (clipped to ``min(n_meters, n_time)``).
    random_state : int
        Seed of the test matrix.
    power_iterations : int
        Subspace iterations (sharpen the spectrum's decay).
    """
    xp = array_namespace(x)
    n, t = x.shape
    ell = min(rank + 8, n, t)
    omega = xp.asarray(np.random.default_rng(random_state).standard_normal((t, ell)), dtype=x.dtype)
    xt = xp.permute_dims(x, (1, 0))
    q, _ = xp.linalg.qr(x @ omega)
    for _ in range(power_iterations):
        w, _ = xp.linalg.qr(xt @ q)
        q, _ = xp.linalg.qr(x @ w)
    small = xp.permute_dims(q, (1, 0)) @ x  # (ell, T)
    _, _, vt = xp.linalg.svd(small, full_matrices=False)
    return xp.permute_dims(vt[: min(rank, ell), :], (1, 0))


def _top_k_columns(xp: Any, s: Any, k: int) -> Any:
    """Column indices of the ``k`` largest entries of each row of ``s``, ordered by decreasing value.

    On NumPy the selection goes through column groups (:func:`_top_k_by_groups`) and gives exactly what
    :func:`_top_k_by_partition` gives, at about half its cost.
    """
    if isinstance(s, np.ndarray):
        return _top_k_by_groups(s, k)
    return _top_k_by_partition(xp, s, k)


def _top_k_by_partition(xp: Any, s: Any, k: int) -> Any:
    """:func:`_top_k_columns` by ``argpartition`` of whole rows (NumPy, CuPy), else a stable sort."""
    if hasattr(xp, "argpartition"):  # NumPy, CuPy: O(n) selection, then a sort of k entries
        idx = xp.argpartition(s, s.shape[1] - k, axis=1)[:, s.shape[1] - k :]
        vals = xp.take_along_axis(s, idx, axis=1)
        order = xp.argsort(-vals, axis=1, stable=True)
        return xp.take_along_axis(idx, order, axis=1)
    return xp.argsort(-s, axis=1, stable=True)[:, :k]


#: Columns per group in :func:`_top_k_by_groups`.
_GROUP = 8


def _top_k_by_groups(s: np.ndarray, k: int) -> np.ndarray:
    """:func:`_top_k_by_partition` on NumPy, selecting among the ``k`` best of ``n / 8`` column groups.

    Column ``j + L i`` (``i < 8``, ``L = n // 8``) belongs to group ``j``. Where the ``k``-th largest group
    maximum is strictly above the ``k + 1``-th, every column of another group is below ``k`` columns of
    these groups, so the row's ``k`` largest entries are among the ``8 (k + 1)`` columns of the ``k + 1``
    best groups (and the last ``n - 8 L`` columns, always candidates): one pass for the maxima, then
    selections over ``n / 8`` and ``8 k + 15`` entries instead of ``n``. A row where that does not hold, where any of its ``k + 1`` largest candidates
    are equal (whose order ``argpartition`` decides) or that holds a non-finite one goes to
    :func:`_top_k_by_partition`, so the result is the same on every row.
    """
    r, n = s.shape
    g = _GROUP
    L = n // g
    if r == 0 or L < 4 * (k + 1):
        return _top_k_by_partition(np, s, k)
    gmax = s[:, : g * L].reshape(r, g, L).max(axis=1)  # (r, L)
    top = np.argpartition(gmax, L - k - 1, axis=1)[:, L - k - 1 :]  # the k + 1 best groups (all candidates)
    top_max = np.take_along_axis(gmax, top, axis=1)
    two_lowest = np.partition(top_max, 1, axis=1)[:, :2]  # the (k + 1)-th and k-th best group maxima
    redo = ~(two_lowest[:, 0] < two_lowest[:, 1]) | ~np.isfinite(top_max).all(axis=1)
    cols = (top[:, None, :] + L * np.arange(g)[None, :, None]).reshape(r, g * (k + 1))
    if g * L < n:
        cols = np.concatenate([cols, np.broadcast_to(np.arange(g * L, n), (r, n - g * L))], axis=1)
    vals = np.take_along_axis(s, cols, axis=1)
    m = vals.shape[1]
    best = np.argpartition(vals, m - k - 1, axis=1)[:, m - k - 1 :]  # the k + 1 largest candidates
    best_vals = np.take_along_axis(vals, best, axis=1)
    order = np.argsort(-best_vals, axis=1, kind="stable")
    sorted_vals = np.take_along_axis(best_vals, order, axis=1)
    redo |= (sorted_vals[:, 1:] == sorted_vals[:, :-1]).any(axis=1) | ~np.isfinite(sorted_vals).all(axis=1)
    out = np.take_along_axis(cols, np.take_along_axis(best, order[:, :k], axis=1), axis=1)
    if redo.any():
        rows = np.flatnonzero(redo)
        out[rows] = _top_k_by_partition(np, s[rows], k)
    return out


def _own_group_columns(candidate_group: np.ndarray):
    """A function of the rows' group codes giving the (row, column) pairs where a candidate is of the row's
    group: the entries :func:`top_k_neighbours` masks, found through the sorted candidate groups."""
    order = np.argsort(candidate_group, kind="stable")
    sorted_group = candidate_group[order]

    def pairs(group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lo = np.searchsorted(sorted_group, group, side="left")
        count = np.searchsorted(sorted_group, group, side="right") - lo
        rows = np.repeat(np.arange(group.shape[0]), count)
        within = np.arange(rows.shape[0]) - np.repeat(np.cumsum(count) - count, count)
        return rows, order[np.repeat(lo, count) + within]

    return pairs


def top_k_neighbours(
    y: Any,
    group: Any,
    k: int,
    *,
    candidates: Any | None = None,
    candidate_group: Any | None = None,
    chunk: int = 2048,
) -> tuple[Any, Any]:
    """The ``k`` candidate rows most similar to each row, other than rows of its own group.

    Parameters
    ----------
    y : array, shape (n_meters, r)
        Unit-norm signals (e.g. denoised principal coordinates) [-]; similarity is their dot product.
    group : array of int, shape (n_meters,)
        Group code per row (e.g. GIS transformer and phase); rows of the same group are never neighbours
        (so a whole group with one wrong label cannot vouch for itself). A row is always of its own group.
    k : int
        Neighbours per row (clipped to the number of candidates).
    candidates : array, shape (n_candidates, r), optional
        Rows the neighbours are taken from (e.g. the meters of one phase); default ``y`` itself.
    candidate_group : array of int, shape (n_candidates,), optional
        Their group codes (required with ``candidates``).
    chunk : int
        Rows per similarity block: memory is ``chunk * n_candidates`` floats.

    Returns
    -------
    index : array of int, shape (n_meters, k)
        Neighbour rows (of ``candidates``), most similar first. Equal similarities are taken and ordered as
        NumPy's ``argpartition`` leaves them (:func:`_top_k_by_partition`): the same for the same input,
        not necessarily lowest row first.
    similarity : array, shape (n_meters, k)
        Their similarity [-]; ``-inf`` where a row has fewer than ``k`` candidates.
    """
    xp = array_namespace(y)
    if candidates is None:
        candidates, candidate_group = y, group
    n = y.shape[0]
    k = max(1, min(int(k), candidates.shape[0] - (1 if candidates is y else 0)))
    ct = xp.permute_dims(candidates, (1, 0))
    idx_parts, sim_parts = [], []
    neg = xp.asarray(-xp.inf, dtype=y.dtype)
    own_of = _own_group_columns(candidate_group) if isinstance(y, np.ndarray) else None
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        s = y[a:b, :] @ ct
        if own_of is not None:
            s[own_of(group[a:b])] = -np.inf  # in place, without a (rows, candidates) mask
        else:
            s = xp.where(group[a:b, None] == candidate_group[None, :], neg, s)
        idx = _top_k_columns(xp, s, k)
        idx_parts.append(idx)
        sim_parts.append(xp.take_along_axis(s, idx, axis=1))
    return xp.concat(idx_parts, axis=0), xp.concat(sim_parts, axis=0)


def neighbour_votes(index: Any, similarity: Any, labels: Any, n_labels: int) -> Any:
    """Similarity-weighted votes of the neighbours' labels.

    Parameters
    ----------
    index, similarity : arrays, shape (n_meters, k)
        From :func:`top_k_neighbours`.
    labels : array of int, shape (n_meters,)
        Label code per row in ``0 .. n_labels - 1``; negative: no label (no vote).
    n_labels : int

    Returns
    -------
    votes : array, shape (n_meters, n_labels)
        Sum over neighbours with label ``p`` of ``max(similarity, 0)`` [-].
    """
    xp = array_namespace(similarity)
    w = xp.where(similarity > 0, similarity, xp.zeros_like(similarity))
    lab = xp.take(labels, xp.reshape(index, (-1,)), axis=0)
    lab = xp.reshape(lab, index.shape)
    cols = [xp.sum(xp.where(lab == p, w, xp.zeros_like(w)), axis=1) for p in range(n_labels)]
    return xp.stack(cols, axis=1)


def neighbour_sums(candidates: Any, index: Any, weights: Any) -> Any:
    """Weighted sums of neighbour rows: ``s_i = sum_m weights_im candidates_{index_im}``, shape (n, n_time).

    Parameters
    ----------
    candidates : array, shape (n_candidates, n_time)
        Rows to sum [any unit].
    index : array of int, shape (n, k)
        Rows of ``candidates`` per output row.
    weights : array, shape (n, k)
        Their weights (0: padding) [-].

    Notes
    -----
    On NumPy one sparse-times-dense product (``scipy.sparse``, ``n * k * n_time`` multiply-adds, no
    gathered copies); elsewhere a loop over the ``k`` columns.
    """
    xp = array_namespace(candidates)
    n, k = index.shape
    if isinstance(candidates, np.ndarray):
        from scipy import sparse

        w = sparse.csr_matrix((np.asarray(weights, dtype=candidates.dtype).reshape(-1),
                               np.asarray(index).reshape(-1), np.arange(0, n * k + 1, k)),
                              shape=(n, candidates.shape[0]))
        return np.asarray(w @ candidates)
    acc = xp.zeros((n, candidates.shape[1]), dtype=candidates.dtype)
    for m in range(k):
        acc = acc + weights[:, m : m + 1] * xp.take(candidates, index[:, m], axis=0)
    return acc


def pooled_neighbour_correlation(u: Any, index: Any, weights: Any, *, candidates: Any | None = None) -> Any:
    """Correlation of each row with the weighted sum of its neighbours' rows.

    Parameters
    ----------
    u : array, shape (n_meters, n_time)
        Unit-norm, zero-mean signals [-] (the rows that are scored).
    index : array of int, shape (n_meters, k)
        Neighbours per row: rows of ``candidates`` (default: of ``u``).
    weights : array, shape (n_meters, k)
        Weight of each neighbour (0: left out) [-].
    candidates : array, shape (n_candidates, n_time), optional
        Unit signals the neighbours are taken from (default ``u``).

    Returns
    -------
    array, shape (n_meters,)
        ``u_i . s_i / |s_i|`` with ``s_i = sum_m weights_im c_{index_im}``; 0 where ``s_i = 0``.
    Its standard error under "no relation" is about ``1 / sqrt(n_time)``.

    The sums are :func:`neighbour_sums`.
    """
    xp = array_namespace(u)
    acc = neighbour_sums(u if candidates is None else candidates, index, weights)
    num = xp.vecdot(u, acc, axis=-1)
    den = xp.sqrt(xp.vecdot(acc, acc, axis=-1))
    return xp.where(den > 0, num / xp.where(den > 0, den, xp.ones_like(den)), xp.zeros_like(den))


def clock_lag(z: Any, reference: Any, max_lag: int = 2) -> tuple[Any, Any]:
    """Whole-sample lag that best aligns each row with a reference signal, and the correlations.

    Parameters
    ----------
    z : array, shape (n_meters, n_time)
        Standardised differenced signals, 0 where missing [-].
    reference : array, shape (n_time,) or (n_refs, n_time)
        The feeder's common signal (e.g. the mean of ``z`` over its meters), or several (e.g. one per
        phase: each row's norms at each lag are then computed once for all of them) [-].
    max_lag : int
        Lags ``-max_lag .. max_lag`` are tried [samples].

    Returns
    -------
    corr : array, shape (n_meters, 2 * max_lag + 1), or (n_refs, n_meters, 2 * max_lag + 1)
        Cosine of each row with the reference delayed by ``lag`` (column ``lag + max_lag``) [-]. A row
        whose clock is one interval late (it stamps the start of the interval) peaks at ``lag = +1``.
    lags : array of int, shape (2 * max_lag + 1,)
    """
    xp = array_namespace(z)
    t = z.shape[1]
    refs = reference[None, :] if reference.ndim == 1 else reference
    cols: list[list[Any]] = [[] for _ in range(refs.shape[0])]
    for lag in range(-max_lag, max_lag + 1):
        a = z[:, lag:] if lag >= 0 else z[:, : t + lag]
        aa = xp.vecdot(a, a, axis=-1)
        for j in range(refs.shape[0]):
            r = refs[j, : t - lag] if lag >= 0 else refs[j, -lag:]
            num = a @ r
            den = xp.sqrt(aa * xp.vecdot(r, r))
            cols[j].append(xp.where(den > 0, num / xp.where(den > 0, den, xp.ones_like(den)), xp.zeros_like(den)))
    corr = xp.stack([xp.stack(c, axis=1) for c in cols])
    return (corr[0, ...] if reference.ndim == 1 else corr), xp.arange(-max_lag, max_lag + 1)
