"""Accuracy of the whole per-block method on physics-based feeders, per feeder and measurement condition.

Every folder in the project's input contract (``meters.csv``, ``readings.parquet``, ``truth.csv``, optional
``transformers.csv`` and ``references.parquet``) is a feeder set: the five of ``../shared/data`` and the
generator's scenarios (:mod:`phaseid_hpc.synth.scenarios`, written on demand). The noise-free voltages get
a seeded measurement model (accuracy class, resolution, missing data in bursts), then the same code the
job runs on a block (:func:`phaseid_hpc.pipeline.process_arrays`: quality, phase identification,
transformer mapping) and the results are scored with :func:`phaseid_hpc.score.score_frames`, beside the
GIS as given and a kNN vote of GIS labels (the simple baseline of the literature).

Examples
--------
    python benchmarks/feeders.py                                   # shared feeders, 7 d, class 0.5, 0.1 V
    python benchmarks/feeders.py --days 7 14 30 --classes 0.5 1.0 --resolutions 0.1 1 --missing 0.01 0.05
    python benchmarks/feeders.py --scenarios regulators lv_european late_clocks
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from phaseid_hpc import contract
from phaseid_hpc.config import RunConfig, load_config
from phaseid_hpc.pipeline import StoreTables, process_arrays
from phaseid_hpc.score import score_frames
from phaseid_hpc.synth.measurement import MeasurementModel, apply_measurement_model

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
CACHE = Path("/tmp/phaseid-feeders-cache")


def load_feeder(path: Path) -> dict:
    """Wide arrays and tables of one contract folder (cached as .npz beside a copy of the tables)."""
    path = Path(path)
    meters = pd.read_csv(path / "meters.csv", dtype={"meter_id": str, "feeder_id": str, "transformer_id": str})
    meters = meters.sort_values(["feeder_id", "transformer_id", "meter_id"], kind="stable").reset_index(drop=True)
    truth = pd.read_csv(path / "truth.csv", dtype={"meter_id": str, "feeder_id": str, "transformer_id": str})
    truth = truth.set_index("meter_id").loc[meters["meter_id"]].reset_index()
    key = CACHE / (path.resolve().as_posix().strip("/").replace("/", "_") + ".npz")
    if key.is_file() and key.stat().st_mtime >= (path / "readings.parquet").stat().st_mtime:
        z = np.load(key, allow_pickle=False)
        voltage, kw, times = z["voltage"], (z["kw"] if z["kw"].size else None), pd.DatetimeIndex(z["times"])
    else:
        reads = pd.read_parquet(path / "readings.parquet")
        reads["meter_id"] = reads["meter_id"].astype(str)
        wide = reads.pivot(index="meter_id", columns="timestamp", values="voltage_v").reindex(meters["meter_id"])
        times = pd.DatetimeIndex(wide.columns)
        voltage = wide.to_numpy(np.float64)
        kw = None
        if "kw" in reads:
            kw = reads.pivot(index="meter_id", columns="timestamp", values="kw").reindex(meters["meter_id"])
            kw = kw.reindex(columns=wide.columns).to_numpy(np.float64)
        CACHE.mkdir(parents=True, exist_ok=True)
        np.savez(key, voltage=voltage, kw=kw if kw is not None else np.zeros(0),
                 times=times.tz_localize(None).to_numpy() if times.tz is not None else times.to_numpy())
        times = pd.DatetimeIndex(times)
    if times.tz is None:
        times = times.tz_localize("UTC")
    refs = None
    if (path / "references.parquet").is_file():
        r = pd.read_parquet(path / "references.parquet")
        r["timestamp"] = pd.DatetimeIndex(r["timestamp"]).tz_convert("UTC") if pd.DatetimeIndex(
            r["timestamp"]).tz is not None else pd.DatetimeIndex(r["timestamp"]).tz_localize("UTC")
        rw = r.pivot(index=["feeder_id", "phase"], columns="timestamp", values="voltage_v").reindex(columns=times)
        refs = (rw.index.to_frame(index=False).astype({"feeder_id": str}), rw.to_numpy(np.float64))
    xf = None
    if (path / "transformers.csv").is_file():
        xf = pd.read_csv(path / "transformers.csv", dtype={"transformer_id": str, "feeder_id": str})
    return {"meters": meters, "truth": truth, "voltage": voltage, "kw": kw, "times": times, "refs": refs,
            "transformers": xf}


def tables_for(feeder: dict, sl: slice) -> StoreTables:
    """StoreTables of a loaded feeder restricted to the time slice ``sl``."""
    m = feeder["meters"].rename(columns={"phase": "phase_gis"}).copy()
    times = feeder["times"][sl]
    interval_s = float((times[1] - times[0]).total_seconds())
    for col in ("service_type",):
        if col not in m:
            m[col] = None
    for col in ("nominal_v", "lat", "lon"):
        if col not in m:
            m[col] = np.nan
    m["sampling_interval_s"] = interval_s
    m["off_grid_fraction"] = 0.0
    refs = None if feeder["refs"] is None else (feeder["refs"][0], feeder["refs"][1][:, sl])
    return StoreTables(m, refs, feeder["transformers"], times, interval_s)


def knn_vote_baseline(z: np.ndarray, gis: np.ndarray, feeders: np.ndarray, k: int = 10) -> np.ndarray:
    """Phase by a vote of the GIS labels of each meter's ``k`` most correlated meters on its feeder.

    ``z`` (n, T): first-differenced voltages, NaN where missing. The simple baseline of the issue.
    """
    out = gis.copy()
    for f in np.unique(feeders):
        rows = np.flatnonzero(feeders == f)
        x = z[rows]
        x = x - np.nanmean(x, axis=1, keepdims=True)
        x = np.where(np.isnan(x), 0.0, x)
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        c = x @ x.T
        np.fill_diagonal(c, -np.inf)
        kk = min(k, len(rows) - 1)
        if kk < 1:
            continue
        nb = np.argpartition(-c, kk - 1, axis=1)[:, :kk]
        labs = gis[rows][nb]
        for j, i in enumerate(rows):
            if gis[i] not in ("A", "B", "C"):
                continue
            v, n = np.unique(labs[j][np.isin(labs[j], ["A", "B", "C"])], return_counts=True)
            if len(v):
                out[i] = v[np.argmax(n)]
    return out


def one_transformer_per_feeder(feeder: dict) -> dict:
    """The same feeder as if one three-phase transformer served every meter (European LV, US pad-mounts).

    GIS and truth both name the feeder's only transformer; the meters stay on their phases.
    """
    out = dict(feeder)
    for key in ("meters", "truth"):
        t = feeder[key].copy()
        t["transformer_id"] = t["feeder_id"].astype(str) + "-T3PH"
        out[key] = t
    out["transformers"] = None
    return out


def more_transformer_errors(feeder: dict, fraction: float, seed: int) -> dict:
    """The same feeder with ``fraction`` of its meters (single-phase, GIS transformer right) filed in GIS
    under a transformer one or two places away in the feeder's transformer list (a drafting error),
    seeded."""
    out = dict(feeder)
    m = feeder["meters"].copy()
    true_tx = feeder["truth"].set_index("meter_id").loc[m["meter_id"], "transformer_id"].to_numpy()
    rng = np.random.default_rng(seed + 11)
    single = m["phase"].astype(str).isin(["A", "B", "C"]).to_numpy()
    cand = np.flatnonzero((m["transformer_id"].to_numpy() == true_tx) & single)
    pick = np.sort(rng.choice(cand, min(cand.size, round(fraction * len(m))), replace=False))
    tx = m["transformer_id"].to_numpy(dtype=object).copy()
    for i in pick:
        same = np.flatnonzero((m["feeder_id"] == m.at[i, "feeder_id"]).to_numpy())
        names = pd.unique(m["transformer_id"].to_numpy()[same])
        k = int(np.flatnonzero(names == tx[i])[0])
        j = int(np.clip(k + rng.choice([-2, -1, 1, 2]), 0, len(names) - 1))
        tx[i] = names[j] if j != k else names[(k + 1) % len(names)]
    m["transformer_id"] = tx
    out["meters"] = m
    return out


def late_clocks(voltage: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shift ``fraction`` of the meters one interval late (they stamp the start of the interval)."""
    rng = np.random.default_rng(seed + 7)
    late = rng.random(voltage.shape[0]) < fraction
    out = voltage.copy()
    out[late, 1:] = voltage[late, :-1]
    out[late, 0] = np.nan
    return out, late


