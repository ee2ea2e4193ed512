"""kernels/change_point.py: windowed leave-one-out zone correlations, phase scores, the best split."""

from __future__ import annotations

import numpy as np
import pytest

from phaseid_hpc.kernels.change_point import best_split, phase_window_scores, window_zone_correlations, windowed

from .backends import BACKENDS, to_np


def _three_phase(rng, n_per=12, n_w=10, window=50, spliced_at=None):
    """Meters following one of three phase signals plus noise; meter 0 moves from A to C at window
    ``spliced_at``. Zones: one per phase."""
    t = n_w * window
    phase_sig = rng.standard_normal((3, t))
    truth = np.repeat(np.arange(3), n_per)
    u = phase_sig[truth] + 1.2 * rng.standard_normal((truth.size, t))
    if spliced_at is not None:
        k = spliced_at * window
        u[0, k:] = phase_sig[2, k:] + 1.2 * rng.standard_normal(t - k)
    u -= u.mean(axis=1, keepdims=True)
    return u, truth


def _reference_corr(u, zone, n_zones, window):
    n, t = u.shape
    n_w = t // window
    out = np.zeros((n, n_w, n_zones))
    for i in range(n):
        for z in range(n_zones):
            members = [j for j in np.flatnonzero(zone == z) if j != i]
            tmpl = u[members].sum(axis=0) if members else np.zeros(t)
            for w in range(n_w):
                a, b = u[i, w * window:(w + 1) * window], tmpl[w * window:(w + 1) * window]
                den = np.linalg.norm(a) * np.linalg.norm(b)
                out[i, w, z] = a @ b / den if den > 0 else 0.0
    return out


def test_windowed_drops_the_remainder():
    x = np.arange(23.0).reshape(1, 23)
    w = windowed(x, 5)
    assert w.shape == (1, 4, 5)
    np.testing.assert_array_equal(w[0, 1], np.arange(5.0, 10.0))
    with pytest.raises(ValueError, match="window"):
        windowed(x, 0)


@BACKENDS
def test_zone_correlations_match_the_plain_loop(xp):
    rng = np.random.default_rng(3)
    u, truth = _three_phase(rng, n_per=5, n_w=4, window=30)
    zone = truth.copy()
    zone[4] = -1  # scored, adds to no template
    corr, _ = window_zone_correlations(xp.asarray(u), xp.asarray(zone), 3, 30)
    np.testing.assert_allclose(to_np(corr), _reference_corr(u, zone, 3, 30), atol=1e-10)


@BACKENDS
def test_spliced_meter_switches_phase_at_the_right_window(xp):
    rng = np.random.default_rng(7)
    u, truth = _three_phase(rng, spliced_at=6)
    scores, chosen = phase_window_scores(xp.asarray(u), xp.asarray(truth), xp.asarray(np.arange(3)), 50)
    scores = to_np(scores)
    assert scores.shape == (36, 10, 3)
    np.testing.assert_array_equal(to_np(chosen)[1], [0, 1, 2])
    k, before, after, stat = (to_np(a) for a in best_split(xp.asarray(scores), 2, 2, min_sd=1 / np.sqrt(50)))
    assert (k[0], before[0], after[0]) == (6, 0, 2)
    assert stat[0] > 5.0
    # every other meter follows one phase throughout: no significant split
    assert np.max(stat[1:]) < 3.0


@BACKENDS
def test_best_split_respects_the_minimum_segments(xp):
    scores = np.zeros((1, 8, 3))
    scores[0, :7, 0] = 0.5
    scores[0, 7:, 1] = 0.5  # a switch one window before the end
    k, _, _, stat = (to_np(a) for a in best_split(xp.asarray(scores), 2, 2, min_sd=0.1))
    assert k[0] != 7 and stat[0] < 1.0
    k, before, after, stat = (to_np(a) for a in best_split(xp.asarray(scores), 2, 1, min_sd=0.1))
    assert (k[0], before[0], after[0]) == (7, 0, 1) and stat[0] > 4.0
