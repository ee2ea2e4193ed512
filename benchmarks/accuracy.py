"""Accuracy benchmark of phase identification on ../shared/data/epri-ckt5 (and, optionally, synthetic data).

The dataset ships noise-free voltages; a seeded measurement model adds accuracy-class noise, resolution
and missing data. Gaps of at most ``--max-gap`` samples are interpolated (what the quality stage does)
before :func:`phaseid_hpc.phase_identification.identify_phases`. Prints a markdown table of accuracy
and of the precision and share of the ``confident`` class.

Examples
--------
    python benchmarks/accuracy.py --quick
    python benchmarks/accuracy.py --days 7 30 --classes 0.5 1.0 --resolutions 0.1 --missing 0
    python benchmarks/accuracy.py --quick --synthetic 3     # plus three synthetic 300-meter feeders
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
import pandas as pd

from phaseid_hpc import contract
from phaseid_hpc.config import PhaseConfig
from phaseid_hpc.phase_identification import identify_phases
from phaseid_hpc.synth.measurement import MeasurementModel, apply_measurement_model

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "epri-ckt5"
SAMPLES_PER_DAY = 96


def load_ckt5(path: Path = DATA):
    """Meters (GIS view, contract columns), truth, voltage (n_meters, n_time) [V], references."""
    meters = pd.read_csv(path / "meters.csv")
    truth = pd.read_csv(path / "truth.csv").set_index("meter_id").loc[meters["meter_id"]].reset_index()
    reads = pd.read_parquet(path / "readings.parquet", columns=["meter_id", "timestamp", "voltage_v"])
    wide = reads.pivot(index="meter_id", columns="timestamp", values="voltage_v").reindex(meters["meter_id"])
    refs = pd.read_parquet(path / "references.parquet")
    rwide = refs.pivot(index=["feeder_id", "phase"], columns="timestamp", values="voltage_v")
    rwide = rwide.reindex(columns=wide.columns)
    ref_table = rwide.index.to_frame(index=False)
    meters = meters.rename(columns={"phase": "phase_gis"})
    return meters, truth, wide.to_numpy(np.float64), ref_table, rwide.to_numpy(np.float64)


def interpolate_short_gaps(voltage: np.ndarray, max_gap: int = 3) -> np.ndarray:
    """Linear interpolation of interior NaN runs of at most ``max_gap`` samples (row by row). [V]"""
    out = voltage.copy()
    t = np.arange(voltage.shape[1])
    for i in np.flatnonzero(np.isnan(voltage).any(axis=1)):
        row = out[i]
        nan = np.isnan(row)
        if nan.all():
            continue
        edges = np.diff(np.concatenate([[0], nan.astype(np.int8), [0]]))
        starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        fill = np.interp(t, t[~nan], row[~nan])
        for s, e in zip(starts, stops):
            if e - s <= max_gap and s > 0 and e < row.size:
                row[s:e] = fill[s:e]
    return out


def score(result: pd.DataFrame, truth_phase: np.ndarray) -> dict[str, float]:
    ok = result["phase"].notna().to_numpy()
    correct = (result["phase"].to_numpy() == truth_phase) & ok
    conf = (result["phase_class"] == contract.CLASS_CONFIDENT).to_numpy()
    return {
        "accuracy": correct.sum() / len(truth_phase),
        "confident_precision": correct[conf].sum() / conf.sum() if conf.any() else float("nan"),
        "share_confident": conf.mean(),
        "n_wrong_confident": int((conf & ~correct).sum()),
    }


def run_grid(days, classes, resolutions, missing, *, seed=0, offset_days=0.0, use_refs=True):
    meters, truth, voltage, ref_table, ref_v = load_ckt5()
    meters["usable"] = True
    rows = []
    for d, c, r, m in itertools.product(days, classes, resolutions, missing):
        t0 = int(offset_days * SAMPLES_PER_DAY)
        sl = slice(t0, t0 + int(d * SAMPLES_PER_DAY))
        model = MeasurementModel(accuracy_class=c, resolution_v=r, missing_fraction=m)
        meas, _ = apply_measurement_model(voltage[:, sl], model, interval_s=900, random_state=seed)
        meas = interpolate_short_gaps(meas, 3)
        tic = time.perf_counter()
        kw = {"references": (ref_table, ref_v[:, sl])} if use_refs else {}
        res = identify_phases(meas, meters, PhaseConfig(random_state=seed), **kw)
        s = score(res, truth["phase"].to_numpy())
        gis = (meters["phase_gis"].to_numpy() == truth["phase"].to_numpy()).mean()
        rows.append({"data": "ckt5", "days": d, "class": c, "res_V": r, "missing": m, "gis_acc": gis, **s,
                     "seconds": time.perf_counter() - tic})
        print(_fmt(rows[-1]), flush=True)
    return pd.DataFrame(rows)


def run_synthetic(days, classes, resolutions, missing, *, n_feeders=3, n_meters=300, seed=0):
    """The same grid on feeders of the synthetic generator (``phaseid_hpc.synth.simulate_feeder``).

    Each feeder has its own seed, topology, LTC, GIS errors and 1ph/2ph/3ph services; accuracy is pooled
    over the feeders (truth: ``true_phase``). Feeder-head references are passed on.
    """
    from phaseid_hpc.synth import simulate_feeder

    rows = []
    for d, c, r, m in itertools.product(days, classes, resolutions, missing):
        model = MeasurementModel(accuracy_class=c, resolution_v=r, missing_fraction=m)
        results, truths, gis, seconds = [], [], [], 0.0
        for f in range(n_feeders):
            sim = simulate_feeder(n_meters, days=d, seed=seed + 1000 * f, measurement=model)
            meters = sim.meters.rename(columns={"phase": "phase_gis"}).assign(usable=True)
            refs = pd.DataFrame({"feeder_id": meters["feeder_id"].iloc[0], "phase": sim.references.index})
            meas = interpolate_short_gaps(np.asarray(sim.measured, dtype=np.float64), 3)
            tic = time.perf_counter()
            results.append(identify_phases(meas, meters, PhaseConfig(random_state=seed),
                                           references=(refs, sim.references.to_numpy(np.float64))))
            seconds += time.perf_counter() - tic
            truths.append(meters["true_phase"].to_numpy())
            gis.append(meters["phase_gis"].to_numpy() == truths[-1])
        res = pd.concat(results, ignore_index=True)
        s = score(res, np.concatenate(truths))
        rows.append({"data": f"synth {n_feeders}x{n_meters}", "days": d, "class": c, "res_V": r, "missing": m,
                     "gis_acc": np.concatenate(gis).mean(), **s, "seconds": seconds})
        print(_fmt(rows[-1]), flush=True)
    return pd.DataFrame(rows)


def _fmt(row) -> str:
    return (f"| {row['data']} | {row['days']:g} | {row['class']:g} | {row['res_V']:g} | {row['missing']:.0%} | "
            f"{row['accuracy']:.2%} | {row['confident_precision']:.2%} | {row['share_confident']:.1%} | "
            f"{row['n_wrong_confident']} | {row['gis_acc']:.1%} | {row['seconds']:.1f} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--days", type=float, nargs="+", default=[1, 3, 7, 14, 30])
    p.add_argument("--classes", type=float, nargs="+", default=[0.2, 0.5, 1.0])
    p.add_argument("--resolutions", type=float, nargs="+", default=[0.1, 1.0])
    p.add_argument("--missing", type=float, nargs="+", default=[0.0, 0.05, 0.2])
    p.add_argument("--quick", action="store_true",
                   help="a short grid: 1/7/30 days x class 0.5/1.0 at 0.1 V, plus 7 days at 1 V and 20%% missing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-references", action="store_true")
    p.add_argument("--synthetic", type=int, default=0, metavar="N",
                   help="also run the grid on N synthetic feeders (phaseid_hpc.synth.simulate_feeder)")
    p.add_argument("--no-ckt5", action="store_true", help="skip the ckt5 rows")
    a = p.parse_args(argv)
    if not DATA.is_dir() and not a.no_ckt5:
        raise SystemExit(f"dataset not found: {DATA} (the benchmark needs ../shared/data/epri-ckt5)")
    print("| data | days | class | res [V] | missing | accuracy | confident precision | share confident "
          "| wrong confident | GIS accuracy | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    grids = ([([1, 7, 30], [0.5, 1.0], [0.1], [0.0]), ([7], [0.5], [1.0], [0.2])] if a.quick
             else [(a.days, a.classes, a.resolutions, a.missing)])
    for grid in grids:
        if not a.no_ckt5:
            run_grid(*grid, seed=a.seed, use_refs=not a.no_references)
        if a.synthetic:
            run_synthetic(*grid, n_feeders=a.synthetic, seed=a.seed)


if __name__ == "__main__":
    main()
