"""changes.py: phase changes at restorations, change points without events; synth/events.py: the splices."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from phaseid_hpc import contract
from phaseid_hpc.changes import (
    apply_connection_changes,
    connection_changes,
    read_events,
    restoration_splits,
)
from phaseid_hpc.config import RunConfig
from phaseid_hpc.errors import ContractError
from phaseid_hpc.phase_identification import identify_phases
from phaseid_hpc.synth.events import (
    inject_tap_change,
    inject_winding_fault,
    splice_phase_changes,
    write_events,
)

DAYS, STEP = 10, 96


def _feeder(seed: int = 0):
    """90 meters on 45 two-meter transformers, 30 per phase, 10 days of 15-min voltage [V] (class 0.5-like
    noise). Each phase's level wanders with its load; each transformer adds its own drop (siblings'
    differenced voltages correlate about 0.4 beyond their phase's: 0.6-0.9 on the physics-based feeders;
    weaker, a meter that follows one sibling alone is not borne by the transformer)."""
    rng = np.random.default_rng(seed)
    n_t = DAYS * STEP
    phase = np.repeat(np.array(["A", "B", "C"]), 30)
    tx = np.array([f"T{i // 2:03d}" for i in range(90)])
    common = 0.01 * np.sin(np.arange(n_t) * 2 * np.pi / STEP)
    ph_sig = np.cumsum(rng.normal(0, 0.0015, (3, n_t)), axis=1)
    tx_sig = np.cumsum(rng.normal(0, 0.0008, (45, n_t)), axis=1)
    code = np.searchsorted(["A", "B", "C"], phase)
    pu = 1.0 + common + ph_sig[code] + tx_sig[np.arange(90) // 2] + rng.normal(0, 0.0007, (90, n_t))
    meters = pd.DataFrame({"meter_id": [f"M{i:03d}" for i in range(90)], "feeder_id": "F1", "transformer_id": tx,
                           "phase": phase})
    times = pd.date_range("2026-06-09 00:15", periods=n_t, freq="15min", tz="UTC")
    return 240.0 * pu, meters, times


def _spliced(seed: int = 0):
    v, meters, times = _feeder(seed)
    out, events, changes = splice_phase_changes(v, meters, times, share=0.02, control_share=0.02,
                                                min_before_days=4, min_after_days=4, random_state=seed)
    return out, meters, times, events, changes


def _block(v, meters, times, events, config=None):
    config = config or RunConfig()
    idm = meters.rename(columns={"phase": "phase_gis"}).assign(nominal_v=240.0)
    whole = identify_phases(v, idm, config.phase)
    res = connection_changes(v, idm, times, events, config, labels=whole["phase"].to_numpy(dtype=object))
    return whole, res


def test_splice_moves_meters_to_a_donor_of_another_phase():
    v, meters, times = _feeder()
    out, events, changes = splice_phase_changes(v, meters, times, share=0.02, control_share=0.02,
                                                min_before_days=4, min_after_days=4, random_state=3)
    moved = changes[changes["moved"]]
    assert len(moved) == 2 and (~changes["moved"]).sum() == 2
    assert (moved["phase_before"] != moved["phase_after"]).all()
    for _, r in moved.iterrows():
        i, j = int(r["meter_id"][1:]), int(r["donor_id"][1:])
        assert meters["phase"][j] == r["phase_after"]
        k = times.get_loc(r["changed_at"] + pd.Timedelta("15min"))
        assert 4 * STEP <= k <= (DAYS - 4) * STEP
        np.testing.assert_allclose(out[i, k:] / v[j, k:], out[i, k] / v[j, k])  # the donor's shape, scaled
        assert np.isnan(out[i, k - 1]) and not np.isnan(out[i, :k - 8]).any()  # outage, then readings
    untouched = ~meters["meter_id"].isin(changes["meter_id"]).to_numpy()
    np.testing.assert_array_equal(out[untouched], v[untouched])
    assert set(events["event"]) == {"outage", "restoration"} and len(events) == 2 * len(changes)
    again = splice_phase_changes(v, meters, times, share=0.02, control_share=0.02, min_before_days=4,
                                 min_after_days=4, random_state=3)
    np.testing.assert_array_equal(again[0], out)  # seeded
    with pytest.raises(ValueError, match="no restoration time"):
        splice_phase_changes(v, meters, times, min_before_days=6, min_after_days=6)


def test_splice_gives_each_moved_meter_its_own_donor():
    # 20% of the meters moved, mostly from the same transformers' phase: no two carry one donor's readings
    v, meters, times = _feeder()
    _, _, changes = splice_phase_changes(v, meters, times, share=0.2, control_share=0.0,
                                         min_before_days=4, min_after_days=4, random_state=1)
    moved = changes[changes["moved"]]
    assert len(moved) == 18 and moved["donor_id"].is_unique


def test_tap_and_winding_injection():
    v, _, _ = _feeder()
    rows = np.array([4, 5])
    tapped = inject_tap_change(v, rows, 300, -2.5)
    np.testing.assert_allclose(tapped[rows, 300:], v[rows, 300:] * 0.975)
    np.testing.assert_array_equal(tapped[rows, :300], v[rows, :300])
    faulty = inject_winding_fault(v, rows, 300, 0.5, random_state=1)
    ratio = faulty[rows, 300:] / v[rows, 300:]
    np.testing.assert_allclose(ratio[0], ratio[1])  # common to the unit's meters
    assert 0.003 < ratio[0].std() < 0.007
    np.testing.assert_array_equal(np.delete(faulty, rows, axis=0), np.delete(v, rows, axis=0))


def test_restoration_splits_follow_the_events():
    times = pd.date_range("2026-06-09 00:15", periods=10 * STEP, freq="15min", tz="UTC")
    ev = pd.DataFrame({"meter_id": ["M1", "M1", "M2", "M3", "M9"],
                       "timestamp": pd.to_datetime(["2026-06-13 10:00", "2026-06-13 12:00", "2026-06-17 12:00",
                                                    "2026-06-12 00:00", "2026-06-12 00:00"], utc=True),
                       "event": ["outage", "restoration", "restoration", "Restoration", "restoration"]})
    stop, start = restoration_splits(ev, np.array(["M1", "M2", "M3"]), times, RunConfig().changes)
    # M1: before ends at the outage, after starts with the interval ending 15 min after the restoration
    assert times[stop[0] - 1] == pd.Timestamp("2026-06-13 10:00", tz="UTC")
    assert times[start[0]] == pd.Timestamp("2026-06-13 12:15", tz="UTC")
    assert start[1] == -1 and stop[1] == -1  # 1.5 days after: too short
    assert times[start[2]] == pd.Timestamp("2026-06-12 00:15", tz="UTC") and stop[2] == start[2]


def test_spliced_meter_with_an_event_gets_the_new_phase_and_the_time():
    v, meters, times, events, changes = _spliced()
    _whole, res = _block(v, meters, times, events)
    ids = meters["meter_id"].to_numpy()
    for _, r in changes.iterrows():
        i = int(np.flatnonzero(ids == r["meter_id"])[0])
        if r["moved"]:
            assert res.reason[i] == contract.REASON_PHASE_CHANGED_AT_RESTORATION
            assert (res.phase_before[i], res.phase_after[i]) == (r["phase_before"], r["phase_after"])
            assert res.changed_at[i] == r["changed_at"]
            # the donor is on another transformer (two meters of one phase each): the meter moved there too
            donor_tx = meters.set_index("meter_id").loc[r["donor_id"], "transformer_id"]
            assert (res.transformer_before[i], res.transformer_after[i]) == (meters["transformer_id"][i], donor_tx)
            assert res.transformer_reason[i] == contract.REASON_TRANSFORMER_CHANGED_AT_RESTORATION
        else:  # control: outage and restoration, same phase and transformer
            assert res.reason[i] == "" and res.phase_after[i] == r["phase_after"]
            assert res.transformer_reason[i] == "" and res.transformer_after[i] == meters["transformer_id"][i]
    others = ~np.isin(ids, changes["meter_id"])
    assert (res.reason[others] == "").all()


def test_spliced_meter_without_events_is_found_by_its_change_point():
    v, meters, times, _events, changes = _spliced()
    _, res = _block(v, meters, times, None)
    ids = meters["meter_id"].to_numpy()
    moved = changes[changes["moved"]]
    for _, r in moved.iterrows():
        i = int(np.flatnonzero(ids == r["meter_id"])[0])
        assert res.reason[i] == contract.REASON_CONNECTION_CHANGED
        assert res.phase_after[i] == r["phase_after"] and res.phase_before[i] == r["phase_before"]
        assert abs(res.changed_at[i] - r["changed_at"]) <= pd.Timedelta("1D")
    assert (res.reason[~np.isin(ids, moved["meter_id"])] == "").all()
    # the search can be turned off
    off = dataclasses.replace(RunConfig(), changes=dataclasses.replace(RunConfig().changes, change_point=False))
    _, res_off = _block(v, meters, times, None, off)
    assert (res_off.reason == "").all()


def test_unchanged_feeder_has_no_change():
    v, meters, times = _feeder(seed=5)
    _, res = _block(v, meters, times, None)
    assert (res.reason == "").all() and pd.isna(res.changed_at).all()


def test_apply_puts_the_answer_after_the_change_on_the_worklist():
    v, meters, times, events, changes = _spliced()
    whole, res = _block(v, meters, times, events)
    out = pd.DataFrame({"meter_id": meters["meter_id"], "phase_gis": meters["phase"],
                        "phase": meters["phase"], "phase_inferred": whole["phase"].astype(object),
                        "phase_confidence": whole["phase_confidence"], "phase_class": whole["phase_class"],
                        "changed": False, "reasons": [[] for _ in range(len(meters))]})
    got = apply_connection_changes(out, res)
    moved = changes[changes["moved"]].set_index("meter_id")
    sel = got.set_index("meter_id").loc[moved.index]
    assert (sel["phase"] == moved["phase_after"]).all() and sel["changed"].all()
    assert all(contract.REASON_PHASE_CHANGED_AT_RESTORATION in r for r in sel["reasons"])
    assert (sel["changed_at"] == moved["changed_at"]).all()
    assert not got.drop(index=got.index[got["meter_id"].isin(moved.index)])["changed"].any()
    joined = apply_connection_changes(out.assign(reasons=""), res)  # joined-string reasons stay strings
    assert joined.set_index("meter_id").loc[moved.index, "reasons"].eq(
        f"{contract.REASON_PHASE_CHANGED_AT_RESTORATION}; {contract.REASON_TRANSFORMER_CHANGED_AT_RESTORATION}").all()


def test_read_events_names_the_problem(tmp_path):
    ok = write_events(pd.DataFrame({"meter_id": ["M1"], "timestamp": pd.to_datetime(["2026-06-09 10:00"], utc=True),
                                    "event": ["restoration"]}), tmp_path / "events.csv")
    assert read_events(ok)["timestamp"][0] == pd.Timestamp("2026-06-09 10:00", tz="UTC")
    (tmp_path / "bad.csv").write_text("meter_id,time,event\nM1,2026-06-09,outage\n")
    with pytest.raises(ContractError, match=r"bad\.csv.*timestamp"):
        read_events(tmp_path / "bad.csv")
    (tmp_path / "bad2.csv").write_text("meter_id,timestamp,event\nM1,yesterday,outage\n")
    with pytest.raises(ContractError, match=r"row 2.*yesterday"):
        read_events(tmp_path / "bad2.csv")
    with pytest.raises(ContractError, match="does not exist"):
        read_events(tmp_path / "none.csv")


def test_windows_around_a_restoration_skip_the_gis_correction_guards(monkeypatch):
    # a restoration makes a change likely and a reconnected meter has left its siblings' phase: the windows
    # are identified without the batch-means margin and the sibling agreement (the rest of the config stays)
    import phaseid_hpc.phase_identification as pi
    from phaseid_hpc.changes import changes_at_restoration
    from phaseid_hpc.config import PhaseConfig

    seen = []

    def spy(voltage, meters, config, **kw):
        seen.append(config)
        return identify_phases(voltage, meters, config, **kw)

    monkeypatch.setattr(pi, "identify_phases", spy)
    rng = np.random.default_rng(0)
    v = 240 + rng.normal(0, 1, (6, 200))
    meters = pd.DataFrame({"meter_id": [f"M{i}" for i in range(6)], "feeder_id": "F",
                           "transformer_id": [f"T{i // 2}" for i in range(6)], "phase_gis": list("AABBCC")})
    stop = np.array([100, -1, -1, -1, -1, -1])
    start = np.array([110, -1, -1, -1, -1, -1])
    cfg = PhaseConfig(nearest_gis_tolerance=0.05)
    changes_at_restoration(v, meters, stop, start, cfg)
    assert len(seen) == 2
    assert all(c.margin_batch_s == 0.0 and c.sibling_agreement == 0.0 for c in seen)
    assert all(c.nearest_gis_raw_tolerance == float("inf") for c in seen)
    assert all(c.nearest_gis_tolerance == 0.05 for c in seen)
