"""Tests of phaseid_hpc/quality.py (assess_quality): each check triggers on its case and not on clean data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from phaseid_hpc import contract as C
from phaseid_hpc.config import QualityConfig
from phaseid_hpc.quality import QUALITY_COLUMNS, assess_quality
from phaseid_hpc.synth.measurement import MeasurementModel, apply_measurement_model

N, T, DT = 24, 672, 900.0  # one feeder, 7 days of 15-minute data
#: At 15-minute resolution and 7 days the estimator's error is tens of seconds (see the ckt5 test), so the
#: default 60 s limit would flag clean meters now and then; tests of other checks use 180 s.
CFG = QualityConfig(max_clock_offset_s=180.0)


def clean_feeder(seed: int = 0, n: int = N, n_time: int = T) -> np.ndarray:
    """Realistic-looking voltages: shared source random walk, local variation, class-0.5 noise, 0.1 V. [V]"""
    rng = np.random.default_rng(seed)
    common = ar1(rng.normal(0.0, 0.002, (1, n_time)), 0.98)
    local = ar1(rng.normal(0.0, 0.0004, (n, n_time)), 0.95)
    v = 240.0 * (1.01 + common + local)
    # a seed of its own: the same stream as `rng` would make the noise copy the source variation
    v, _ = apply_measurement_model(v, MeasurementModel(), interval_s=DT, random_state=seed + 1000)
    return v


def ar1(e: np.ndarray, phi: float) -> np.ndarray:
    """AR(1) along the last axis from innovations ``e``."""
    out = np.empty_like(e)
    out[..., 0] = e[..., 0]
    for k in range(1, e.shape[-1]):
        out[..., k] = phi * out[..., k - 1] + e[..., k]
    return out


def run(v, *, nominal=None, sampling=None, off_grid=None, config=CFG, **kw):
    n = v.shape[0]
    return assess_quality(
        v,
        np.full(n, 240.0) if nominal is None else nominal,
        np.full(n, DT) if sampling is None else sampling,
        np.zeros(n) if off_grid is None else off_grid,
        DT,
        config,
        **kw,
    )


def test_clean_data_has_no_findings():
    v = clean_feeder()
    q = run(v, meter_ids=[f"m{i}" for i in range(N)])
    t = q.table
    assert list(t.columns) == list(QUALITY_COLUMNS)
    assert t.index.tolist() == [f"m{i}" for i in range(N)]
    assert t["usable"].all() and (t["usable_fraction"] == 1.0).all()
    assert all(r == [] for r in t["reasons"]), t["reasons"]
    assert (t["detected_units"] == "V").all()
    assert np.isfinite(t["clock_offset_s"]).all() and (t["clock_offset_s"].abs() < 180).all()
    np.testing.assert_array_equal(q.voltage, v)


def test_sampling_inconsistency_flags_and_excludes():
    v = clean_feeder(1)
    sampling = np.full(N, DT)
    sampling[0] = 300.0
    sampling[2] = np.nan  # unknown: not a finding
    off_grid = np.zeros(N)
    off_grid[1] = 0.2
    t = run(v, sampling=sampling, off_grid=off_grid).table
    for i in (0, 1):
        assert C.REASON_INCONSISTENT_SAMPLING in t["reasons"][i] and not t["usable"][i]
    assert t["reasons"][2] == [] and t["usable"][2]
    cfg = QualityConfig(max_clock_offset_s=180.0, inconsistent_sampling_unusable=False)
    t2 = run(v, sampling=sampling, off_grid=off_grid, config=cfg).table
    assert t2["usable"][0] and C.REASON_INCONSISTENT_SAMPLING in t2["reasons"][0]


def test_gaps_interpolation_limit_and_long_gap_reason():
    v = clean_feeder(2)
    v[0, 100:103] = np.nan  # 3: filled
    v[1, 100:104] = np.nan  # 4: not filled
    q = run(v)
    t = q.table
    assert not np.isnan(q.voltage[0]).any() and t["n_gaps_filled"][0] == 1 and t["reasons"][0] == []
    assert np.isnan(q.voltage[1, 100:104]).all() and t["n_long_gaps"][1] == 1
    assert t["reasons"][1] == [C.REASON_LONG_GAPS] and t["usable"][1]
    assert t["usable_fraction"][1] == pytest.approx((T - 4) / T)


def test_insufficient_and_no_readings():
    v = clean_feeder(3)
    v[0, T // 3 :] = np.nan  # a third left < 0.5
    v[1] = np.nan
    v[2, 90:] = np.nan  # 90 samples < min_usable_samples = 96 ... and < 0.5
    t = run(v).table
    assert C.REASON_INSUFFICIENT_DATA in t["reasons"][0] and not t["usable"][0]
    assert t["reasons"][1] == [C.REASON_NO_READINGS] and not t["usable"][1]
    assert np.isnan(t["clock_offset_s"][1]) and t["usable_fraction"][1] == 0.0
    assert C.REASON_INSUFFICIENT_DATA in t["reasons"][2]
    cfg = QualityConfig(max_clock_offset_s=180.0, min_usable_fraction=0.1, min_usable_samples=10)
    assert run(v, config=cfg).table["usable"][2]


def test_implausible_samples_removed_and_mostly_implausible_meter_flagged():
    v = clean_feeder(4)
    v[0, 50] = 30.0  # one spike: removed, then interpolated like a one-sample gap
    v[1, : int(T * 0.6)] = 20.0  # mostly outside (and no unit confusion explains it)
    q = run(v)
    t = q.table
    assert t["n_implausible"][0] == 1 and t["reasons"][0] == [] and 200 < q.voltage[0, 50] < 280
    assert C.REASON_IMPLAUSIBLE_VOLTAGE in t["reasons"][1] and not t["usable"][1]
    assert np.isnan(q.voltage[1, : int(T * 0.6)]).all()


def test_flat_line_runs_and_constant_meter():
    v = clean_feeder(5)
    v[0, 200:300] = 241.05  # 100 identical > 96 (off the 0.1 V grid: neighbours differ)
    v[1, 200:296] = 241.05  # 96: allowed
    v[2] = 241.0  # stuck for good
    q = run(v)
    t = q.table
    assert C.REASON_FLAT_LINE in t["reasons"][0] and t["usable"][0] and t["n_flat"][0] == 100
    assert np.isnan(q.voltage[0, 200:300]).all()
    assert C.REASON_FLAT_LINE not in t["reasons"][1]
    assert C.REASON_FLAT_LINE in t["reasons"][2] and not t["usable"][2]


def test_wrong_units_detected_and_kv_rescaled():
    v = clean_feeder(6)
    v[0] /= 1000.0  # kV
    v[1] *= np.sqrt(3.0)  # line-to-line on a line-to-neutral nominal
    nominal = np.full(N, 240.0)
    nominal[2] = np.nan  # unknown nominal: inferred, not a finding
    q = run(v, nominal=nominal)
    t = q.table
    assert t["detected_units"][0] == "kV" and C.REASON_WRONG_UNITS in t["reasons"][0] and t["usable"][0]
    np.testing.assert_allclose(q.voltage[0], v[0] * 1000.0)
    assert t["detected_units"][1] == "line-to-line" and C.REASON_WRONG_UNITS in t["reasons"][1]
    assert t["usable"][1] and t["nominal_v_used"][1] == pytest.approx(240.0 * np.sqrt(3.0))
    assert t["nominal_inferred"][2] and t["nominal_v_used"][2] == 240.0 and t["reasons"][2] == []


def test_clock_offset_flagged_and_optionally_corrected():
    rng = np.random.default_rng(7)
    true = 240.0 * (
        1.01 + ar1(rng.normal(0.0, 0.002, (1, T)), 0.98) + ar1(rng.normal(0.0, 0.0004, (N, T)), 0.95)
    )
    t_ = np.arange(T, dtype=np.float64)
    true[0] = np.interp(t_ - 300.0 / DT, t_, true[0])  # 300 s late
    true[1] = np.interp(t_ + 450.0 / DT, t_, true[1])  # 450 s early
    v, _ = apply_measurement_model(true, MeasurementModel(), interval_s=DT, random_state=1007)
    t = run(v).table
    assert t["clock_offset_s"][0] == pytest.approx(300.0, abs=45.0)
    assert t["clock_offset_s"][1] == pytest.approx(-450.0, abs=45.0)
    assert C.REASON_CLOCK_OFFSET in t["reasons"][0] and C.REASON_CLOCK_OFFSET in t["reasons"][1]
    assert t["usable"][0] and not t["clock_corrected"].any()
    q = run(v, config=QualityConfig(max_clock_offset_s=180.0, correct_clock_offset=True))
    assert q.table["clock_corrected"][:2].all() and not q.table["clock_corrected"][2:].any()
    again = run(q.voltage).table
    assert abs(again["clock_offset_s"][0]) < 45.0 and abs(again["clock_offset_s"][1]) < 45.0


def test_feeders_in_one_block_use_their_own_common_signal():
    a, b = clean_feeder(8), clean_feeder(9)
    v = np.concatenate([a, b])
    feeders = np.array(["F1"] * N + ["F2"] * N)
    together = run(v, feeder_ids=feeders).table["clock_offset_s"].to_numpy()
    alone = np.concatenate([run(a).table["clock_offset_s"], run(b).table["clock_offset_s"]])
    np.testing.assert_allclose(together, alone, atol=1e-9)


def test_same_inputs_same_table():
    v = clean_feeder(10)
    v[3, 10:50] = np.nan
    a, b = run(v.copy()), run(v.copy())
    pd.testing.assert_frame_equal(a.table, b.table)
    np.testing.assert_array_equal(a.voltage, b.voltage)


def test_bad_shapes_raise_with_the_name():
    v = clean_feeder(11)
    with pytest.raises(ValueError, match="nominal_v"):
        run(v, nominal=np.full(N - 1, 240.0))
    with pytest.raises(ValueError, match="voltage"):
        run(v[0])


@pytest.mark.requires_shared
def test_clock_offset_accuracy_on_ckt5(ckt5):
    """14 days of ckt5, class 0.5 noise, 0.1 V, 30% of meters offset uniformly in +-300 s (seed 1).

    Measured (1,379 meters): median |error| 44 s over all meters, 43 s over the offset meters; 61 s at 7 days,
    35 s at 35 days. A 120 s limit then flags 90% of meters offset by more and 9% of meters offset by < 60 s.
    """
    df = pd.read_parquet(ckt5 / "readings.parquet", columns=["meter_id", "timestamp", "voltage_v"])
    wide = df.pivot(index="meter_id", columns="timestamp", values="voltage_v")
    v = wide.to_numpy(np.float64)[:, : 14 * 96]
    model = MeasurementModel(
        accuracy_class=0.5, resolution_v=0.1, clock_offset_fraction=0.3, clock_offset_max_s=300.0
    )
    meas, true = apply_measurement_model(v, model, interval_s=900.0, random_state=1)
    n = len(v)
    cfg = QualityConfig(max_clock_offset_s=120.0)
    t = run(
        meas, nominal=np.full(n, 240.0), sampling=np.full(n, 900.0), off_grid=np.zeros(n), config=cfg
    ).table
    est = t["clock_offset_s"].to_numpy()
    err = est - true
    assert np.isfinite(err).mean() > 0.99
    assert np.nanmedian(np.abs(err)) < 60.0
    assert np.nanmedian(np.abs(err[true != 0])) < 60.0
    flagged = t["reasons"].map(lambda r: C.REASON_CLOCK_OFFSET in r).to_numpy()
    assert flagged[np.abs(true) > 120].mean() > 0.8 and flagged[np.abs(true) < 60].mean() < 0.2
