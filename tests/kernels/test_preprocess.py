import numpy as np
import pytest

from phaseid_hpc._compat import to_numpy
from phaseid_hpc.kernels.preprocess import (
    per_unit_differences,
    remove_common_mode,
    standardize_rows,
    unit_rows,
)

array_api_strict = pytest.importorskip("array_api_strict")
#: Every kernel runs on NumPy and on the array-API reference namespace.
BACKENDS = pytest.mark.parametrize("xp", [np, array_api_strict], ids=["numpy", "array_api_strict"])


def to_np(x) -> np.ndarray:
    return np.asarray(to_numpy(x))



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