def run_case(name: str, feeder: dict, days: float, cls: float, res_v: float, missing: float, seed: int,
             config: RunConfig, late_fraction: float = 0.0, offset_fraction: float = 0.0,
             dump: Path | None = None) -> dict:
    times = feeder["times"]
    step = float((times[1] - times[0]).total_seconds())
    n_t = min(round(days * 86400 / step), len(times))
    sl = slice(0, n_t)
    model = MeasurementModel(accuracy_class=cls, resolution_v=res_v, missing_fraction=missing,
                             clock_offset_fraction=offset_fraction, clock_offset_max_s=300.0)
    meas, offsets = apply_measurement_model(feeder["voltage"][:, sl], model, interval_s=step, random_state=seed)
    late = np.zeros(len(meas), dtype=bool)
    if late_fraction > 0:
        meas, late = late_clocks(meas, late_fraction, seed)
    tables = tables_for(feeder, sl)
    kw = None if feeder["kw"] is None else feeder["kw"][:, sl]
    tic = time.perf_counter()
    res = process_arrays(meas, kw, None, tables, config)
    seconds = time.perf_counter() - tic
    meters = res["meters"]
    s = score_frames(meters, feeder["truth"])
    if dump is not None:  # per-meter answers beside the GIS labels and the truth, to read the wrong rows
        dump.mkdir(parents=True, exist_ok=True)
        per = meters.drop(columns=[c for c in ("reasons",) if c in meters]).copy()
        per["reasons"] = meters["reasons"].map(lambda r: ";".join(map(str, r)) if isinstance(r, list) else str(r))
        t = feeder["truth"].set_index("meter_id").reindex(per["meter_id"].astype(str))
        per["phase_true"] = t["phase"].astype(str).to_numpy()
        per["transformer_true"] = t["transformer_id"].astype(str).to_numpy()
        per.to_parquet(dump / f"{name.replace(':', '-').replace('/', '_')}-d{days:g}-c{cls:g}-r{res_v:g}"
                              f"-m{missing:g}-s{seed}.parquet")
    truth_phase = feeder["truth"]["phase"].astype(str).to_numpy()
    gis = tables.meters["phase_gis"].astype(str).to_numpy()
    dz = np.diff(meas / np.nanmean(meas, axis=1, keepdims=True), axis=1)
    knn = knn_vote_baseline(dz, gis, tables.meters["feeder_id"].astype(str).to_numpy())
    p, x = s["phase"], s.get("transformer", {})
    extra = {}
    truly_late = late.copy()
    if "clock_shift_intervals" in feeder["truth"]:
        truly_late |= feeder["truth"]["clock_shift_intervals"].to_numpy() != 0
    flagged = meters["reasons"].str.contains(contract.REASON_CLOCK_OFFSET, regex=False).to_numpy()
    clean = ~truly_late & (np.abs(offsets) < 30.0)
    clock_false_alarms = float(flagged[clean].mean())
    if offset_fraction > 0:  # sub-interval offsets injected: how many of the clearly offset ones are caught
        off = ~truly_late & (np.abs(offsets) > 90.0)
        extra["clock_caught"] = float(flagged[off].mean()) if off.any() else float("nan")
    if late.any():  # the others must meet the targets; the late ones must not be guessed
        on_time = score_frames(meters[~late], feeder["truth"])["phase"]
        extra = {"on_time_phase": on_time["accuracy"], "on_time_conf_prec": on_time["confident_precision"],
                 "late_wrong_confident": int(((meters["phase"].to_numpy() != truth_phase) & late
                                              & (meters["phase_class"] == "confident").to_numpy()).sum())}
    return {**extra,
        "feeder": name, "days": days, "class": cls, "res_V": res_v, "missing": missing,
        "meters": len(meters), "gis": p["gis_accuracy"], "knn10": float((knn == truth_phase).mean()),
        "phase": p["accuracy"], "conf_prec": p["confident_precision"],
        "conf_share": p["classes"]["confident"]["share"],
        "corr": p["corrections"], "corr_prec": p["correction_precision"], "corr_recall": p["correction_recall"],
        "xf_gis": x.get("gis_accuracy"), "xf": x.get("accuracy"), "xf_corr": x.get("flags"),
        "xf_corr_prec": x.get("correction_precision"), "clock_fa": clock_false_alarms, "s": seconds,
    }


