"""kernels/change_point.py: windowed leave-one-out zone correlations, phase scores, the best split."""

from __future__ import annotations

import numpy as np
import pytest

from phaseid_hpc.kernels.change_point import best_split, window_correlations, windowed

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


def _loo_phase_templates(u, truth):
    """Per meter and phase: the sum of that phase's meters other than itself, shape (3, n, T)."""
    out = np.zeros((3,) + u.shape)
    for p in range(3):
        members = truth == p
        total = u[members].sum(axis=0)
        out[p] = total[None, :] - np.where(members[:, None], u, 0.0)
    return out


def test_windowed_drops_the_remainder():
    x = np.arange(23.0).reshape(1, 23)
    w = windowed(x, 5)
    assert w.shape == (1, 4, 5)
    np.testing.assert_array_equal(w[0, 1], np.arange(5.0, 10.0))
    with pytest.raises(ValueError, match="window"):
        windowed(x, 0)


@BACKENDS
def test_window_correlations_match_the_plain_loop(xp):
    rng = np.random.default_rng(3)
    u = rng.standard_normal((4, 95))
    t = rng.standard_normal((4, 95))
    t[2, 30:60] = 0.0  # a template silent for a whole window: 0, not NaN
    got = to_np(window_correlations(xp.asarray(u), xp.asarray(t), 30))
    assert got.shape == (4, 3)
    for i in range(4):
        for w in range(3):
            a, b = u[i, 30 * w:30 * (w + 1)], t[i, 30 * w:30 * (w + 1)]
            den = np.linalg.norm(a) * np.linalg.norm(b)
            assert got[i, w] == pytest.approx(a @ b / den if den else 0.0, abs=1e-12)
    assert got[2, 1] == 0.0


@BACKENDS
def test_spliced_meter_switches_phase_at_the_right_window(xp):
    rng = np.random.default_rng(7)
    u, truth = _three_phase(rng, spliced_at=6)
    tmpl = _loo_phase_templates(u, truth)
    scores = np.stack([to_np(window_correlations(xp.asarray(u), xp.asarray(tmpl[p]), 50)) for p in range(3)],
                      axis=-1)
    assert scores.shape == (36, 10, 3)
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


def _best_split_by_loop(scores, min_before, min_after, min_sd):
    """The statistic of :func:`best_split`'s docstring, split by split (float64 reference)."""
    n, n_w, n_p = scores.shape
    best = (np.full(n, -1), np.full(n, -1), np.full(n, -1), np.full(n, -np.inf))
    for i in range(n):
        for p in range(n_p):
            for q in range(n_p):
                if p == q:
                    continue
                d = scores[i, :, q] - scores[i, :, p]
                for k in range(max(min_before, 1), n_w - max(min_after, 1) + 1):
                    if scores[i, :k].mean(axis=0).argmax() != p or scores[i, k:].mean(axis=0).argmax() != q:
                        continue
                    b, a = d[:k], d[k:]
                    ss = ((b - b.mean()) ** 2).sum() + ((a - a.mean()) ** 2).sum()
                    sd = max(np.sqrt(ss / max(n_w - 2, 1)), min_sd)
                    stat = min(-b.mean() * np.sqrt(k) / sd, a.mean() * np.sqrt(n_w - k) / sd)
                    if stat > best[3][i]:
                        best[0][i], best[1][i], best[2][i], best[3][i] = k, p, q, stat
    return best


@BACKENDS
def test_best_split_scores_every_split_as_the_definition(xp):
    rng = np.random.default_rng(3)
    scores = rng.standard_normal((40, 12, 3)) * 0.1
    scores[:20, :5, 0] += 0.3
    scores[:20, 5:, 2] += 0.3  # half the meters switch from A to C at window 5
    k, p, q, stat = (to_np(a) for a in best_split(xp.asarray(scores), 2, 3, min_sd=0.05))
    rk, rp, rq, rstat = _best_split_by_loop(scores, 2, 3, 0.05)
    assert np.array_equal(k, rk) and np.array_equal(p, rp) and np.array_equal(q, rq)
    np.testing.assert_allclose(stat, rstat, rtol=1e-9)
    assert (k[:20] == 5).all() and (p[:20] == 0).all() and (q[:20] == 2).all()
