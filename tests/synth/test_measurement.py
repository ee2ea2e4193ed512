"""Tests of phaseid_hpc/synth/measurement.py."""

from __future__ import annotations

import numpy as np
import pytest

from phaseid_hpc.synth import simulate_feeder
from phaseid_hpc.synth.measurement import (
    MeasurementModel,
    _shift,
    apply_measurement_model,
    collector_distance_m,
)


def test_shift_equals_interp():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((6, 40))
    s = np.array([0.0, 0.3, -2.7, 10.5, -60.0, 39.2])
    t = np.arange(40.0)
    ref = np.stack([np.interp(t - s[i], t, v[i]) for i in range(6)])
    np.testing.assert_allclose(_shift(v, s), ref, atol=1e-12)


def test_measurement_model_noise_rounding_missing_and_seed():
    v = np.full((400, 960), 240.0)
    model = MeasurementModel(accuracy_class=0.5, resolution_v=0.1, missing_fraction=0.05)
    out, off = apply_measurement_model(v, model, interval_s=900, random_state=3)
    again, _ = apply_measurement_model(v, model, interval_s=900, random_state=3)
    np.testing.assert_array_equal(out, again)
    assert 0.035 < np.isnan(out).mean() < 0.065
    ok = ~np.isnan(out)
    assert abs(np.std(out[ok]) / 240 - model.sigma) < 0.2 * model.sigma
    assert np.allclose(out[ok] * 10, np.round(out[ok] * 10))
    assert not off.any()


def test_missing_data_grows_with_hops_from_the_collector():
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 6000, (1200, 2))  # [m]
    dist = collector_distance_m(xy, meters_per_collector=600, random_state=2)
    assert dist.min() == 0.0 and dist.max() < 6000 * np.sqrt(2)
    v = np.full((1200, 672), 240.0)
    model = MeasurementModel(missing_fraction=0.05, missing_hop_m=400.0)
    out, _ = apply_measurement_model(v, model, interval_s=900, random_state=3, distance_m=dist)
    miss = np.isnan(out).mean(axis=1)
    assert abs(miss.mean() - 0.05) < 0.01  # the total share is kept
    near, far = dist < np.quantile(dist, 0.25), dist > np.quantile(dist, 0.75)
    assert miss[far].mean() > 2.5 * miss[near].mean()
    assert np.corrcoef(dist, miss)[0, 1] > 0.5
    with pytest.raises(ValueError, match="distance_m"):
        apply_measurement_model(v, model, interval_s=900, random_state=3)


def test_utility_generator_applies_distance_correlated_missing_data():
    from phaseid_hpc.synth.generator import _S_MEAS, _rng

    model = MeasurementModel(missing_fraction=0.06, missing_hop_m=300.0)
    sim = simulate_feeder(800, days=2, seed=9, measurement=model)
    dist = collector_distance_m(sim.topology.meter_xy[sim.order], random_state=_rng(9, _S_MEAS, 0, 1))
    miss = np.isnan(sim.measured).mean(axis=1)
    assert abs(miss.mean() - 0.06) < 0.015
    assert np.corrcoef(dist, miss)[0, 1] > 0.25
