"""Connection changes and transformer faults injected into physics-based and generated feeders.

For every feeder (the five of ``../shared/data`` and, with ``--scenarios``, the generator's), over
``--trials`` seeded trials, on ``--days`` days:

* Phase changes: ``--share`` of the single-phase meters are moved to another phase at a restoration
  (:func:`phaseid_hpc.synth.events.splice_phase_changes`: the readings after it come from a meter of the new
  phase that follows the meter most closely, at least ``--min-after`` days after, 3 days before), as many
  control meters get an outage and restoration without a change; the class 0.5, 0.1 V measurement model
  (1% missing) is applied and the block runs (:func:`phaseid_hpc.pipeline.process_arrays`, changes off),
  then :func:`phaseid_hpc.changes.changes_for_block` with the events file and without it (change point
  only). Detected: the meter carries ``Phase Changed At Restoration`` or ``Connection Changed`` and its
  ``phase_after`` is the new phase (``when_err_h``: median error of ``changed_at``); false alarm: an
  unchanged meter (control or not) carries either reason. Where the donor is on another transformer the
  meter moved there too: ``Transformer Changed At Restoration`` with ``transformer_after`` the donor's
  transformer is a detection, the reason on any other meter a false alarm.
* Transformer health: ``--xf-share`` of the transformers with at least two meters get a tap change of
  ``--tap-pct`` (:func:`phaseid_hpc.synth.events.inject_tap_change`, a random time in the middle half) and as
  many others a winding fault (:func:`phaseid_hpc.synth.events.inject_winding_fault`, ``--winding-pct`` common
  noise from a time between 1/8 and 1/2 of the period); :func:`phaseid_hpc.validation.validate_transformers`
  runs with the true mapping. Detected: ``voltage_level_step`` / ``correlation_loss``; false alarm: either
  flag on an untouched transformer.

Rows go to ``benchmarks/results/changes.csv``. With ``--delta-cost N``: a generated utility of N meters is
run in full and then as a delta run after one event (:func:`delta_cost`;
``benchmarks/results/changes_delta.csv``).

Examples
--------
    python benchmarks/changes.py                                   # shared feeders, 14 days, 2 trials
    python benchmarks/changes.py --feeders epri-ckt5 --scenarios regulators --trials 1
    python benchmarks/changes.py --delta-cost 3000 --days 14      # full run vs delta run after one event
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from feeders import feeder_paths, load_feeder, tables_for

from phaseid_hpc import contract
from phaseid_hpc.changes import changes_for_block
from phaseid_hpc.config import ValidationConfig, load_config
from phaseid_hpc.pipeline import process_arrays
from phaseid_hpc.synth.events import (
    inject_tap_change,
    inject_winding_fault,
    splice_phase_changes,
    write_events,
)
from phaseid_hpc.synth.measurement import MeasurementModel, apply_measurement_model
from phaseid_hpc.validation import validate_transformers

RESULTS = Path(__file__).resolve().parent / "results" / "changes.csv"
CHANGE_REASONS = (contract.REASON_PHASE_CHANGED_AT_RESTORATION, contract.REASON_CONNECTION_CHANGED)
HEALTH_FLAGS = ("voltage_level_step", "correlation_loss")


def phase_change_trial(feeder: dict, n_t: int, share: float, min_after: float, seed: int, config) -> dict:
    """One trial: splice, measure, run the block, find the changes with and without events."""
    truth = feeder["truth"]
    times = feeder["times"][:n_t]
    true_meters = truth[["meter_id", "feeder_id", "transformer_id", "phase"]]
    v, events, changes = splice_phase_changes(feeder["voltage"][:, :n_t], true_meters, times, share=share,
                                              control_share=share, min_before_days=3.0,
                                              min_after_days=min_after, random_state=seed)
    model = MeasurementModel(accuracy_class=0.5, resolution_v=0.1, missing_fraction=0.01)
    meas, _ = apply_measurement_model(v, model, interval_s=900.0, random_state=seed)
    tables = tables_for(feeder, slice(0, n_t))
    kw = None if feeder["kw"] is None else feeder["kw"][:, :n_t]
    tic = time.perf_counter()
    base = process_arrays(meas, kw, None, tables, config)["meters"]
    block_s = time.perf_counter() - tic
    moved = changes[changes["moved"]].set_index("meter_id")
    is_moved = base["meter_id"].isin(moved.index).to_numpy()
    out = {"moved": int(is_moved.sum()), "unchanged": int((~is_moved).sum()), "block_s": block_s}
    with tempfile.TemporaryDirectory() as tmp:
        path = write_events(events, Path(tmp) / "events.csv")
        for label, ev in (("events", path), ("no_events", None)):
            cfg = dataclasses.replace(config, changes=dataclasses.replace(config.changes, enabled=True,
                                                                          events_file=str(ev or "")))
            tic = time.perf_counter()
            res = changes_for_block(base, meas, times, cfg, interval_s=tables.interval_s, kw=kw,
                                    nominal_v=tables.meters["nominal_v"].to_numpy(dtype=np.float64))
            secs = time.perf_counter() - tic
            flagged = res["reasons"].astype(str).apply(lambda r: any(c in r for c in CHANGE_REASONS)).to_numpy()
            after = res["phase_after"].to_numpy(dtype=object)
            new = moved["phase_after"].reindex(res["meter_id"]).to_numpy(dtype=object)
            right = flagged & is_moved & (after == new)
            when = pd.DatetimeIndex(res["changed_at"])[right]
            true_when = pd.DatetimeIndex(moved["changed_at"].reindex(res["meter_id"][right]))
            err_h = np.abs((when - true_when).total_seconds().to_numpy()) / 3600 if right.any() else np.array([np.nan])
            out[label] = {"detected": int(right.sum()), "fa": int((flagged & ~is_moved).sum()),
                          "when_err_h": float(np.median(err_h)), "s": secs,
                          "recommended": int((res["phase"].to_numpy(dtype=object)[is_moved] == new[is_moved]).sum())}
            if label == "events" and "transformer_after" in res:  # the donor's transformer, where it differs
                tx_true = truth.set_index("meter_id")["transformer_id"].astype(str)
                donor_tx = tx_true.reindex(moved["donor_id"].reindex(res["meter_id"])).to_numpy(dtype=object)
                tx_moved = is_moved & (donor_tx != tx_true.reindex(res["meter_id"]).to_numpy(dtype=object))
                tx_flag = res["reasons"].astype(str).str.contains(
                    contract.REASON_TRANSFORMER_CHANGED_AT_RESTORATION, regex=False).to_numpy()
                out["tx"] = {"moved": int(tx_moved.sum()), "unchanged": int((~tx_moved).sum()),
                             "detected": int((tx_flag & tx_moved
                                              & (res["transformer_after"].to_numpy(dtype=object) == donor_tx)).sum()),
                             "fa": int((tx_flag & ~tx_moved).sum())}
    return out


def health_trial(feeder: dict, n_t: int, share: float, tap_pct: float, winding_pct: float, seed: int) -> dict:
    """One trial of tap changes and winding faults on transformers with 2+ meters."""
    config = ValidationConfig()
    truth = feeder["truth"]
    meters = pd.DataFrame({"meter_id": truth["meter_id"], "feeder_id": truth["feeder_id"].astype(str),
                           "transformer_id": truth["transformer_id"].astype(str), "phase": truth["phase"]})
    tx_of = meters["transformer_id"].to_numpy()
    sizes = meters["transformer_id"].value_counts()
    eligible = np.array(sorted(sizes.index[sizes >= config.health_min_meters]))
    out = {"tap": [0, 0], "winding": [0, 0], "fa": 0, "healthy": 0, "eligible": len(eligible)}
    if len(eligible) < 3 or feeder["kw"] is None:
        return out
    rng = np.random.default_rng([seed, 17])
    k = max(1, round(share * len(eligible)))
    pick = rng.choice(eligible, 2 * k, replace=False)
    tapped, faulty = pick[:k], pick[k:]
    v = feeder["voltage"][:, :n_t]
    for t in tapped:
        v = inject_tap_change(v, np.flatnonzero(tx_of == t), int(rng.integers(n_t // 4, 3 * n_t // 4)),
                              float(rng.choice([-1.0, 1.0])) * tap_pct)
    for t in faulty:
        v = inject_winding_fault(v, np.flatnonzero(tx_of == t), int(rng.integers(n_t // 8, n_t // 2)),
                                 winding_pct, rng)
    model = MeasurementModel(accuracy_class=0.5, resolution_v=0.1, missing_fraction=0.01)
    meas, _ = apply_measurement_model(v, model, interval_s=900.0, random_state=rng)
    refs = None if feeder["refs"] is None else (feeder["refs"][0], feeder["refs"][1][:, :n_t])
    res = validate_transformers(feeder["kw"][:, :n_t], None, meas, meters, feeder["transformers"],
                                feeder["times"][:n_t], config, references=refs)
    col = "flag_codes" if "flag_codes" in res else "flags"
    flags = dict(zip(res["transformer_id"], res[col]))
    for t in tapped:
        out["tap"][0 if "voltage_level_step" in flags[t] else 1] += 1
    for t in faulty:
        out["winding"][0 if "correlation_loss" in flags[t] else 1] += 1
    for t in sorted(set(eligible) - set(pick)):
        out["healthy"] += 1
        out["fa"] += int(any(f in flags[t] for f in HEALTH_FLAGS))
    return out


def _block_compute(summary) -> float:
    """Seconds of block work summed over blocks and stages (reading included): the run's compute cost, which
    a delta run of one feeder cannot spread over several workers as the full run does [s]."""
    return float(sum(v for k, v in summary.timings_s.items() if k.startswith("block_") and k.endswith("_sum")))


def _logged_block_compute(run_log: Path, block: int) -> float:
    """Stage seconds (reading included) of one block, from the ``block_done`` line of a run's log [s]."""
    for line in run_log.read_text().splitlines():
        if " block_done " not in line:
            continue
        fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        if int(fields["block"]) == block:
            return float(sum(float(v) for k, v in fields.items() if k.endswith("_s")))
    raise ValueError(f"{run_log}: no block_done line for block {block}")


