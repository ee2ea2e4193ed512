"""Tests of phaseid_hpc/synth/measurement.py."""

from __future__ import annotations

import numpy as np

from phaseid_hpc.synth.measurement import MeasurementModel, _shift, apply_measurement_model


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
