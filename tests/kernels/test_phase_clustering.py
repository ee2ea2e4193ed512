import numpy as np

from phaseid_hpc.kernels.phase_clustering import (
    leave_group_out_scores,
    margin_error_probability,
    one_hot,
    phase_templates,
    pool_by_transformer,
    template_scores,
)
from tests.kernels.backends import BACKENDS, array_api_strict, to_np  # noqa: F401


def _three_phase(seed=0, t=600, per=10, noise=2.0):
    rng = np.random.default_rng(seed)
    s = rng.standard_normal((3, t))
    truth = np.repeat(np.arange(3), per)
    x = s[truth] + noise * rng.standard_normal((truth.size, t))
    return x, truth


@BACKENDS
def test_templates_and_scores_pick_true_phase(xp):
    x, truth = _three_phase()
    w = one_hot(xp.asarray(truth), 3)
    t = phase_templates(xp.asarray(x), w)
    scores, n = template_scores(xp.asarray(x), t)
    assert (to_np(scores).argmax(axis=1) == truth).all()
    assert to_np(n).min() == 600


@BACKENDS
def test_pooling_keeps_a_wrongly_grouped_meter_out(xp):
    rng = np.random.default_rng(2)
    t = 800
    phase = rng.standard_normal((2, t))
    tr = 1.5 * rng.standard_normal((30, t))  # each transformer's own load signal (stronger than the phase)
    rows, groups, labels = [], [], []
    for g in range(30):  # transformer 0 has three meters, the others one each, all on phase 0
        for _ in range(3 if g == 0 else 1):
            rows.append(phase[0] + tr[g] + rng.standard_normal(t))
            groups.append(g)
            labels.append(0)
    for _ in range(6):  # phase 1 meters, alone on their transformers
        rows.append(phase[1] + rng.standard_normal(t))
        groups.append(-1)
        labels.append(1)
    rows.append(phase[1] + 0.5 * rng.standard_normal(t))  # GIS puts it on transformer 0: wrong
    groups.append(0)
    labels.append(1)
    x = xp.asarray(np.stack(rows))
    templates = phase_templates(x, one_hot(xp.asarray(np.array(labels)), 2))
    own, _ = template_scores(x, templates)
    member, _, pooled = pool_by_transformer(x, xp.asarray(np.array(groups)), 30, xp.max(own, axis=1))
    member = to_np(member)
    assert member[:3].all() and not member[3:].any()
    p = to_np(pooled)
    np.testing.assert_allclose(p[0], p[2])
    np.testing.assert_allclose(np.linalg.norm(p, axis=1), 1.0)


@BACKENDS
def test_error_probability_is_monotone_in_margin_and_samples(xp):
    gram = np.array([[1.0, -0.5, -0.5], [-0.5, 1.0, -0.5], [-0.5, -0.5, 1.0]])
    scores = np.array([[0.30, 0.05, 0.0], [0.20, 0.15, 0.0], [0.30, 0.05, 0.0]])
    best, p, r2 = margin_error_probability(xp.asarray(scores), xp.asarray(gram), xp.asarray([600.0, 600.0, 60.0]))
    p = to_np(p)
    assert to_np(best).tolist() == [0, 0, 0]
    assert p[0] < p[2] < 0.5 and p[0] < p[1] < 1.0
    assert (0 <= to_np(r2)).all() and (to_np(r2) <= 0.99).all()


def test_error_probability_is_calibrated_under_the_noise_model():
    rng = np.random.default_rng(5)
    t, k = 300, 3
    templates = np.linalg.qr(rng.standard_normal((t, k)))[0].T  # orthonormal
    n = 4000
    truth = rng.integers(0, k, n)
    x = 0.25 * templates[truth] + rng.standard_normal((n, t)) / np.sqrt(t)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    best, p, _ = margin_error_probability(x @ templates.T, templates @ templates.T, np.full(n, float(t)))
    wrong, p = np.asarray(best) != truth, np.asarray(p)
    # conservative on average, and meters called nearly certain (p < 4e-4) are right
    assert wrong.mean() <= p.mean()
    sure = p < 4e-4
    assert sure.sum() > 100 and wrong[sure].mean() < 1e-3