def delta_cost(n_meters: int, days: float, seed: int, workdir: Path, repeat: int = 3) -> dict:
    """Full run, then a delta run after one event on one feeder: wall time of each and the feeder's share.

    Both runs read the events file.

    A generated utility (several feeders, one block at the default block size) is ingested; one meter of
    the smallest feeder is spliced to another phase at a restoration in the middle of the period.
    """
    from phaseid_hpc.delta import run_delta
    from phaseid_hpc.ingest import ingest_files
    from phaseid_hpc.pipeline import run_job
    from phaseid_hpc.synth import generate_utility

    export = workdir / "export"
    generate_utility(export, n_meters=n_meters, days=days, seed=seed, feeder_meters=(300, 900))
    reads = pd.concat([pd.read_parquet(p) for p in sorted(export.glob("readings*.parquet"))], ignore_index=True)
    truth = pd.read_csv(export / "truth.csv", dtype={"meter_id": str, "feeder_id": str, "transformer_id": str})
    small = truth["feeder_id"].value_counts().sort_values(kind="stable").index[0]
    times = pd.DatetimeIndex(sorted(reads["timestamp"].unique()))
    times = times.tz_localize("UTC") if times.tz is None else times
    on = truth[truth["feeder_id"] == small].reset_index(drop=True)
    wide = reads[reads["meter_id"].isin(on["meter_id"])].pivot(index="meter_id", columns="timestamp",
                                                                values="voltage_v").reindex(on["meter_id"])
    v, events, changes = splice_phase_changes(wide.to_numpy(np.float64), on, times, share=0.0, control_share=0.0,
                                              min_before_days=days / 2 - 0.5, min_after_days=days / 2 - 0.5,
                                              random_state=seed)
    mid = changes["meter_id"].iloc[0]
    sel = reads["meter_id"] == mid
    new_v = pd.Series(v[int(np.flatnonzero(on["meter_id"].to_numpy() == mid)[0])], index=wide.columns)
    reads.loc[sel, "voltage_v"] = new_v.reindex(reads.loc[sel, "timestamp"]).to_numpy().astype(reads["voltage_v"].dtype)
    reads = reads[~(sel & reads["voltage_v"].isna())]
    for p in export.glob("readings*.parquet"):
        p.unlink()
    reads.to_parquet(export / "readings.parquet", index=False)
    store = workdir / "store.zarr"
    ingest_files([str(export / "readings.parquet")], export / "meters.csv", store,
                 transformers_path=export / "transformers.csv", references_path=export / "references.parquet")
    config = load_config(environ={})
    events_csv = write_events(events, workdir / "events.csv")
    # the full run reads the same events log (a utility's weekly run has it): both runs then do the
    # before/after identification of the meter with events, and the delta run is compared like for like
    full_config = dataclasses.replace(config, changes=dataclasses.replace(config.changes,
                                                                          events_file=str(events_csv)))
    # the affected feeder's own cost within a full run: the same full run with every feeder its own block,
    # that feeder's block's stage seconds (the event's before/after identification included)
    per_feeder_config = dataclasses.replace(full_config, job=dataclasses.replace(full_config.job, block_bytes=1))
    from phaseid_hpc.store import open_store

    order = pd.unique(open_store(store, block_bytes=None, recover=False)["feeder_id"].to_numpy().astype(str))
    feeder_block = int(np.flatnonzero(order == small)[0])
    full_t, delta_t, feeder_t = [], [], []
    for r in range(repeat):  # alternating, fresh folders: medians of each
        run_job(store, workdir / f"perfeeder{r}", config=per_feeder_config, report=False)
        feeder_t.append(_logged_block_compute(workdir / f"perfeeder{r}" / "run.log", feeder_block))
        tic = time.perf_counter()
        full = run_job(store, workdir / f"full{r}", config=full_config, report=False)
        full_t.append((time.perf_counter() - tic, full.timings_s["blocks_wall"],
                       full.timings_s.get("block_changes_sum", 0.0), _block_compute(full)))
        tic = time.perf_counter()
        delta = run_delta(store, workdir / f"delta{r}", since=workdir / f"full{r}", config=config, report=False,
                          events=events_csv)
        delta_t.append((time.perf_counter() - tic, delta.timings_s["blocks_wall"],
                        delta.timings_s.get("block_changes_sum", 0.0), _block_compute(delta)))
    full_s, full_blocks_s, full_changes_s, full_compute_s = np.median(np.array(full_t), axis=0)
    delta_s, delta_blocks_s, delta_changes_s, delta_compute_s = np.median(np.array(delta_t), axis=0)
    got = pd.read_parquet(workdir / "delta0" / "meters.parquet").set_index("meter_id").loc[mid]
    share = float((truth["feeder_id"] == small).mean())
    feeder_s = float(np.median(feeder_t))
    return {"meters": n_meters, "feeders": int(truth["feeder_id"].nunique()), "days": days,
            "blocks_full": full.n_blocks, "affected_feeder_meters": int((truth["feeder_id"] == small).sum()),
            "affected_share": share, "full_s": float(full_s), "delta_s": float(delta_s),
            "delta_over_full": float(delta_s / full_s),
            "full_blocks_s": float(full_blocks_s), "delta_blocks_s": float(delta_blocks_s),
            "delta_blocks_over_full": float(delta_blocks_s / full_blocks_s),
            "full_block_compute_s": float(full_compute_s), "delta_block_compute_s": float(delta_compute_s),
            "delta_compute_over_full": float(delta_compute_s / full_compute_s), "repeats": repeat,
            "feeder_in_full_compute_s": feeder_s, "delta_compute_over_feeder_in_full": float(delta_compute_s / feeder_s),
            "feeder_share_of_full_compute": float(feeder_s / full_compute_s),
            "full_changes_s": float(full_changes_s), "delta_changes_s": float(delta_changes_s),
            "moved_found": bool(contract.REASON_PHASE_CHANGED_AT_RESTORATION in got["reasons"]
                                and got["phase"] == changes["phase_after"].iloc[0])}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--feeders", nargs="*", default=["epri-ckt5", "ieee8500", "epri-k1", "epri-m1", "epri-ckt7"])
    p.add_argument("--scenarios", nargs="*", default=["regulators"])
    p.add_argument("--days", type=float, default=14)
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--share", type=float, default=0.01)
    p.add_argument("--min-after", type=float, default=3.0)
    p.add_argument("--xf-share", type=float, default=0.05)
    p.add_argument("--tap-pct", type=float, default=2.5)
    p.add_argument("--winding-pct", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-health", action="store_true")
    p.add_argument("--csv", type=Path, default=RESULTS)
    p.add_argument("--delta-cost", type=int, default=0, metavar="N_METERS",
                   help="only measure a full run against a delta run after one event (generated utility)")
    a = p.parse_args(argv)
    if a.delta_cost:
        with tempfile.TemporaryDirectory() as tmp:
            row = delta_cost(a.delta_cost, a.days, a.seed, Path(tmp))
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        pd.DataFrame([row]).to_csv(RESULTS.with_name("changes_delta.csv"), index=False)
        return
    config = load_config(overrides={"validation": {"enabled": False}, "pt": {"enabled": False},
                                    "changes": {"enabled": False}})
    cols = ["feeder", "check", "injected", "detected", "healthy", "false_alarms", "false_alarm_rate", "when_err_h",
            "s"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    rows = []

    def emit(row: dict) -> None:
        rows.append(row)
        cells = [f"{row[c]:.4f}" if isinstance(row[c], float) and c != "s" else
                 (f"{row[c]:.1f}" if c == "s" else str(row[c])) for c in cols]
        print("| " + " | ".join(cells) + " |", flush=True)

    for name, path in feeder_paths(a.feeders, a.scenarios, a.days, a.seed):
        feeder = load_feeder(path)
        n_t = min(len(feeder["times"]), round(a.days * 96))
        acc = {k: {"moved": 0, "detected": 0, "fa": 0, "unchanged": 0, "err": [], "s": 0.0}
               for k in ("events", "no_events")}
        tx_acc = {"moved": 0, "unchanged": 0, "detected": 0, "fa": 0}
        for trial in range(a.trials):
            r = phase_change_trial(feeder, n_t, a.share, a.min_after, a.seed * 1000 + trial, config)
            for key in tx_acc:
                tx_acc[key] += r.get("tx", {}).get(key, 0)
            for k, c in acc.items():
                c["moved"] += r["moved"]
                c["unchanged"] += r["unchanged"]
                c["detected"] += r[k]["detected"]
                c["fa"] += r[k]["fa"]
                c["err"].append(r[k]["when_err_h"])
                c["s"] += r[k]["s"]
        for k, label in (("events", "phase moved, events file"), ("no_events", "phase moved, change point only")):
            c = acc[k]
            emit({"feeder": name, "check": label, "injected": c["moved"], "detected": c["detected"] / c["moved"],
                  "healthy": c["unchanged"], "false_alarms": c["fa"], "false_alarm_rate": c["fa"] / c["unchanged"],
                  "when_err_h": float(np.nanmedian(c["err"])), "s": c["s"] / a.trials})
        if tx_acc["moved"]:
            emit({"feeder": name, "check": "transformer moved with it, events file", "injected": tx_acc["moved"],
                  "detected": tx_acc["detected"] / tx_acc["moved"], "healthy": tx_acc["unchanged"],
                  "false_alarms": tx_acc["fa"], "false_alarm_rate": tx_acc["fa"] / tx_acc["unchanged"],
                  "when_err_h": float("nan"), "s": float("nan")})
        if a.no_health:
            continue
        tic = time.perf_counter()
        h = {"tap": [0, 0], "winding": [0, 0], "fa": 0, "healthy": 0, "eligible": 0}
        for trial in range(a.trials):
            r = health_trial(feeder, n_t, a.xf_share, a.tap_pct, a.winding_pct, a.seed * 1000 + trial)
            for key in ("tap", "winding"):
                h[key] = [h[key][0] + r[key][0], h[key][1] + r[key][1]]
            h["fa"] += r["fa"]
            h["healthy"] += r["healthy"]
            h["eligible"] = r["eligible"]
        secs = (time.perf_counter() - tic) / a.trials
        if h["healthy"] == 0:
            emit({"feeder": name, "check": "health: no transformer with 2+ meters", "injected": 0,
                  "detected": float("nan"), "healthy": 0, "false_alarms": 0, "false_alarm_rate": float("nan"),
                  "when_err_h": float("nan"), "s": secs})
            continue
        for key, label in (("tap", f"tap step {a.tap_pct:g}%"), ("winding", f"winding noise {a.winding_pct:g}%")):
            n_inj = sum(h[key])
            emit({"feeder": name, "check": label, "injected": n_inj, "detected": h[key][0] / n_inj,
                  "healthy": h["healthy"], "false_alarms": h["fa"], "false_alarm_rate": h["fa"] / h["healthy"],
                  "when_err_h": float("nan"), "s": secs})
    if a.csv and str(a.csv) not in ("", "."):
        a.csv.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows, columns=cols).to_csv(a.csv, index=False)


if __name__ == "__main__":
    sys.exit(main())
