"""kernels/pt_deviation.py: levels, drop slopes, group medians, shape neighbours, persistence."""

from __future__ import annotations

import numpy as np
import pytest

from phaseid_hpc.kernels.pt_deviation import (
    aggregate_means,
    drop_corrected_level,
    drop_slope,
    group_median_deviation,
    load_matched_reference,
    nearest_shape_neighbours,
    negligible_drop,
    neighbour_deviation,
    neighbour_threshold,
    persistent_deviation,
    relative_level_pct,
    unexplained_by_own_load,
    window_levels,
)

from .backends import BACKENDS, to_np


def _group_feeder(rng, n_groups=4, size=4, n_t=400):
    """Meters on transformers: common secondary level u_g(t), own drop k_i P_i, a gain error d_i [%]."""
    group = np.repeat(np.arange(n_groups), size)
    n = group.size
    upstream = np.cumsum(rng.normal(0, 0.05, n_t))
    u = upstream[None, :] + rng.normal(0, 0.3, (n_groups, 1)) + 0.05 * rng.standard_normal((n_groups, n_t))
    p = np.abs(rng.normal(2.0, 1.5, (n, n_t)))
    k = rng.uniform(0.05, 0.2, n)
    d = np.zeros(n)
    y = u[group] - k[:, None] * p + d[:, None] + 0.01 * rng.standard_normal((n, n_t))
    return y, p, k, group


def _loo(group, xp=np):
    """Leave-one-out group mean as (index, weight) arrays: every other meter of the group, equal weights."""
    w = (group[:, None] == group[None, :]).astype(float)
    np.fill_diagonal(w, 0.0)
    width = int(w.sum(axis=1).max())
    idx = np.zeros((len(group), width), dtype=np.int64)
    wt = np.zeros((len(group), width))
    for i in range(len(group)):
        nz = np.flatnonzero(w[i])
        idx[i, : nz.size] = nz
        wt[i, : nz.size] = 1.0 / nz.size
    return xp.asarray(idx), xp.asarray(wt)


@BACKENDS
def test_relative_level_is_percent_log_of_nominal(xp):
    v = np.array([[240.0, 242.4, np.nan, 0.0], [120.0, 118.8, 121.2, 120.0]])
    nom = np.array([240.0, 120.0])
    y = to_np(relative_level_pct(xp.asarray(v), xp.asarray(nom)))
    with np.errstate(divide="ignore", invalid="ignore"):
        expect = 100 * np.log(v / nom[:, None])
    expect[0, 2:] = np.nan
    np.testing.assert_allclose(y, expect, atol=1e-12)


@BACKENDS
def test_drop_slope_recovers_k_and_ignores_a_gain_error(xp):
    rng = np.random.default_rng(1)
    y, p, k, group = _group_feeder(rng)
    y[3] += 2.0  # a 2% PT gain error is a level: the slope from differences does not see it
    y[5, 10:20] = np.nan
    p[6, ::7] = np.nan
    got = to_np(drop_slope(xp.asarray(y), xp.asarray(p), *_loo(group, xp)))
    # the leave-one-out reference holds the siblings' drops: the estimate is k_i (1 + 1/(size-1)) minus
    # the mean of the others' slopes times the correlation of loads (0 here), within noise
    np.testing.assert_allclose(got, k, atol=0.01)


@BACKENDS
def test_drop_slope_without_load_variation_takes_the_median(xp):
    rng = np.random.default_rng(2)
    y, p, _, group = _group_feeder(rng)
    p[0] = 3.0  # constant load: no slope estimable
    got = to_np(drop_slope(xp.asarray(y), xp.asarray(p), *_loo(group, xp)))
    assert got[0] == pytest.approx(np.median(got[1:]), abs=1e-12)


@BACKENDS
def test_unexplained_by_own_load_keeps_what_the_meter_shares_with_the_feeder(xp):
    # dy = shared swing - k dP: the residual is the shared swing (less its own share along dP), orthogonal
    # to the meter's centred load over the samples where both are valid
    rng = np.random.default_rng(6)
    shared = rng.normal(0.0, 0.05, (3, 300))
    dp = rng.normal(0.0, 2.0, (3, 300))
    dy = shared - np.array([[0.1], [0.0], [0.3]]) * dp
    dy[0, 10:20] = np.nan
    dp[2, ::9] = np.nan
    dp[1] = np.nan  # no load at all: the residual is dy itself
    got = to_np(unexplained_by_own_load(xp.asarray(dy), xp.asarray(dp)))
    assert (got[0, 10:20] == 0.0).all()  # missing dy: 0
    np.testing.assert_allclose(got[1], dy[1], atol=1e-12)
    for i in (0, 2):
        ok = np.isfinite(dy[i]) & np.isfinite(dp[i])
        centred = dp[i, ok] - dp[i, ok].mean()
        assert abs(got[i, ok] @ centred) < 1e-9  # nothing along its own load is left
        # the shared swing is kept (up to a constant: k times the mean load step)
        kept, want = got[i, ok], shared[i, ok]
        np.testing.assert_allclose(kept - kept.mean(), want - want.mean(), atol=0.01)
        np.testing.assert_allclose(got[i, ~ok & np.isfinite(dy[i])], dy[i, ~ok & np.isfinite(dy[i])])