@BACKENDS
def test_leave_group_out_scores_equal_brute_force(xp):
    x, truth = _three_phase(seed=3, per=6, t=200)
    x[0, :5] = np.nan
    group = np.array([0, 0, 1, 1, 1, -1] * 3)
    group[6:] += np.repeat([2, 4], 6)[: 12] * (group[6:] >= 0)
    sig = np.asarray(to_np(phase_templates(xp.asarray(x), one_hot(xp.asarray(np.arange(18)), 18))))  # unit rows
    w = np.eye(3)[truth]
    got = to_np(leave_group_out_scores(xp.asarray(sig), xp.asarray(x), xp.asarray(w), xp.asarray(group), 8))
    u = np.nan_to_num(x)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    for i in range(18):
        keep = (group != group[i]) if group[i] >= 0 else (np.arange(18) != i)
        t = (w * keep[:, None]).T @ u
        t /= np.linalg.norm(t, axis=1, keepdims=True)
        np.testing.assert_allclose(got[i], t @ sig[i], atol=1e-12)


@BACKENDS
def test_within_group_gram_matches_direct_dot_products(xp):
    from phaseid_hpc.kernels.phase_clustering import group_pairs, within_group_gram

    rng = np.random.default_rng(3)
    group = np.array([2, 0, -1, 2, 1, 0, 2, 3, 3, 3, 3, 3, -1, 1, 2])  # sizes 1..5 and ungrouped rows
    u = rng.standard_normal((group.size, 40))
    rows, cols, gram = within_group_gram(xp.asarray(u), group)
    r2, c2 = group_pairs(group)
    assert np.array_equal(rows, r2) and np.array_equal(cols, c2)
    expected = {(i, j) for i in range(group.size) for j in range(group.size) if group[i] >= 0 and group[i] == group[j]}
    assert set(zip(rows.tolist(), cols.tolist())) == expected
    np.testing.assert_allclose(gram, np.einsum("pt,pt->p", u[rows], u[cols]), rtol=1e-12, atol=1e-12)


def test_gram_refinement_equals_reference_kernels():
    """The fast refinement (dot products only) gives the scores of the full-length reference kernels."""
    from phaseid_hpc.kernels.preprocess import unit_rows
    from phaseid_hpc.phase_identification import _refine, _RefineInputs

    x, truth = _three_phase(seed=4, t=300, per=40, noise=3.0)
    rng = np.random.default_rng(5)
    x[rng.random(x.shape) < 0.05] = np.nan  # some missing samples
    n = truth.size
    group = np.repeat(np.arange(n // 4), 4)[rng.permutation(n)]
    group[:3] = -1  # ungrouped (e.g. not single-phase) rows
    single = group >= 0
    code = np.where(single, truth, -1)
    code[single & (rng.random(n) < 0.1)] = 0  # some wrong labels
    present = np.arange(3)
    obs = ~np.isnan(x)
    inp = _RefineInputs(np, np.where(obs, x, 0.0), obs, unit_rows(x), group)
    new, templates, scores, span = _refine(np, inp, code.copy(), present, single)
    # one reference iteration from the last labels gives the same scores
    w = one_hot(np.where(single, new, -1), 3)
    t_ref = phase_templates(x, w)
    own, _ = template_scores(x, t_ref)
    _, _, pooled = pool_by_transformer(x, group, int(group.max()) + 1, own.max(axis=1))
    ref_scores = leave_group_out_scores(pooled, x, w, group, int(group.max()) + 1)
    np.testing.assert_allclose(templates, t_ref, atol=1e-12)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-9)
    np.testing.assert_allclose(span, pooled @ t_ref.T, atol=1e-9)
    assert (np.where(single, ref_scores.argmax(axis=1), -1) == new).all()
