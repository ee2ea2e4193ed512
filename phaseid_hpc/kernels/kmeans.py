"""Batched Lloyd k-means with seeded k-means++ initialisation, on any array-API backend.

scikit-learn's ``KMeans`` has no array-API path, so this small implementation keeps clustering on the
device (CuPy) with the rest of the kernels. ``n_init`` restarts run together as one batch: distances
for all restarts are one batched GEMM per iteration.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._compat import array_namespace, to_numpy

__all__ = ["batched_kmeans", "kmeans_plusplus"]


def _sq_dist(xp: Any, x: Any, x_sq: Any, centers: Any) -> Any:
    """Squared distances, shape (b, n, k), for centers (b, k, d)."""
    c_sq = xp.sum(centers * centers, axis=2)  # (b, k)
    cross = xp.matmul(x[None, :, :], xp.permute_dims(centers, (0, 2, 1)))  # (b, n, k)
    return xp.clip(x_sq[None, :, None] - 2.0 * cross + c_sq[:, None, :], 0.0, None)


def kmeans_plusplus(x: Any, k: int, *, random_state: int | np.random.Generator, n_init: int = 1) -> Any:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) for ``n_init`` independent restarts.

    Parameters
    ----------
    x : array, shape (n, d)
        Points (no NaN).
    k : int
        Number of clusters.
    random_state : int or numpy.random.Generator
        The random draws are made on the host, so the result is the same on every backend.
    n_init : int
        Number of independent seedings.

    Returns
    -------
    array, shape (n_init, k, d)
        Initial centers.
    """
    xp = array_namespace(x)
    rng = np.random.default_rng(random_state)
    n = x.shape[0]
    x_sq = xp.sum(x * x, axis=1)
    out = []
    for _ in range(n_init):
        first = int(rng.integers(n))
        idx = [first]
        d2 = _sq_dist(xp, x, x_sq, x[first : first + 1, :][None, :, :])[0, :, 0]
        for _ in range(1, k):
            p = to_numpy(d2).astype(np.float64)
            total = p.sum()
            nxt = int(rng.integers(n)) if total <= 0 else int(rng.choice(n, p=p / total))
            idx.append(nxt)
            d_new = _sq_dist(xp, x, x_sq, x[nxt : nxt + 1, :][None, :, :])[0, :, 0]
            d2 = xp.minimum(d2, d_new)
        out.append(xp.stack([x[i, :] for i in idx], axis=0))
    return xp.stack(out, axis=0)


def batched_kmeans(
    x: Any,
    k: int,
    *,
    random_state: int | np.random.Generator,
    n_init: int = 8,
    init: Any | None = None,
    max_iter: int = 100,
) -> tuple[Any, Any, Any]:
    """Lloyd's k-means, all restarts in one batch; returns the best restart.

    Parameters
    ----------
    x : array, shape (n, d)
        Points (no NaN). For cosine-like clustering pass unit-norm rows.
    k : int
        Number of clusters.
    random_state : int or numpy.random.Generator
        Seed of the k-means++ restarts.
    n_init : int
        Number of k-means++ restarts.
    init : array, shape (b0, k, d), optional
        Extra starting centers (e.g. from prior labels), run in the same batch.
    max_iter : int
        Most Lloyd iterations.

    Returns
    -------
    labels : array, shape (n,), int64
        Cluster of each point, canonically ordered: clusters numbered by their smallest member index.
    centers : array, shape (k, d)
        Centers in the same order.
    inertia : float
        Sum of squared distances to the assigned centers.

    Notes
    -----
    Ties between restarts of equal inertia go to the lowest batch index (``init`` comes first), so the
    result is deterministic for a given seed.
    """
    xp = array_namespace(x)
    x = xp.asarray(x, dtype=xp.float64)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must lie in [1, n_points={n}], got {k}")
    batches = []
    if init is not None:
        batches.append(xp.asarray(init, dtype=xp.float64))
    if n_init > 0:
        batches.append(kmeans_plusplus(x, k, random_state=random_state, n_init=n_init))
    centers = xp.concat(batches, axis=0)
    x_sq = xp.sum(x * x, axis=1)
    ar = xp.arange(k)
    labels = None
    for _ in range(max_iter):
        dist = _sq_dist(xp, x, x_sq, centers)
        new = xp.argmin(dist, axis=2)  # (b, n)
        if labels is not None and bool(xp.all(new == labels)):
            break
        labels = new
        onehot = xp.astype(labels[:, :, None] == ar[None, None, :], x.dtype)  # (b, n, k)
        counts = xp.sum(onehot, axis=1)  # (b, k)
        sums = xp.matmul(xp.permute_dims(onehot, (0, 2, 1)), x[None, :, :])  # (b, k, d)
        safe = xp.where(counts > 0, counts, xp.ones_like(counts))
        centers = xp.where(counts[:, :, None] > 0, sums / safe[:, :, None], centers)
    dist = _sq_dist(xp, x, x_sq, centers)
    labels = xp.argmin(dist, axis=2)
    inertia = xp.sum(xp.min(dist, axis=2), axis=1)  # (b,)
    best = int(to_numpy(xp.argmin(inertia)))
    lab = to_numpy(labels[best, :]).astype(np.int64)
    # Canonical cluster order: by first appearance.
    order = []
    for v in lab:
        if v not in order:
            order.append(int(v))
        if len(order) == k:
            break
    order += [c for c in range(k) if c not in order]
    remap = np.empty(k, dtype=np.int64)
    remap[np.asarray(order)] = np.arange(k)
    lab = remap[lab]
    c = centers[best, ...]
    c = xp.stack([c[i, :] for i in order], axis=0)
    return xp.asarray(lab), c, float(to_numpy(inertia[best]))