@BACKENDS
def test_negligible_drop_is_the_mean_load_at_the_slope(xp):
    kw = np.array([[0.01, 0.02, np.nan], [1.0, 3.0, 2.0], [-0.5, -0.5, 0.5], [np.nan] * 3])
    got = to_np(negligible_drop(xp.asarray(kw), 0.05, 0.1))
    # mean |P|: 0.015, 2.0, 0.5 kW, none; at 0.05 %/kW: 0.00075, 0.1, 0.025 %
    assert got.tolist() == [True, True, True, False]
    assert to_np(negligible_drop(xp.asarray(kw), 0.05, 0.099)).tolist() == [True, False, True, False]


@BACKENDS
def test_window_levels_show_a_gain_error_after_drop_correction(xp):
    rng = np.random.default_rng(3)
    y, p, k, _ = _group_feeder(rng, n_groups=1, size=6)
    y[2] += 1.5
    lvl = drop_corrected_level(xp.asarray(y), xp.asarray(p), xp.asarray(k))
    w = to_np(window_levels(lvl, 3, min_samples=10))
    assert w.shape == (6, 3)
    others = np.delete(w, 2, axis=0)
    np.testing.assert_allclose(w[2] - others.mean(axis=0), 1.5, atol=0.05)
    assert np.ptp(others, axis=0).max() < 0.05


@BACKENDS
def test_window_levels_need_min_samples(xp):
    lvl = np.ones((2, 10))
    lvl[1, :5] = np.nan  # first window empty, second full
    lvl[0, 5:8] = np.nan  # second window: 2 samples left, below min_samples
    w = to_np(window_levels(xp.asarray(lvl), 2, min_samples=3))
    assert w[0, 0] == 1.0 and np.isnan(w[0, 1]) and np.isnan(w[1, 0]) and w[1, 1] == 1.0


@BACKENDS
def test_group_median_deviation_matches_numpy(xp):
    rng = np.random.default_rng(4)
    group = rng.integers(0, 5, 40)
    levels = rng.normal(0, 1, (40, 2))
    levels[[3, 17], 1] = np.nan
    dev, size = group_median_deviation(xp.asarray(levels), xp.asarray(group), 6)
    dev, size = to_np(dev), to_np(size)
    for i in range(40):
        for j in range(2):
            peers = levels[group == group[i], j]
            expect = levels[i, j] - np.median(peers[np.isfinite(peers)])
            np.testing.assert_allclose(dev[i, j], expect, atol=1e-12, equal_nan=True)
        assert size[i] == np.isfinite(levels[group == group[i]]).all(axis=1).sum()


@BACKENDS
def test_one_failing_pt_in_a_group_of_three_does_not_spill_over(xp):
    levels = np.array([[0.1], [-0.1], [3.0]])
    dev, _ = group_median_deviation(xp.asarray(levels), xp.asarray(np.zeros(3, dtype=np.int64)), 1)
    np.testing.assert_allclose(to_np(dev)[:, 0], [0.0, -0.2, 2.9], atol=1e-12)


@BACKENDS
def test_nearest_shape_neighbours_match_brute_force(xp):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((15, 30))
    group = np.arange(15) // 3
    allowed = np.ones(15, dtype=bool)
    allowed[[4, 9]] = False
    idx = to_np(
        nearest_shape_neighbours(xp.asarray(x), xp.asarray(group), 4, allowed=xp.asarray(allowed), chunk=4)
    )
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(axis=2)
    d[group[:, None] == group[None, :]] = np.inf
    d[:, ~allowed] = np.inf
    np.testing.assert_array_equal(idx, np.argsort(d, axis=1, kind="stable")[:, :4])


@BACKENDS
def test_neighbours_beyond_the_candidates_are_minus_one(xp):
    x = np.arange(6.0).reshape(3, 2)
    idx = to_np(nearest_shape_neighbours(xp.asarray(x), xp.asarray(np.array([0, 0, 1])), 3))
    assert (idx[:2, 1:] == -1).all() and (idx[:2, 0] == 2).all() and (idx[2, 2] == -1)


@BACKENDS
def test_neighbour_deviation_is_the_median_difference(xp):
    levels = np.array([[2.0], [0.1], [-0.1], [0.0], [np.nan]])
    index = np.array([[1, 2, 3], [2, 3, -1], [4, -1, -1], [-1, -1, -1], [0, 1, 2]])
    dev = to_np(neighbour_deviation(xp.asarray(levels), xp.asarray(index)))[:, 0]
    np.testing.assert_allclose(dev[:2], [2.0, 0.15], atol=1e-12)
    assert np.isnan(dev[2:]).all()


