import numpy as np
import pandas as pd

from phaseid_hpc.kernels.correlation import nan_corr_counts, nan_corrcoef
from tests.kernels.backends import BACKENDS, array_api_strict, to_np  # noqa: F401


def _data(seed=0, n=6, t=200):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((2, t))
    return rng.standard_normal((n, 2)) @ base + 0.5 * rng.standard_normal((n, t))


@BACKENDS
def test_equals_numpy_corrcoef_on_complete_data(xp):
    x = _data()
    r = to_np(nan_corrcoef(xp.asarray(x)))
    np.testing.assert_allclose(r, np.corrcoef(x), atol=1e-12)


@BACKENDS
def test_cross_correlation_matches_corrcoef_block(xp):
    x, y = _data(1), _data(2, n=3)
    r = to_np(nan_corrcoef(xp.asarray(x), xp.asarray(y)))
    np.testing.assert_allclose(r, np.corrcoef(x, y)[:6, 6:], atol=1e-12)


@BACKENDS
def test_nan_aware_equals_pairwise_complete(xp):
    x = _data(3)
    rng = np.random.default_rng(4)
    x[rng.random(x.shape) < 0.2] = np.nan
    r, n = nan_corr_counts(xp.asarray(x))
    expected = pd.DataFrame(x.T).corr(min_periods=3).to_numpy()
    np.testing.assert_allclose(to_np(r), expected, atol=1e-10)
    obs = (~np.isnan(x)).astype(float)
    np.testing.assert_array_equal(to_np(n), obs @ obs.T)


@BACKENDS
def test_undefined_pairs_are_nan(xp):
    x = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0], [np.nan, np.nan, 1.0, 2.0]])
    r = to_np(nan_corrcoef(xp.asarray(x)))
    assert np.isnan(r[1]).all()  # constant series
    assert np.isnan(r[0, 2])  # only two joint samples < min_periods
    assert r[0, 0] == 1.0
