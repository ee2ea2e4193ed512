"""Meter PT deviations and transformer health faults injected into physics-based feeders: detection and false alarms.

For every feeder (the five of ``../shared/data`` and, with ``--scenarios``, the generator's), over
``--trials`` seeded trials:

* PT: ``--pt-share`` of the meters (at least one; at most one per transformer, since two meters of one
  transformer departing together look like the transformer's tap) get a gain error of +/- each ``--pt-pct`` on their true
  voltage; the class 0.5, 0.1 V measurement model (1% missing) is applied and
  :func:`phaseid_hpc.pt_deviation.detect_pt_deviation` runs with the true transformer and phase of every
  meter (what the mapping recommends where it is right). Detected: the meter carries a Meter PT Deviation
  reason; false alarm: a healthy meter does.
* Transformer health: ``--xf-share`` of the transformers with at least two meters (at least one) get a tap
  change (every meter of the unit steps by +/- ``--tap-pct`` at a random time in the middle half of the
  period) and as many others a winding fault (from a random time between 1/8 and 1/2 of the period, a common multiplicative
  noise of ``--winding-pct`` one sigma on all its meters: they stay correlated with each other and lose the
  feeder's fluctuations). :func:`phaseid_hpc.validation.validate_transformers` runs with the true mapping;
  detected: ``voltage_level_step`` on a tapped unit, ``correlation_loss`` on a faulty one; false alarm:
  either flag on an untouched unit.

Examples
--------
    python benchmarks/pt_health.py                       # 7 days, 10 trials, results/pt_health.csv
    python benchmarks/pt_health.py --days 14 --trials 20 --scenarios regulators single_meter_transformers
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from feeders import feeder_paths, load_feeder

from phaseid_hpc import contract
from phaseid_hpc.config import PTConfig, ValidationConfig
from phaseid_hpc.pt_deviation import detect_pt_deviation
from phaseid_hpc.synth.measurement import MeasurementModel, apply_measurement_model
from phaseid_hpc.validation import validate_transformers

RESULTS = Path(__file__).resolve().parent / "results" / "pt_health.csv"
HEALTH_FLAGS = ("voltage_level_step", "correlation_loss")


def _flag_column(table: pd.DataFrame) -> str:
    return "flag_codes" if "flag_codes" in table else "flags"


def pt_trials(
    feeder: dict,
    n_t: int,
    pct: float,
    share: float,
    trials: int,
    seed: int,
    model: MeasurementModel,
    config: PTConfig,
) -> dict:
    """Detection and false alarms of PT deviations of +/- ``pct`` % on ``share`` of the meters."""
    v0, kw = feeder["voltage"][:, :n_t], (None if feeder["kw"] is None else feeder["kw"][:, :n_t])
    truth = feeder["truth"]
    meters = pd.DataFrame(
        {
            "feeder_id": truth["feeder_id"].astype(str),
            "transformer_id": truth["transformer_id"],
            "phase": truth["phase"],
            "nominal_v": feeder["meters"].get("nominal_v"),
        }
    )
    n = len(v0)
    tx = truth["transformer_id"].astype(str).to_numpy()
    hit = miss = fa = healthy = 0
    err = []
    for trial in range(trials):
        rng = np.random.default_rng([seed, trial, int(pct * 1000)])
        # at most one failing PT per transformer: two meters of one transformer that depart together are
        # what the transformer's own tap looks like, and are (rightly) not flagged
        perm = rng.permutation(n)
        first = perm[~pd.Series(tx[perm]).duplicated().to_numpy()]
        bad = first[: max(1, round(share * n))]
        gain = np.ones(n)
        gain[bad] += rng.choice([-1.0, 1.0], bad.size) * pct / 100
        meas, _ = apply_measurement_model(v0 * gain[:, None], model, interval_s=900.0, random_state=rng)
        res = detect_pt_deviation(meas, kw, meters, config)
        flagged = (
            res["reasons"]
            .map(lambda r: any(c.startswith(contract.REASON_PT_DEVIATION) for c in r))
            .to_numpy()
        )
        is_bad = np.zeros(n, dtype=bool)
        is_bad[bad] = True
        hit += int(flagged[is_bad].sum())
        miss += int((~flagged[is_bad]).sum())
        fa += int(flagged[~is_bad].sum())
        healthy += int((~is_bad).sum())
        err.extend(res["pt_deviation_pct"].to_numpy()[bad] - 100 * (gain[bad] - 1))
    err = np.asarray(err)
    return {
        "injected": hit + miss,
        "detected": hit / max(hit + miss, 1),
        "healthy": healthy,
        "false_alarms": fa,
        "false_alarm_rate": fa / max(healthy, 1),
        "estimate_error_pct_p95": float(np.nanquantile(np.abs(err), 0.95))
        if np.isfinite(err).any()
        else np.nan,
    }


def health_trials(
    feeder: dict,
    n_t: int,
    share: float,
    trials: int,
    seed: int,
    tap_pct: float,
    winding_pct: float,
    model: MeasurementModel,
    config: ValidationConfig,
) -> dict:
    """Detection of tap changes and winding faults, false alarms on untouched transformers."""
    v0, kw = feeder["voltage"][:, :n_t], feeder["kw"][:, :n_t]
    truth = feeder["truth"]
    times = feeder["times"][:n_t]
    meters = pd.DataFrame(
        {
            "meter_id": truth["meter_id"],
            "feeder_id": truth["feeder_id"].astype(str),
            "transformer_id": truth["transformer_id"].astype(str),
            "phase": truth["phase"],
        }
    )
    refs = None if feeder["refs"] is None else (feeder["refs"][0], feeder["refs"][1][:, :n_t])
    tx_of = meters["transformer_id"].to_numpy()
    sizes = meters["transformer_id"].value_counts()
    eligible = np.array(sorted(sizes.index[sizes >= config.health_min_meters]))
    out = {"tap": [0, 0], "winding": [0, 0], "fa": 0, "healthy": 0, "eligible": len(eligible)}
    if len(eligible) < 3:
        return out
    k = max(1, round(share * len(eligible)))
    for trial in range(trials):
        rng = np.random.default_rng([seed, trial, 99])
        pick = rng.choice(eligible, 2 * k, replace=False)
        tapped, faulty = pick[:k], pick[k:]
        v = v0.copy()
        for t in tapped:
            rows = tx_of == t
            start = int(rng.integers(n_t // 4, 3 * n_t // 4))
            v[rows, start:] *= 1 + rng.choice([-1.0, 1.0]) * tap_pct / 100
        for t in faulty:
            rows = tx_of == t
            start = int(rng.integers(n_t // 8, n_t // 2))
            v[rows, start:] *= 1 + winding_pct / 100 * rng.standard_normal(n_t - start)[None, :]
        meas, _ = apply_measurement_model(v, model, interval_s=900.0, random_state=rng)
        res = validate_transformers(
            kw, None, meas, meters, feeder["transformers"], times, config, references=refs
        )
        flags = dict(zip(res["transformer_id"], res[_flag_column(res)]))
        for t in tapped:
            out["tap"][0 if "voltage_level_step" in flags[t] else 1] += 1
        for t in faulty:
            out["winding"][0 if "correlation_loss" in flags[t] else 1] += 1
        for t in set(eligible) - set(pick):
            out["healthy"] += 1
            out["fa"] += int(any(f in flags[t] for f in HEALTH_FLAGS))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--feeders", nargs="*", default=["epri-ckt5", "ieee8500", "epri-k1", "epri-m1", "epri-ckt7"]
    )
    p.add_argument("--scenarios", nargs="*", default=[])
    p.add_argument("--days", type=float, default=7)
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--aggregate-s", type=float, default=3600.0,
                   help="PT check: readings averaged to this interval first ([pt] aggregate_s) [s]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pt-pct", type=float, nargs="*", default=[1.5, 3.0])
    p.add_argument("--pt-share", type=float, default=0.01)
    p.add_argument("--xf-share", type=float, default=0.05)
    p.add_argument("--tap-pct", type=float, default=2.5)
    p.add_argument("--winding-pct", type=float, default=0.5)
    p.add_argument("--no-health", action="store_true")
    p.add_argument("--csv", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    model = MeasurementModel(accuracy_class=0.5, resolution_v=0.1, missing_fraction=0.01)
    rows = []
    cols = ["feeder", "check", "injected", "detected", "healthy", "false_alarms", "false_alarm_rate", "s"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))

    def emit(row: dict) -> None:
        rows.append(row)
        print(
            "| "
            + " | ".join(f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in cols)
            + " |",
            flush=True,
        )

    for name, path in feeder_paths(a.feeders, a.scenarios, a.days, a.seed):
        feeder = load_feeder(path)
        n_t = min(round(a.days * 96), len(feeder["times"]))
        for pct in a.pt_pct:
            tic = time.perf_counter()
            r = pt_trials(feeder, n_t, pct, a.pt_share, a.trials, a.seed, model, PTConfig(aggregate_s=a.aggregate_s))
            emit({"feeder": name, "check": f"pt {pct:g}%", **r, "s": time.perf_counter() - tic})
        if a.no_health or feeder["kw"] is None:
            continue
        tic = time.perf_counter()
        h = health_trials(
            feeder, n_t, a.xf_share, a.trials, a.seed, a.tap_pct, a.winding_pct, model, ValidationConfig()
        )
        s = time.perf_counter() - tic
        if h["healthy"] == 0:
            emit(
                {
                    "feeder": name,
                    "check": "health: no transformer with 2+ meters",
                    "injected": 0,
                    "detected": np.nan,
                    "healthy": 0,
                    "false_alarms": 0,
                    "false_alarm_rate": np.nan,
                    "s": s,
                }
            )
            continue
        for key, label in (
            ("tap", f"tap step {a.tap_pct:g}%"),
            ("winding", f"winding noise {a.winding_pct:g}%"),
        ):
            hit, miss = h[key]
            emit(
                {
                    "feeder": name,
                    "check": label,
                    "injected": hit + miss,
                    "detected": hit / max(hit + miss, 1),
                    "healthy": h["healthy"],
                    "false_alarms": h["fa"],
                    "false_alarm_rate": h["fa"] / h["healthy"],
                    "s": s,
                }
            )
    if a.csv:
        a.csv.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_csv(a.csv, index=False)


if __name__ == "__main__":
    sys.exit(main())
