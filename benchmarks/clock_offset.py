"""Clock-offset estimation and flagging (``assess_quality``) on ckt5 and on a synthetic feeder.

Measurement model (seeded, :func:`phaseid_hpc.synth.measurement.apply_measurement_model`): class 0.5 noise,
0.1 V resolution, 30% of meters offset uniformly within +-300 s, 15-minute data. For each window [days]
and method it reports:

* ``med_err``: median |estimate - truth| over all meters [s];
* ``med_se``: median reported ``clock_offset_se_s`` [s];
* ``sd_z``: standard deviation of (estimate - truth) / se over clean meters (1 = honest standard errors);
* ``caught``: share of truly offset meters (|truth| > limit + 30 s) flagged ``REASON_CLOCK_OFFSET``;
* ``clean_flagged``: share of clean meters (|truth| < 30 s) flagged (target <= 2%).

Methods: ``median, z=0`` is the previous behaviour (feeder median as the common signal, flag when
|offset| > limit); ``median, z=1.5`` is what a feeder without references now gets; ``reference, z=0`` uses the feeder-head references; ``reference, z=1.5`` (the default)
flags only offsets that exceed the limit by 1.5 standard errors. Limit: 60 s (the default).

Run::

    .venv/bin/python benchmarks/clock_offset.py --days 7 14 35 --synthetic-meters 600
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from phaseid_hpc import contract as C
from phaseid_hpc.config import QualityConfig
from phaseid_hpc.quality import assess_quality
from phaseid_hpc.synth import simulate_feeder
from phaseid_hpc.synth.measurement import MeasurementModel, apply_measurement_model

CKT5 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "epri-ckt5"
MODEL = MeasurementModel(
    accuracy_class=0.5, resolution_v=0.1, clock_offset_fraction=0.3, clock_offset_max_s=300.0
)
METHODS = {
    "median, z=0": (False, 0.0),
    "median, z=1.5": (False, 1.5),
    "reference, z=0": (True, 0.0),
    "reference, z=1.5": (True, 1.5),
}


def load_ckt5(path: Path = CKT5) -> dict:
    """True voltages (n_meters, n_time), feeder ids and references (meta, (n_refs, n_time))."""
    df = pd.read_parquet(path / "readings.parquet", columns=["meter_id", "timestamp", "voltage_v"])
    wide = df.pivot(index="meter_id", columns="timestamp", values="voltage_v")
    meters = pd.read_csv(path / "meters.csv").set_index("meter_id").loc[wide.index]
    r = pd.read_parquet(path / "references.parquet")
    rw = r.pivot_table(index=["feeder_id", "phase"], columns="timestamp", values="voltage_v")
    rw = rw.reindex(columns=wide.columns)
    meta = rw.index.to_frame(index=False)
    return {
        "voltage": wide.to_numpy(np.float64),
        "feeder_id": meters["feeder_id"].to_numpy(),
        "references": (meta, rw.to_numpy(np.float64)),
    }


def load_synthetic(n_meters: int, days: int, seed: int) -> dict:
    sim = simulate_feeder(n_meters, days=days, seed=seed, measurement=None)
    meta = pd.DataFrame({"feeder_id": sim.feeder_id, "phase": list(sim.references.index)})
    return {
        "voltage": np.asarray(sim.voltage, dtype=np.float64),
        "feeder_id": np.full(len(sim.voltage), sim.feeder_id),
        "references": (meta, np.asarray(sim.references.to_numpy(), dtype=np.float64)),
    }


def score(data: dict, days: int, limit_s: float, seed: int) -> list[dict]:
    n_t = days * 96
    v = data["voltage"][:, :n_t]
    meas, true = apply_measurement_model(v, MODEL, interval_s=900.0, random_state=seed)
    n = len(v)
    meta, rv = data["references"]
    rows = []
    for name, (use_refs, z) in METHODS.items():
        cfg = QualityConfig(max_clock_offset_s=limit_s, clock_flag_z=z, clock_use_references=use_refs)
        t0 = time.perf_counter()
        t = assess_quality(
            meas,
            np.full(n, 240.0),
            np.full(n, 900.0),
            np.zeros(n),
            900.0,
            cfg,
            feeder_ids=data["feeder_id"],
            references=(meta, rv[:, :n_t]),
        ).table
        dt = time.perf_counter() - t0
        est, se = t["clock_offset_s"].to_numpy(), t["clock_offset_se_s"].to_numpy()
        flagged = t["reasons"].map(lambda r: C.REASON_CLOCK_OFFSET in r).to_numpy()
        clean, off = np.abs(true) < 30.0, np.abs(true) > limit_s + 30.0
        zc = ((est - true) / se)[clean]
        rows.append(
            {
                "days": days,
                "method": name,
                "med_err": round(float(np.nanmedian(np.abs(est - true))), 1),
                "med_se": round(float(np.nanmedian(se)), 1),
                "sd_z": round(float(np.nanstd(zc)), 2),
                "caught": round(float(flagged[off].mean()), 3),
                "clean_flagged": round(float(flagged[clean].mean()), 3),
                "estimated": round(float(np.isfinite(est).mean()), 3),
                "seconds": round(dt, 2),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--days", type=int, nargs="+", default=[7, 14, 35])
    ap.add_argument("--limit", type=float, default=60.0)
    ap.add_argument("--synthetic-meters", type=int, default=600, help="0 skips the synthetic feeder")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    datasets = {}
    if (CKT5 / "readings.parquet").is_file():
        datasets["ckt5"] = load_ckt5()
    else:
        print(f"ckt5 skipped: {CKT5} not found")
    if a.synthetic_meters:
        datasets[f"synthetic-{a.synthetic_meters}"] = load_synthetic(
            a.synthetic_meters, max(a.days), seed=a.seed
        )
    out = []
    for name, data in datasets.items():
        for d in a.days:
            for row in score(data, d, a.limit, a.seed):
                out.append({"data": name, **row})
    pd.set_option("display.width", 200)
    print(pd.DataFrame(out).to_string(index=False))


if __name__ == "__main__":
    main()
