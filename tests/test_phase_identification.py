"""identify_phases on a small simulated feeder (built here), and on ckt5 when ../shared is present."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from phaseid_hpc import contract
from phaseid_hpc.config import PhaseConfig
from phaseid_hpc.errors import ContractError
from phaseid_hpc.phase_identification import RESULT_COLUMNS, identify_phases

PHASES = np.array(["A", "B", "C"])


def _unit(v):
    """Rows scaled to unit norm (the signals the identification kernels take)."""
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def simulated_feeder(seed=0, n_tr=50, days=7, feeder="F1", phases=(0, 1, 2), wrong_phase=0.12,
                     wrong_tr=0.03, noise_pct=0.07, resolution=0.1, n_pairs=0):
    """A toy feeder: voltage = source + phase drop + transformer drop + own drop + meter noise.

    Returns meters (contract columns, GIS view), truth phase, voltage (n, t) [V], references table and
    reference voltage (A, B, C rows) [V].
    """
    rng = np.random.default_rng(seed)
    t = 96 * days
    walk = lambda *shape: np.cumsum(rng.standard_normal(shape), axis=-1)
    source = 0.3 * walk(t) / np.sqrt(t) * 5
    phase_sig = 0.004 * walk(3, t) / np.sqrt(96)
    rows = []
    for k in range(n_tr):
        p = phases[k % len(phases)]
        tr_sig = 0.004 * walk(t) / np.sqrt(96)
        for j in range(int(rng.integers(1, 5))):
            own = 0.003 * walk(t) / np.sqrt(96)
            pu = 1 + source / 100 + phase_sig[p] * rng.uniform(0.5, 1.5) + tr_sig + own
            rows.append((f"{feeder}-T{k:03d}", PHASES[p], "1ph-240", 240 * pu))
    for k in range(n_pairs):
        a, b = [(0, 1), (1, 2), (2, 0)][k % 3]
        pu = 1 + source / 100 + 0.5 * (phase_sig[a] + phase_sig[b]) + 0.003 * walk(t) / np.sqrt(96)
        rows.append((f"{feeder}-P{k:03d}", PHASES[a] + PHASES[b], "2ph-208", 208 * pu))
    n = len(rows)
    v = np.stack([r[3] for r in rows])
    v = v * (1 + noise_pct / 100 * rng.standard_normal(v.shape))
    v = np.round(v / resolution) * resolution
    truth = np.array([r[1] for r in rows])
    gis = truth.copy()
    single = np.array([len(p) == 1 for p in truth])
    flip = single & (rng.random(n) < wrong_phase)
    gis[flip] = [PHASES[(list(PHASES).index(p) + int(rng.integers(1, 3))) % 3] for p in truth[flip]]
    trs = np.array([r[0] for r in rows], dtype=object)
    moved = rng.random(n) < wrong_tr
    trs[moved] = rng.choice(trs, moved.sum())
    meters = pd.DataFrame({
        "meter_id": [f"{feeder}-M{i:04d}" for i in range(n)], "feeder_id": feeder, "transformer_id": trs,
        "phase_gis": gis, "service_type": [r[2] for r in rows], "nominal_v": [240.0 if r[2] == "1ph-240" else 208.0
                                                                              for r in rows],
        "usable": True,
    })
    ref_v = 7200 * (1 + source / 100 + 0.5 * phase_sig)
    refs = pd.DataFrame({"feeder_id": feeder, "phase": list(PHASES)})
    return meters, truth, v, refs, ref_v


def accuracy(res, truth):
    return float((res["phase"].to_numpy() == truth).mean())


@pytest.fixture(scope="module")
def feeder():
    return simulated_feeder()


def test_high_accuracy_and_corrects_wrong_labels(feeder):
    meters, truth, v, _, _ = feeder
    res = identify_phases(v, meters)
    assert list(res.columns) == list(RESULT_COLUMNS)
    assert res.index.equals(meters.index)
    assert accuracy(res, truth) >= 0.98
    wrong_gis = meters["phase_gis"].to_numpy() != truth
    assert wrong_gis.sum() >= 10
    assert (res["phase"].to_numpy()[wrong_gis] == truth[wrong_gis]).mean() >= 0.9
    conf = (res["phase_class"] == contract.CLASS_CONFIDENT).to_numpy()
    assert conf.mean() > 0.5 and (res["phase"].to_numpy()[conf] == truth[conf]).all()
    assert res["phase_confidence"].between(0, 1).all()


def test_deterministic(feeder):
    meters, _, v, _, _ = feeder
    a = identify_phases(v, meters, PhaseConfig(random_state=3))
    b = identify_phases(v.copy(), meters.copy(), PhaseConfig(random_state=3))
    pd.testing.assert_frame_equal(a, b)


def test_insufficient_data_and_low_correlation(feeder):
    meters, truth, v, _, _ = feeder
    meters = meters.copy()
    v = v.copy()
    meters.loc[0, "usable"] = False
    v[1] = np.nan
    v[2, 30:] = np.nan  # too few samples
    v[3] = 240 + np.random.default_rng(9).standard_normal(v.shape[1])  # matches no phase
    res = identify_phases(v, meters)
    for i in (0, 1, 2):
        assert res.loc[i, "phase"] is None
        assert res.loc[i, "phase_class"] == contract.CLASS_INSUFFICIENT
        assert contract.REASON_INSUFFICIENT_DATA in res.loc[i, "reasons"]
    assert contract.REASON_LOW_CORRELATION in res.loc[3, "reasons"]
    assert res.loc[3, "phase_class"] == contract.CLASS_LOW
    assert accuracy(res.iloc[4:], truth[4:]) >= 0.98


def test_phase_to_phase_services_get_their_pair():
    meters, truth, v, _, _ = simulated_feeder(seed=1, n_pairs=9)
    res = identify_phases(v, meters)
    pair = meters["service_type"].eq("2ph-208").to_numpy()
    assert (res["phase"].to_numpy()[pair] == truth[pair]).mean() >= 8 / 9
    assert accuracy(res[~pair], truth[~pair]) >= 0.97


def test_two_phase_feeder_gets_no_third_phase():
    meters, truth, v, _, _ = simulated_feeder(seed=2, phases=(0, 1))
    res = identify_phases(v, meters)
    assert set(res["phase"]) <= {"A", "B"}
    assert accuracy(res, truth) >= 0.97


def test_feeders_are_independent_in_a_block():
    m1, _, v1, _, _ = simulated_feeder(seed=4, n_tr=20, feeder="F1")
    m2, _, v2, _, _ = simulated_feeder(seed=5, n_tr=20, feeder="F2")
    block = identify_phases(np.vstack([v1, v2]), pd.concat([m1, m2], ignore_index=True))
    alone = identify_phases(v2, m2)
    pd.testing.assert_frame_equal(block.iloc[len(m1):].reset_index(drop=True), alone)


def test_references_name_phases_without_gis():
    meters, truth, v, refs, ref_v = simulated_feeder(seed=6)
    meters = meters.assign(phase_gis=None)
    res = identify_phases(v, meters, references=(refs, ref_v))
    assert accuracy(res, truth) >= 0.97


@pytest.mark.parametrize("resolution", [0.1, 1.0])  # 1 V: the second look on hourly means too
def test_array_api_strict_matches_numpy(resolution):
    xps = pytest.importorskip("array_api_strict")
    meters, _, v, _, _ = simulated_feeder(seed=7, n_tr=20, days=3, resolution=resolution)
    a = identify_phases(v, meters)
    b = identify_phases(xps.asarray(v), meters)
    assert a["phase"].tolist() == b["phase"].tolist()
    # float32 unit signals: sums taken in another order (scipy's sparse products on NumPy, loops elsewhere)
    np.testing.assert_allclose(a["phase_confidence"], b["phase_confidence"], atol=1e-6)


def test_contract_errors_name_the_problem(feeder):
    meters, _, v, refs, ref_v = feeder
    with pytest.raises(ValueError, match="phase_gis"):
        identify_phases(v, meters.drop(columns="phase_gis"))
    with pytest.raises(ValueError, match="n_meters"):
        identify_phases(v[1:], meters)
    with pytest.raises(ValueError, match="reference_voltage"):
        identify_phases(v, meters, references=(refs, ref_v[:, 1:]))


@pytest.mark.requires_shared
def test_ckt5_seven_days_class_05(ckt5):
    from phaseid_hpc.synth.measurement import MeasurementModel, apply_measurement_model

    meters = pd.read_csv(ckt5 / "meters.csv").rename(columns={"phase": "phase_gis"})
    truth = pd.read_csv(ckt5 / "truth.csv").set_index("meter_id").loc[meters["meter_id"], "phase"].to_numpy()
    first_week = [("timestamp", "<=", pd.Timestamp("2026-06-16 00:00", tz="UTC"))]  # keeps the test fast
    reads = pd.read_parquet(ckt5 / "readings.parquet", columns=["meter_id", "timestamp", "voltage_v"],
                            filters=first_week)
    wide = reads.pivot(index="meter_id", columns="timestamp", values="voltage_v").reindex(meters["meter_id"])
    assert wide.shape[1] >= 7 * 96
    v, _ = apply_measurement_model(wide.to_numpy()[:, : 7 * 96], MeasurementModel(0.5, 0.1), interval_s=900,
                                   random_state=0)
    res = identify_phases(v, meters.assign(usable=True))
    assert accuracy(res, truth) >= 0.99
    conf = (res["phase_class"] == contract.CLASS_CONFIDENT).to_numpy()
    assert (res["phase"].to_numpy()[conf] == truth[conf]).mean() >= 0.999


# --- issue 10: the cases that broke the three-cluster method ------------------------------------------


def test_policy_low_confidence_disagreement_never_replaces_gis():
    from phaseid_hpc.phase_identification import recommend

    gis = np.array(["A", "B", "C", "A", "ABC"], dtype=object)
    inferred = np.array(["B", "C", "C", None, "ABC"], dtype=object)
    cls = np.array([contract.CLASS_CONFIDENT, contract.CLASS_SUSPECT, contract.CLASS_LOW,
                    contract.CLASS_INSUFFICIENT, contract.CLASS_CONFIDENT], dtype=object)
    np.testing.assert_array_equal(recommend(gis, inferred, cls), ["B", "B", "C", "A", "ABC"])


def test_late_clocks_are_shifted_back_and_do_not_change_the_others():
    meters, truth, v, _, _ = simulated_feeder(seed=11, n_tr=90, days=7)
    base = identify_phases(v, meters)
    late = np.zeros(len(meters), dtype=bool)
    late[::10] = True  # 10% of meters stamp the start of the interval: one sample late
    v_late = v.copy()
    v_late[late, 1:] = v[late, :-1]
    v_late[late, 0] = np.nan
    res = identify_phases(v_late, meters)
    shifted = np.array([contract.REASON_CLOCK_SHIFTED in r for r in res["reasons"]])
    assert shifted[late].mean() >= 0.9 and not shifted[~late].any()
    on_time = ~late
    assert accuracy(res[on_time], truth[on_time]) >= accuracy(base[on_time], truth[on_time]) - 0.01
    conf = (res["phase_class"] == contract.CLASS_CONFIDENT).to_numpy()
    assert (res["phase"].to_numpy()[conf] == truth[conf]).all()  # late ones identified or not confident


def test_one_three_phase_transformer_serving_every_phase():
    meters, truth, v, _, _ = simulated_feeder(seed=12, n_tr=60)
    one = meters.assign(transformer_id="F1-T3PH")  # European LV: one MV/LV transformer, all phases
    res = identify_phases(v, one)
    assert accuracy(res, truth) >= 0.97
    conf = (res["phase_class"] == contract.CLASS_CONFIDENT).to_numpy()
    assert conf.mean() > 0.5 and (res["phase"].to_numpy()[conf] == truth[conf]).all()


def test_regulator_tap_steps_on_one_phase_branch():
    """Meters below a single-phase line regulator jump together at every tap change: local structure that
    three global clusters mistake for a phase; the neighbour vote keeps them on their phase."""
    meters, truth, v, _, _ = simulated_feeder(seed=13, n_tr=90, days=7)
    rng = np.random.default_rng(13)
    on_a = np.flatnonzero(truth == "A")
    below = on_a[: len(on_a) // 2]
    taps = np.cumsum(rng.choice([-1, 0, 0, 0, 0, 0, 0, 0, 1], v.shape[1]))  # steps of 0.625 %
    v = v.copy()
    v[below] *= (1 + 0.00625 * taps)[None, :]
    res = identify_phases(v, meters)
    assert accuracy(res, truth) >= 0.98
    conf = (res["phase_class"] == contract.CLASS_CONFIDENT).to_numpy()
    assert (res["phase"].to_numpy()[conf] == truth[conf]).all()


def test_single_meter_transformers_keep_gis_transformer():
    from phaseid_hpc.config import TransformerConfig
    from phaseid_hpc.transformer_mapping import recommend_transformers

    m = pd.DataFrame({"feeder_id": ["F1"] * 4 + ["F2"] * 4,
                      "transformer_id": ["T1", "T2", "T3", "T4", "U1", "U1", "U2", "U2"]})
    inferred = np.array(["T2", "T2", "T3", "T4", "U2", "U1", "U2", "U2"], dtype=object)
    cls = np.array([contract.CLASS_CONFIDENT] * 8, dtype=object)
    rec = recommend_transformers(m, inferred, cls, TransformerConfig())
    # F1: every meter alone, nothing calibrates a move; F2: siblings, the confident move stands
    np.testing.assert_array_equal(rec, ["T1", "T2", "T3", "T4", "U2", "U1", "U2", "U2"])
    cls[4] = contract.CLASS_SUSPECT
    assert recommend_transformers(m, inferred, cls, TransformerConfig())[4] == "U1"
    inferred[5] = "F2-NEW000"  # a transformer missing from GIS: review, not a correction
    assert recommend_transformers(m, inferred, cls, TransformerConfig())[5] == "U1"


def test_coarse_resolution_gets_a_second_look_on_hourly_means():
    from phaseid_hpc.config import PhaseConfig
    from phaseid_hpc.phase_identification import _coarse_feeders

    meters, truth, v, _, _ = simulated_feeder(seed=0, n_tr=80, days=14, resolution=1.0)
    assert _coarse_feeders(v, meters, PhaseConfig(), 900.0) == {"F1": 4}  # 1 V: most steps read as 0
    fine = simulated_feeder(seed=0, n_tr=80, days=14, resolution=0.1)
    assert _coarse_feeders(fine[2], fine[0], PhaseConfig(), 900.0) == {}
    off = identify_phases(v, meters, PhaseConfig(coarse_zero_share=1.0))
    on = identify_phases(v, meters)
    # the same answers; many more confident (0.69 -> 0.99 of the meters), none of them wrong
    np.testing.assert_array_equal(on["phase"].to_numpy(), off["phase"].to_numpy())
    conf_on = (on["phase_class"] == "confident").to_numpy()
    assert conf_on.mean() > (off["phase_class"] == "confident").to_numpy().mean() + 0.15
    assert (on["phase"].to_numpy()[conf_on] == truth[conf_on]).all()
    # a meter is only ever raised, never lowered
    assert (on["phase_confidence"].to_numpy() >= off["phase_confidence"].to_numpy()).all()


def test_a_swap_no_voltage_can_orient_goes_to_the_review_list():
    from phaseid_hpc.config import TransformerConfig
    from phaseid_hpc.transformer_mapping import recommend_transformers

    # U1 and U2, two meters each, one of each misfiled on the other: rows 0 and 2 moving pairs them as
    # rows 1 and 3 moving would; held. V1/V2: the same swap, but three meters stay on each: it stands.
    m = pd.DataFrame({"feeder_id": ["F"] * 12,
                      "transformer_id": ["U1", "U1", "U2", "U2"] + ["V1"] * 4 + ["V2"] * 4})
    inferred = np.array(["U2", "U1", "U1", "U2", "V2", "V1", "V1", "V1", "V1", "V2", "V2", "V2"], dtype=object)
    cls = np.array([contract.CLASS_CONFIDENT] * 12, dtype=object)
    rec = recommend_transformers(m, inferred, cls, TransformerConfig())
    np.testing.assert_array_equal(rec[:4], m["transformer_id"].to_numpy()[:4])
    np.testing.assert_array_equal(rec[4:], inferred[4:])
    # a one-way move onto a two-meter transformer is no swap: it stands
    inferred1 = np.array(["U2", "U1", "U2", "U2"] + list(m["transformer_id"][4:]), dtype=object)
    assert recommend_transformers(m, inferred1, cls, TransformerConfig())[0] == "U2"


def test_three_phase_services_keep_gis_transformer_unless_asked():
    from phaseid_hpc.config import TransformerConfig
    from phaseid_hpc.transformer_mapping import recommend_transformers

    m = pd.DataFrame({"feeder_id": ["F"] * 6, "transformer_id": ["U1", "U1", "U2", "U2", "U3", "U3"],
                      "phase_gis": ["A", "ABC", "A", "A", "B", "B"],
                      "service_type": ["1ph-240", "3ph", "1ph-240", "1ph-240", "3ph-208", "1ph-240"]})
    inferred = np.array(["U2", "U2", "U2", "U2", "U1", "U3"], dtype=object)
    cls = np.array([contract.CLASS_CONFIDENT] * 6, dtype=object)
    rec = recommend_transformers(m, inferred, cls, TransformerConfig())
    # row 1 (GIS ABC) and row 4 (a 3ph service type) stay; the single-phase move stands
    np.testing.assert_array_equal(rec, ["U2", "U1", "U2", "U2", "U3", "U3"])
    rec = recommend_transformers(m, inferred, cls, TransformerConfig(correct_three_phase=True))
    np.testing.assert_array_equal(rec, inferred)


def test_a_single_phase_meter_does_not_join_a_bank_of_three_phase_services_unless_asked():
    from phaseid_hpc.config import TransformerConfig
    from phaseid_hpc.transformer_mapping import recommend_transformers

    m = pd.DataFrame({"feeder_id": ["F"] * 6, "transformer_id": ["U1", "U1", "U2", "U2", "U3", "U3"],
                      "phase_gis": ["A", "A", "ABC", "ABC", "B", "B"]})
    # row 0 follows the three-phase bank U2; row 4 joins U1, which keeps a single-phase meter
    inferred = np.array(["U2", "U1", "U2", "U2", "U1", "U3"], dtype=object)
    cls = np.array([contract.CLASS_CONFIDENT] * 6, dtype=object)
    rec = recommend_transformers(m, inferred, cls, TransformerConfig())
    np.testing.assert_array_equal(rec, ["U1", "U1", "U2", "U2", "U1", "U3"])
    rec = recommend_transformers(m, inferred, cls, TransformerConfig(correct_three_phase=True))
    np.testing.assert_array_equal(rec, inferred)


def test_nearest_gis_factor_holds_back_a_change_whose_nearest_gis_meters_disagree():
    from phaseid_hpc.config import PhaseConfig
    from phaseid_hpc.phase_identification import _nearest_gis_factor

    rng = np.random.default_rng(0)

    base = rng.normal(size=(2, 8))
    # row 0: a meter moved from GIS B (1) to C (2); its nearest GIS-B meters (rows 1-3, other groups) are
    # closer than any GIS-C meter (rows 4-9): the change is held back. Row 10: moved from B to C with only
    # GIS-C meters near it: kept.
    y = np.vstack([base[0] + 0.05 * rng.normal(size=(4, 8)), base[0] + 0.6 * rng.normal(size=(6, 8)),
                   base[1] + 0.05 * rng.normal(size=(1, 8)), base[1] + 0.05 * rng.normal(size=(4, 8))])
    y = _unit(y)
    gis = np.array([1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 1, 2, 2, 2, 2])
    labels = gis.copy()
    labels[[0, 10]] = 2
    group = np.arange(gis.size)
    off = _nearest_gis_factor(np, y, y, group, gis, labels, PhaseConfig(nearest_gis_tolerance=float("inf")))
    assert (off == 1.0).all()  # inf turns the check off
    on = _nearest_gis_factor(np, y, y, group, gis, labels, PhaseConfig(nearest_gis_tolerance=0.02))
    assert on[0] == 0.0 and on[10] == 1.0
    assert (on[labels == gis] == 1.0).all()


def test_second_look_releases_a_change_held_by_labels_this_pass_corrects():
    from phaseid_hpc.config import PhaseConfig
    from phaseid_hpc.phase_identification import _nearest_gis_checks, _nearest_gis_second_look

    rng = np.random.default_rng(0)
    base = rng.normal(size=(2, 8))
    # row 0: filed B, answered C; its nearest meters (rows 1-3, another transformer) are filed B too, but
    # answered C; the GIS-C meters (rows 4-9) are farther: held back. Rows 10-14: B meters elsewhere.
    y = _unit(np.vstack([base[0] + 0.05 * rng.normal(size=(4, 8)), base[0] + 0.6 * rng.normal(size=(6, 8)),
                         base[1] + 0.05 * rng.normal(size=(5, 8))]))
    gis = np.array([1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1])
    labels = gis.copy()
    labels[[0, 1, 2, 3]] = 2
    group = np.array([0, 1, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
    cfg = PhaseConfig(nearest_gis_tolerance=0.02, nearest_gis_raw_tolerance=0.02)
    near = _nearest_gis_checks(np, y, y, y, group, gis, labels, cfg, None)
    assert near[0] == 0.0
    # rows 1-3 not confident: their GIS label still counts, row 0 stays held
    none = np.zeros(gis.size, dtype=bool)
    assert _nearest_gis_second_look(np, y, y, y, group, gis, labels, cfg, None, near, none)[0] == 0.0
    # rows 1-3 corrected with confidence: row 0's nearest meters now stand at C, the change is released
    sure = np.isin(np.arange(gis.size), [1, 2, 3])
    again = _nearest_gis_second_look(np, y, y, y, group, gis, labels, cfg, None, near, sure)
    assert again[0] == 1.0
    assert (again[1:] == near[1:]).all()  # only held changes are looked at again


def test_group_consensus_makes_a_whole_moving_group_confident_together():
    from phaseid_hpc.config import PhaseConfig
    from phaseid_hpc.phase_identification import _group_consensus

    cfg = PhaseConfig()
    # group 0: four meters filed A (0), all answered C, three confident, one at 0.6: all confident.
    # group 1: the same but one member held back (0.2): unchanged. group 2: two of four confident, but one
    # answers B: unchanged. group 3: three members, one confident: unchanged. group 4: two members: unchanged.
    group = np.array([0] * 4 + [1] * 4 + [2] * 4 + [3] * 3 + [4] * 2)
    gis = np.zeros(group.size, dtype=np.int64)
    labels = np.full(group.size, 2)
    labels[11] = 1
    c = np.array([1.0, 0.9, 0.95, 0.6, 1.0, 1.0, 0.9, 0.2, 1.0, 1.0, 0.6, 0.9, 1.0, 0.6, 0.6, 1.0, 0.6])
    out = _group_consensus(group, gis, labels, c, cfg)
    assert (out[:4] >= cfg.confident_threshold).all()
    np.testing.assert_array_equal(out[4:], c[4:])
    # an answer that confirms GIS is not a move: nothing to lift
    np.testing.assert_array_equal(_group_consensus(group, labels, labels, c, cfg), c)


def test_group_veto_a_check_that_holds_one_moving_member_back_holds_them_all():
    from phaseid_hpc.config import PhaseConfig
    from phaseid_hpc.phase_identification import _group_consensus

    cfg = PhaseConfig()
    # group 0: three filed A, all answered C, one confident, one held back by a check: none confident.
    # group 1: two filed A answered C, one confident and one held back: none confident. group 2: the same
    # but the held one answers B: not moving together, unchanged. group 3: one member at 0 from its own
    # weak evidence, no check held it: not a veto.
    group = np.array([0, 0, 0, 1, 1, 2, 2, 3, 3])
    gis = np.zeros(group.size, dtype=np.int64)
    labels = np.array([2, 2, 2, 2, 2, 2, 1, 2, 2])
    c = np.array([1.0, 0.6, 0.0, 0.95, 0.0, 1.0, 0.0, 1.0, 0.0])
    held = np.array([0, 0, 1, 0, 1, 0, 1, 0, 0], dtype=bool)
    out = _group_consensus(group, gis, labels, c, cfg, held=held)
    assert (out[:5] < cfg.confident_threshold).all()
    np.testing.assert_array_equal(out[5:], c[5:])
    np.testing.assert_array_equal(_group_consensus(group, gis, labels, c, cfg), c)  # nobody held: no veto


@pytest.mark.parametrize("strict", [False, True])
def test_stray_sibling_factor_holds_a_stray_whose_transformer_does_not_move_with_confidence(strict):
    from phaseid_hpc.config import PhaseConfig
    from phaseid_hpc.phase_identification import _stray_sibling_factor

    rng = np.random.default_rng(3)
    n_t = 400
    phase_sig = rng.normal(size=(3, n_t))
    own = rng.normal(size=(2, n_t))
    # rows 0-5: transformer 0, truly A; its own load dominates (similar to each other, weakly to phase A)
    # rows 6-7: strays of transformer 0 that GIS files under transformers 1 and 2
    # rows 8-9: strays of transformer 3 (rows 10-14, really B, GIS right) filed under transformers 4 and 5
    # rows 15-34: single meters of every phase, one per transformer
    x = np.vstack([own[0] + 0.3 * phase_sig[0] + 0.3 * rng.normal(size=(8, n_t)),
                   own[1] + 0.3 * phase_sig[1] + 0.3 * rng.normal(size=(7, n_t)),
                   phase_sig[np.arange(20) % 3] + rng.normal(size=(20, n_t))])
    u = _unit(x - x.mean(axis=1, keepdims=True))
    tx = np.array([0] * 6 + [1, 2, 4, 5] + [3] * 5 + list(range(6, 26)))
    gis = np.array([0] * 8 + [1] * 7 + list(np.arange(20) % 3))
    labels = gis.copy()
    labels[:8] = 2  # transformer 0 and its strays answered C ...
    c = np.full(gis.size, 0.3)
    c[[6, 7]] = 1.0  # ... the strays with confidence, the transformer's own meters without
    labels[[8, 9]] = 2
    gis[[8, 9]] = 0  # the other strays: filed A, answered B with confidence
    labels[[8, 9]] = 1
    c[[8, 9]] = 1.0
    c[10:] = 1.0
    cfg = PhaseConfig()
    xp_u = u
    if strict:
        xps = pytest.importorskip("array_api_strict")
        xp_u = xps.asarray(u)
    from phaseid_hpc._compat import array_namespace

    f = _stray_sibling_factor(array_namespace(xp_u), xp_u, tx, gis, labels, c, cfg)
    assert f[[6, 7]].tolist() == [0.0, 0.0]  # their siblings stand at GIS A: held back
    assert f[[8, 9]].tolist() == [1.0, 1.0]  # their siblings stand at B, which GIS confirms: the move stands
    assert (f[10:] == 1.0).all()
    # once transformer 0's own change is confident, its strays move with it
    c2 = c.copy()
    c2[:6] = 1.0
    f2 = _stray_sibling_factor(array_namespace(xp_u), xp_u, tx, gis, labels, c2, cfg)
    assert f2[[6, 7]].tolist() == [1.0, 1.0]
    # and the transformer never waits on its own strays: most of its family is filed with it
    c3 = c2.copy()
    c3[[6, 7]] = 0.3
    assert (_stray_sibling_factor(array_namespace(xp_u), xp_u, tx, gis, labels, c3, cfg)[:6] == 1.0).all()


def test_nearest_gis_factor_ignores_physical_siblings_filed_under_another_transformer():
    from phaseid_hpc.config import PhaseConfig
    from phaseid_hpc.phase_identification import _nearest_gis_factor

    rng = np.random.default_rng(1)

    base = rng.normal(size=(2, 12))
    # rows 0-1: one transformer filed as B, really C (the vote says C); rows 2-3: two meters of that same
    # transformer that GIS files under another transformer, also as B (as similar to rows 0-1 as those are to
    # each other); rows 4-9: GIS-C meters of the neighbourhood; rows 10-13: GIS-B meters far away.
    y = np.vstack([base[0] + 0.05 * rng.normal(size=(4, 12)), base[0] + 0.7 * rng.normal(size=(6, 12)),
                   base[1] + 0.3 * rng.normal(size=(4, 12))])
    y = _unit(y)
    gis = np.array([1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1])
    labels = gis.copy()
    labels[[0, 1]] = 2
    group = np.array([0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])
    # rows 2-3 count as independent GIS-B evidence: held back
    nobody = PhaseConfig(nearest_gis_tolerance=0.02, nearest_gis_count=2, nearest_gis_sibling_ratio=2.0)
    assert _nearest_gis_factor(np, y, y, group, gis, labels, nobody)[[0, 1]].tolist() == [0.0, 0.0]
    # as siblings they do not count; the GIS-B meters left are far: the correction stands
    siblings = PhaseConfig(nearest_gis_tolerance=0.02, nearest_gis_count=2, nearest_gis_sibling_ratio=0.9)
    assert _nearest_gis_factor(np, y, y, group, gis, labels, siblings)[[0, 1]].tolist() == [1.0, 1.0]
    # a meter alone in its group has no yardstick: row 0 alone is held back as before
    alone = np.arange(gis.size)
    assert _nearest_gis_factor(np, y, y, alone, gis, labels, siblings)[0] == 0.0


def test_transformer_siblings_of_another_gis_phase_count_as_they_stand():
    from phaseid_hpc.config import PhaseConfig
    from phaseid_hpc.phase_identification import _sibling_agreement_factor, _transformer_groups

    rng = np.random.default_rng(4)
    base = rng.normal(size=(2, 200))
    # transformer 0: row 0 filed A (0), rows 1-3 filed C (2); all four answered B (1), but the C rows'
    # change was held back (they stand at C). Transformer 1: rows 4-6 filed C, answered A, row 6 held back.
    y = _unit(np.vstack([base[0] + 0.2 * rng.normal(size=(4, 200)), base[1] + 0.2 * rng.normal(size=(3, 200))]))
    gis = np.array([0, 2, 2, 2, 2, 2, 2])
    labels = np.array([1, 1, 1, 1, 0, 0, 0])
    stands = np.array([1, 2, 2, 2, 0, 0, 2])
    tx = np.array([0, 0, 0, 0, 1, 1, 1])
    cfg = PhaseConfig()
    f = _sibling_agreement_factor(np, y, tx, gis, labels, cfg, sibling_labels=stands)
    assert f[0] == 0.0  # its C siblings stand at C: B alone is not confident
    assert (f[4:] == 1.0).all()  # siblings of its own GIS phase: compared by their answers, no cascade
    assert _sibling_agreement_factor(np, y, tx, gis, labels, cfg, sibling_labels=labels)[0] == 1.0
    # only transformers of four or more single-phase meters form such groups
    # (among 36 others, each alone: a group of more than a quarter of its phase's meters carries no local
    # information and is split anyway)
    meters = pd.DataFrame({"transformer_id": ["T0"] * 4 + ["T1"] * 3 + [f"S{i}" for i in range(36)]})
    phases = np.array(["A", "C", "C", "C", "C", "C", "C"] + ["ABC"[i % 3] for i in range(36)], dtype=object)
    codes = _transformer_groups(meters, phases, np.arange(43), cfg)
    assert len(set(codes[:4])) == 1 and len(set(codes[4:7])) == 3 and len(set(codes)) == 40


def test_sibling_yardstick_is_how_alike_the_other_group_mates_are():
    from phaseid_hpc.phase_identification import _sibling_similarity

    rng = np.random.default_rng(5)
    base = rng.normal(size=(2, 40))
    # group 0: a stray (row 0) and three siblings (rows 1-3); group 1: a pair (rows 4-5); row 6 alone
    y = _unit(np.vstack([base[0] + 0.3 * rng.normal(size=(1, 40)), base[1] + 0.3 * rng.normal(size=(3, 40)),
                         base[0] + 0.3 * rng.normal(size=(2, 40)), base[1]]))
    group = np.array([0, 0, 0, 0, 1, 1, 2])
    rows = np.array([0, 1, 4, 6])
    got = _sibling_similarity(np, y, group, rows)
    c = y @ y.T
    np.testing.assert_allclose(got[0], np.mean([c[1, 2], c[1, 3], c[2, 3]]))  # the siblings', not the stray's
    np.testing.assert_allclose(got[1], np.mean([c[0, 2], c[0, 3], c[2, 3]]))
    np.testing.assert_allclose(got[2], c[4, 5])  # one group-mate: the pair's own similarity
    assert np.isnan(got[3])  # alone


def test_batch_margin_t_sees_a_margin_that_comes_from_one_burst():
    from phaseid_hpc.phase_identification import _batch_margin_t, _phase_neighbourhood_correlation

    rng = np.random.default_rng(2)
    n_t = 1400

    s_a, s_c = rng.normal(size=(2, n_t))
    # rows 1-10 follow phase A, rows 11-20 phase C (labels 0 and 2); row 0 is filed A, answered C
    steady = 0.3 * s_a + 0.5 * s_c + rng.normal(size=n_t)
    burst = 0.3 * s_a + 0.3 * s_c + rng.normal(size=n_t)
    burst[:100] += 3.0 * s_c[:100]  # the whole excess over A comes from one short stretch
    labels = np.array([2] + [0] * 10 + [2] * 10)
    gis = labels.copy()
    gis[0] = 0
    group = np.arange(labels.size)
    t = {}
    for name, row0 in (("steady", steady), ("burst", burst)):
        rows = np.vstack([row0, s_a + rng.normal(0, 0.5, (10, n_t)), s_c + rng.normal(0, 0.5, (10, n_t))])
        u = _unit(rows - rows.mean(axis=-1, keepdims=True))
        r = _phase_neighbourhood_correlation(np, u, u, group, labels, 5)
        z = (r[0, 2] - r[0, 0]) * np.sqrt(n_t)
        t[name] = _batch_margin_t(np, u, u, u, group, labels, gis, np.array([0]), 5, 14)[0]
        assert z > 4.0  # both look decisive by the nominal error
        if name == "steady":
            assert 0.6 * z < t[name] < 1.6 * z  # white residual: about the same figure
    assert t["burst"] < 2.0 < t["steady"]


def test_sibling_agreement_holds_back_a_transformer_the_vote_splits():
    from phaseid_hpc.config import PhaseConfig
    from phaseid_hpc.phase_identification import _sibling_agreement_factor

    rng = np.random.default_rng(3)
    base = rng.normal(size=50)
    # rows 0-5: one transformer (siblings, similar signals), GIS A (0); row 6 filed under it but elsewhere
    u = np.vstack([base + 0.3 * rng.normal(size=(6, 50)), rng.normal(size=(1, 50))])
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    group = np.zeros(7, dtype=int)
    gis = np.zeros(7, dtype=int)
    cfg = PhaseConfig()
    split = np.array([2, 2, 2, 0, 0, 0, 2])  # the vote splits the transformer; the stray goes to C too
    f = _sibling_agreement_factor(np, u, group, gis, split, cfg)
    assert f[:3].tolist() == [0.0, 0.0, 0.0]  # half of their siblings disagree
    assert f[6] == 1.0  # a stray has no siblings in the group: judged alone
    whole = np.array([2, 2, 2, 2, 2, 2, 0])  # a whole mislabelled transformer moves together
    assert (_sibling_agreement_factor(np, u, group, gis, whole, cfg)[:6] == 1.0).all()
    off = _sibling_agreement_factor(np, u, group, gis, split, PhaseConfig(sibling_agreement=0.0))
    assert (off == 1.0).all()


def test_nearest_gis_check_in_the_raw_signals_sees_what_the_denoised_space_hides():
    from phaseid_hpc.config import PhaseConfig
    from phaseid_hpc.phase_identification import _nearest_gis_factor

    rng = np.random.default_rng(5)

    # raw signals: row 0 (GIS C, answered B) follows the C meters (rows 1-4) weakly and the B meters (5-8)
    # not at all; in a misleading "denoised" space it sits on top of the B meters
    s_c, s_b = rng.normal(size=(2, 400))
    u = _unit(np.vstack([0.4 * s_c + rng.normal(size=400), s_c + 0.5 * rng.normal(size=(4, 400)),
                        s_b + 0.5 * rng.normal(size=(4, 400))]))
    y = _unit(np.vstack([np.r_[0.0, 1.0], np.tile([1.0, 0.0], (4, 1)), np.tile([0.0, 1.0], (4, 1))])
             + 0.01 * rng.normal(size=(9, 2)))
    gis = np.array([2, 2, 2, 2, 2, 1, 1, 1, 1])
    labels = gis.copy()
    labels[0] = 1
    group = np.arange(9)
    cfg = PhaseConfig(nearest_gis_tolerance=0.02, nearest_gis_raw_tolerance=0.01)
    assert _nearest_gis_factor(np, y, u, group, gis, labels, cfg)[0] == 1.0  # the denoised check passes it
    raw = _nearest_gis_factor(np, u, u, group, gis, labels, cfg, query=u, tolerance=cfg.nearest_gis_raw_tolerance)
    assert raw[0] == 0.0 and (raw[1:] == 1.0).all()
    off = _nearest_gis_factor(np, u, u, group, gis, labels, cfg, query=u, tolerance=float("inf"))
    assert (off == 1.0).all()


def test_a_pair_is_the_two_phases_whose_signals_explain_it_and_a_change_needs_raw_backing():
    from phaseid_hpc.config import PhaseConfig
    from phaseid_hpc.phase_identification import _identify_pairs

    rng = np.random.default_rng(6)
    n_t = 500

    s = rng.normal(size=(3, n_t))
    singles = np.vstack([s[p] + 0.4 * rng.normal(size=(8, n_t)) for p in range(3)])  # rows 0-23: A, B, C
    pair_raw = s[1] + s[2] + 0.4 * rng.normal(size=n_t)  # really BC
    u = _unit(np.vstack([singles, pair_raw]))
    labels = np.repeat([0, 1, 2], 8)
    s_idx = np.arange(24)
    pair = np.zeros(25, dtype=bool)
    pair[24] = True
    cfg = PhaseConfig(n_neighbours=4)

    def run(y, gis):
        phase, conf, _ = _identify_pairs(np, y, u, np.flatnonzero(pair), s_idx, labels, np.full(25, n_t), cfg,
                                         gis)
        return phase[0], conf[0]

    # a denoised space that puts the service among the A and B meters (their votes would say AB): the
    # regression of its raw signal on each phase's local signal still finds B and C, with confidence
    y_bad = _unit(np.vstack([np.tile([1.0, 0.0, 0.0], (8, 1)), np.tile([0.0, 1.0, 0.0], (8, 1)),
                            np.tile([0.0, 0.0, 1.0], (8, 1)), [[1.0, 1.0, 0.0]]]) + 0.01 * rng.normal(size=(25, 3)))
    gis = np.array(list("A" * 8 + "B" * 8 + "C" * 8) + ["AB"], dtype=object)
    answer, conf = run(y_bad, gis)
    assert answer == "BC" and conf >= cfg.confident_threshold
    # the same change where GIS files no meter nearby on C (the C meters' labels say A): the raw nearest
    # meters of each GIS label do not back it, so it is not confident
    gis_no_c = np.array(list("A" * 8 + "B" * 8 + "A" * 8) + ["AB"], dtype=object)
    answer, conf = run(y_bad, gis_no_c)
    assert answer == "BC" and conf < cfg.suspect_threshold
    # backed, the correction keeps the confidence it has without GIS
    phase0, c0, weak = _identify_pairs(np, y_bad, u, np.flatnonzero(pair), s_idx, labels, np.full(25, n_t),
                                       cfg)
    assert phase0[0] == "BC" and c0[0] == run(y_bad, gis)[1] and not weak[0]
    # a service whose signal follows one phase only gets no confident pair
    u[24] = _unit((s[1] + 0.4 * rng.normal(size=n_t))[None, :])[0]
    answer, conf = run(y_bad, gis)
    assert conf < cfg.confident_threshold


def test_pair_margin_is_the_weaker_answer_phase_over_the_third():
    from phaseid_hpc.phase_identification import _pair_margin

    rng = np.random.default_rng(6)
    n_t = 1400
    s = rng.normal(size=(3, n_t))
    # rows 0-29: single-phase meters, ten per phase; rows 30-31: a line-to-line C-A service (twice)
    single = np.vstack([s[p] + 0.8 * rng.normal(size=(10, n_t)) for p in range(3)])
    pair = s[0] + s[2] + 0.8 * rng.normal(size=(2, n_t))
    u = _unit(np.vstack([single, pair]) - np.vstack([single, pair]).mean(axis=1, keepdims=True))
    y = u  # search in the raw space
    s_idx = np.arange(30)
    labels = np.repeat([0, 1, 2], 10)
    rows = np.array([30, 31])
    n_obs = np.full(32, n_t)
    right = _pair_margin(np, y, u, s_idx, labels, rows, np.array([[0, 2], [0, 2]]), 5, n_obs[rows], 28)
    wrong = _pair_margin(np, y, u, s_idx, labels, rows, np.array([[0, 1], [1, 2]]), 5, n_obs[rows], 28)
    assert (right > 4).all() and (wrong < 0).all()
    # nominal only (too few batches): larger in size than the batch-means figure
    nominal = _pair_margin(np, y, u, s_idx, labels, rows, np.array([[0, 2], [0, 2]]), 5, n_obs[rows], 1)
    assert (nominal >= right).all()
    # a feeder without C meters: the third phase is no rival
    no_c = _pair_margin(np, y, u, s_idx[:20], labels[:20], rows, np.array([[0, 1], [0, 1]]), 5, n_obs[rows], 28)
    assert np.isinf(no_c).all()


def test_pair_margin_needs_the_regression_to_put_the_third_phase_last():
    """Local phase signals overlap (B's meters here move with A's load): a C-A service correlates more with
    the B neighbourhood than with the C one, but regressed on the three it needs no B; A-B is not confident."""
    from phaseid_hpc.phase_identification import _pair_margin

    rng = np.random.default_rng(11)
    n_t = 1400
    s = rng.normal(size=(3, n_t))
    centre = [s[0], s[1] + 0.8 * s[0], s[2]]
    single = np.vstack([centre[p] + 0.3 * rng.normal(size=(10, n_t)) for p in range(3)])
    pair = s[0] + 0.5 * s[2] + 0.3 * rng.normal(size=(2, n_t))
    x = np.vstack([single, pair])
    u = _unit(x - x.mean(axis=1, keepdims=True))
    s_idx, labels, rows = np.arange(30), np.repeat([0, 1, 2], 10), np.array([30, 31])
    n_obs = np.full(2, n_t)
    ab = np.array([[0, 1], [0, 1]])
    # by correlation alone A-B beats C by more than the confidence threshold (2 SE)
    assert (_pair_margin(np, u, u, s_idx, labels, rows, ab, 5, n_obs, 28, regression=False) > 2).all()
    assert (_pair_margin(np, u, u, s_idx, labels, rows, ab, 5, n_obs, 28) <= 0).all()
    # a real A-B service keeps its margin
    u2 = u.copy()
    ab_pair = s[0] + s[1] + 0.3 * rng.normal(size=(2, n_t))
    u2[30:] = _unit(ab_pair - ab_pair.mean(axis=1, keepdims=True))
    assert (_pair_margin(np, u2, u2, s_idx, labels, rows, ab, 5, n_obs, 28) > 4).all()


def feeder_with_loads(seed=0, n_tr=60, days=7, heavy=8, z_heavy=0.025):
    """A feeder with loads: voltage = source - phase drop (the phase's summed load) - transformer drop
    (its summed load) - service drop (own load) + meter noise. One heavy transformer (``heavy`` meters on A,
    all filed on B in GIS) has an impedance of ``z_heavy`` [pu/kW], the others 0.0015.

    Returns meters (GIS view), truth phase, voltage (n, t) [V], kW (n, t) and the heavy transformer's rows.
    """
    rng = np.random.default_rng(seed)
    t = 96 * days

    def load(n):
        base = 0.5 + 0.5 * (1 - np.cos(2 * np.pi * np.arange(t) / 96))[None, :] * rng.uniform(0.5, 1.5, (n, 1))
        steps = (rng.random((n, t)) < 0.05).cumsum(1) % 2 * rng.uniform(1, 4, (n, 1))  # appliances on and off
        return base + steps + 0.2 * rng.random((n, t))

    tr_phase, tr_id, kws, zs = [], [], [], []
    for k in range(n_tr):
        m = int(rng.integers(2, 5))
        kws.append(load(m))
        tr_phase += [k % 3] * m
        tr_id += [f"T{k:03d}"] * m
        zs += [0.0015] * m
    kws.append(load(heavy))
    tr_phase += [0] * heavy
    tr_id += ["TH"] * heavy
    zs += [z_heavy] * heavy
    kw, tr_phase, tr_id, zs = np.vstack(kws), np.array(tr_phase), np.array(tr_id), np.array(zs)
    n = len(kw)
    phase_load = np.stack([kw[tr_phase == p].sum(0) for p in range(3)])
    source = 0.01 * np.cumsum(rng.standard_normal(t)) / np.sqrt(96)
    primary = (source[None, :] - 0.0012 * phase_load / np.sqrt(n / 3)
               + 0.002 * np.cumsum(rng.standard_normal((3, t)), 1) / np.sqrt(96))
    tx_load = pd.DataFrame(kw).groupby(tr_id).transform("sum").to_numpy()
    pu = 1 + primary[tr_phase] * rng.uniform(0.7, 1.3, (n, 1)) - zs[:, None] * tx_load - 0.001 * kw
    v = np.round(240 * pu * (1 + 0.0007 * rng.standard_normal((n, t))), 1)
    gis = PHASES[tr_phase].copy()
    gis[tr_id == "TH"] = "B"
    meters = pd.DataFrame({"meter_id": [f"M{i:04d}" for i in range(n)], "feeder_id": "F", "transformer_id": tr_id,
                           "phase_gis": gis, "service_type": "1ph-240", "nominal_v": 240.0, "usable": True})
    return meters, PHASES[tr_phase], v, kw, tr_id == "TH"


def test_load_compensation_reveals_a_transformer_whose_own_load_hides_its_phase():
    """Its meters share a drop ten times their phase's swings: on voltage alone the mislabelled transformer
    is not corrected with confidence; with its kW the drop is compensated and it is, and nobody else moves."""
    meters, truth, v, kw, heavy = feeder_with_loads()
    raw = identify_phases(v, meters, PhaseConfig())
    comp = identify_phases(v, meters, PhaseConfig(), kw=kw)
    assert (raw["phase_class"][heavy] != contract.CLASS_CONFIDENT).all()
    assert (comp["phase"][heavy] == "A").all() and (comp["phase_class"][heavy] == contract.CLASS_CONFIDENT).all()
    for res in (raw, comp):
        assert (res["phase"].to_numpy()[~heavy] == truth[~heavy]).all()
        assert not ((res["phase"].to_numpy() != truth) & (res["phase_class"] == contract.CLASS_CONFIDENT)).any()
    # turned off, kW changes nothing
    off = identify_phases(v, meters, PhaseConfig(load_neighbours=0), kw=kw)
    pd.testing.assert_frame_equal(off, raw)


def test_load_compensation_contract():
    meters, _, v, kw, _ = feeder_with_loads(n_tr=12, days=2)
    with pytest.raises(ContractError, match="kw must have the shape of voltage"):
        identify_phases(v, meters, PhaseConfig(), kw=kw[:, 1:])
    kw_gaps = kw.copy()
    kw_gaps[::3, 10:40] = np.nan  # missing kW: fitted without those samples, never a NaN answer
    kw_gaps[0] = np.nan  # a meter without kW keeps its voltage
    res = identify_phases(v, meters, PhaseConfig(), kw=kw_gaps)
    assert res["phase"].notna().all()


def test_combine_passes_takes_the_more_confident_answer_and_reviews_contradictions():
    from phaseid_hpc.phase_identification import _combine_passes

    cfg = PhaseConfig()
    obj = lambda *x: np.array(x, dtype=object)
    raw = (obj("A", "B", "C", "A", None), np.array([0.9, 0.2, 0.8, 0.5, 0.0]),
           obj("confident", "low", "suspect", "low", "insufficient_data"), [["r0"], [], [], [], []],
           np.array([1, 1, 2, 2, -1]), np.array([0, 1, 0, 0, 0]), np.array([True, False, True, True, False]),
           np.array([False, False, False, False, False]))
    comp = (obj("A", "C", "A", "B", None), np.array([0.95, 1.0, 0.9, 0.3, 0.0]),
            obj("confident", "confident", "confident", "low", "insufficient_data"), [["r1"], [], [], [], []],
            np.array([7, 7, 7, 7, -1]), np.array([0, 0, 0, 0, 0]), np.array([True, True, True, False, False]),
            np.array([False, False, False, False, False]))
    phase, conf, cls, reasons, zone, lag, free, _ = _combine_passes(raw, comp, cfg)
    assert phase.tolist() == ["A", "C", "A", "A", None]
    np.testing.assert_allclose(conf, [0.95, 1.0, cfg.suspect_threshold, 0.5, 0.0])
    # meter 2: both passes suspect or better on different answers -> the review list, not the worklist
    assert cls.tolist() == ["confident", "confident", "suspect", "low", "insufficient_data"]
    assert reasons[0] == ["r1"] and free.tolist() == [True, True, False, True, False]
    assert zone.tolist() == [1, 1, 2, 2, -1] and lag.tolist() == [0, 1, 0, 0, 0]  # the measured pass's
    # a measured answer that a check or group rule held back stays held, however sure the other pass is
    held = raw[:7] + (np.array([False, True, False, False, False]),)
    phase, conf, *_ = _combine_passes(held, comp, cfg)
    assert phase[1] == "B" and conf[1] == 0.2


def _transformer_feeder(rng, n_t=600, lone_sibling=True):
    """Four meters of one transformer (rows 0-3) and a fifth (row 4) GIS files under it on another phase;
    unit signals: shared secondary voltage for rows 0-3 (and row 4 where ``lone_sibling``) plus own noise."""
    secondary = rng.normal(size=n_t)
    rows = [secondary + 0.6 * rng.normal(size=n_t) for _ in range(4)]
    rows.append((secondary if lone_sibling else rng.normal(size=n_t)) + 0.6 * rng.normal(size=n_t))
    return _unit(np.vstack(rows))


def test_transformer_consensus_lifts_a_lone_change_its_transformer_confirms():
    from phaseid_hpc.config import PhaseConfig
    from phaseid_hpc.phase_identification import _transformer_consensus

    cfg = PhaseConfig()
    rng = np.random.default_rng(11)
    tx_group = np.zeros(5, dtype=np.int64)
    gis = np.array([0, 0, 0, 0, 1])  # the lone meter GIS files on B
    labels = np.zeros(5, dtype=np.int64)  # everyone answered A
    c = np.array([1.0, 1.0, 1.0, 1.0, 0.6])
    cut = np.zeros(5, dtype=bool)
    out = _transformer_consensus(np, _transformer_feeder(rng), tx_group, gis, labels, c, cut, cfg)
    assert out[4] == cfg.confident_threshold and (out[:4] == 1.0).all()
    # not a physical sibling (another phase of a three-phase bank): not lifted
    stranger = _transformer_feeder(rng, lone_sibling=False)
    out = _transformer_consensus(np, stranger, tx_group, gis, labels, c, cut, cfg)
    assert out[4] == 0.6
    # a rule cut it, or a mate is not confident, or another mate shares its GIS phase: not lifted
    u = _transformer_feeder(rng)
    was_cut = np.array([0, 0, 0, 0, 1], bool)
    assert _transformer_consensus(np, u, tx_group, gis, labels, c, was_cut, cfg)[4] == 0.6
    mate_unsure = np.array([1, 1, 1, 0.5, 0.6])
    assert _transformer_consensus(np, u, tx_group, gis, labels, mate_unsure, cut, cfg)[4] == 0.6
    assert _transformer_consensus(np, u, tx_group, np.array([0, 0, 0, 1, 1]), labels, c, cut, cfg)[4] == 0.6


def test_transformer_tiebreak_settles_a_contradiction_between_the_passes():
    from phaseid_hpc.config import PhaseConfig
    from phaseid_hpc.phase_identification import _combine_passes, _transformer_tiebreak

    cfg = PhaseConfig()
    rng = np.random.default_rng(12)
    meters = pd.DataFrame({"transformer_id": ["T1"] * 5, "phase_gis": ["A", "A", "A", "A", "B"]})

    def res(phases, confs):
        n = len(phases)
        return (np.array(phases, dtype=object), np.array(confs, dtype=float),
                np.array(["confident" if c >= cfg.confident_threshold else "low" for c in confs],
                         dtype=object),
                [[] for _ in range(n)], np.zeros(n, np.int64), np.zeros(n, np.int64), np.ones(n, bool),
                np.zeros(n, bool))

    raw = res(["A", "A", "A", "A", "A"], [1.0, 1.0, 1.0, 1.0, 1.0])  # the lone meter moved to A
    comp = res(["B", "B", "B", "B", "B"], [0.0, 0.0, 0.0, 0.0, 1.0])  # it confirms B; the move to B held
    combined = _combine_passes(raw, comp, cfg, meters)
    assert combined[0][4] == "A" and combined[1][4] == cfg.suspect_threshold  # contested
    s_idx = np.arange(5)
    out = _transformer_tiebreak(np, _transformer_feeder(rng), s_idx, raw, comp, combined, meters, cfg)
    assert out[0][4] == "A" and out[1][4] == 1.0 and out[2][4] == "confident"
    # not their physical sibling: it stays contested
    out = _transformer_tiebreak(np, _transformer_feeder(rng, lone_sibling=False), s_idx, raw, comp, combined,
                                meters, cfg)
    assert out[1][4] == cfg.suspect_threshold


def test_virtual_meters_pool_agreeing_group_mates_in_the_signals_dtype():
    """Meters of one GIS group that the vote puts on one phase are averaged (unit norm); a member answered
    another phase is pooled only with those sharing its answer; float32 signals give float32 virtual meters
    (a float64 result would make every later product convert the signals)."""
    from phaseid_hpc.phase_identification import _pool_agreeing

    rng = np.random.default_rng(0)
    u = rng.standard_normal((5, 50)).astype(np.float32)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    group = np.array([0, 0, 0, 1, 2])
    labels = np.array([1, 1, 2, 0, 0])
    out = _pool_agreeing(np, u, group, labels)
    assert out.dtype == np.float32
    pooled = (u[0] + u[1]) / np.linalg.norm(u[0] + u[1])
    np.testing.assert_allclose(out[0], pooled, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[1], pooled, rtol=1e-5, atol=1e-6)
    for i in (2, 3, 4):  # alone with its answer: itself
        np.testing.assert_allclose(out[i], u[i], rtol=1e-5, atol=1e-6)