@BACKENDS
def test_persistent_deviation_needs_every_window_with_one_sign(xp):
    dev = np.array([[1.2, 1.5], [1.2, 0.8], [-1.3, -1.1], [1.4, -1.4], [np.nan, 2.0]])
    est, flagged = persistent_deviation(xp.asarray(dev), 1.0)
    np.testing.assert_allclose(to_np(est)[:4], [1.35, 1.0, -1.2, 0.0])
    assert to_np(flagged).tolist() == [True, False, True, False, False]


@BACKENDS
def test_persistent_deviation_takes_one_threshold_per_meter(xp):
    dev = np.array([[1.2, 1.5], [1.2, 1.5], [-2.5, -2.2]])
    _, flagged = persistent_deviation(xp.asarray(dev), xp.asarray([1.0, 2.0, 2.0]))
    assert to_np(flagged).tolist() == [True, False, True]


@BACKENDS
def test_neighbour_threshold_widens_only_where_the_comparison_scatters(xp):
    rng = np.random.default_rng(5)
    tight = rng.normal(0.0, 0.1, (200, 2))
    tight[:2] += 3.0  # two failing PTs barely move a robust spread
    assert neighbour_threshold(xp.asarray(tight), 1.0, 4.0) == 1.0
    loose = rng.normal(0.0, 0.8, (200, 2))
    thr = neighbour_threshold(xp.asarray(loose), 1.0, 4.0)
    # the spread of a mean of two windows of sd 0.8 is 0.8 / sqrt(2); four of those
    assert 1.8 < thr < 2.8  # 4 x 0.8 / sqrt(2) = 2.26
    assert neighbour_threshold(xp.asarray(loose[:5]), 1.0, 4.0) == 1.0  # too few to judge a spread
    assert neighbour_threshold(xp.asarray(loose), 1.0, 0.0) == 1.0  # turned off
    # 40% of the transformers on a +-2.5% tap: the median absolute deviation does not see it, the tail does
    taps = rng.normal(0.0, 0.1, (200, 2))
    taps[:80] += np.where(np.arange(80) % 2, 2.5, -2.5)[:, None]
    assert neighbour_threshold(xp.asarray(taps), 1.0, 4.0) < 1.5
    assert neighbour_threshold(xp.asarray(taps), 1.0, 4.0, tail_factor=1.5) > 3.5


@BACKENDS
def test_aggregate_means_matches_a_plain_loop(xp):
    rng = np.random.default_rng(4)
    x = rng.normal(240, 2, (3, 13))
    x[0, :4] = np.nan  # a whole first block missing
    x[1, 5] = np.nan
    got = to_np(aggregate_means(xp.asarray(x), 4))
    ref = np.full((3, 3), np.nan)
    for i in range(3):
        for b in range(3):
            seg = x[i, 4 * b : 4 * b + 4]
            if np.isfinite(seg).any():
                ref[i, b] = np.nanmean(seg)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(to_np(aggregate_means(xp.asarray(x), 1)), x)



@BACKENDS
def test_aggregate_means_redoes_only_rows_with_a_gap(xp):
    # most rows complete (one summing pass), a few with NaN or inf inside (masked): each row equals the
    # masked mean of its own blocks, whatever the other rows hold
    rng = np.random.default_rng(5)
    x = rng.normal(240, 2, (6, 16))
    x[2, 3] = np.nan
    x[4, 8:12] = np.nan  # a whole block
    x[5, 1] = np.inf
    got = to_np(aggregate_means(xp.asarray(x), 4))
    for i in range(6):
        seg = x[i].reshape(4, 4)
        ok = np.isfinite(seg)
        want = np.where(ok.any(axis=1), np.where(ok, seg, 0.0).sum(axis=1) / np.maximum(ok.sum(axis=1), 1), np.nan)
        np.testing.assert_array_equal(got[i], want)
    np.testing.assert_array_equal(to_np(aggregate_means(xp.asarray(x[[0, 1, 3]]), 4)), got[[0, 1, 3]])


def test_load_matched_reference_takes_the_median_of_like_loads():
    dev = np.array([0.0, 0.1, -0.1, 0.05, -2.2, -2.0, -2.4, -2.1, 1.0, np.nan])
    kw = np.array([2.0, 2.2, 1.9, 2.5, 11.0, 12.0, 11.5, 10.5, 40.0, 11.2])
    ref = load_matched_reference(dev, kw, k=3, ratio=1.5)
    assert ref[0] == pytest.approx(np.median([0.1, -0.1, 0.05]))  # itself left out
    assert ref[4] == pytest.approx(np.median([-2.0, -2.4, -2.1]))  # the NaN row does not count
    assert np.isnan(ref[8])  # no meter of like load
    assert np.isfinite(ref[9])  # a meter without a deviation still gets a reference
    assert np.isnan(load_matched_reference(dev, kw, k=4, ratio=1.5)[4])  # three alike: too few
    assert np.isnan(load_matched_reference(dev, kw, k=0, ratio=1.5)).all()
