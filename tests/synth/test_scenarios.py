"""Tests of phaseid_hpc/synth/scenarios.py: contract files and the physics each scenario adds."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from phaseid_hpc import contract
from phaseid_hpc.synth import scenarios
from phaseid_hpc.synth.powerflow import feeder_drops, feeder_voltages
from phaseid_hpc.synth.scenarios import SCENARIOS, simulate_scenario, write_scenario

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "epri-ckt5"


@pytest.fixture(scope="module")
def regulators():
    return simulate_scenario("regulators", days=4, seed=1)


@pytest.fixture(scope="module")
def lv():
    return simulate_scenario("lv_european", days=7, seed=2)


def _mates_corr(v: np.ndarray, a: int, others: np.ndarray, lag: int) -> float:
    """Correlation of meter ``a``'s differenced series, delayed by ``lag``, with the mean of ``others``."""
    d = np.diff(v.astype(np.float64), axis=1)
    x, y = d[a], d[others].mean(axis=0)
    if lag:
        x, y = x[:-lag], y[lag:]
    return float(np.corrcoef(x, y)[0, 1])


@pytest.mark.parametrize("name", SCENARIOS)
def test_written_files_follow_the_shared_feeder_format(name, tmp_path):
    out = write_scenario(name, tmp_path / name, days=1, seed=3)
    rd = pd.read_parquet(out / "readings.parquet")
    assert list(rd.columns) == ["meter_id", "timestamp", "voltage_v", "kw"]
    assert str(rd.timestamp.dt.tz) == "UTC"
    meters = pd.read_csv(out / "meters.csv")
    assert list(meters.columns) == list(contract.METERS_REQUIRED + contract.METERS_OPTIONAL)
    assert set(meters.phase) <= set(contract.PHASE_LABELS)
    truth = pd.read_csv(out / "truth.csv")
    assert tuple(truth.columns[:6]) == contract.TRUTH_COLUMNS
    assert (truth.meter_id.to_numpy() == meters.meter_id.to_numpy()).all()
    assert meters.meter_id.is_monotonic_increasing
    xf = pd.read_csv(out / "transformers.csv")
    assert list(xf.columns) == list(contract.TRANSFORMERS_REQUIRED)
    assert set(meters.transformer_id) | set(truth.transformer_id) <= set(xf.transformer_id)
    step = pd.Timedelta(seconds=3600 if name == "lv_european" else 900)
    assert rd.timestamp.min() == pd.Timestamp("2026-06-09", tz="UTC") + step  # interval ends
    assert len(rd) == len(meters) * round(86400 / step.total_seconds())
    assert rd.voltage_v.notna().all()  # noise-free and complete: the consumer applies the meter model
    nominal = meters.set_index("meter_id").nominal_v.reindex(rd.meter_id).to_numpy()
    ratio = rd.voltage_v / nominal
    assert 0.85 < np.percentile(ratio, 0.1) and np.percentile(ratio, 99.9) < 1.1
    if SHARED.exists():
        shared = pd.read_parquet(SHARED / "readings.parquet").head(1)
        assert list(shared.columns) == list(rd.columns)
        assert list(pd.read_csv(SHARED / "truth.csv", nrows=1).columns) == list(truth.columns[:6])
    if name == "lv_european":
        assert not (out / "references.parquet").exists()
    else:
        refs = pd.read_parquet(out / "references.parquet")
        assert list(refs.columns) == list(contract.REFERENCES_REQUIRED)
        assert refs.voltage_v.between(6800, 7900).all()


def test_same_seed_same_data_and_gis_error_rates():
    a = simulate_scenario("single_meter_transformers", days=1, seed=5)
    b = simulate_scenario("single_meter_transformers", days=1, seed=5)
    np.testing.assert_array_equal(a.voltage, b.voltage)
    pd.testing.assert_frame_equal(a.meters, b.meters)
    assert abs(a.truth.phase_label_corrupted.mean() - 0.08) < 0.01
    assert abs(a.truth.transformer_label_corrupted.mean() - 0.03) < 0.01
    # Every meter alone on its transformer.
    assert a.truth.transformer_id.is_unique
    with pytest.raises(ValueError, match="unknown scenario"):
        simulate_scenario("nope")


def _regulator_zones(res):
    """Per line regulator: rows of its phase's meters below it and elsewhere, and its pure tap moves."""
    (fid,) = res.equipment
    eq, top = res.equipment[fid], res.topologies[fid]
    taps = eq["regulator_tap"]
    rows_of = np.empty(top.n_meters, int)
    rows_of[res.topology_meter] = np.arange(top.n_meters)
    meter_node = top.xfmr_node[top.meter_xfmr]
    busy = (np.diff(eq["ltc_tap"]) != 0) | (np.diff(eq["capacitor_on"].astype(int), axis=1) != 0).any(axis=0)
    zones = []
    for r in range(len(taps)):
        node, ph = eq["regulator_node"][r], eq["regulator_phase"][r]
        below = np.zeros(len(top.node_parent), bool)
        below[node] = True
        for k in range(node + 1, len(below)):  # topological order
            below[k] = below[top.node_parent[k]]
        single = top.meter_phase == "ABC"[ph]
        step = np.diff(taps[r])
        pure = (step != 0) & ~busy & ~(np.diff(np.delete(taps, r, axis=0), axis=1) != 0).any(axis=0)
        zones.append(
            {
                "phase": ph,
                "down": rows_of[np.flatnonzero(single & below[meter_node])],
                "up": rows_of[np.flatnonzero(single & ~below[meter_node])],
                "step": step,
                "pure": pure,
                "still": ~busy & ~(np.diff(taps, axis=1) != 0).any(axis=0),
            }
        )
    return zones


