"""kernels/neighbours.py: neighbour search, votes, pooled correlation, clock lag, principal basis."""

from __future__ import annotations

import numpy as np
import pytest

from phaseid_hpc.kernels.neighbours import (
    _top_k_by_groups,
    _top_k_by_partition,
    clock_lag,
    neighbour_votes,
    pooled_neighbour_correlation,
    principal_basis,
    top_k_neighbours,
)

from .backends import BACKENDS, to_np


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@BACKENDS
@pytest.mark.parametrize("chunk", [3, 2048])
def test_top_k_matches_brute_force_and_excludes_own_group(xp, chunk):
    rng = np.random.default_rng(0)
    y = _unit(rng.standard_normal((23, 5)))
    group = np.arange(23) // 2  # pairs of rows are one group
    idx, sim = top_k_neighbours(xp.asarray(y), xp.asarray(group), 4, chunk=chunk)
    idx, sim = to_np(idx), to_np(sim)
    s = y @ y.T
    s[group[:, None] == group[None, :]] = -np.inf
    expect = np.argsort(-s, axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(idx, expect)
    np.testing.assert_allclose(sim, np.take_along_axis(s, expect, axis=1), atol=1e-12)
    assert not (group[idx] == group[:, None]).any()


@pytest.mark.parametrize("n", [100, 797, 2901])
@pytest.mark.parametrize("k", [1, 3, 11, 20])
def test_top_k_by_groups_gives_exactly_the_argpartition_selection(n, k):
    """The grouped selection returns the rows' selection by ``argpartition``, ties and non-finite included."""
    rng = np.random.default_rng(n + k)
    s = rng.standard_normal((300, n)).astype(np.float32)
    s[:40] = rng.integers(0, 4, (40, n))  # ties everywhere
    s[40:60, rng.integers(0, n, 30)] = -np.inf  # an own group masked
    s[60:70, : n - k // 2] = -np.inf  # fewer than k finite entries
    s[70, 3] = np.nan
    s[80:90, ::7] = s[80:90, 1::7][:, : s[80:90, ::7].shape[1]]  # equal pairs (pooled rows)
    expect = _top_k_by_partition(np, s, k)
    got = _top_k_by_groups(s, k)
    np.testing.assert_array_equal(got, expect)
    top = -np.sort(-s, axis=1)[:, : k + 1]
    finite = np.isfinite(s).all(axis=1) & (top[:, 1:] != top[:, :-1]).all(axis=1)
    assert finite.sum() > 150  # most rows took the grouped path
    np.testing.assert_array_equal(got[finite], np.argsort(-s[finite], axis=1, kind="stable")[:, :k])


@BACKENDS
def test_votes_are_similarity_weighted_and_ignore_unlabelled(xp):
    index = np.array([[1, 2, 3], [0, 2, 3]])
    sim = np.array([[0.9, 0.5, -0.2], [0.8, 0.1, 0.3]])
    labels = np.array([0, 1, 1, -1])
    v = to_np(neighbour_votes(xp.asarray(index), xp.asarray(sim), xp.asarray(labels), 3))
    np.testing.assert_allclose(v, [[0.0, 1.4, 0.0], [0.8, 0.1, 0.0]])


@BACKENDS
def test_pooled_correlation_high_for_related_rows_only(xp):
    rng = np.random.default_rng(1)
    common = rng.standard_normal(500)
    rel = _unit(common + 0.5 * rng.standard_normal((4, 500)))
    other = _unit(rng.standard_normal((1, 500)))
    u = np.vstack([rel, other])
    index = np.array([[1, 2], [0, 2], [0, 1], [1, 0], [0, 1]])
    c = to_np(pooled_neighbour_correlation(xp.asarray(u), xp.asarray(index), xp.asarray(np.ones((5, 2)))))
    assert (c[:4] > 0.7).all() and abs(c[4]) < 4 / np.sqrt(500)


@BACKENDS
def test_clock_lag_finds_a_late_row(xp):
    rng = np.random.default_rng(2)
    ref = rng.standard_normal(400)
    z = np.vstack([ref + 0.3 * rng.standard_normal(400), np.r_[0.0, ref[:-1]] + 0.3 * rng.standard_normal(400)])
    corr, lags = clock_lag(xp.asarray(z), xp.asarray(ref), max_lag=2)
    best = to_np(lags)[np.argmax(to_np(corr), axis=1)]
    np.testing.assert_array_equal(best, [0, 1])
    # several references at once: each one's correlations exactly as alone
    refs = np.vstack([ref, rng.standard_normal(400), np.r_[ref[1:], 0.0]])
    many, _ = clock_lag(xp.asarray(z), xp.asarray(refs), max_lag=2)
    assert to_np(many).shape == (3, 2, 5)
    for j in range(3):
        np.testing.assert_array_equal(to_np(many)[j], to_np(clock_lag(xp.asarray(z), xp.asarray(refs[j]), max_lag=2)[0]))


@BACKENDS
def test_principal_basis_spans_the_signal_subspace(xp):
    rng = np.random.default_rng(3)
    factors = rng.standard_normal((3, 200))
    x = rng.standard_normal((60, 3)) @ factors + 1e-6 * rng.standard_normal((60, 200))
    b = to_np(principal_basis(xp.asarray(x), 3, random_state=0))
    assert b.shape == (200, 3)
    np.testing.assert_allclose(b.T @ b, np.eye(3), atol=1e-10)
    resid = x - (x @ b) @ b.T
    assert np.linalg.norm(resid) / np.linalg.norm(x) < 1e-5
    np.testing.assert_array_equal(b, to_np(principal_basis(xp.asarray(x), 3, random_state=0)))