COLUMNS = ["feeder", "days", "class", "res_V", "missing", "meters", "gis", "knn10", "phase", "conf_prec",
           "conf_share", "corr", "corr_prec", "corr_recall", "xf_gis", "xf", "xf_corr", "xf_corr_prec", "clock_fa", "s"]


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if v <= 1.0 else f"{v:.1f}"
    return str(v)


def feeder_paths(names: list[str], scenarios: list[str], days: float, seed: int) -> list[tuple[str, Path]]:
    out = [(n, SHARED / n) for n in names if (SHARED / n).is_dir()]
    if scenarios:
        from phaseid_hpc.synth.scenarios import write_scenario

        for sc in scenarios:
            d = CACHE / f"scenario-{sc}-s{seed}-d{int(days)}"
            if not (d / "truth.csv").is_file():
                write_scenario(sc, d, seed=seed, days=int(days))
            out.append((f"synth:{sc}", d))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--feeders", nargs="*", default=["epri-ckt5", "ieee8500", "epri-k1", "epri-m1", "epri-ckt7"])
    p.add_argument("--scenarios", nargs="*", default=[])
    p.add_argument("--days", type=float, nargs="+", default=[7])
    p.add_argument("--classes", type=float, nargs="+", default=[0.5])
    p.add_argument("--resolutions", type=float, nargs="+", default=[0.1])
    p.add_argument("--missing", type=float, nargs="+", default=[0.01])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-transformer", action="store_true", help="skip the transformer mapping stage")
    p.add_argument("--csv", type=Path, help="also write the rows to this CSV")
    p.add_argument("--late-clocks", type=float, default=0.0, metavar="FRACTION",
                   help="shift this share of meters one interval late")
    p.add_argument("--clock-offsets", type=float, default=0.0, metavar="FRACTION",
                   help="offset this share of clocks uniformly within +-300 s (reports clock_caught)")
    p.add_argument("--one-transformer", action="store_true",
                   help="GIS and truth: one three-phase transformer per feeder serves every meter")
    p.add_argument("--more-transformer-errors", type=float, default=0.0, metavar="FRACTION",
                   help="file this share of the meters under a neighbouring transformer in GIS, on top of "
                        "the errors the data already has")
    p.add_argument("--dump", type=Path, help="also write each case's per-meter results (with the truth) here")
    a = p.parse_args(argv)
    # the defaults, with PHASEID__SECTION__KEY environment overrides (e.g. PHASEID__PHASE__N_NEIGHBOURS=20)
    config = load_config(overrides={"validation": {"enabled": False},
                                    "transformer": {"enabled": not a.no_transformer}})
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    rows = []
    for name, path in feeder_paths(a.feeders, a.scenarios, max(a.days), a.seed):
        feeder = load_feeder(path)
        if a.one_transformer:
            feeder, name = one_transformer_per_feeder(feeder), name + "/1xf"
        if a.more_transformer_errors > 0:
            feeder = more_transformer_errors(feeder, a.more_transformer_errors, a.seed)
            name = f"{name}/+{100 * a.more_transformer_errors:g}%xf"
        for d, c, r, m in itertools.product(a.days, a.classes, a.resolutions, a.missing):
            row = run_case(name, feeder, d, c, r, m, a.seed, config, a.late_clocks, a.clock_offsets,
                           a.dump)
            rows.append(row)
            line = "| " + " | ".join(_fmt(row[k]) for k in COLUMNS) + " |"
            if "clock_caught" in row:
                line += f" clock offsets > 90 s caught {row['clock_caught']:.3f}"
            if "on_time_phase" in row:
                line += (f" on-time phase {row['on_time_phase']:.4f}, conf prec {_fmt(row['on_time_conf_prec'])},"
                         f" late wrong confident {row['late_wrong_confident']}")
            print(line, flush=True)
    if a.csv:
        pd.DataFrame(rows).to_csv(a.csv, index=False)


if __name__ == "__main__":
    sys.exit(main())
