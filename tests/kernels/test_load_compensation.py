import numpy as np

from phaseid_hpc.kernels.load_compensation import (
    compensated_differences,
    fit_load_coefficients,
    load_drop,
    neighbour_mean,
    sibling_load,
)
from phaseid_hpc.kernels.preprocess import per_unit_differences, standardized_differences
from tests.kernels.backends import BACKENDS, array_api_strict, to_np  # noqa: F401


@BACKENDS
def test_sibling_load_sums_the_other_meters_of_each_group(xp):
    kw = np.array([[1.0, 2.0, np.nan], [3.0, 4.0, 5.0], [10.0, 20.0, 30.0], [7.0, 7.0, 7.0]])
    group = np.array([5, 9, 5, 5])  # codes need not be contiguous or sorted
    own, sib = sibling_load(xp.asarray(kw), group)
    own, sib = to_np(own), to_np(sib)
    np.testing.assert_allclose(own[0], [1.0, 2.0, 1.5])  # the gap takes the row's mean
    np.testing.assert_allclose(sib[0], own[2] + own[3])
    np.testing.assert_allclose(sib[2], own[0] + own[3])
    np.testing.assert_allclose(sib[1], 0.0)  # alone on its transformer


@BACKENDS
def test_neighbour_mean_skips_missing_samples(xp):
    x = np.array([[1.0, np.nan, 3.0], [3.0, np.nan, np.nan], [5.0, 6.0, 7.0]])
    idx = np.array([[0, 1], [1, 1], [2, 0]])
    m = to_np(neighbour_mean(xp.asarray(x), xp.asarray(idx)))
    np.testing.assert_allclose(m[0], [2.0, np.nan, 3.0])
    np.testing.assert_allclose(m[1], [3.0, np.nan, np.nan])
    np.testing.assert_allclose(m[2], [3.0, 6.0, 5.0])
    # weight 0: padding, not a neighbour
    w = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    m = to_np(neighbour_mean(xp.asarray(x), xp.asarray(idx), xp.asarray(w)))
    np.testing.assert_allclose(m[0], [1.0, np.nan, 3.0])
    np.testing.assert_allclose(m[2], [1.0, np.nan, 3.0])


@BACKENDS
def test_fit_recovers_the_drops_and_keeps_the_physical_sign(xp):
    rng = np.random.default_rng(0)
    n_t = 2000
    d_own = rng.standard_normal((3, n_t))
    d_sib = rng.standard_normal((3, n_t))
    noise = 1e-3 * rng.standard_normal((3, n_t))
    a_true = np.array([-2e-3, 1e-3, -1e-3])  # row 1: voltage rises with its own load (not physical)
    c_true = np.array([-5e-3, -4e-3, 2e-3])  # row 2: with its siblings' load
    dv = a_true[:, None] * d_own + c_true[:, None] * d_sib + noise
    dv[0, :100] = np.nan
    a, c = fit_load_coefficients(xp.asarray(dv), xp.asarray(d_own), xp.asarray(d_sib), min_samples=48)
    a, c = to_np(a), to_np(c)
    np.testing.assert_allclose([a[0], c[0]], [-2e-3, -5e-3], rtol=0.02)
    assert a[1] == 0.0 and abs(c[1] + 4e-3) < 2e-4  # the wrong-signed one is dropped, the other refitted
    assert c[2] == 0.0 and abs(a[2] + 1e-3) < 2e-4


@BACKENDS
def test_fit_without_siblings_or_samples(xp):
    rng = np.random.default_rng(1)
    d_own = rng.standard_normal((2, 500))
    dv = -3e-3 * d_own + 1e-4 * rng.standard_normal((2, 500))
    dv[1, 20:] = np.nan  # 19 samples left: too few
    a, c = fit_load_coefficients(xp.asarray(dv), xp.asarray(d_own), xp.zeros((2, 500), dtype=xp.float64),
                                 min_samples=48)
    a, c = to_np(a), to_np(c)
    np.testing.assert_allclose(a[0], -3e-3, rtol=0.01)
    assert c[0] == 0.0 and a[1] == 0.0 and c[1] == 0.0


