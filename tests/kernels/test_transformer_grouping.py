"""Tests of phaseid_hpc/kernels/transformer_grouping.py on NumPy and array-api-strict."""

from __future__ import annotations

import numpy as np
import pytest

from phaseid_hpc._compat import to_numpy
from phaseid_hpc.kernels import transformer_grouping as tg

array_api_strict = pytest.importorskip("array_api_strict")
BACKENDS = [pytest.param(np, id="numpy"), pytest.param(array_api_strict, id="array-api-strict")]


def _data(seed=0, n=12, t=300):
    rng = np.random.default_rng(seed)
    groups = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4, -1])[:n]
    phase = np.array([0, 0, 0, 1, 1, 2, 0, 0, 0, 0, 1, 2])[:n]
    common = rng.standard_normal((3, t)).cumsum(1)
    tx = rng.standard_normal((5, t)).cumsum(1)
    v = 240 + common[phase] + tx[np.maximum(groups, 0)] + 0.3 * rng.standard_normal((n, t))
    v[2, 10:30] = np.nan
    v[7, ::7] = np.nan
    cur = 5 + rng.standard_normal((n, t))
    cur[4, 50:60] = np.nan
    return v, cur, groups, phase


def _loo_corr_brute(z, groups, n_groups, w):
    n = z.shape[0]
    out = np.full((n, n_groups), np.nan)
    for i in range(n):
        for g in range(n_groups):
            mem = [j for j in range(n) if groups[j] == g and j != i]
            pool = sum((w[j] * z[j] for j in mem), np.zeros(z.shape[1]))
            nn = np.linalg.norm(pool)
            if nn > 1e-9 and np.linalg.norm(z[i]) > 0:
                out[i, g] = z[i] @ pool / nn
    return out


@pytest.mark.parametrize("xp", BACKENDS)
def test_membership_matrix(xp):
    h = to_numpy(tg.membership_matrix(xp.asarray([1, 0, -1, 1]), 3, xp.asarray([1.0, 2.0, 3.0, 0.5])))
    np.testing.assert_array_equal(h, [[0, 1, 0], [2, 0, 0], [0, 0, 0], [0, 0.5, 0]])


@pytest.mark.parametrize("xp", BACKENDS)
def test_differenced_signals_unit_norm_nan_aware_and_free_of_common_mode(xp):
    v, _, _, phase = _data()
    z, n_valid = tg.differenced_signals(xp.asarray(v), xp.asarray(phase), 3)
    z, n_valid = to_numpy(z), to_numpy(n_valid)
    assert z.shape == (v.shape[0], v.shape[1] - 1) and np.isfinite(z).all()
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-9)
    d = np.diff(v, axis=1)
    np.testing.assert_array_equal(n_valid, np.isfinite(d).sum(1))
    assert (z[~np.isfinite(d)] == 0).all()
    # each phase's common mode (mean of the first-pass unit rows) is projected out of every meter
    x = np.where(np.isfinite(d), d - np.nanmean(d, 1, keepdims=True), 0)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    for p in range(3):
        m = x[phase == p].mean(0)
        mask_ok = np.isfinite(d)
        # zero where every sample is valid; near zero otherwise (missing samples re-zeroed)
        full = mask_ok.all(1)
        np.testing.assert_allclose(z[full] @ m, 0.0, atol=1e-7)


@pytest.mark.parametrize("xp", BACKENDS)
def test_group_correlations_match_leave_one_out_brute_force(xp):
    v, _, groups, phase = _data()
    z, _ = tg.differenced_signals(xp.asarray(v), xp.asarray(phase), 3)
    w = np.array([1, 1, 0, 1, 1, 1, 1, 0.5, 1, 1, 1, 1.0])
    c = to_numpy(tg.group_correlations(z, xp.asarray(groups), 5, xp.asarray(w)))
    brute = _loo_corr_brute(to_numpy(z), groups, 5, w)
    np.testing.assert_allclose(c, brute, atol=1e-9, equal_nan=True)
    # meter 5 is alone on group 2: no pool without it
    assert np.isnan(c[5, 2]) and np.isfinite(c[5, 0])
    # same-group meters move together far more than with other groups (with only two groups on a phase the
    # common-mode removal makes them anti-correlated: the small-feeder limit of the method)
    assert c[0, 0] > 0.5 and c[6, 3] > 0.5 and c[0, 3] < c[0, 0] - 0.5


@pytest.mark.parametrize("xp", BACKENDS)
def test_group_correlations_allowed_mask_and_pool(xp):
    v, _, groups, phase = _data()
    z, _ = tg.differenced_signals(xp.asarray(v), xp.asarray(phase), 3)
    allowed = np.ones((12, 5), bool)
    allowed[:, 4] = False
    c = to_numpy(tg.group_correlations(z, xp.asarray(groups), 5, allowed=xp.asarray(allowed)))
    assert np.isnan(c[:, 4]).all()
    p = to_numpy(tg.pool_by_transformer(z, xp.asarray(groups), 5))
    zn = to_numpy(z)
    np.testing.assert_allclose(p[:, 3], zn[6:10].sum(0), atol=1e-12)


