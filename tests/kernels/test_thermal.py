"""Tests of phaseid_hpc/kernels/thermal.py: standard check vectors, the transformer-thermal-model library as
reference implementation, and the array-API contract (NumPy and array-api-strict)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from phaseid_hpc.config import ValidationConfig
from phaseid_hpc.kernels import thermal

#: The configuration's distribution-ONAN parameters of each standard (the only place they are written).
IEEE = ValidationConfig(thermal_standard="ieee").thermal_parameters()
IEC = ValidationConfig(thermal_standard="iec").thermal_parameters()


def test_models_need_every_parameter():
    params = dict(IEC)
    del params["winding_time_constant_min"]
    with pytest.raises(TypeError, match="winding_time_constant_min"):
        thermal.iec_temperatures(np.ones((1, 4)), 20.0, 15.0, **params)


# --- check vectors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "expected"), [(1.0, 110.0), (1.2, 134.1)])
def test_ieee_onan_steady_state_hot_spot(k, expected):
    """IEEE ONAN, R = 5, top-oil rise 55 K, hot-spot rise 80 K, ambient 30 degC."""
    got = float(thermal.steady_state_hot_spot(np.asarray(k), 30.0, **IEEE))
    assert got == pytest.approx(expected, abs=0.1)


def test_iec_distribution_steady_state_hot_spot():
    """IEC distribution (55 K, 23 K gradient), ambient 20 degC, K = 1 -> 98 degC."""
    assert float(thermal.steady_state_hot_spot(np.asarray(1.0), 20.0, **IEC)) == pytest.approx(98.0, abs=0.1)


def test_aging_rate_check_vectors():
    f_aa = thermal.relative_aging_rate(np.asarray([110.0, 120.0]), "thermally_upgraded")
    np.testing.assert_allclose(f_aa, [1.000, 2.709], atol=0.001)
    v = thermal.relative_aging_rate(np.asarray([98.0, 104.0, 92.0]), "normal")
    np.testing.assert_allclose(v, [1.0, 2.0, 0.5], rtol=1e-12)
    with pytest.raises(ValueError, match="insulation"):
        thermal.relative_aging_rate(np.asarray([98.0]), "kraft")


@pytest.mark.parametrize("model", [thermal.iec_temperatures, thermal.ieee_temperatures])
@pytest.mark.parametrize(
    ("params", "ambient", "k", "expected"), [(IEEE, 30.0, 1.2, 134.1), (IEC, 20.0, 1.0, 98.0)]
)
def test_dynamic_models_settle_to_the_steady_state(model, params, ambient, k, expected):
    load = np.full((2, 24 * 4 * 3), 0.3)
    load[0, 4:] = k  # step up from 0.3 pu; after 3 days (24 tau_o) the state is steady
    top_oil, hot_spot = model(
        load, ambient, 15.0, **{**IEC, **params}
    )  # IEC's k11, k21, k22 for the IEC model
    assert hot_spot.shape == load.shape == top_oil.shape
    assert hot_spot[0, -1] == pytest.approx(expected, abs=0.1)
    assert hot_spot[0, 8] < expected - 5  # the oil lags (tau_o = 180 min)
    np.testing.assert_allclose(hot_spot[1], thermal.steady_state_hot_spot(np.asarray(0.3), ambient, **params))


def test_ieee_ambient_passes_without_lag_iec_with_lag():
    load = np.full((1, 200), 0.8)
    amb = np.where(np.arange(200) < 100, 20.0, 30.0)
    iec_oil, _ = thermal.iec_temperatures(load, amb, 15.0, **IEC)
    ieee_oil, _ = thermal.ieee_temperatures(load, amb, 15.0, **IEC)
    assert ieee_oil[0, 100] - ieee_oil[0, 99] == pytest.approx(10.0)
    assert 0 < iec_oil[0, 100] - iec_oil[0, 99] < 1.0


def test_equivalent_aging_and_loss_of_life():
    rate = np.asarray([[1.0, 3.0, np.nan, 2.0], [np.nan] * 4])
    f = thermal.equivalent_aging_factor(rate)
    assert f[0] == pytest.approx(2.0) and np.isnan(f[1])
    assert thermal.loss_of_life_hours(rate, 0.25)[0] == pytest.approx(2.0 * 4 * 0.25)


# --- cross-check against transformer-thermal-model (IEC 60076-7, Alliander) ----------------------------


def _library_run(
    load: np.ndarray, ambient: np.ndarray, times: np.ndarray, **over
) -> tuple[np.ndarray, np.ndarray]:
    ttm = pytest.importorskip("transformer_thermal_model")  # noqa: F841
    from transformer_thermal_model.model import Model
    from transformer_thermal_model.schemas import InputProfile, UserTransformerSpecifications
    from transformer_thermal_model.schemas.thermal_model.initial_state import InitialLoad
    from transformer_thermal_model.transformer import DistributionTransformer

    specs = UserTransformerSpecifications(
        load_loss=5.0,  # with no_load_loss = 1: R = 5
        no_load_loss=1.0,
        nom_load_sec_side=1.0,  # load given in pu
        top_oil_temp_rise=55.0,
        winding_oil_gradient=23.0,
        hot_spot_fac=1.0,  # H g_r = 23 K
        amb_temp_surcharge=0.0,  # the library adds 10 K by default for indoor units
        time_const_oil=180.0,
        time_const_windings=4.0,
        **over,
    )
    profile = InputProfile.create(
        datetime_index=times, load_profile=load, ambient_temperature_profile=ambient
    )
    model = Model(
        temperature_profile=profile,
        transformer=DistributionTransformer(user_specs=specs),
        initial_condition=InitialLoad(initial_load=float(load[0])),
    )
    out = model.run()
    return out.top_oil_temp_profile.to_numpy(), out.hot_spot_temp_profile.to_numpy()


@pytest.fixture(scope="module")
def profiles() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    n = 4 * 96
    t = np.arange(n)
    daily = np.sin(t / 96 * 2 * np.pi)
    load = np.clip(
        0.7 + np.array([0.3, 0.6, 0.9])[:, None] * daily + 0.1 * rng.standard_normal((3, n)), 0, None
    )
    ambient = 20.0 + 6.0 * daily
    times = pd.date_range("2026-06-01 00:15", periods=n, freq="15min").to_numpy()
    return load, ambient, times


@pytest.mark.parametrize("k21", [1, 2])
def test_iec_kernel_matches_transformer_thermal_model(profiles, k21):
    load, ambient, times = profiles
    params = dict(IEC, k21=float(k21))
    top_oil, hot_spot = thermal.iec_temperatures(load, ambient, 15.0, **params)
    for i in range(load.shape[0]):
        lib_oil, lib_hot = _library_run(load[i], ambient, times, winding_const_k21=k21)
        np.testing.assert_allclose(top_oil[i], lib_oil, atol=1e-9)
        np.testing.assert_allclose(hot_spot[i], lib_hot, atol=1e-9)
    assert hot_spot.max() > 120.0  # the profile reaches the region where the flags matter


def test_aging_matches_transformer_thermal_model(profiles):
    from transformer_thermal_model.aging import aging_rate_profile, days_aged
    from transformer_thermal_model.transformer import PaperInsulationType

    load, ambient, times = profiles
    _, hot_spot = thermal.iec_temperatures(load, ambient, 15.0, **IEC)
    hs = pd.Series(hot_spot[2], index=pd.DatetimeIndex(times))
    for ours, theirs in (
        ("thermally_upgraded", PaperInsulationType.THERMAL_UPGRADED),
        ("normal", PaperInsulationType.NORMAL),
    ):
        rate = thermal.relative_aging_rate(hot_spot, ours)
        np.testing.assert_allclose(rate[2], aging_rate_profile(hs, theirs).to_numpy(), rtol=1e-12)
        # the library weights each sample by the step before it (the first sample by 0)
        lol_h = thermal.loss_of_life_hours(rate, 0.25)[2] - rate[2, 0] * 0.25
        assert lol_h == pytest.approx(days_aged(hs, theirs) * 24.0, rel=1e-10)


def test_float32_stays_within_a_hundredth_of_a_degree(profiles):
    load, ambient, _ = profiles
    _, hot64 = thermal.iec_temperatures(load, ambient, 15.0, **IEC)
    _, hot32 = thermal.iec_temperatures(load.astype(np.float32), ambient, 15.0, **IEC)
    assert hot32.dtype == np.float32
    np.testing.assert_allclose(hot32, hot64, atol=0.01)


# --- array API -----------------------------------------------------------------------------------------


def test_array_api_strict_matches_numpy(profiles):
    xps = pytest.importorskip("array_api_strict")
    load, ambient, _ = profiles
    for model in (thermal.iec_temperatures, thermal.ieee_temperatures):
        oil_np, hot_np = model(load, ambient, 15.0, **IEC)
        oil_s, hot_s = model(xps.asarray(load), xps.asarray(ambient), 15.0, **IEC)
        assert isinstance(hot_s, type(xps.asarray(0.0)))
        np.testing.assert_allclose(np.asarray(hot_s), hot_np, rtol=1e-12)
        np.testing.assert_allclose(np.asarray(oil_s), oil_np, rtol=1e-12)
        rate = thermal.relative_aging_rate(hot_s, "thermally_upgraded")
        f = thermal.equivalent_aging_factor(rate)
        np.testing.assert_allclose(
            np.asarray(f), thermal.equivalent_aging_factor(np.asarray(rate)), rtol=1e-12
        )
        np.testing.assert_allclose(
            np.asarray(thermal.steady_state_hot_spot(xps.asarray([1.0, 1.2]), 30.0, **IEEE)),
            [110.0, 134.08],
            atol=0.01,
        )


# --- blocked scan ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("n_time", "f"), [(1, 0.5), (31, 0.08), (200, 0.08), (2880, 0.847), (97, 1.0)])
def test_first_order_lag_matches_the_sequential_recurrence(dtype, n_time, f):
    """The blocked-GEMM scan equals y[i] = y[i-1] + f (x[i] - y[i-1]), y[0] = x[0], also across block edges."""
    rng = np.random.default_rng(1)
    x = (50.0 + 30.0 * rng.standard_normal((5, n_time))).astype(dtype)
    expected = np.empty(x.shape)
    expected[:, 0] = x[:, 0]
    for i in range(1, n_time):
        expected[:, i] = expected[:, i - 1] + f * (x[:, i].astype(np.float64) - expected[:, i - 1])
    got = thermal._first_order_lag(x, f)
    assert got.dtype == dtype and got.shape == x.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9 if dtype == np.float64 else 2e-3)
    np.testing.assert_allclose(thermal._first_order_lag(x, f, gain=2.0), 2.0 * expected, atol=4e-3)