@BACKENDS
def test_compensation_removes_a_transformer_drop_and_keeps_the_primary(xp):
    """Two meters on one transformer, one on another, all on one phase: the fitted coefficients, applied,
    leave the shared primary voltage."""
    rng = np.random.default_rng(2)
    n_t = 1500
    primary = 240.0 + np.cumsum(0.05 * rng.standard_normal(n_t))
    kw = np.abs(2.0 + np.cumsum(0.2 * rng.standard_normal((3, n_t)), axis=1))
    group = np.array([0, 0, 1])
    own_h, sib_h = kw, kw[[1, 0, 2]] * np.array([[1.0], [1.0], [0.0]])
    v = primary - 240.0 * (0.004 * (own_h + sib_h) + 0.002 * own_h)  # transformer 0.4%/kW, service 0.2%/kW
    own, sib = sibling_load(xp.asarray(kw), group)
    dv = np.diff(v / 240.0, axis=1) - np.diff(primary / 240.0)  # a perfect neighbourhood: the primary itself
    a, c = fit_load_coefficients(xp.asarray(dv), xp.asarray(np.diff(kw, axis=1)),
                                 xp.asarray(np.diff(to_np(sib), axis=1)))
    np.testing.assert_allclose(to_np(a)[:2], -0.006, rtol=1e-6)
    np.testing.assert_allclose(to_np(c)[:2], -0.004, rtol=1e-6)
    drop = to_np(load_drop(own, sib, a, c))
    np.testing.assert_allclose(v / 240.0 - drop, np.broadcast_to(primary / 240.0, (3, n_t)), atol=1e-10)
    # the features of the compensated voltage: those of the primary, for all three meters
    z, _, _ = standardized_differences(xp.asarray(v), xp.full((3,), 240.0, dtype=xp.float64),
                                       less=load_drop(own, sib, a, c))
    z_primary, _, _ = standardized_differences(xp.asarray(primary[None, :]), xp.full((1,), 240.0, dtype=xp.float64))
    np.testing.assert_allclose(to_np(z), np.broadcast_to(to_np(z_primary), (3, n_t - 1)), atol=1e-6)
    z_raw, _, _ = standardized_differences(xp.asarray(v), xp.full((3,), 240.0, dtype=xp.float64))
    assert np.abs(to_np(z_raw)[0] - to_np(z_primary)[0]).max() > 0.1  # without it, they differ


@BACKENDS
def test_compensated_differences_equal_the_kernels_one_by_one(xp):
    """The one-call compensation (row chunks, neighbours' counts in float32) gives exactly what the kernels
    give called one after the other on whole arrays, gaps, padding and a meter without siblings' term
    included."""
    rng = np.random.default_rng(5)
    n, n_t = 23, 300
    v = 240.0 + np.cumsum(0.1 * rng.standard_normal((n, n_t)), axis=1)
    kw = np.abs(2.0 + np.cumsum(0.2 * rng.standard_normal((n, n_t)), axis=1))
    v[rng.random(v.shape) < 0.02] = np.nan
    kw[rng.random(kw.shape) < 0.02] = np.nan
    v[3, :] = np.nan  # a meter with no reading
    nominal = np.full(n, 240.0)
    nominal[5] = np.nan  # its own mean as base
    group = np.repeat(np.arange(8), 3)[:n]
    index = rng.integers(0, n, (n, 4))
    weights = np.ones((n, 4))
    weights[::4, -1] = 0.0  # padding
    sibling_rows = (np.arange(n) % 5 != 0).astype(np.float64)
    xv, xk = xp.asarray(v), xp.asarray(kw)
    dv = per_unit_differences(xv, xp.asarray(nominal))
    target = dv - neighbour_mean(dv, xp.asarray(index), xp.asarray(weights))
    own, sib = sibling_load(xk, group)
    a, c = fit_load_coefficients(target, xk[:, 1:] - xk[:, :-1], sib[:, 1:] - sib[:, :-1], min_samples=48)
    want = standardized_differences(xv, xp.asarray(nominal), dtype=xp.float32,
                                    less=load_drop(own, sib, a, c * xp.asarray(sibling_rows)))
    for chunk in (4, 7, 256):
        got = compensated_differences(xv, xp.asarray(nominal), xk, group, xp.asarray(index), xp.asarray(weights),
                                      xp.asarray(sibling_rows), min_samples=48, dtype=xp.float32, chunk=chunk)
        for g, w in zip(got, want):
            assert np.array_equal(to_np(g), to_np(w))
    assert np.abs(to_np(want[0]) - to_np(standardized_differences(xv, xp.asarray(nominal),
                                                                   dtype=xp.float32)[0])).max() > 0.01