def test_group_correlations_float32_close_to_float64():
    v, _, groups, phase = _data()
    z, _ = tg.differenced_signals(v, phase, 3)
    c64 = tg.group_correlations(z, groups, 5)
    c32 = tg.group_correlations(z.astype(np.float32), groups, 5)
    assert c32.dtype == np.float32
    np.testing.assert_allclose(c32, c64, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("xp", BACKENDS)
@pytest.mark.parametrize("with_current", [True, False])
def test_level_consistency_matches_least_squares(xp, with_current):
    v, cur, groups, _ = _data()
    w = np.array([1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1.0])
    rms, slope = tg.level_consistency(
        xp.asarray(v), xp.asarray(cur) if with_current else None, xp.asarray(groups), 5, xp.asarray(w)
    )
    rms, slope = to_numpy(rms), to_numpy(slope)
    vf = np.where(np.isnan(v), np.nanmean(v, 1, keepdims=True), v)
    cf = np.where(np.isnan(cur), np.nanmean(cur, 1, keepdims=True), cur)
    t = v.shape[1]
    for i, g in [(0, 0), (0, 3), (6, 3), (10, 0), (11, 3)]:
        mem = [j for j in range(12) if groups[j] == g and j != i and w[j] > 0]
        y = vf[i] - vf[mem].mean(0)
        x = np.c_[np.ones(t), cf[i]] if with_current else np.ones((t, 1))
        coef, *_ = np.linalg.lstsq(x, y, rcond=None)
        res = y - x @ coef
        np.testing.assert_allclose(rms[i, g], np.sqrt(np.mean(res**2)), rtol=1e-7)
        if with_current:
            np.testing.assert_allclose(slope[i, g], coef[1], rtol=1e-6, atol=1e-9)
    # group 1 without meter 3 has only meter 4, whose weight is 0: no reference level
    assert np.isnan(rms[3, 1]) and np.isnan(rms[5, 2])


@pytest.mark.parametrize("xp", BACKENDS)
def test_pairwise_correlations(xp):
    v, _, _, phase = _data()
    z, _ = tg.differenced_signals(xp.asarray(v), xp.asarray(phase), 3)
    c = to_numpy(tg.pairwise_correlations(z))
    np.testing.assert_allclose(c, c.T, atol=1e-12)
    np.testing.assert_allclose(np.diag(c), 1.0)


def test_flat_meter_gives_zero_signal_not_nan():
    v, _, groups, phase = _data()
    v[3] = 240.0
    z, _ = tg.differenced_signals(v, phase, 3)
    assert (z[3] == 0).all()
    c = tg.group_correlations(z, groups, 5)
    assert np.isnan(c[3]).all() and np.isfinite(c[4, 0])


@pytest.mark.parametrize("xp", BACKENDS)
def test_partial_correlations_remove_the_shared_lateral(xp):
    rng = np.random.default_rng(3)
    lateral, own = rng.standard_normal((2, 2000))
    member = lateral + own + 0.5 * rng.standard_normal(2000)  # shares the transformer's own signal
    neighbour = lateral + 0.5 * rng.standard_normal(2000)  # shares only the lateral
    target = lateral + own
    control = lateral + 0.3 * rng.standard_normal(2000)
    x = np.stack([member, neighbour])
    r = to_numpy(
        tg.partial_correlations(
            xp.asarray(x), xp.asarray(np.stack([target] * 2)), xp.asarray(np.stack([control] * 2))
        )
    )
    assert r[0] > 0.5 and abs(r[1]) < 0.15
    # against an unrelated control it is the plain correlation
    r0 = to_numpy(
        tg.partial_correlations(
            xp.asarray(x[:1]), xp.asarray(target[None]), xp.asarray(rng.standard_normal((1, 2000)))
        )
    )
    assert abs(r0[0] - np.corrcoef(member, target)[0, 1]) < 0.05


@pytest.mark.parametrize("xp", BACKENDS)
def test_differenced_signals_row_blocks_and_float32(xp):
    v, _, _, phase = _data()
    w = np.linspace(0.5, 1.5, len(phase))
    z64, n64 = tg.differenced_signals(
        xp.asarray(v), xp.asarray(phase), 3, weights=xp.asarray(w), block_rows=None
    )
    zb, nb = tg.differenced_signals(xp.asarray(v), xp.asarray(phase), 3, weights=xp.asarray(w), block_rows=5)
    np.testing.assert_array_equal(to_numpy(nb), to_numpy(n64))
    np.testing.assert_allclose(to_numpy(zb), to_numpy(z64), atol=1e-12)
    z32, n32 = tg.differenced_signals(
        xp.asarray(v), xp.asarray(phase), 3, weights=xp.asarray(w), dtype=xp.float32, block_rows=5
    )
    assert z32.dtype == xp.float32
    np.testing.assert_array_equal(to_numpy(n32), to_numpy(n64))
    # float32 differences of ~240 V readings: good to ~1e-5 of a unit-norm row
    np.testing.assert_allclose(to_numpy(z32), to_numpy(z64), atol=2e-5)


@pytest.mark.parametrize("xp", BACKENDS)
def test_group_sums_chunked_and_by_column_match_the_one_hot_gemm(xp):
    v, _, groups, phase = _data()
    z, _ = tg.differenced_signals(xp.asarray(v), xp.asarray(phase), 3)
    w = np.array([1, 1, 0, 1, 1, 1, 1, 0.5, 1, 1, 1, 1.0])
    full = to_numpy(tg.pool_by_transformer(z, xp.asarray(groups), 5, xp.asarray(w))).T  # (g, T)
    np.testing.assert_allclose(
        to_numpy(tg.group_sums(z, xp.asarray(groups), 5, xp.asarray(w), chunk=2)), full, atol=1e-12
    )
    cols = np.array([1, 3, 4])
    part = to_numpy(tg.group_sums(z, xp.asarray(groups), 5, xp.asarray(w), columns=xp.asarray(cols)))
    np.testing.assert_allclose(part, full[cols], atol=1e-12)
    # a group without members sums to 0; meter 11 (group -1) enters no sum
    assert (to_numpy(tg.group_sums(z, xp.asarray(groups), 6, columns=xp.asarray([5]))) == 0).all()


@pytest.mark.parametrize("xp", BACKENDS)
def test_pair_dots_and_loo_correlations_match_group_correlations(xp):
    v, _, groups, phase = _data()
    z, _ = tg.differenced_signals(xp.asarray(v), xp.asarray(phase), 3)
    w = np.array([1, 1, 0, 1, 1, 1, 1, 0.5, 1, 1, 1, 1.0])
    ref = to_numpy(tg.group_correlations(z, xp.asarray(groups), 5, xp.asarray(w)))
    sums = tg.group_sums(z, xp.asarray(groups), 5, xp.asarray(w))
    pn2 = to_numpy(xp.vecdot(sums, sums, axis=-1))
    zz = to_numpy(xp.vecdot(z, z, axis=-1))
    rows = np.array([0, 0, 3, 5, 6, 7, 10, 11])
    cols = np.array([0, 3, 1, 2, 3, 3, 0, 4])
    dots = to_numpy(tg.pair_dots(z, sums, xp.asarray(rows), xp.asarray(cols), block=3))
    np.testing.assert_allclose(dots, (to_numpy(z) @ to_numpy(sums).T)[rows, cols], atol=1e-12)
    corr = to_numpy(
        tg.loo_correlations(
            xp.asarray(dots),
            xp.asarray(pn2[cols]),
            xp.asarray(groups[rows] == cols),
            xp.asarray(w[rows]),
            xp.asarray(zz[rows]),
        )
    )
    np.testing.assert_allclose(corr, ref[rows, cols], atol=1e-12, equal_nan=True)
    assert np.isnan(corr[3])  # meter 5 alone on group 2


@pytest.mark.parametrize("xp", BACKENDS)
@pytest.mark.parametrize("with_current", [True, False])
def test_level_pairs_match_level_consistency(xp, with_current):
    v, cur, groups, _ = _data()
    w = np.array([1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1.0])
    kw = cur * v / 1000.0  # so that 1000 kW / V is the current proxy
    rms, _ = tg.level_consistency(
        xp.asarray(v),
        xp.asarray(kw * 1000.0 / v) if with_current else None,
        xp.asarray(groups),
        5,
        xp.asarray(w),
    )
    vc, ic, stats = tg.level_signals(
        xp.asarray(v), xp.asarray(kw) if with_current else None, x_over_r=0.0, block_rows=5
    )
    lsum = tg.group_sums(vc, xp.asarray(groups), 5, xp.asarray(w))
    cnt = np.bincount(groups[groups >= 0], weights=w[groups >= 0], minlength=5)
    rows = np.array([0, 0, 6, 10, 11, 3, 5])
    cols = np.array([0, 3, 3, 0, 3, 1, 2])
    for a, b_ in zip(stats, tg.level_row_stats(vc, ic)):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b_), rtol=1e-12)
    for row_stats in (None, stats):
        got, _ = tg.level_consistency_pairs(
            vc,
            ic,
            lsum,
            xp.asarray(cnt),
            xp.asarray(rows),
            xp.asarray(cols),
            xp.asarray(groups[rows] == cols),
            xp.asarray(w),
            row_stats=row_stats,
        )
        np.testing.assert_allclose(to_numpy(got), to_numpy(rms)[rows, cols], rtol=1e-7, equal_nan=True)
    assert np.isnan(to_numpy(got)[-2:]).all()
