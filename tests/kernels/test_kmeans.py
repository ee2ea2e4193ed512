import numpy as np
import pytest

from phaseid_hpc.kernels.kmeans import batched_kmeans, kmeans_plusplus
from tests.kernels.backends import BACKENDS, array_api_strict, to_np  # noqa: F401


def _blobs(seed=0, k=3, per=40, d=5):
    rng = np.random.default_rng(seed)
    centers = 10 * rng.standard_normal((k, d))
    truth = np.repeat(np.arange(k), per)
    x = centers[truth] + rng.standard_normal((k * per, d))
    perm = rng.permutation(truth.size)
    return x[perm], truth[perm]


def _same_partition(a, b):
    return len(set(zip(a.tolist(), b.tolist()))) == len(set(a.tolist())) == len(set(b.tolist()))


@BACKENDS
def test_recovers_separated_blobs(xp):
    x, truth = _blobs()
    labels, centers, inertia = batched_kmeans(xp.asarray(x), 3, random_state=0, n_init=4)
    labels = to_np(labels)
    assert _same_partition(labels, truth)
    assert to_np(centers).shape == (3, 5)
    assert 0 < inertia < 3 * x.shape[0] * 5  # about d per point for unit-variance blobs


@BACKENDS
def test_deterministic_by_seed_and_canonical_order(xp):
    x, _ = _blobs(1, k=4)
    a = batched_kmeans(xp.asarray(x), 4, random_state=7, n_init=3)
    b = batched_kmeans(xp.asarray(x), 4, random_state=7, n_init=3)
    np.testing.assert_array_equal(to_np(a[0]), to_np(b[0]))
    np.testing.assert_array_equal(to_np(a[1]), to_np(b[1]))
    lab = to_np(a[0])
    first = [int(np.flatnonzero(lab == c)[0]) for c in range(4)]
    assert first == sorted(first)  # clusters numbered by first appearance


def test_same_result_on_both_backends():
    import array_api_strict as xps

    x, _ = _blobs(2)
    a = batched_kmeans(x, 3, random_state=3, n_init=2)
    b = batched_kmeans(xps.asarray(x), 3, random_state=3, n_init=2)
    np.testing.assert_array_equal(to_np(a[0]), to_np(b[0]))
    assert a[2] == pytest.approx(b[2])


@BACKENDS
def test_init_centers_are_used(xp):
    x, truth = _blobs(3)
    init = np.stack([x[truth == c].mean(axis=0) for c in range(3)])[None]
    labels, _, _ = batched_kmeans(xp.asarray(x), 3, random_state=0, n_init=0, init=xp.asarray(init))
    assert _same_partition(to_np(labels), truth)


@BACKENDS
def test_kmeans_plusplus_shapes_and_points(xp):
    x, _ = _blobs(4)
    c = to_np(kmeans_plusplus(xp.asarray(x), 3, random_state=0, n_init=2))
    assert c.shape == (2, 3, 5)
    for row in c.reshape(-1, 5):  # seeds are data points
        assert np.isclose(np.abs(x - row).sum(axis=1), 0).any()


def test_bad_k_raises():
    with pytest.raises(ValueError, match="k must lie"):
        batched_kmeans(np.zeros((2, 2)), 3, random_state=0)
