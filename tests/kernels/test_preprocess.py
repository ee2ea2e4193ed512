import numpy as np
import pytest

from phaseid_hpc.kernels.preprocess import (
    per_unit_differences,
    remove_common_mode,
    standardize_rows,
    unit_rows,
    zero_step_share,
)
from tests.kernels.backends import BACKENDS, array_api_strict, to_np  # noqa: F401


@BACKENDS
def test_per_unit_differences_and_nan(xp):
    v = np.array([[240.0, 241.2, np.nan, 243.6], [120.0, 121.2, 122.4, 120.0]])
    d = to_np(per_unit_differences(xp.asarray(v), xp.asarray([240.0, np.nan])))
    assert d.shape == (2, 3)
    np.testing.assert_allclose(d[0, 0], 0.005)
    assert np.isnan(d[0, 1]) and np.isnan(d[0, 2])
    own = np.mean(v[1])  # NaN nominal falls back to the meter's mean
    np.testing.assert_allclose(d[1], np.diff(v[1]) / own)


@BACKENDS
def test_standardize_rows_clips_and_keeps_nan(xp):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 500))
    x[0, 10] = 100.0
    x[1, 5] = np.nan
    z, n = standardize_rows(xp.asarray(x), clip=6.0)
    z, n = to_np(z), to_np(n)
    assert np.nanmax(np.abs(z)) <= 6.0
    assert np.isnan(z[1, 5]) and n.tolist() == [500, 499, 500]
    np.testing.assert_allclose(np.nanmean(z[2]), 0, atol=1e-12)


@BACKENDS
def test_remove_common_mode_leaves_residual_orthogonal(xp):
    rng = np.random.default_rng(1)
    common = rng.standard_normal(400)
    x = rng.uniform(0.5, 2, (5, 1)) * common + 0.3 * rng.standard_normal((5, 400))
    r, c = remove_common_mode(xp.asarray(x))
    r, c = to_np(r), to_np(c)
    np.testing.assert_allclose(r @ c, 0, atol=1e-9)
    assert np.corrcoef(c, common)[0, 1] > 0.99


@BACKENDS
def test_unit_rows(xp):
    x = np.array([[3.0, np.nan, 4.0], [0.0, 0.0, 0.0]])
    u = to_np(unit_rows(xp.asarray(x)))
    np.testing.assert_allclose(u, [[0.6, 0.0, 0.8], [0, 0, 0]])


@BACKENDS
@pytest.mark.parametrize("missing", [0.0, 0.05], ids=["complete", "missing"])
@pytest.mark.parametrize("bad_nominal", [False, True], ids=["nominal", "own_mean"])
def test_zero_filled_pipeline_equals_nan_kernels(xp, missing, bad_nominal):
    from phaseid_hpc.kernels.preprocess import common_mode_residual, standardized_differences

    rng = np.random.default_rng(7)
    v = 240 + np.cumsum(rng.standard_normal((12, 200)), axis=1) * 0.3
    v[:, 50] += 40  # an outlier step, clipped
    v[rng.random(v.shape) < missing] = np.nan
    nominal = np.full(12, 240.0)
    if bad_nominal:
        nominal[[1, 4]] = [np.nan, -1.0]
    w = (np.arange(12) % 3 != 0).astype(float)
    z_ref, n_ref = standardize_rows(per_unit_differences(xp.asarray(v), xp.asarray(nominal)))
    f_ref, c_ref = remove_common_mode(z_ref, xp.asarray(w))
    z, obs, n_obs = standardized_differences(xp.asarray(v), xp.asarray(nominal))
    f, c = common_mode_residual(z, obs, xp.asarray(w))
    nan = np.isnan(to_np(z_ref))
    assert np.array_equal(~to_np(obs), nan) and nan.any() == (missing > 0)
    np.testing.assert_allclose(to_np(n_obs), to_np(n_ref))
    np.testing.assert_allclose(to_np(z), np.where(nan, 0.0, to_np(z_ref)), atol=1e-12)
    np.testing.assert_allclose(to_np(f), np.where(nan, 0.0, to_np(f_ref)), atol=1e-12)
    np.testing.assert_allclose(to_np(c), to_np(c_ref), atol=1e-12)
    assert np.abs(to_np(z)).max() == 6.0  # the step was clipped
    # float32 features (what identification keeps): computed in float64, the same values to float32
    z32, obs32, _ = standardized_differences(xp.asarray(v), xp.asarray(nominal), dtype=xp.float32)
    assert z32.dtype == xp.float32 and np.array_equal(to_np(obs32), to_np(obs))
    np.testing.assert_array_equal(to_np(z32), to_np(z).astype(np.float32))
    f32, c32 = common_mode_residual(z32, obs, xp.asarray(w))
    assert f32.dtype == xp.float32
    np.testing.assert_allclose(to_np(f32), to_np(f), atol=1e-5)
    np.testing.assert_allclose(to_np(c32), to_np(c), atol=1e-5)


@BACKENDS
def test_zero_step_share_counts_observed_flat_steps(xp):
    v = np.array([[240.0, 240.0, 241.0, 241.0, np.nan, 241.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
                  [np.nan, np.nan, 7.0, np.nan, np.nan, np.nan]])
    share = to_np(zero_step_share(xp.asarray(v)))
    # row 0: steps 0, 1, 0, -, - -> 2 of 3 observed; row 1: none; row 2: no observed step -> 0
    np.testing.assert_allclose(share, [2 / 3, 0.0, 0.0])


@BACKENDS
def test_per_unit_base_falls_back_to_the_own_mean(xp):
    from phaseid_hpc.kernels.preprocess import per_unit_base

    v = np.array([[240.0, 242.0, np.nan], [118.0, 122.0, 120.0], [np.nan, np.nan, np.nan]])
    np.testing.assert_allclose(to_np(per_unit_base(xp.asarray(v), xp.asarray([240.0, 120.0, 240.0]))),
                               [240.0, 120.0, 240.0])
    np.testing.assert_allclose(to_np(per_unit_base(xp.asarray(v), xp.asarray([np.nan, -1.0, np.nan]))),
                               [241.0, 120.0, 1.0])
