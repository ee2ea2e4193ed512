"""Tests of phaseid_hpc/kernels/quality.py on NumPy and array-api-strict."""

from __future__ import annotations

import numpy as np
import pytest

from phaseid_hpc.config import QualityConfig
from phaseid_hpc.kernels import quality as kq
from phaseid_hpc.quality import block_parameters
from phaseid_hpc.synth.measurement import MeasurementModel, apply_measurement_model

xps = pytest.importorskip("array_api_strict")

_CFG = QualityConfig()
#: The clock thresholds of the default configuration (the kernels have no defaults of their own).
CLOCK = {
    "min_pairs": _CFG.min_usable_samples,
    "min_correlation": _CFG.clock_min_correlation,
    "min_meters": _CFG.clock_min_meters,
}


def params(**over):
    """Keyword arguments of ``quality_block``: the default configuration's thresholds with overrides."""
    return {**block_parameters(_CFG), **over}


def feeder_voltage(n_meters: int, n_time: int, seed: int, base: float = 240.0) -> np.ndarray:
    """A feeder: shared random-walk source variation, per-meter local variation and noise. [V]"""
    rng = np.random.default_rng(seed)
    common = np.cumsum(rng.normal(0.0, 0.002, n_time))
    local = np.cumsum(rng.normal(0.0, 0.0005, (n_meters, n_time)), axis=1)
    return base * (1.0 + 0.02 + common + local + rng.normal(0.0, 0.0003, (n_meters, n_time)))


def test_nanmedian_without_missing_values_is_the_middle_of_the_sorted_values():
    rng = np.random.default_rng(2)
    for shape in ((7, 33), (8, 40)):
        x = rng.normal(size=shape)
        s = np.sort(x, axis=0)
        n = x.shape[0]
        np.testing.assert_array_equal(kq.nanmedian(x, axis=0), (s[(n - 1) // 2] + s[n // 2]) / 2)


def test_nanmedian_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 33))
    x[rng.random(x.shape) < 0.3] = np.nan
    x[3] = np.nan
    got = kq.nanmedian(x, axis=1)
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):
        want = np.nanmedian(x, axis=1)
    np.testing.assert_allclose(got, want, equal_nan=True)
    np.testing.assert_allclose(kq.nanmedian(x, axis=0), np.nanmedian(x, axis=0), equal_nan=True)


@pytest.mark.parametrize("nan_share", [0.01, 0.6])
def test_nanmedian_selection_and_sort_agree(nan_share, monkeypatch):
    # few missing values: the medians' order positions span a few places (np.partition); many, varying per
    # column: they span more than _MAX_PARTITION_KTH (the sort); either way exactly np.nanmedian
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 50))
    x[rng.random(x.shape) < nan_share] = np.nan
    got = kq.nanmedian(x, axis=0)
    np.testing.assert_array_equal(got, np.nanmedian(x, axis=0))
    monkeypatch.setattr(kq, "_MAX_PARTITION_KTH", 0)  # always sort
    np.testing.assert_array_equal(kq.nanmedian(x, axis=0), got)


@pytest.mark.parametrize("gap", [1, 2, 3])
def test_gaps_up_to_max_are_interpolated_exactly(gap):
    v = np.tile(np.arange(20, dtype=np.float64) * 2.0 + 230.0, (2, 1))
    v[0, 5 : 5 + gap] = np.nan
    filled, n_filled, n_gaps, n_long = kq.fill_short_gaps(v, 3)
    np.testing.assert_allclose(filled[0], v[1])  # a straight line is restored exactly
    assert n_filled.tolist() == [gap, 0] and n_gaps.tolist() == [1, 0] and n_long.tolist() == [0, 0]


def test_gap_longer_than_max_and_edge_gaps_stay_missing():
    v = np.full((3, 20), 240.0)
    v[0, 5:9] = np.nan  # 4 > 3
    v[1, :2] = np.nan  # leading, short: no neighbour before
    v[2, 16:] = np.nan  # trailing, 4 long
    v[2, 3] = np.nan  # plus one short interior gap
    filled, n_filled, n_gaps, n_long = kq.fill_short_gaps(v, 3)
    assert np.isnan(filled[0, 5:9]).all() and not np.isnan(filled[0, :5]).any()
    assert np.isnan(filled[1, :2]).all()
    assert np.isnan(filled[2, 16:]).all() and filled[2, 3] == 240.0
    assert n_filled.tolist() == [0, 0, 1]
    assert n_gaps.tolist() == [0, 0, 1]
    assert n_long.tolist() == [1, 0, 1]


