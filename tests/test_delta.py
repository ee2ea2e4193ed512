"""Delta runs: a meter moved at a restoration is found after it; only its feeder is recomputed, the rest copied."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from phaseid_hpc import contract
from phaseid_hpc.config import load_config
from phaseid_hpc.delta import affected_blocks, delta_plan, run_delta
from phaseid_hpc.errors import ContractError
from phaseid_hpc.pipeline import run_job
from phaseid_hpc.store import FeederBlock


def _config():
    # the stages a delta run changes; the others only cost time here
    return load_config(overrides={"transformer": {"enabled": False}, "validation": {"enabled": False},
                                  "pt": {"enabled": False}}, environ={})


@pytest.fixture(scope="module")
def spliced_utility(tmp_path_factory):
    """Several feeders in one block; one meter moved to another phase at a restoration on day 4 of 8."""
    from phaseid_hpc.ingest import ingest_files
    from phaseid_hpc.synth import generate_utility
    from phaseid_hpc.synth.events import splice_phase_changes, write_events

    root = tmp_path_factory.mktemp("delta")
    export = root / "export"
    generate_utility(export, n_meters=400, days=8, seed=5, feeder_meters=(80, 150))
    reads = pd.concat([pd.read_parquet(p) for p in sorted(export.glob("readings*.parquet"))], ignore_index=True)
    truth = pd.read_csv(export / "truth.csv", dtype={"meter_id": str, "feeder_id": str, "transformer_id": str})
    wide = reads.pivot(index="meter_id", columns="timestamp", values="voltage_v").reindex(truth["meter_id"])
    times = pd.DatetimeIndex(wide.columns)
    times = times.tz_localize("UTC") if times.tz is None else times
    v, events, changes = splice_phase_changes(wide.to_numpy(np.float64), truth, times, share=0.0,
                                              control_share=0.0, min_before_days=3.5, min_after_days=3.5,
                                              random_state=2)
    mid = changes["meter_id"].iloc[0]
    row = int(np.flatnonzero(truth["meter_id"].to_numpy() == mid)[0])
    new_v = pd.Series(v[row], index=wide.columns)
    sel = reads["meter_id"] == mid
    reads.loc[sel, "voltage_v"] = new_v.reindex(reads.loc[sel, "timestamp"]).to_numpy().astype(reads["voltage_v"].dtype)
    reads = reads[~(sel & reads["voltage_v"].isna())]  # the outage: no readings
    for p in export.glob("readings*.parquet"):
        p.unlink()
    reads.to_parquet(export / "readings.parquet", index=False)
    store = root / "store.zarr"
    ingest_files([str(export / "readings.parquet")], export / "meters.csv", store,
                 transformers_path=export / "transformers.csv", references_path=export / "references.parquet")
    prev = root / "prev"
    run_job(store, prev, config=_config(), report=False)
    return {"store": store, "prev": prev, "events": write_events(events, root / "events.csv"),
            "change": changes.iloc[0], "truth": truth}


def test_affected_blocks_cut_blocks_to_the_affected_feeders():
    table = pd.DataFrame({"feeder_id": list("aaabbcccdd")})
    blocks = [FeederBlock(0, 5, ("a", "b")), FeederBlock(5, 10, ("c", "d"))]
    assert affected_blocks(table, blocks, ["b", "c", "d"]) == [FeederBlock(3, 5, ("b",)), FeederBlock(5, 10, ("c", "d"))]
    assert affected_blocks(table, blocks, ["a", "d"]) == [FeederBlock(0, 3, ("a",)), FeederBlock(8, 10, ("d",))]
    assert affected_blocks(table, blocks, []) == []


def test_delta_plan_names_unknown_meters():
    table = pd.DataFrame({"meter_id": ["m1", "m2"], "feeder_id": ["F1", "F2"]})
    ev = pd.DataFrame({"meter_id": ["m2", "m2"], "event": ["outage", "restoration"],
                       "timestamp": pd.to_datetime(["2026-06-03 02:00", "2026-06-03 04:00"], utc=True)})
    plan = delta_plan(ev, table)
    assert plan.to_dict("records") == [{"feeder_id": "F2", "meter_id": "m2",
                                        "events": "outage 2026-06-03T02:00Z; restoration 2026-06-03T04:00Z"}]
    with pytest.raises(ContractError, match="m9"):
        delta_plan(ev.assign(meter_id="m9"), table)


def test_delta_run_finds_the_move_and_recomputes_only_its_feeder(spliced_utility, tmp_path):
    u = spliced_utility
    change = u["change"]
    out = tmp_path / "delta"
    summary = run_delta(u["store"], out, since=u["prev"], events=u["events"], config=_config(), report=False)
    new = pd.read_parquet(out / "meters.parquet")
    old = pd.read_parquet(u["prev"] / "meters.parquet")
    feeder = change["feeder_id"]
    # the moved meter: both answers, the time, and the answer after the restoration recommended
    r = new.set_index("meter_id").loc[change["meter_id"]]
    assert contract.REASON_PHASE_CHANGED_AT_RESTORATION in r["reasons"]
    assert (r["phase_before"], r["phase_after"]) == (change["phase_before"], change["phase_after"])
    assert r["phase"] == change["phase_after"] and pd.Timestamp(r["changed_at"]) == change["changed_at"]
    corr = pd.read_csv(out / "corrections.csv", dtype=str).set_index("meter_id")
    assert corr.loc[change["meter_id"], "phase"] == change["phase_after"]
    assert pd.Timestamp(corr.loc[change["meter_id"], "changed_at"]) == change["changed_at"]  # GIS stale since
    # no other meter of the recomputed feeder is reported as changed
    others = new[(new["feeder_id"] == feeder) & (new["meter_id"] != change["meter_id"])]
    assert not others["reasons"].str.contains("Changed", regex=False).any()
    # every other feeder's rows are the previous ones, value for value
    keep_old = old[old["feeder_id"] != feeder].sort_values("meter_id", kind="stable").reset_index(drop=True)
    keep_new = new[new["feeder_id"] != feeder].sort_values("meter_id", kind="stable").reset_index(drop=True)
    assert len(keep_old) > 0
    pd.testing.assert_frame_equal(keep_new, keep_old, check_exact=True)
    # only the affected feeder's rows were computed (the store holds every feeder in one block)
    parts = sorted((out / "partitions").glob("block-*[0-9a-f].parquet"))
    assert summary.n_blocks == 1 and len(parts) == 1
    assert set(pd.read_parquet(parts[0])["feeder_id"]) == {feeder}
    assert len(pd.read_parquet(parts[0])) == int((old["feeder_id"] == feeder).sum())
    assert len(list((u["prev"] / "partitions").glob("block-*[0-9a-f].parquet"))) == 1
    # the run log and summary say which feeders and meters were recomputed and why
    log = (out / "run.log").read_text()
    assert f"delta_feeder_recomputed feeder={feeder}" in log and f"meter={change['meter_id']}" in log
    assert "restoration" in log
    kept = list(out.glob("events-*.csv"))  # the events the blocks used, named by their content
    assert len(kept) == 1 and kept[0].read_bytes() == u["events"].read_bytes()
    assert json.loads((out / "summary.json").read_text())["config"]["changes"]["events_file"] == str(kept[0].resolve())
    doc = json.loads((out / "summary.json").read_text())["delta"]
    assert doc["recomputed_feeders"] == [feeder]
    assert [m["meter_id"] for m in doc["event_meters"]] == [change["meter_id"]]
    assert doc["recomputed_meters"] == len(pd.read_parquet(parts[0]))
