"""How hard is a dataset? Correlation structure of first-differenced AMI voltage, by true relationship.

For any dataset in the data contract (a directory with ``readings.parquet`` and ``truth.csv``; when
``truth.csv`` is absent, ``meters.csv`` labels are used), prints a markdown table of

* mean Pearson correlation of first-differenced voltage over pairs of single-phase meters on the same
  feeder and the same true phase, on different true phases, and under the same true transformer;
* how often a meter's most-correlated other meter on its feeder shares its true transformer (meters that
  have at least one transformer mate);

on the voltages as stored and after the seeded measurement model (class 0.5 and 0.1% one sigma, both with
0.1 V resolution) is applied.
Feed it noise-free voltages (``../shared/data/epri-ckt5``, or ``phaseid synth`` with a noise-free
``MeasurementModel(accuracy_class=0, resolution_v=0)``) so that both columns mean what they say.

Usage::

    .venv/bin/python benchmarks/realism.py ../shared/data/epri-ckt5 [more dirs ...] [--max-meters 1500]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds

from phaseid_hpc.synth.measurement import MeasurementModel, apply_measurement_model

SINGLE = ("A", "B", "C")


def load_feeders(path: Path, max_meters: int, seed: int = 0):
    """Yield (feeder_id, table, voltage (n, T)) for up to ``max_meters`` meters, whole feeders first."""
    labels = pd.read_csv(
        path / "truth.csv" if (path / "truth.csv").exists() else path / "meters.csv",
        dtype={"meter_id": str, "feeder_id": str, "transformer_id": str, "phase": str},
    )
    feeders = sorted(labels.feeder_id.unique())
    rng = np.random.default_rng(seed)
    rng.shuffle(feeders)
    dataset = ds.dataset(path / "readings.parquet", format="parquet")
    taken = 0
    for fid in feeders:
        if taken >= max_meters:
            break
        tab = labels[labels.feeder_id == fid].sort_values("meter_id").reset_index(drop=True)
        ids = tab.meter_id.tolist()
        rd = dataset.to_table(
            columns=["meter_id", "timestamp", "voltage_v"], filter=ds.field("meter_id").isin(ids)
        ).to_pandas()
        wide = rd.pivot(index="meter_id", columns="timestamp", values="voltage_v").reindex(ids)
        taken += len(ids)
        yield fid, tab, wide.to_numpy(dtype=np.float64)


def diff_corr(v: np.ndarray) -> np.ndarray:
    """Correlation matrix of first differences; missing differences are treated as zero deviation."""
    d = np.diff(v, axis=1)
    d = d - np.nanmean(d, axis=1, keepdims=True)
    d = np.nan_to_num(d)
    sd = np.sqrt((d * d).sum(axis=1))
    sd[sd == 0] = np.inf
    d = d / sd[:, None]
    return d @ d.T


def feeder_stats(tab: pd.DataFrame, v: np.ndarray) -> dict[str, list]:
    c = diff_corr(v)
    single = tab.phase.isin(SINGLE).to_numpy()
    ph = tab.phase.to_numpy()
    tr = tab.transformer_id.to_numpy()
    iu = np.triu_indices(len(tab), 1)
    pair_single = single[iu[0]] & single[iu[1]]
    same_ph = ph[iu[0]] == ph[iu[1]]
    same_tr = tr[iu[0]] == tr[iu[1]]
    cu = c[iu]
    out = {
        "same_phase": cu[pair_single & same_ph & ~same_tr].tolist(),
        "diff_phase": cu[pair_single & ~same_ph].tolist(),
        "same_transformer": cu[same_tr].tolist(),
    }
    np.fill_diagonal(c, -np.inf)
    best = c.argmax(axis=1)
    has_mate = pd.Series(tr).map(pd.Series(tr).value_counts()).to_numpy() > 1
    out["nn_same_transformer"] = (tr[best] == tr)[has_mate].tolist()
    return out


#: Column name -> measurement model (None: the voltages as stored). Class 0.7 is 0.1% one sigma.
MODELS = {
    "noise-free": None,
    "class 0.5, 0.1 V": MeasurementModel(accuracy_class=0.5, resolution_v=0.1),
    "0.1%, 0.1 V": MeasurementModel(accuracy_class=0.7, resolution_v=0.1),
}


def realism(path: Path, max_meters: int, interval_s: float | None = None) -> pd.DataFrame:
    acc = {
        k: {m: [] for m in MODELS}
        for k in ("same_phase", "diff_phase", "same_transformer", "nn_same_transformer")
    }
    n_m = 0
    for i, (_fid, tab, v) in enumerate(load_feeders(path, max_meters)):
        n_m += len(tab)
        for name, model in MODELS.items():
            vm = (
                v
                if model is None
                else apply_measurement_model(v, model, interval_s=interval_s or 900.0, random_state=i)[0]
            )
            st = feeder_stats(tab, vm)
            for k, per_model in acc.items():
                per_model[name] += st[k]
    rows = []
    for k, label in [
        ("same_phase", "corr same phase (same feeder, other transformer)"),
        ("diff_phase", "corr different phase"),
        ("same_transformer", "corr same transformer"),
        ("nn_same_transformer", "most-correlated neighbour on same transformer"),
    ]:
        rows.append({"metric": label, **{m: float(np.mean(x)) if x else np.nan for m, x in acc[k].items()}})
    df = pd.DataFrame(rows)
    df.attrs["n_meters"] = n_m
    return df


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", type=Path)
    ap.add_argument("--max-meters", type=int, default=1500, help="meters read per dataset (whole feeders)")
    a = ap.parse_args(argv)
    tables = []
    for p in a.paths:
        if not (p / "readings.parquet").exists():
            print(f"skip {p}: no readings.parquet", file=sys.stderr)
            continue
        df = realism(p, a.max_meters)
        tables.append((p, df))
    metrics = tables[0][1].metric.tolist()
    header = (
        "| metric | "
        + " | ".join(f"{p.name} ({df.attrs['n_meters']} m) {m}" for p, df in tables for m in MODELS)
        + " |"
    )
    print(header)
    print("|---" * (1 + len(MODELS) * len(tables)) + "|")
    for i, name in enumerate(metrics):
        cells = [f"{df.iloc[i][m]:.3f}" for _, df in tables for m in MODELS]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