def test_max_gap_zero_fills_nothing():
    v = np.full((1, 10), 240.0)
    v[0, 4] = np.nan
    filled, n_filled, _, n_long = kq.fill_short_gaps(v, 0)
    assert np.isnan(filled[0, 4]) and n_filled[0] == 0 and n_long[0] == 1


def test_flat_run_mask_marks_runs_longer_than_limit_only():
    rng = np.random.default_rng(1)
    v = 240.0 + rng.normal(0.0, 1.0, (3, 60))
    v[0, 10:21] = 241.0  # 11 identical samples > 10
    v[1, 10:20] = 241.0  # 10 identical samples: allowed
    v[2] = 239.0  # constant meter
    mask, constant = kq.flat_run_mask(v, 10)
    assert np.flatnonzero(mask[0]).tolist() == list(range(10, 21))
    assert not mask[1].any()
    assert mask[2].all()
    assert constant.tolist() == [False, False, True]


def test_detect_units_cases():
    med = np.array([241.0, 0.241, 416.0, 120.0, 121.0, np.nan, 0.121, 275.0, 5000.0, 240.0])
    nom = np.array([240.0, 240.0, 240.0, 208.0, 240.0, 240.0, np.nan, np.nan, 240.0, 120.0])
    scale, base, code, inferred = kq.detect_units(med, nom, min_pu=0.8, max_pu=1.1)
    assert code.tolist() == [
        kq.UNITS_OK,
        kq.UNITS_KV,
        kq.UNITS_LINE_TO_LINE,
        kq.UNITS_LINE_TO_NEUTRAL,
        kq.UNITS_HALF_BASE,
        kq.UNITS_OK,  # no readings: nothing to say
        kq.UNITS_KV,  # unknown nominal, kV readings
        kq.UNITS_OK,  # unknown nominal, inferred 277
        kq.UNITS_UNKNOWN,
        kq.UNITS_DOUBLE_BASE,
    ]
    assert scale.tolist() == [1, 1000, 1, 1, 1, 1, 1000, 1, 1, 1]
    np.testing.assert_allclose(base[[0, 1, 2, 4, 6, 7, 9]], [240, 240, 240 * 3**0.5, 120, 120, 277, 240])
    assert np.isnan(base[8])
    assert inferred.tolist() == [False] * 6 + [True, True, False, False]


def test_clock_offsets_recovered_on_synthetic_feeder():
    v = feeder_voltage(40, 960, seed=2)
    model = MeasurementModel(
        accuracy_class=0.2, resolution_v=0.0, clock_offset_fraction=0.4, clock_offset_max_s=800.0
    )
    meas, true = apply_measurement_model(v, model, interval_s=900.0, random_state=3)
    off, corr, _ = kq.estimate_clock_offsets(
        meas / 240.0, np.zeros(40, dtype=np.int64), max_lag=1, exclude_above=60.0 / 900.0, n_refine=2, **CLOCK
    )
    err = off * 900.0 - true
    assert np.isfinite(off).all() and (corr > 0.5).all()
    assert np.median(np.abs(err)) < 15.0, err  # [s], measured 8 s (42 s without the refinement passes)
    assert np.max(np.abs(err)) < 90.0, err


def test_clock_offsets_positive_means_series_late():
    v = feeder_voltage(20, 960, seed=4)
    meas = v.copy()
    t = np.arange(960, dtype=np.float64)
    meas[0] = np.interp(t - 0.5, t, v[0])  # meter 0 reads what happened half an interval earlier
    off, _, _ = kq.estimate_clock_offsets(meas / 240.0, np.zeros(20, dtype=np.int64), max_lag=1, **CLOCK)
    assert 0.4 < off[0] < 0.6


