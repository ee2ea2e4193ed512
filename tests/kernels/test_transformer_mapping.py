"""Tests of phaseid_hpc/kernels/transformer_mapping.py on NumPy and array-api-strict.

Where a kernel is a faster or batched form of a plain computation, the plain form is written here as the
oracle (``*_reference``) and the test asserts fast == reference on random inputs.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from phaseid_hpc.kernels import transformer_grouping as tg
from phaseid_hpc.kernels import transformer_mapping as tk
from phaseid_hpc.kernels.correlation import fisher_z

from .backends import BACKENDS, to_np


def _signals(seed=0, sizes=(5, 4, 6, 1, 3, 2), t=400, noise=1.0, sub_blocks=None):
    """Unit-norm rows: each group's own random walk step plus noise; ``sub_blocks``: {group: k} makes the
    last ``k`` members of the group follow a signal of their own (a hidden transformer)."""
    rng = np.random.default_rng(seed)
    gi = np.repeat(np.arange(len(sizes)), sizes)
    own = rng.standard_normal((len(sizes), t))
    x = own[gi] + noise * rng.standard_normal((len(gi), t))
    for g, k in (sub_blocks or {}).items():
        rows = np.flatnonzero(gi == g)[-k:]
        x[rows] = rng.standard_normal(t) + noise * rng.standard_normal((k, t))
    x -= x.mean(1, keepdims=True)
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    return z.astype(np.float32), gi


# ---------------------------------------------------------------------------------------------------------
# helpers for repeated idioms
# ---------------------------------------------------------------------------------------------------------


@BACKENDS
def test_fisher_z_clips_and_keeps_nan(xp):
    r = xp.asarray([-1.0, -0.5, 0.0, 0.5, 1.0, float("nan")])
    z = to_np(fisher_z(r))
    np.testing.assert_allclose(z[1:4], np.arctanh([-0.5, 0.0, 0.5]), rtol=1e-15)
    assert z[0] == -z[4] == pytest.approx(-math.atanh(0.999999)) and np.isnan(z[5])
    assert to_np(fisher_z(r, limit=0.9))[4] == pytest.approx(math.atanh(0.9))


@BACKENDS
def test_group_sum_matches_bincount(xp):
    rng = np.random.default_rng(1)
    idx, w = rng.integers(0, 7, 50), rng.standard_normal(50)
    np.testing.assert_allclose(to_np(tk.group_sum(xp.asarray(idx), 9, xp.asarray(w))), np.bincount(idx, w, 9))
    cnt = to_np(tk.group_sum(xp.asarray(idx), 9))
    np.testing.assert_array_equal(cnt, np.bincount(idx, minlength=9))
    assert cnt.dtype.kind == "i"


@BACKENDS
def test_group_means_with_and_without_the_element(xp):
    rng = np.random.default_rng(2)
    idx = rng.integers(0, 5, 40)
    idx[idx == 3] = 2  # group 3 empty
    vals = rng.standard_normal(40)
    inc = rng.random(40) < 0.8
    vals[~inc] = np.nan
    mean, total, count = (
        to_np(a) for a in tk.group_mean(xp.asarray(vals), xp.asarray(idx), xp.asarray(inc), 5)
    )
    loo = to_np(tk.leave_one_out_group_mean(xp.asarray(vals), xp.asarray(idx), xp.asarray(inc), 5))
    for g in range(5):
        sel = inc & (idx == g)
        assert count[g] == sel.sum()
        if sel.any():
            assert mean[g] == pytest.approx(vals[sel].mean()) and total[g] == pytest.approx(vals[sel].sum())
        else:
            assert np.isnan(mean[g])
    for i in range(40):
        others = inc & (idx == idx[i]) & (np.arange(40) != i)
        if others.any():
            assert loo[i] == pytest.approx(vals[others].mean())
        else:
            assert np.isnan(loo[i])


def _group_medians_reference(values, groups, n_groups):
    """The pandas groupby median the kernel replaces."""
    return pd.Series(values).groupby(groups).median().reindex(range(n_groups)).to_numpy(dtype=float)


@BACKENDS
@pytest.mark.parametrize("seed", range(4))
def test_group_medians_equal_pandas(xp, seed):
    rng = np.random.default_rng(seed)
    n = 60
    idx = rng.integers(0, 9, n)
    vals = np.round(rng.standard_normal(n), 1)  # ties
    vals[rng.random(n) < 0.2] = np.nan
    vals[idx == 4] = np.nan  # a group with members but no value
    got = to_np(tk.group_medians(xp.asarray(vals), xp.asarray(idx), 10))
    np.testing.assert_array_equal(got, _group_medians_reference(vals, idx, 10))
    assert np.isnan(got[4]) and np.isnan(got[9])
    assert float(tk.median(xp.asarray([3.0, 1.0, 2.0, 10.0]))) == 2.5
    empty = to_np(tk.group_medians(xp.asarray([np.nan]), xp.asarray([0]), 2))
    assert np.isnan(empty).all()


@BACKENDS
def test_set_pairs_and_set_rows(xp):
    a = xp.zeros((3, 4))
    a = tk.set_pairs(a, xp.asarray([1, 0, 3]), xp.asarray([1.0, 2.0, 3.0]))
    a = tk.set_pairs(a, xp.asarray([2]), float("nan"), rows=xp.asarray([0]))
    got = to_np(a)
    np.testing.assert_array_equal(got[np.arange(3), [1, 0, 3]], [1.0, 2.0, 3.0])
    assert np.isnan(got[0, 2]) and np.nansum(got) == 6.0
    b = tk.set_rows(xp.zeros((4, 2)), np.array([3, 1]), xp.asarray([[1.0, 2.0], [3.0, 4.0]]))
    np.testing.assert_array_equal(to_np(b), [[0, 0], [3, 4], [0, 0], [1, 2]])
    c = tk.set_block(
        xp.zeros((3, 4)), np.array([2, 0]), np.array([3, 1]), xp.asarray([[1.0, 2.0], [3.0, 4.0]])
    )
    np.testing.assert_array_equal(to_np(c), [[0, 4, 0, 3], [0, 0, 0, 0], [0, 2, 0, 1]])
    d = to_np(tk.set_block(xp.zeros((2, 3)), None, np.array([1]), float("nan")))
    assert np.isnan(d[:, 1]).all() and (d[:, [0, 2]] == 0).all()


# ---------------------------------------------------------------------------------------------------------
# pools and candidates
# ---------------------------------------------------------------------------------------------------------


@BACKENDS
def test_group_pools_incremental_update_equals_a_fresh_build(xp):
    z, gi = _signals(3)
    n, n_g = len(gi), gi.max() + 1
    zx = xp.asarray(z)
    vc = xp.asarray(np.random.default_rng(0).standard_normal(z.shape).astype(np.float32))
    blocks = [(0, np.arange(n), zx)]
    w = np.ones(n)
    gmask = np.zeros(n_g, np.int64)
    inc = tk.GroupPools(zx, vc, n_g, blocks)
    inc.update(gi, w, gmask)
    moved = gi.copy()
    moved[[0, 7]] = [2, 0]
    w2 = w.copy()
    w2[3] = 0.0
    dirty = inc.update(moved, w2, gmask)
    np.testing.assert_array_equal(dirty, [0, 1, 2])  # only the groups that changed are re-summed
    fresh = tk.GroupPools(zx, vc, n_g, blocks)
    fresh.update(moved, w2, gmask)
    np.testing.assert_allclose(to_np(inc.s), to_np(fresh.s), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(inc.own, fresh.own, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(inc.pn2, fresh.pn2, rtol=1e-6)
    np.testing.assert_allclose(to_np(inc.lsum), to_np(fresh.lsum), rtol=1e-5, atol=1e-5)
    # S is z P^T with P the weighted group sums
    hot = (moved[:, None] == np.arange(n_g)) * w2[:, None]
    np.testing.assert_allclose(to_np(inc.s), z @ (hot.T @ z).T, rtol=1e-5, atol=1e-5)


@BACKENDS
def test_group_pools_phase_blocks_hold_s_on_compatible_pairs_only(xp):
    z, gi = _signals(5, sizes=(3, 3, 2, 4))
    n, n_g = len(gi), 4
    zx = xp.asarray(z)
    # meters 6, 7: unknown phase (in every block); meter 2: on B in an A group
    pmask = np.array([1, 1, 2, 2, 2, 2, 0, 0, 4, 4, 4, 4])
    gmask = np.array([1, 2, 0, 4])  # group 2: no phase (every block)
    blocks = []
    for k in range(3):
        rows = np.flatnonzero(((pmask >> k) & 1 == 1) | (pmask == 0))
        blocks.append((1 << k, rows, xp.take(zx, xp.asarray(rows), axis=0)))
    pools = tk.GroupPools(zx, None, n_g, blocks)
    pools.update(gi, np.ones(n), gmask)
    s = to_np(pools.s)
    full = z @ ((gi[:, None] == np.arange(n_g)).astype(float).T @ z).T
    compatible = ((pmask[:, None] & gmask[None, :]) != 0) | (pmask[:, None] == 0) | (gmask[None, :] == 0)
    compatible[np.arange(n), gi] = True  # the own group is always there
    np.testing.assert_allclose(s[compatible], full[compatible], rtol=1e-5, atol=1e-6)
    assert np.isnan(s[~compatible]).all() and (~compatible).any()
    np.testing.assert_allclose(pools.own, full[np.arange(n), gi], rtol=1e-5, atol=1e-6)


@BACKENDS
def test_candidates_equal_leave_one_out_group_correlations(xp):
    z, gi = _signals(4)
    n, n_g = len(gi), gi.max() + 1
    zx = xp.asarray(z)
    pools = tk.GroupPools(zx, None, n_g, [(0, np.arange(n), zx)])
    w = np.ones(n)
    pools.update(gi, w, np.zeros(n_g, np.int64))
    zz = np.ones(n)
    corr_own, _z = tk.loo_fisher_z(pools.own, pools.pn2[gi], w, zz)
    gis = (gi + 1) % n_g  # the GIS group (never a candidate) differs from the current one
    a = xp.asarray
    alt = to_np(tk.candidate_correlations(pools.s, a(pools.pn2), a(corr_own), a(gi), a(gis), a(zz)))
    ref = tg.group_correlations(z.astype(np.float64), gi, n_g)  # reference: leave-one-out by one-hot GEMM
    ref[np.arange(n), gis] = np.nan
    ref = np.where(np.isnan(ref), -np.inf, ref)
    np.testing.assert_allclose(alt, ref, atol=2e-6)
    b, cb, c2, c2v = (to_np(r) for r in tk.best_two(xp.asarray(alt.copy())))
    order = np.argsort(-ref, axis=1, kind="stable")
    np.testing.assert_array_equal(b, order[:, 0])
    np.testing.assert_array_equal(c2, order[:, 1])
    np.testing.assert_allclose(cb, ref[np.arange(n), order[:, 0]], atol=2e-6)
    np.testing.assert_allclose(c2v, ref[np.arange(n), order[:, 1]], atol=2e-6)
    # the singleton group 3 has no pool without its member: no own correlation
    assert np.isnan(corr_own[gi == 3]).all()


@BACKENDS
def test_best_two_and_candidate_masks(xp):
    alt = xp.asarray(np.array([[0.1, 0.5, 0.3], [0.2, 0.2, -1.0]], dtype=np.float32))
    s = xp.asarray(np.array([[0.2, 1.0, 0.6], [0.4, 0.4, -2.0]], dtype=np.float32))
    b, cb, c2, c2v = (to_np(a) for a in tk.best_two(alt))
    np.testing.assert_array_equal(b, [1, 0])  # ties: the first
    np.testing.assert_array_equal(c2, [2, 1])
    np.testing.assert_allclose(c2v, [0.3, 0.2], rtol=1e-6)
    assert cb.dtype == np.float64
    alt2 = tk.candidate_correlations(
        s,
        xp.asarray([4.0, 4.0, 4.0]),
        xp.asarray([0.9, 0.8]),
        xp.asarray([0, 1]),
        xp.asarray([2, 2]),
        xp.asarray([1.0, 0.0]),
        distance_penalty=xp.asarray(np.array([[0, np.nan, 0], [0, 0, 0]], dtype=np.float32)),
    )
    got = to_np(alt2)
    np.testing.assert_allclose(got[0], [0.9, -np.inf, -np.inf])  # own LOO value, too far, GIS
    assert np.isneginf(got[1]).all()  # a flat meter has no candidate


@BACKENDS
def test_group_phase_mask_majority_letters(xp):
    letters = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1], [1, 1, 0], [0, 1, 0]])
    assign = np.array([0, 0, 0, 1, 1, 2, 3])
    w = np.array([1, 1, 1, 1, 1, 1, 0.0])
    got = to_np(tk.group_phase_mask(xp.asarray(letters), xp.asarray(assign), xp.asarray(w), 5))
    # group 0: A twice, B once (>= half of 2): A|B; 1: C; 2: A and B; 3: only a weight-0 member; 4: empty
    np.testing.assert_array_equal(got, [3, 4, 3, 0, 0])


def _far_reference(lat, lon, glat, glon, d_max):
    """Haversine distance of every meter to every group centre."""
    p1, l1, p2, l2 = (np.radians(a) for a in (lat[:, None], lon[:, None], glat[None, :], glon[None, :]))
    a = np.sin((p2 - p1) / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin((l2 - l1) / 2) ** 2
    return 2 * 6_371_000.0 * np.arcsin(np.sqrt(a)) > d_max


@BACKENDS
def test_far_from_groups_equals_haversine(xp):
    rng = np.random.default_rng(5)
    gi = rng.integers(0, 6, 80)
    lat, lon = 40 + rng.uniform(0, 0.01, 80), -100 + rng.uniform(0, 0.01, 80)
    lat[3] = np.nan
    far = to_np(tk.far_from_groups(xp.asarray(lat), xp.asarray(lon), xp.asarray(gi), 6, 400.0))
    glat, glon = (_group_medians_reference(a, gi, 6) for a in (lat, lon))
    ref = _far_reference(lat, lon, glat, glon, 400.0)
    assert far.shape == (80, 6) and 0 < far.sum() < far.size
    np.testing.assert_array_equal(far[np.arange(80) != 3], ref[np.arange(80) != 3])
    assert not far[3].any()  # unknown position: never too far
    none = tk.far_from_groups(
        xp.asarray(np.full(3, np.nan)), xp.asarray(np.zeros(3)), xp.asarray([0, 0, 1]), 2, 1.0
    )
    assert none is None


@BACKENDS
def test_pair_reference(xp):
    zs = np.array([5.0, 7.0, 1.0, 2.0, 3.0, np.nan])
    assign = np.array([0, 0, 1, 1, 1, 1])
    w = np.ones(6)
    # fewer than 10 members of two-meter groups: median over every finite value
    assert tk.pair_reference(xp.asarray(zs), xp.asarray(assign), xp.asarray(w), 2) == 3.0
    zs2 = np.r_[np.arange(10.0), 100.0, 100.0, 100.0]
    assign2 = np.r_[np.repeat(np.arange(5), 2), 5, 5, 5]
    got = tk.pair_reference(xp.asarray(zs2), xp.asarray(assign2), xp.asarray(np.ones(13)), 6)
    assert got == 4.5  # the pairs only
    assert tk.pair_reference(xp.asarray([np.nan]), xp.asarray([0]), xp.asarray([1.0]), 1) == math.inf


# ---------------------------------------------------------------------------------------------------------
# move rules
# ---------------------------------------------------------------------------------------------------------

_RULES = {
    "min_corr_se": 3.0,
    "unrelated_se": 1.0,
    "ambiguity_se": 1.0,
    "flag_margin_se": 2.0,
    "weak_gis_margin_se": 1.0,
    "singleton_fit_se": 2.0,
}


@BACKENDS
def test_small_rules(xp):
    got = to_np(tk.phase_disjoint(xp.asarray([1, 1, 0, 3, 4]), xp.asarray([2, 1, 2, 1, 0])))
    np.testing.assert_array_equal(got, [True, False, False, False, False])
    np.testing.assert_allclose(to_np(tk.fisher_se(xp.asarray([106.0, 5.0]))), [0.1, 1 / math.sqrt(10)])
    got = to_np(tk.fisher_z_or(xp.asarray([0.5, -np.inf, np.nan]), -1.0))
    np.testing.assert_allclose(got, [math.atanh(0.5), -1.0, -1.0])
    ok = to_np(
        tk.level_consistent(xp.asarray([1.0, 2.0, np.nan, 3.1]), xp.asarray([1.0, 1.0, 1.0, 2.0]), 1.5)
    )
    np.testing.assert_array_equal(ok, [True, False, True, False])
    unrel = tk.unrelated_to_gis(
        xp.asarray([0.5, 0.5, 2.0, np.nan, 0.5]),
        xp.asarray([4.0, 2.0, 4.0, 4.0, np.nan]),
        xp.asarray(np.ones(5)),
        unrelated_se=1.0,
        min_corr_se=3.0,
    )
    np.testing.assert_array_equal(to_np(unrel), [True, False, False, False, False])


@BACKENDS
def test_move_candidates_rules(xp):
    inf, nan = np.inf, np.nan
    # 0: clear move; 1: fits its own group as its members do (stays); 2: runner-up too close;
    # 3: alone on its GIS group and fits the target; 4: alone, target's members fit much better;
    # 5: weak GIS (phase mismatch) with a smaller lead; 6: lone target below the pair reference; 7: no candidate
    zb = np.array([10.0, 10.0, 10.0, 8.0, 5.0, 6.0, 5.0, -inf])
    z2 = np.array([2.0, 2.0, 9.5, 1.0, 1.0, 1.0, 1.0, 0.0])
    zo = np.array([2.0, 6.0, 2.0, nan, nan, 4.5, 1.0, 2.0])
    kb = np.array([9.0, 9.0, 9.0, 9.0, 12.0, 9.0, nan, 9.0])
    kl = np.array([8.0, 6.5, 8.0, nan, nan, 8.0, 8.0, 8.0])
    mis = np.array([0, 0, 0, 0, 0, 1, 0, 0], bool)
    lone = np.array([0, 0, 0, 0, 0, 0, 1, 0], bool)
    named = {"zb": zb, "z2": z2, "zo": zo, "kappa_best": kb, "kappa_gis_loo": kl}
    a = {k: xp.asarray(v) for k, v in named.items()}
    mc = tk.move_candidates(
        **a,
        se=xp.asarray(np.ones(8)),
        phase_mismatch=xp.asarray(mis),
        lone_target=xp.asarray(lone),
        pair_reference_se=6.0,
        **_RULES,
    )
    np.testing.assert_array_equal(to_np(mc.multi), [1, 0, 0, 0, 0, 1, 0, 0])
    np.testing.assert_array_equal(to_np(mc.single), [0, 0, 0, 1, 0, 0, 0, 0])
    np.testing.assert_allclose(to_np(mc.strength), zb - np.where(np.isfinite(zo), zo, 0.0))
    # row 3 again, its target's members hardly holding together (kappa 2): the feeder's typical pair (z 13)
    # sets the bar it must clear instead; 8 is short of 13 - 2, not of 9 - 2
    a3 = {**a, "kappa_best": xp.asarray(np.where(np.arange(8) == 3, 2.0, kb))}
    args = dict(se=xp.asarray(np.ones(8)), phase_mismatch=xp.asarray(mis), lone_target=xp.asarray(lone),
                pair_reference_se=6.0, **_RULES)
    assert bool(to_np(tk.move_candidates(**a3, **args).single)[3])
    assert not bool(to_np(tk.move_candidates(**a3, **args, fit_floor_se=13.0).single)[3])
    assert bool(to_np(tk.move_candidates(**a3, **args, fit_floor_se=9.0).single)[3])


@BACKENDS
def test_apply_moves_strongest_first_without_chains(xp):
    assign = np.array([0, 1, 2, 2, 3, 4, 5])
    # 0 -> 1 and 1 -> 0 swap (only the stronger, meter 1, moves); 2 and 3 both leave group 2 (both may);
    # 4 -> 5 is blocked (5 lost meter 6, which goes to 4 ... and 4 lost nothing yet): order decides
    desired = np.array([1, 0, 6, 6, 5, 4, 4])
    strength = np.array([2.0, 3.0, 1.0, np.nan, 5.0, 0.0, 4.0])
    got = to_np(tk.apply_moves(xp.asarray(assign), xp.asarray(desired), xp.asarray(strength)))
    # order: 4 (5.0), 6 (4.0), 1 (3.0), 0 (2.0), 2 (1.0), 3 (NaN, weakest)
    # 4: 3 -> 5 moves (5 received, 3 lost); 6: 5 -> 4 blocked (5 received); 1: 1 -> 0 moves;
    # 0: 0 -> 1 blocked (0 received); 2: 2 -> 6 moves; 3: 2 -> 6 blocked (6 received)
    np.testing.assert_array_equal(got, [0, 0, 6, 2, 5, 4, 5])
    # infinite strengths rank like the largest finite ones; ties go to the lower index
    got2 = to_np(tk.apply_moves(xp.asarray([0, 1]), xp.asarray([2, 2]), xp.asarray([-np.inf, -np.inf])))
    np.testing.assert_array_equal(got2, [2, 1])


def test_partial_from_dots_equals_partial_correlations_of_vectors():
    rng = np.random.default_rng(6)
    x, t, c = rng.standard_normal((3, 20, 300))
    t += 0.5 * c
    x += 0.3 * t + 0.4 * c
    ref = tg.partial_correlations(x, t, c)  # reference: from the vectors
    dots = [np.einsum("ij,ij->i", a, b) for a, b in ((x, t), (x, c), (t, c), (x, x), (t, t), (c, c))]
    np.testing.assert_allclose(tk.partial_from_dots(*dots), ref, rtol=1e-12)
    # x collinear with c: undefined; a zero norm: undefined
    assert np.isnan(tk.partial_from_dots(1.0, 2.0, 0.5, 1.0, 1.0, 4.0))
    assert np.isnan(tk.partial_from_dots(0.0, 0.0, 0.5, 0.0, 1.0, 1.0))


@BACKENDS
def test_partial_from_dots_backends(xp):
    got = to_np(tk.partial_from_dots(xp.asarray([0.5]), xp.asarray([0.2]), xp.asarray([0.1]), 1.0, 1.0, 1.0))
    r = (0.5 - 0.2 * 0.1) / math.sqrt((1 - 0.04) * (1 - 0.01))
    assert got[0] == pytest.approx(r, rel=1e-14)


def _shares_reference(z, i, b, c, assign, w, se, min_corr_se, singleton_fit_se):
    """Plain form of ``shares_own_signal`` for one meter: explicit pools and partial correlations."""
    z = z.astype(np.float64)
    mem_b = [j for j in np.flatnonzero((assign == b) & (w > 0)) if j != i]
    mem_c = [j for j in np.flatnonzero((assign == c) & (w > 0)) if j != i]
    if not mem_b or not mem_c:
        return False
    pool_b, pool_c = z[mem_b].sum(0), z[mem_c].sum(0)
    r_i = tg.partial_correlations(z[i][None], pool_b[None], pool_c[None])[0]
    if not np.isfinite(r_i) or np.arctanh(r_i) < min_corr_se * se:
        return False
    if len(mem_b) >= 2:
        r_m = [tg.partial_correlations(z[j][None], (pool_b - z[j])[None], pool_c[None])[0] for j in mem_b]
        ref = np.mean(np.arctanh(np.array(r_m)))
        if np.arctanh(r_i) < ref - singleton_fit_se * se:
            return False
    return True


@BACKENDS
def test_shares_own_signal_equals_reference(xp):
    z, gi = _signals(7, sizes=(4, 5, 3, 1, 1, 2), noise=1.5)
    n = len(gi)
    assign = gi.copy()
    w = np.ones(n)
    w[2] = 0.0
    se = np.full(n, 1 / math.sqrt(394))
    cand = np.array([0, 5, 12, 13, 14])
    best = np.array([1, 0, 1, 2, 2, 1, 2, 0, 0, 0, 1, 0, 0, 0, 5, 0])
    runner = np.array([2, 2, 0, 0, 0, 2, 0, 1, 1, 1, 0, 1, 1, 1, 0, 1])
    got = tk.shares_own_signal(
        xp.asarray(z), cand, best, runner, assign, w, se, min_corr_se=3.0, singleton_fit_se=2.0
    )
    ref = np.zeros(n, bool)
    for i in cand:
        ref[i] = _shares_reference(z, i, best[i], runner[i], assign, w, se[i], 3.0, 2.0)
    np.testing.assert_array_equal(got, ref)
    assert not got[[0, 5, 12, 13]].all()
    assert not tk.shares_own_signal(
        xp.asarray(z), np.zeros(0, int), best, runner, assign, w, se, min_corr_se=3.0, singleton_fit_se=2.0
    ).any()


# ---------------------------------------------------------------------------------------------------------
# sub-groups split off a GIS group
# ---------------------------------------------------------------------------------------------------------


def _split_off_reference(z, gis_index, usable, n_valid, unrelated_se, min_corr_se):
    """One group at a time: Fiedler cut of the correlation graph, then the two tests."""
    z = z.astype(np.float64)
    out = np.zeros(len(gis_index), bool)
    for g in np.unique(gis_index):
        mem = np.flatnonzero((gis_index == g) & usable)
        k = len(mem)
        if k < 4:
            continue
        c = z[mem] @ z[mem].T
        se = 1.0 / math.sqrt(max(n_valid[mem].min() - 6.0, 10.0))
        aff = np.clip(np.arctanh(np.clip(c, -0.999999, 0.999999)) / se, 0.0, None)
        np.fill_diagonal(aff, 0.0)
        f = np.linalg.eigh(np.diag(aff.sum(1)) - aff)[1][:, 1]
        f = f * np.sign(f[np.argmax(np.abs(f))])
        order = np.argsort(f, kind="stable")
        gap = int(np.argmax(np.diff(f[order]))) + 1
        first, rest = order[:gap], order[gap:]
        if len(first) == len(rest):
            continue
        small, large = (first, rest) if len(first) < len(rest) else (rest, first)
        ps, pl = z[mem[small]].sum(0), z[mem[large]].sum(0)
        if np.arctanh(ps @ pl / math.sqrt(ps @ ps * (pl @ pl))) / se >= unrelated_se:
            continue

        def coherent(block, mem=mem, se=se):
            if len(block) < 2:
                return True
            zb = z[mem[block]]
            pool = zb.sum(0)
            loo = [(zj @ (pool - zj)) / np.linalg.norm(pool - zj) for zj in zb]
            return np.mean(np.arctanh(loo)) / se > min_corr_se

        if coherent(large) and coherent(small):
            out[mem[small]] = True
    return out


@BACKENDS
@pytest.mark.parametrize("seed", range(3))
def test_split_off_equals_reference_and_finds_the_hidden_block(xp, seed):
    z, gi = _signals(seed, sizes=(8, 6, 6, 3, 9, 5), noise=1.2, sub_blocks={0: 3, 4: 2, 2: 3})
    n = len(gi)
    usable = np.ones(n, bool)
    usable[24] = False  # a member of group 4 that does not count
    n_valid = np.full(n, 399.0)
    got = tk.split_off(xp.asarray(z), gi, usable, n_valid, unrelated_se=1.0, min_corr_se=3.0)
    ref = _split_off_reference(z, gi, usable, n_valid, 1.0, 3.0)
    np.testing.assert_array_equal(got, ref)
    # the hidden blocks of groups 0 (3 of 8) and 4 (2 of 9) are split off; 3 of 6 is no smaller side
    np.testing.assert_array_equal(np.flatnonzero(got), [5, 6, 7, 30, 31])


# ---------------------------------------------------------------------------------------------------------
# new groups and confidence
# ---------------------------------------------------------------------------------------------------------


@BACKENDS
def test_orphan_components(xp):
    z, _ = _signals(8, sizes=(3, 2, 1, 2), noise=0.5)
    corr = xp.asarray(z @ z.T)
    bits = np.array([1, 1, 0, 2, 2, 1, 1, 4])  # meter 2 phase unknown; group 3 (rows 6, 7) mixes A and C
    comp = tk.orphan_components(corr, xp.asarray(np.full(8, 0.05)), xp.asarray(bits), min_corr_se=3.0)
    np.testing.assert_array_equal(comp, [0, 0, 0, 1, 1, 2, 3, 4])


@BACKENDS
def test_assignment_lead_and_confidence(xp):
    nan, inf = np.nan, np.inf
    se = np.full(4, 0.1)
    d = tk.assignment_lead(
        is_new=xp.asarray([True, False, False, False]),
        moved=xp.asarray([False, True, False, False]),
        zb=xp.asarray([0.1, 1.0, 0.5, -inf]),
        z2=xp.asarray([0.0, 0.4, 0.0, 0.0]),
        zo=xp.asarray([-0.2, 0.3, 0.9, nan]),
        best=xp.asarray([0, 1, 0, 0]),
        assign=xp.asarray([0, 1, 1, 1]),
        kappa=xp.asarray([0.8, 0.6]),
        se=xp.asarray(se),
        unrelated_se=1.0,
        min_corr_se=3.0,
        singleton_fit_se=2.0,
    )
    # new: min((0.1 + 0.2) / 0.1, (0.3 - 0.1) / 0.1); moved: (1.0 - 0.4) / 0.1; own: (0.9 - 0.5) / 0.1; alone: 3
    np.testing.assert_allclose(to_np(d), [2.0, 6.0, 4.0, 3.0])
    conf = tk.lead_confidence(xp.asarray([0.0, 2.0, -2.0]))
    np.testing.assert_allclose(conf, [0.5, 0.5 * (1 + math.erf(1.0)), 0.5 * (1 - math.erf(1.0))], rtol=1e-15)


@BACKENDS
def test_final_coherence(xp):
    z, gi = _signals(9, sizes=(4, 3, 1))
    usable = np.ones(len(gi), bool)
    got = tk.final_coherence(xp.asarray(z), gi, 3, usable)
    ref = tg.group_correlations(z.astype(np.float64), gi, 3)[np.arange(len(gi)), gi]
    for g in range(2):
        assert got[g] == pytest.approx(np.tanh(np.mean(np.arctanh(ref[gi == g]))), abs=1e-6)
    assert np.isnan(got[2])


@BACKENDS
def test_anchoring_lead_sees_a_target_that_splits_along_the_meters_followed(xp):
    """Meter 0 moved to group 1 = {1, 2, 3, 4}: it moves with 1 and 2; 3 and 4 form a block of their own."""
    rng = np.random.default_rng(3)
    n_t = 2000
    a, b = rng.standard_normal(n_t), rng.standard_normal(n_t)
    x = np.stack([a, a, a, b, b]) + 0.8 * rng.standard_normal((5, n_t))
    x -= x.mean(1, keepdims=True)
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    se = np.full(5, 1 / np.sqrt(n_t - 3))
    assign = np.array([1, 1, 1, 1, 1])
    usable = np.ones(5, bool)
    kw = dict(unrelated_se=3.0, min_corr_se=6.0)
    lead = tk.anchoring_lead(xp.asarray(z), np.array([0]), assign, usable, se, **kw)
    assert lead[0] < 0
    # the same target holding together (3, 4 share the signal too): the move is borne by it
    x2 = np.stack([a, a, a, a + b, a + b]) + 0.8 * rng.standard_normal((5, n_t))
    z2 = x2 / np.linalg.norm(x2, axis=1, keepdims=True)
    assert tk.anchoring_lead(xp.asarray(z2), np.array([0]), assign, usable, se, **kw)[0] == np.inf
    lead3 = tk.anchoring_lead(xp.asarray(z2), np.array([0]), assign, usable, se, **{**kw, "min_corr_se": 20.0})
    assert lead3[0] > 0
    # two transformers of one lateral: the sides share a little (significant over a long window, but far
    # below what members of one transformer share): the ratio test holds the move
    c_ = rng.standard_normal(n_t)
    x3 = np.stack([a + 0.3 * c_, a + 0.3 * c_, a + 0.3 * c_, b + 0.3 * c_, b + 0.3 * c_])
    x3 = x3 + 0.8 * rng.standard_normal((5, n_t))
    z3 = x3 / np.linalg.norm(x3, axis=1, keepdims=True)
    assert tk.anchoring_lead(xp.asarray(z3), np.array([0]), assign, usable, se, **{**kw, "ratio": 0.0})[0] > 0
    assert tk.anchoring_lead(xp.asarray(z3), np.array([0]), assign, usable, se, **kw)[0] == 0.0
    # fewer than two other members, or an unusable rest: no test
    usable[3:] = False
    assert tk.anchoring_lead(xp.asarray(z), np.array([0]), assign, usable, se, **kw)[0] == np.inf