def test_regulator_taps_step_in_0625_percent_steps_downstream_only(regulators):
    res = regulators
    (fid,) = res.equipment
    eq = res.equipment[fid]
    taps = eq["regulator_tap"]
    assert len(taps) >= 4 and len(set(eq["regulator_phase"].tolist())) == 3  # every phase regulated
    assert len(set(eq["regulator_node"].tolist())) >= 4  # at different places
    assert ((np.diff(taps, axis=1) != 0).sum(axis=1) >= 4).all()  # steps during the days, each one
    # At a tap change (no other equipment moving), meters below the regulator on its phase move by
    # about one 0.625% step (less the time-delay share) relative to the same phase elsewhere.
    dv = np.diff(res.voltage.astype(np.float64), axis=1) / res.meters.nominal_v.to_numpy()[:, None]
    for z in _regulator_zones(res):
        assert len(z["down"]) >= 50 and z["pure"].sum() >= 2
        rel = np.median(dv[z["down"]], axis=0) - np.median(dv[z["up"]], axis=0)
        pure, step = z["pure"], z["step"]
        assert (np.sign(rel[pure]) == step[pure]).all()
        assert 0.6 < np.median(np.abs(rel[pure]) / np.abs(step[pure])) / 0.00625 < 1.1
        assert np.median(np.abs(rel[z["still"]])) < 0.15 * 0.00625


def test_reference_is_upstream_of_the_regulators(regulators):
    res = regulators
    (fid,) = res.equipment
    eq = res.equipment[fid]
    ref = res.references.pivot(index="timestamp", columns="phase", values="voltage_v").to_numpy().T
    dref = np.diff(ref.astype(np.float64), axis=1) / ref[:, 1:]
    dv = np.diff(res.voltage.astype(np.float64), axis=1) / res.meters.nominal_v.to_numpy()[:, None]
    # The reference lacks the steps the meters below each regulator see ...
    for z in _regulator_zones(res):
        gap = np.median(dv[z["down"]], axis=0) - dref[z["phase"]]
        pure, step = z["pure"], z["step"]
        assert np.median(np.abs(gap[pure])) > 0.5 * 0.00625
        assert (np.sign(gap[pure]) == step[pure]).mean() >= 0.8
    # ... and has the substation LTC's.
    ltc = np.diff(eq["ltc_tap"])
    only = (ltc != 0) & ~(np.diff(eq["regulator_tap"], axis=1) != 0).any(axis=0)
    assert only.sum() >= 3
    assert (np.sign(dref[:, only].mean(axis=0)) == np.sign(ltc[only])).mean() >= 0.8


def test_capacitor_switching_steps_voltage(regulators):
    res = regulators
    (fid,) = res.equipment
    on = res.equipment[fid]["capacitor_on"]
    assert on.shape[0] >= 2
    switched = (np.diff(on.astype(int), axis=1) != 0).sum(axis=1)
    assert (switched >= 2).all()
    # Switching the banks on raises every meter's voltage (regulators held out: they would react).
    top = replace(res.topologies[fid], regulators=None)
    kw = np.zeros((top.n_meters, 2), np.float32)
    fv_off = feeder_voltages(top, kw, kw, np.random.default_rng(0), cap_on=np.zeros((on.shape[0], 2), bool))
    fv_on = feeder_voltages(top, kw, kw, np.random.default_rng(0), cap_on=np.ones((on.shape[0], 2), bool))
    head = np.ones((3, 2))
    v_off = fv_off.meter_voltage(head, interval_s=900)[0]
    v_on = fv_on.meter_voltage(head, interval_s=900)[0]
    rise = (v_on - v_off) / top.meter_nominal_v[:, None]
    assert (rise > 0).mean() > 0.95 and 0.002 < np.median(rise) < 0.03


def test_feeder_voltages_without_equipment_equal_feeder_drops():
    """The regulator-aware power flow reduces to the utility generator's on a plain feeder."""
    res = simulate_scenario("large", days=1, seed=4, n_meters=400)
    top = next(iter(res.topologies.values()))
    plain = replace(top, capacitors=None, regulators=None, z_three_phase=None)
    rng = np.random.default_rng(7)
    kw = rng.uniform(0, 4, (top.n_meters, 12)).astype(np.float32)
    kvar = (0.3 * kw).astype(np.float32)
    head = 1 + 0.01 * rng.standard_normal((3, 12))
    w, drop, fp, fq = feeder_drops(plain, kw, kvar, np.random.default_rng(3))
    expected = (top.meter_nominal_v * top.xfmr_tap[top.meter_xfmr])[:, None] * (w @ head) - drop
    fv = feeder_voltages(plain, kw, kvar, np.random.default_rng(3))
    got, _ = fv.meter_voltage(head, interval_s=900)
    np.testing.assert_allclose(got, expected, atol=2e-3)
    np.testing.assert_allclose(fv.feeder_p, fp, rtol=1e-6)
    np.testing.assert_allclose(fv.feeder_q, fq, rtol=1e-6)