def test_groups_in_one_call_equal_separate_calls():
    a = feeder_voltage(12, 500, seed=5)
    b = feeder_voltage(9, 500, seed=6, base=120.0) / 120.0 * 240.0
    both = np.concatenate([a, b]) / 240.0
    groups = np.array([3] * 12 + [7] * 9)
    off, _, _ = kq.estimate_clock_offsets(both, groups, max_lag=1, **CLOCK)
    off_a, _, _ = kq.estimate_clock_offsets(a / 240.0, np.zeros(12, dtype=np.int64), max_lag=1, **CLOCK)
    off_b, _, _ = kq.estimate_clock_offsets(b / 240.0, np.zeros(9, dtype=np.int64), max_lag=1, **CLOCK)
    np.testing.assert_allclose(off, np.concatenate([off_a, off_b]), rtol=1e-9, atol=1e-9)
    # interleaved rows give the same per-row answers
    perm = np.random.default_rng(0).permutation(21)
    off_p, _, _ = kq.estimate_clock_offsets(both[perm], groups[perm], max_lag=1, **CLOCK)
    np.testing.assert_allclose(off_p, off[perm], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("xp", [np, xps], ids=["numpy", "array_api_strict"])
def test_refinement_recomputes_only_groups_whose_contributors_changed(xp):
    # three feeders, offset meters on two of them: the refinement passes must give exactly what recomputing
    # every group each pass gives (a group whose contributors did not change keeps its numbers)
    model = MeasurementModel(accuracy_class=0.2, resolution_v=0.0, clock_offset_fraction=0.3, clock_offset_max_s=800.0)
    parts = [feeder_voltage(15, 600, seed=s) for s in (11, 12, 13)]
    parts[0], _ = apply_measurement_model(parts[0], model, interval_s=900.0, random_state=1)
    parts[2], _ = apply_measurement_model(parts[2], model, interval_s=900.0, random_state=2)
    v = np.concatenate(parts) / 240.0
    groups = np.repeat([0, 1, 2], 15)
    kw = {**CLOCK, "max_lag": 1, "max_common_meters": 256}
    got = kq.estimate_clock_offsets(xp.asarray(v), xp.asarray(groups), exclude_above=60.0 / 900.0, n_refine=2,
                                    max_lag=1, **CLOCK)
    diffs = kq._differenced(xp.asarray(v[:, 1:] - v[:, :-1]))
    rows_list = kq._group_rows(groups)
    est = kq._clock_offsets_once(diffs, rows_list, include=None, **kw)
    changed = []
    for _ in range(2):  # every group recomputed, as before the shortcut
        inc = xp.isfinite(est[0]) & (xp.abs(est[0]) <= 60.0 / 900.0)
        new = kq._clock_offsets_once(diffs, rows_list, include=inc, **kw)
        changed.append(int(np.sum(np.isfinite(np.asarray(new[0])) & (np.asarray(new[0]) != np.asarray(est[0])))))
        est = kq._take(xp.isfinite(new[0]), new, est, xp)
    assert changed[0] > 0  # the offset meters moved their feeders' estimates
    for a, b in zip(got, est):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # some groups only: those rows as in the full call, NaN elsewhere
    inc = xp.isfinite(est[0])
    full = kq._clock_offsets_once(diffs, rows_list, include=inc, **kw)
    part = kq._clock_offsets_once(diffs, [rows_list[2], rows_list[0]], include=inc, **kw)
    for a, b in zip(full, part):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_array_equal(b[groups != 1], a[groups != 1])
        assert np.isnan(b[groups == 1]).all()


def test_clock_offset_needs_enough_meters():
    v = feeder_voltage(2, 500, seed=7) / 240.0
    off, _, _ = kq.estimate_clock_offsets(v, np.zeros(2, dtype=np.int64), max_lag=1, **CLOCK)  # needs 3
    assert np.isnan(off).all()


def test_shift_rows_advances_by_linear_interpolation():
    v = feeder_voltage(3, 200, seed=8)
    t = np.arange(200, dtype=np.float64)
    delays = np.array([0.3, -1.4, 0.0])
    back = kq.shift_rows(v, delays, max_shift=3)
    want = np.stack([np.interp(t + d, t, row) for d, row in zip(delays, v)])
    np.testing.assert_allclose(back[:, 3:-3], want[:, 3:-3], rtol=1e-12)
    np.testing.assert_array_equal(back[2], v[2])
    assert np.isnan(back[0, -1]) and np.isnan(back[1, :2]).all()  # shifted in from beyond the ends
    # a straight line is moved exactly: delaying then advancing gives it back
    line = np.tile(230.0 + 0.01 * t, (1, 1))
    late = np.interp(t - 0.3, t, line[0])[None, :]
    np.testing.assert_allclose(kq.shift_rows(late, np.array([0.3]), max_shift=1)[0, 1:-1], line[0, 1:-1])


def _block_inputs(seed: int = 9):
    rng = np.random.default_rng(seed)
    v = feeder_voltage(16, 400, seed=seed)
    v[0, 10:13] = np.nan
    v[1, 20:40] = np.nan
    v[2] = np.nan
    v[3, 50:200] = v[3, 50]
    v[4] /= 1000.0
    v[5, 7] = 10.0
    v[6, rng.random(400) < 0.7] = np.nan
    nominal = np.full(16, 240.0)
    nominal[7] = np.nan
    sampling = np.full(16, 900.0)
    sampling[8] = 300.0
    off_grid = np.zeros(16)
    off_grid[9] = 0.5
    groups = np.array([0] * 8 + [1] * 8)
    return v, nominal, sampling, off_grid, groups


@pytest.mark.parametrize(("correct", "with_refs"), [(False, False), (True, False), (False, True)])
def test_quality_block_on_array_api_strict_matches_numpy(correct, with_refs):
    args = _block_inputs()
    kw = {
        "interval_s": 900.0,
        "min_usable_samples": 50,
        "correct_clock_offset": correct,
        "max_clock_offset_s": 10.0,
        "clock_flag_z": 0.0,
    }
    refs = {}
    if with_refs:  # feeder 1 has a reference row, feeder 0 keeps its median
        r = np.nanmedian(args[0][8:], axis=0)[None, :] * 30.0
        refs = {"references": r, "reference_groups": np.array([1])}
    ref = kq.quality_block(*args, **params(**kw), **refs)
    got = kq.quality_block(
        *(xps.asarray(a) for a in args), **params(**kw), **{k: xps.asarray(a) for k, a in refs.items()}
    )
    for name, want in ref._asdict().items():
        have = np.from_dlpack(getattr(got, name))
        np.testing.assert_allclose(have, want, rtol=1e-10, atol=1e-10, equal_nan=True, err_msg=name)
    assert ref.units_code[4] == kq.UNITS_KV and ref.flat_line[3] and ref.no_readings[2]
    if correct:
        assert ref.clock_corrected.any()


def test_quality_block_is_deterministic():
    args = _block_inputs(seed=10)
    a = kq.quality_block(*args, **params(interval_s=900.0))
    b = kq.quality_block(*(x.copy() for x in args), **params(interval_s=900.0))
    for name in a._fields:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_quality_block_float32_keeps_dtype():
    args = list(_block_inputs(seed=11))
    args[0] = args[0].astype(np.float32)
    r = kq.quality_block(*args, **params(interval_s=900.0))
    assert r.voltage.dtype == np.float32


def _flat_mask_brute(v: np.ndarray, R: int) -> np.ndarray:
    """Samples in runs of more than ``R`` identical (non-NaN) consecutive readings, by walking the runs."""
    mask = np.zeros(v.shape, dtype=bool)
    for i, row in enumerate(v):
        n = 0
        while n < row.size:
            e = n + 1
            while e < row.size and row[e] == row[n]:
                e += 1
            if R > 0 and e - n > R:
                mask[i, n:e] = True
            n = e
    return mask


@pytest.mark.parametrize("seed", range(4))
def test_flat_run_mask_matches_walking_the_runs(seed):
    rng = np.random.default_rng(seed)
    for R in (1, 2, 3, 5, 8):
        v = rng.integers(0, 2, (6, 41)).astype(np.float64)
        v[rng.random(v.shape) < 0.05] = np.nan
        v[5] = 1.0  # constant row
        want = _flat_mask_brute(v, R)
        for mod in (np, xps):
            mask, constant = kq.flat_run_mask(mod.asarray(v), R)
            np.testing.assert_array_equal(np.asarray(mask), want, err_msg=f"R={R} {mod.__name__}")
            assert np.asarray(constant).tolist() == [False] * 5 + [True]


def test_quality_block_complete_rows_and_inf_match_array_api_strict():
    """NumPy's fast paths (no missing samples, in-place cleaning, Gram row per feeder) agree with the generic path."""
    v, nominal, sampling, off_grid, groups = _block_inputs(seed=12)
    v = np.round(feeder_voltage(16, 400, seed=12), 1)  # complete, quantised like a meter
    v[4] /= 1000.0
    nominal[5] = 1e-9  # no plausible base
    args = (v, nominal, sampling, off_grid, groups)
    kw = {"interval_s": 900.0, "min_usable_samples": 50, "max_flat_run": 4}
    for extra in (None, (3, 100, np.inf)):
        a = [x.copy() for x in args]
        if extra is not None:
            a[0][extra[0], extra[1]] = extra[2]
        before = a[0].copy()
        ref = kq.quality_block(*a, **params(**kw))
        np.testing.assert_array_equal(a[0], before)  # the input is not modified
        got = kq.quality_block(*(xps.asarray(x) for x in a), **params(**kw))
        for name, want in ref._asdict().items():
            have = np.from_dlpack(getattr(got, name))
            np.testing.assert_allclose(have, want, rtol=1e-9, atol=1e-12, equal_nan=True, err_msg=name)


def test_detect_kilovolts_is_the_kv_rule_of_detect_units():
    rng = np.random.default_rng(13)
    med = np.concatenate([rng.uniform(0.05, 600.0, 200), rng.uniform(0.08, 0.6, 100), [np.nan, 0.0, -0.24]])
    nom = rng.choice([120.0, 208.0, 240.0, 277.0, 480.0, np.nan, 0.0], med.size)
    for mod in (np, xps):
        kv = np.asarray(kq.detect_kilovolts(mod.asarray(med), mod.asarray(nom), min_pu=0.8, max_pu=1.1))
        scale, _, code, _ = kq.detect_units(mod.asarray(med), mod.asarray(nom), min_pu=0.8, max_pu=1.1)
        np.testing.assert_array_equal(kv, np.asarray(code) == kq.UNITS_KV)
        np.testing.assert_array_equal(kv, np.asarray(scale) == 1000.0)
    assert kv.sum() > 20 and not kv[-3:].any()
    known = np.isfinite(nom) & (nom > 0)
    pu = 1000.0 * med / np.where(known, nom, np.nan)
    np.testing.assert_array_equal(
        kv[known], ((pu >= 0.8) & (pu <= 1.1))[known]
    )  # no V reading is in band there


def test_sampling_consistency_flags_interval_and_off_grid():
    si = np.array([900.0, 905.0, 950.0, np.nan, 900.0, 300.0])
    og = np.array([0.0, 0.0, 0.0, 0.5, np.nan, np.nan])
    for mod in (np, xps):
        bad = kq.sampling_consistency(
            mod.asarray(si),
            mod.asarray(og),
            interval_s=900.0,
            sampling_rel_tol=0.01,
            max_off_grid_fraction=0.05,
        )
        assert np.asarray(bad).tolist() == [False, False, True, True, False, True]


def test_clock_offset_flag_needs_the_margin():
    off = np.array([100.0, 100.0, -100.0, 50.0, np.nan, 100.0])
    se = np.array([10.0, 30.0, 10.0, 1.0, 1.0, np.nan])
    for mod in (np, xps):
        flag = kq.clock_offset_flag(mod.asarray(off), mod.asarray(se), limit_s=60.0, z=2.0)
        assert np.asarray(flag).tolist() == [True, False, True, False, False, True]


def test_quality_block_needs_every_threshold():
    args = _block_inputs(seed=14)
    kw = params(interval_s=900.0)
    del kw["max_flat_run"]
    with pytest.raises(TypeError, match="max_flat_run"):
        kq.quality_block(*args, **kw)
