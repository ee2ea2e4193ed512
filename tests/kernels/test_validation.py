"""Tests of phaseid_hpc/kernels/validation.py on NumPy and array-api-strict, against plain loops as oracles."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest

from phaseid_hpc.config import ValidationConfig
from phaseid_hpc.kernels import validation as kv

from .backends import BACKENDS, to_np

xps = pytest.importorskip("array_api_strict")


# --- oracles: the plain form of each kernel ----------------------------------------------------------


def _level_step_loop(offset: np.ndarray, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Two adjacent windows of ``w`` samples at every split, means over their valid samples (>= w // 2)."""
    n, n_t = offset.shape
    step, index = np.full(n, np.nan), np.full(n, -1)
    for r in range(n):
        for i in range(w, n_t - w + 1):
            a, b = offset[r, i - w : i], offset[r, i : i + w]
            if np.isfinite(a).sum() < w // 2 or np.isfinite(b).sum() < w // 2:
                continue
            d = abs(np.nanmean(b) - np.nanmean(a))
            if not d <= step[r]:  # first maximum (NaN start)
                step[r], index[r] = d, i
    return step, index


def _window_correlation_loop(a: np.ndarray, b: np.ndarray, w: int) -> np.ndarray:
    n, span = a.shape
    out = np.full((n, span // w), np.nan)
    for r in range(n):
        for j in range(span // w):
            x, y = a[r, j * w : (j + 1) * w], b[r, j * w : (j + 1) * w]
            ok = np.isfinite(x) & np.isfinite(y)
            if ok.sum() >= w // 2 and np.std(x[ok]) > 0 and np.std(y[ok]) > 0:
                out[r, j] = np.corrcoef(x[ok], y[ok])[0, 1]
    return out


def _neighbourhood_median_loop(tx_mean: np.ndarray, feeder_start: np.ndarray, k: int) -> np.ndarray:
    n_tx, _ = tx_mean.shape
    out = np.full(tx_mean.shape, np.nan)
    bounds = np.append(feeder_start, n_tx)
    for f0, f1 in itertools.pairwise(bounds):
        d = np.diff(tx_mean[f0:f1], axis=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            d = np.where(np.isfinite(d), d - np.nanmean(d, axis=1, keepdims=True), 0.0)
        u = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-300)
        for i in range(f1 - f0):
            others = [j for j in range(f1 - f0) if j != i]
            if not others:
                continue
            c = u[others] @ u[i]
            best = [others[j] for j in np.argsort(-c, kind="stable")[: min(k, len(others))]]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: NaN, as the kernel
                out[f0 + i] = np.nanmedian(tx_mean[f0:f1][best], axis=0)
    return out


def _longest_run_loop(win_lost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    longest, start = np.zeros(len(win_lost), dtype=int), np.full(len(win_lost), -1)
    for r, row in enumerate(win_lost):
        j = 0
        while j < row.size:
            if not row[j]:
                j += 1
                continue
            e = j
            while e < row.size and row[e]:
                e += 1
            if e - j > longest[r]:
                longest[r], start[r] = e - j, j
            j = e
    return longest, start


# --- gap filling --------------------------------------------------------------------------------------


@BACKENDS
def test_fill_time_gaps_is_linear_interpolation_per_row(xp):
    rng = np.random.default_rng(2)
    x = rng.random((6, 50))
    x[rng.random(x.shape) < 0.3] = np.nan
    x[0, :7] = np.nan  # leading run: constant extrapolation
    x[1, -9:] = np.nan  # trailing run
    x[2] = np.nan  # no data: 0
    x[3, 10:40] = np.nan  # long gap
    filled, n_real = kv.fill_time_gaps(xp.asarray(x))
    filled, n_real = to_np(filled), to_np(n_real)
    t = np.arange(50)
    for i in range(6):
        ok = ~np.isnan(x[i])
        expected = np.interp(t, t[ok], x[i, ok]) if ok.any() else np.zeros(50)
        np.testing.assert_allclose(filled[i], expected, rtol=1e-12)
        assert n_real[i] == ok.sum()
    assert np.isnan(x).any()  # the input is left alone


def test_fill_time_gaps_keeps_float32():
    x = np.array([[1.0, np.nan, 3.0, np.nan]], dtype=np.float32)
    filled, _ = kv.fill_time_gaps(x)
    assert filled.dtype == np.float32 and filled.tolist() == [[1.0, 2.0, 3.0, 3.0]]


# --- level steps --------------------------------------------------------------------------------------


@BACKENDS
@pytest.mark.parametrize("holes", [False, True])
def test_level_step_matches_the_two_window_loop(xp, holes):
    rng = np.random.default_rng(3)
    x = rng.normal(0.0, 0.001, (5, 60)).astype(np.float32)
    x[1, 33:] += 0.02  # a step at 33
    x[2] = 0.0  # flat
    if holes:
        x[rng.random(x.shape) < 0.2] = np.nan
        x[3, :] = np.nan  # nothing valid
    want_step, want_index = _level_step_loop(x.astype(np.float64), 8)
    step, index = kv.level_step(xp.asarray(x), 8)
    np.testing.assert_allclose(to_np(step), want_step, rtol=1e-6, atol=1e-9, equal_nan=True)
    np.testing.assert_array_equal(
        to_np(index)[np.isfinite(want_step) & (want_step > 1e-6)],
        want_index[np.isfinite(want_step) & (want_step > 1e-6)],
    )
    assert to_np(index)[1] == 33 and abs(to_np(step)[1] - 0.02) < 0.002


def test_level_step_too_short():
    step, index = kv.level_step(np.zeros((2, 15), dtype=np.float32), 8)
    assert np.isnan(step).all() and (index == -1).all()


@BACKENDS
def test_minus_load_part_removes_what_the_load_explains(xp):
    rng = np.random.default_rng(4)
    load = rng.uniform(1.0, 5.0, (3, 200))
    step = np.where(np.arange(200) >= 120, 0.01, 0.0)
    offset = (-0.002 * load + step).astype(np.float32)
    offset[2, 5] = np.nan
    load[2, 9] = np.nan
    got = to_np(kv.minus_load_part(xp.asarray(offset), xp.asarray(load)))
    assert got.dtype == np.float32 and np.isnan(got[2, 5])
    assert got[2, 9] == offset[2, 9]  # no load sample: nothing removed
    # the step stays (the fit of the load absorbs only its chance correlation with the step)
    np.testing.assert_allclose(got[:2, 120:].mean(axis=1) - got[:2, :120].mean(axis=1), 0.01, atol=2e-3)
    # without a step the load's part goes entirely: a constant is left
    pure = to_np(
        kv.minus_load_part(xp.asarray((0.003 - 0.002 * load[:2]).astype(np.float32)), xp.asarray(load[:2]))
    )
    assert np.std(pure, axis=1).max() < 1e-6 < np.std(0.002 * load[:2], axis=1).min()


# --- correlation loss ---------------------------------------------------------------------------------


@BACKENDS
def test_window_correlation_matches_corrcoef_per_window(xp):
    rng = np.random.default_rng(5)
    a = rng.normal(size=(4, 60)).astype(np.float32)
    b = (0.6 * a + rng.normal(size=a.shape)).astype(np.float32)
    a[1, rng.random(60) < 0.3] = np.nan
    b[2, :25] = np.nan  # first windows too sparse
    want = _window_correlation_loop(a.astype(np.float64), b.astype(np.float64), 12)
    got = to_np(kv.window_correlation(xp.asarray(a), xp.asarray(b), 12))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, equal_nan=True)


@BACKENDS
def test_neighbourhood_median_matches_the_loop(xp):
    rng = np.random.default_rng(6)
    common = np.cumsum(rng.normal(0, 0.002, 40))
    zone = np.cumsum(rng.normal(0, 0.003, 40))
    tx_mean = 1.0 + common + rng.normal(0, 0.0005, (9, 40))
    tx_mean[:4] += zone  # a regulator zone: its units follow each other
    tx_mean[2, 10:20] = np.nan
    tx_mean = tx_mean.astype(np.float32)
    start = np.array([0, 7])  # feeders of 7 and 2 transformers
    want = _neighbourhood_median_loop(tx_mean.astype(np.float64), start, k=3)
    got = to_np(kv.neighbourhood_median(xp.asarray(tx_mean), start, k=3))
    np.testing.assert_allclose(got, want, rtol=1e-5, equal_nan=True)


@BACKENDS
def test_longest_lost_run_matches_walking_the_runs(xp):
    rng = np.random.default_rng(7)
    lost = rng.random((20, 11)) < 0.5
    lost[0] = False
    longest, start = kv.longest_lost_run(xp.asarray(lost))
    want_l, want_s = _longest_run_loop(lost)
    np.testing.assert_array_equal(to_np(longest), want_l)
    np.testing.assert_array_equal(to_np(start), want_s)


@BACKENDS
def test_usual_correlation_is_the_best_or_the_upper_quartile(xp):
    r = np.full((3, 12), np.nan)
    r[0, :5] = [0.9, 0.2, 0.8, 0.1, 0.7]  # <= 8 windows: the best
    r[1] = np.linspace(0.0, 0.99, 12)  # 12 windows: the 3rd best (ceil(12 / 4))
    got = to_np(kv.usual_correlation(xp.asarray(r)))
    np.testing.assert_allclose(got[:2], [0.9, np.linspace(0.0, 0.99, 12)[-3]])
    assert np.isnan(got[2])


@BACKENDS
def test_lost_windows_need_a_cause_of_the_unit_alone(xp):
    n_win, n_tx = 10, 6
    r = np.full((n_tx, n_win), 0.9)
    r[0, 6:8] = 0.1  # unit 0 loses its reference in windows 6 and 7
    r[1, 6:8] = 0.1  # so does unit 1, but a meter of it departs in window 6
    r[3, :] = 0.05  # too few meters to be checked
    agree = np.ones((n_tx, n_win), dtype=bool)
    agree[1, 6] = False
    enough = np.array([True, True, True, False, True, True])
    feeder = (np.array([0]), np.zeros(n_tx, dtype=np.int64))
    kw = {"window": 96, "min_correlation": 0.3, "loss_se": 3.0}
    lost = to_np(kv.lost_windows(xp.asarray(r), xp.asarray(agree), xp.asarray(enough), *feeder, **kw))
    assert np.flatnonzero(lost[0]).tolist() == [6, 7]
    assert np.flatnonzero(lost[1]).tolist() == [7]
    assert not lost[2:].any()
    # a drop below half the usual correlation, by more than 3 standard errors of z, counts too
    r[4, 2] = 0.35
    lost = to_np(kv.lost_windows(xp.asarray(r), xp.asarray(agree), xp.asarray(enough), *feeder, **kw))
    assert np.flatnonzero(lost[4]).tolist() == [2]
    # the whole feeder losing it is not a unit's fault
    r_all = np.where(np.arange(n_win) >= 6, 0.1, 0.9) * np.ones((n_tx, 1))
    every = xp.asarray(np.ones(n_tx, bool))
    assert not to_np(kv.lost_windows(xp.asarray(r_all), xp.asarray(agree), every, *feeder, **kw)).any()


@BACKENDS
def test_window_scale_is_the_median_absolute_value_per_window(xp):
    rng = np.random.default_rng(21)
    d = rng.normal(size=(3, 50))
    d[1, 3] = np.nan
    d[2, 10:20] = np.nan  # a whole window missing
    got = to_np(kv.window_scale(xp.asarray(d), 10))
    want = np.array([[np.nanmedian(np.abs(d[r, w * 10 : (w + 1) * 10])) if np.isfinite(d[r, w * 10 : (w + 1) * 10]).any()
                      else np.nan for w in range(5)] for r in range(3)])
    np.testing.assert_allclose(got, want, rtol=1e-12, equal_nan=True)


@BACKENDS
def test_noisy_windows_against_the_quietest_one(xp):
    ref = np.ones((4, 6))
    tx = np.ones((4, 6))
    tx[0, 3:] = 3.0  # unit 0 fluctuates three times as much from window 3 on
    tx[1, :] = [1.0, 1.5, 1.9, 1.2, 1.0, 1.8]  # day-to-day scatter below twice the quietest
    tx[2, 3:] = 3.0
    ref[2, 3:] = 3.0  # the whole reference moves as much: nothing of the unit's own
    tx[3, 2] = np.nan
    got = to_np(kv.noisy_windows(xp.asarray(tx), xp.asarray(ref), 2.0))
    assert np.flatnonzero(got[0]).tolist() == [3, 4, 5]
    assert not got[1:].any()
    assert not to_np(kv.noisy_windows(xp.asarray(tx), xp.asarray(ref), 0.0)).any()


def test_transformer_health_sees_a_noisy_winding_the_correlation_misses():
    """On an LTC feeder the head's tap steps carry most of a unit's correlation with it: a noisy winding
    (0.2% per sample from sample 300) leaves that correlation above half its usual value, but the unit's
    typical step (median absolute difference) grows several fold against the head's."""
    rng = np.random.default_rng(5)
    n_t, per = 96 * 7, 3
    tx_of = np.repeat(np.arange(12), per)
    steps = np.where(rng.random(n_t) < 15 / 96, rng.choice([-1.0, 1.0], n_t) * 0.00625, 0.0)
    head = 1.0 + np.cumsum(rng.normal(0, 0.0003, n_t) + steps)
    v = 240.0 * (head + rng.normal(0, 0.0005, (12, n_t))[tx_of] + rng.normal(0, 0.0002, (36, n_t)))
    v[tx_of == 4, 300:] *= 1 + 0.002 * rng.standard_normal(n_t - 300)[None, :]
    groups = kv.MeterGroups.from_assignment(tx_of, 12)
    kw = {"window": 96, "min_meters": 2, "min_correlation": 0.3, "loss_se": 3.0, "neighbours": 8}
    args = (groups, np.zeros(12, dtype=np.int64), np.zeros(36, dtype=np.int64), (head / head.mean())[None, :], None)
    without = kv.transformer_health(v, *args, **kw)
    with_noise = kv.transformer_health(v, *args, **kw, noise_factor=2.0)
    assert without["correlation_lost_windows"][4] == 0
    assert with_noise["correlation_lost_windows"][4] >= 2
    # healthy units scatter (up to 2.1 times their quietest window here), never two windows running
    assert with_noise["correlation_lost_windows"][np.arange(12) != 4].max() < 2
    b = kv.transformer_health(xps.asarray(v), groups, np.zeros(12, dtype=np.int64), np.zeros(36, dtype=np.int64),
                              xps.asarray((head / head.mean())[None, :]), None, **kw, noise_factor=2.0)
    np.testing.assert_array_equal(to_np(b["correlation_lost_windows"]), with_noise["correlation_lost_windows"])


# --- sums, rows, loading ------------------------------------------------------------------------------


def test_weighted_row_sums_sparse_and_dense_agree():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(7, 30))
    rows, cols = np.array([0, 0, 2, 1, 2]), np.array([0, 3, 3, 6, 5])
    w = np.array([1.0, 0.5, 0.5, 1 / 3, 2.0])
    want = np.zeros((3, 30))
    for r, c, ww in zip(rows, cols, w):
        want[r] += ww * x[c]
    np.testing.assert_allclose(kv.weighted_row_sums(x, rows, cols, w, 3), want, rtol=1e-12)
    np.testing.assert_allclose(
        to_np(kv.weighted_row_sums(xps.asarray(x), rows, cols, w, 3)), want, rtol=1e-12
    )


@BACKENDS
def test_set_rows_and_take_rows(xp):
    x = xp.asarray(np.arange(12.0).reshape(4, 3))
    y = kv.set_rows(x, np.array([3, 1]), xp.asarray(np.array([[-1.0, -1, -1], [-2, -2, -2]])))
    assert to_np(y).tolist() == [[0, 1, 2], [-2, -2, -2], [6, 7, 8], [-1, -1, -1]]
    assert to_np(kv.take_rows(y, np.array([1, 1]))).tolist() == [[-2, -2, -2]] * 2
    assert to_np(kv.set_rows(xp.asarray(np.zeros(3)), np.array([2]), 5.0)).tolist() == [0, 0, 5]


def test_multi_pair_sums_add_as_reduceat():
    """The fast form equals NumPy's reduceat bit for bit (the order of a sum of three rows matters)."""
    rng = np.random.default_rng(9)
    p = rng.normal(size=(8, 50)) * 100
    pair_tx = np.array([0, 1, 1, 1, 2, 3, 3, 4])
    multi = np.array([1, 3])
    local = np.array([1, 5])
    sub = np.array([1, 2, 3, 5, 6])
    p_sum = np.add.reduceat(p[sub], np.array([0, 3]), axis=0)
    want = np.hypot(p_sum, p_sum * 0.33)
    got = kv._multi_pair_sums(p, None, pair_tx, multi, 0.33)
    np.testing.assert_array_equal(got, want)
    assert local.size == multi.size


@BACKENDS
def test_transformer_loading_single_and_bank(xp):
    p = np.array([[1.0, 3.0], [2.0, 2.0], [1.0, 1.0], [4.0, 2.0]])
    pair_tx = np.array([0, 1, 1, 2])  # tx 1 carries two pairs
    rating = np.array([10.0, 30.0, np.nan])
    out = kv.transformer_loading(
        xp.asarray(p.copy()), None, pair_tx, 3, np.array([False, True, False]), rating, tan_phi=0.0
    )
    loading = to_np(out["loading"])
    np.testing.assert_allclose(loading[0], [0.1, 0.3])
    np.testing.assert_allclose(loading[1], 3 * np.array([2.0, 2.0]) / 30.0)  # bank: the most loaded phase
    assert np.isnan(loading[2]).all()
    np.testing.assert_allclose(to_np(out["peak_kva"]), [3.0, 3.0, 4.0])  # |P_a + P_b|
    np.testing.assert_allclose(to_np(out["mean_kva"]), [2.0, 3.0, 3.0])


@BACKENDS
def test_row_quantile_matches_numpy(xp):
    x = np.random.default_rng(10).normal(size=(5, 37))
    nan_rows = np.array([False, False, True, False, False])
    got = to_np(kv.row_quantile(xp.asarray(x), 0.99, xp.asarray(nan_rows)))
    want = np.where(nan_rows, np.nan, np.quantile(x, 0.99, axis=1))
    np.testing.assert_allclose(got, want, rtol=1e-12, equal_nan=True)


def test_meter_groups_sort_meters_by_transformer():
    g = kv.MeterGroups.from_assignment(np.array([2, -1, 0, 2, 0, 2]), 4, chunk=2)
    assert g.order.tolist() == [2, 4, 0, 3, 5] and not g.identity
    assert g.n_meters.tolist() == [2, 0, 3, 0]
    assert g.group_tx.tolist() == [0, 2] and g.group_start.tolist() == [0, 2]
    assert g.chunks == [(0, 2, 0, 1), (2, 5, 1, 2)]  # whole transformers per chunk
    assert kv.MeterGroups.from_assignment(np.array([0, 0, 1]), 2).identity


# --- thermal and health, NumPy against array-api-strict -------------------------------------------------


def test_thermal_summary_on_both_backends():
    rng = np.random.default_rng(11)
    loading = np.abs(0.8 + 0.5 * rng.normal(size=(5, 192)))
    loading[1] *= 2.5  # hot
    ok = np.array([True, True, True, False, True])
    loading[3] = np.nan
    cfg = ValidationConfig()
    kw = {
        "standard": "iec",
        "insulation": cfg.insulation,
        "hot_spot_normal_c": cfg.hot_spot_normal_c,
        "hot_spot_emergency_c": cfg.hot_spot_emergency_c,
        "params": cfg.thermal_parameters(),
    }
    a = kv.thermal_summary(loading, ok, 30.0, 15.0, **kw)
    b = kv.thermal_summary(xps.asarray(loading), xps.asarray(ok), 30.0, 15.0, **kw)
    for k in a:
        np.testing.assert_allclose(to_np(b[k]), a[k], rtol=1e-6, equal_nan=True, err_msg=k)
    assert a["hours_above_normal"][1] > 0 and np.isnan(a["f_eqa"][3]) and a["hours_above_normal"][3] == 0


def _health_block(seed: int = 12):
    """Ten transformers of four meters on one feeder: a tap step on unit 3, unit 6 loses the feeder from
    sample 400 (its meters still follow each other)."""
    rng = np.random.default_rng(seed)
    n_t, per = 96 * 6, 4
    tx_of = np.repeat(np.arange(10), per)
    head = 1.0 + np.cumsum(rng.normal(0, 0.002, n_t))
    v = 240.0 * (head + rng.normal(0, 0.0005, (10, n_t))[tx_of] + rng.normal(0, 0.0005, (40, n_t)))
    v[tx_of == 3, 300:] *= 1.03
    v[tx_of == 6, 400:] = 240.0 * (1.0 + rng.normal(0, 0.003, n_t - 400))
    v[5, 50:90] = np.nan
    return v, tx_of


def test_transformer_health_on_both_backends():
    v, tx_of = _health_block()
    groups = kv.MeterGroups.from_assignment(tx_of, 10)
    feeder_code = np.array([0] * 10)
    refs = np.zeros((0, v.shape[1]))
    kw = {"window": 96, "min_meters": 2, "min_correlation": 0.3, "loss_se": 3.0, "neighbours": 8}
    a = kv.transformer_health(v, groups, feeder_code, np.full(40, -1), refs, None, **kw)
    b = kv.transformer_health(
        xps.asarray(v), groups, feeder_code, np.full(40, -1), xps.asarray(refs), None, **kw
    )
    for k in a:
        np.testing.assert_allclose(
            to_np(b[k]), a[k], rtol=1e-5, atol=1e-7, equal_nan=True, err_msg=k
        )  # float32 sums
    assert a["voltage_step_index"][3] == 300 and a["voltage_step_pu"][3] > 0.02
    assert (
        a["correlation_lost_windows"][6] >= 1
        and a["correlation_lost_windows"][[0, 1, 2, 4, 5, 7, 8, 9]].max() == 0
    )


def test_transformer_power_sums_each_units_pairs():
    p = np.random.default_rng(13).normal(size=(5, 20))
    pair_tx = np.array([0, 0, 0, 2, 3])
    want = np.stack([p[0] + p[1] + p[2], np.zeros(20), p[3], p[4]])
    np.testing.assert_allclose(kv.transformer_power(p, pair_tx, 4), want, rtol=1e-12)
    np.testing.assert_allclose(to_np(kv.transformer_power(xps.asarray(p), pair_tx, 4)), want, rtol=1e-12)