def test_large_feeder_with_three_phase_services():
    res = simulate_scenario("large", days=1, seed=0)
    m = res.meters
    assert len(m) >= 4000 and m.feeder_id.nunique() == 1
    three = m.service_type == "3ph"
    assert 180 <= three.sum() <= 320
    assert (res.truth.phase[three.to_numpy()] == "ABC").all()
    assert res.equipment[m.feeder_id[0]]["capacitor_on"].shape[0] == 4


def test_lv_networks_one_three_phase_transformer_serving_all_phases(lv):
    m, t = lv.meters, lv.truth
    assert (lv.times[1] - lv.times[0]) == pd.Timedelta(hours=1)
    sizes = m.groupby("feeder_id").size()
    assert sizes.min() == 3 and sizes.max() == 125 and len(sizes) >= 5
    assert (m.groupby("feeder_id").transformer_id.nunique() == 1).all()
    assert (t.groupby("feeder_id").transformer_id.nunique() == 1).all()
    assert (lv.transformers.n_phases == 3).all() and len(lv.transformers) == len(sizes)
    assert (m.nominal_v == 230.0).all()
    for fid, grp in t.groupby("feeder_id"):
        if len(grp) >= 12:
            assert {"A", "B", "C"} <= set(grp.phase)
    assert 0.08 < (t.phase == "ABC").mean() < 0.25
    assert not t.transformer_label_corrupted.any()


def test_lv_neutral_shift_couples_phases(lv):
    """Load on one phase of a four-wire LV cable raises the other two (neutral-point shift)."""
    fid = lv.meters.feeder_id.value_counts().index[0]
    top = lv.topologies[fid]
    kw = np.zeros((top.n_meters, 2), np.float32)
    on_a = top.meter_phase == "A"
    kw[on_a, 1] = 3.0
    fv = feeder_voltages(top, kw, 0 * kw, np.random.default_rng(0))
    v, _ = fv.meter_voltage(np.ones((3, 2)), interval_s=3600)
    dv = v[:, 1] - v[:, 0]
    assert np.median(dv[on_a]) < -1.0  # [V] own phase drops
    assert np.median(dv[top.meter_phase == "B"]) > 0.2  # the others rise


def test_late_clock_meters_are_one_interval_early():
    res = simulate_scenario("late_clocks", days=3, seed=6, n_meters=1200)
    shift = res.truth.clock_shift_intervals.to_numpy()
    assert set(np.unique(shift)) == {0, 1}
    assert 0.07 < shift.mean() < 0.13
    assert "clock_shift_intervals" not in simulate_scenario("regulators", days=1, n_meters=200).truth
    tr = res.truth.transformer_id.to_numpy()
    better = []
    for a in np.flatnonzero(shift == 1):
        mates = np.flatnonzero((tr == tr[a]) & (shift == 0))
        if len(mates) >= 2:
            # Delaying the late meter by one interval lines it up with its transformer mates.
            better.append(_mates_corr(res.voltage, a, mates, 1) > _mates_corr(res.voltage, a, mates, 0) + 0.2)
    assert len(better) >= 20 and np.mean(better) > 0.9


def test_generation_is_fast_enough():
    import time

    t0 = time.perf_counter()
    simulate_scenario("regulators", days=14, seed=0)
    assert time.perf_counter() - t0 < 20.0  # [s] 14 days of ~1,400 meters


def test_scenario_table_in_docstring_names_every_scenario():
    for name in SCENARIOS:
        assert f"``{name}``" in scenarios.__doc__


def test_regulators_pv_exports_at_noon():
    pv = simulate_scenario("regulators_pv", days=3, seed=1, n_meters=400)
    local_hour = (pv.times - pd.Timedelta(hours=5)).hour
    noon = (local_hour >= 11) & (local_hour < 15)
    exporting = (pv.kw[:, noon] < 0).mean(axis=1) > 0.3
    assert 0.1 < exporting.mean() < 0.35  # homes with PV export at noon
    assert (pv.kw[:, ~noon][exporting] >= -0.5).mean() > 0.8  # ... not at night


def test_cli_synth_scenario(tmp_path, capsys):
    from phaseid_hpc.cli import main

    assert (
        main(["synth", "--scenario", "lv_european", "--days", "1", "--seed", "2", "--out", str(tmp_path)])
        == 0
    )
    assert str(tmp_path) in capsys.readouterr().out
    truth = pd.read_csv(tmp_path / "truth.csv")
    assert len(truth) == 360 and (tmp_path / "scenario.json").exists()
