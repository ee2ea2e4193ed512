"""Accuracy of meter-to-transformer verification (``map_transformers``) on ckt5 and synthetic data.

For each window [days], meter accuracy class and label-corruption rate it reports:

* ``on_right``: share of meters whose proposed transformer is the true one (a proposed new group counts as
  right for a meter when the group's majority true transformer is that meter's and is missing from GIS);
* ``flag_precision``: share of changed meters whose GIS label was in fact wrong;
* ``flag_recall``: share of wrong GIS labels that were changed;
* ``moved_right``: share of changed meters now on their true transformer;
* ``gis_right``: share right before the mapping (the GIS view).

Corruption: ckt5's ``meters.csv`` ships 41 wrong transformer labels (3.0%); the 10% case corrupts more labels,
seeded, mostly (80%) to the transformer of the same feeder nearest in mean voltage level, else at random.
The phase input is the TRUE phase (``--phase truth``, the default, until phase identification lands) or the
GIS phase (``--phase gis``). Noise: :func:`phaseid_hpc.synth.measurement.apply_measurement_model`, seeded.

Run::

    .venv/bin/python benchmarks/transformer_accuracy.py --days 7 14 --classes 0.2 0.5 1.0 --corruption 0.03 0.10
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from phaseid_hpc.config import TransformerConfig
from phaseid_hpc.synth.measurement import MeasurementModel, apply_measurement_model
from phaseid_hpc.transformer_mapping import map_transformers

CKT5 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "epri-ckt5"


def load_ckt5(path: Path = CKT5) -> dict:
    """Readings pivoted to (n_meters, n_time) in meters.csv order, plus GIS and truth tables."""
    meters = pd.read_csv(path / "meters.csv")
    truth = pd.read_csv(path / "truth.csv").set_index("meter_id").loc[meters["meter_id"]].reset_index()
    r = pd.read_parquet(path / "readings.parquet")
    v = r.pivot(index="meter_id", columns="timestamp", values="voltage_v").loc[meters["meter_id"]]
    kw = r.pivot(index="meter_id", columns="timestamp", values="kw").loc[meters["meter_id"]]
    return {
        "meters": meters,
        "truth": truth,
        "voltage": v.to_numpy(np.float64),
        "kw": kw.to_numpy(np.float64),
        "interval_s": 900.0,
    }


def corrupt_labels(
    gis: np.ndarray, truth: np.ndarray, feeder: np.ndarray, level: np.ndarray, rate: float, seed: int
) -> np.ndarray:
    """Corrupt more GIS transformer labels until ``rate`` of meters are wrong (seeded).

    80% go to the transformer of the same feeder nearest in mean voltage level (a neighbour on the lateral),
    20% to a random transformer of the feeder.
    """
    rng = np.random.default_rng(seed)
    out = gis.astype(object).copy()
    n_target = round(rate * len(out))
    wrong = out != truth
    candidates = np.flatnonzero(~wrong)
    need = n_target - int(wrong.sum())
    if need <= 0:
        return out
    pick = np.sort(rng.choice(candidates, size=need, replace=False))
    tx_level = pd.Series(level).groupby([feeder, truth]).mean()
    for i in pick:
        f = feeder[i]
        lv = tx_level.loc[f]
        lv = lv[lv.index != truth[i]]
        if len(lv) == 0:
            continue
        if rng.random() < 0.8:
            out[i] = lv.index[np.argmin(np.abs(lv.to_numpy() - level[i]))]
        else:
            out[i] = lv.index[rng.integers(len(lv))]
    return out


def score(result: pd.DataFrame, gis: np.ndarray, truth: np.ndarray) -> dict:
    prop = result["transformer"].astype(object).to_numpy()
    changed = result["transformer_changed"].to_numpy(bool)
    wrong = gis != truth
    gis_set = set(gis)
    right = prop == truth
    # proposed new groups: right when the group's majority true transformer is missing from GIS
    for tid in set(prop[[("-NEW" in str(p)) for p in prop]]):
        mem = prop == tid
        maj = pd.Series(truth[mem]).mode().iloc[0]
        if maj not in gis_set:
            right[mem] = truth[mem] == maj
    n_flag = int(changed.sum())
    return {
        "gis_right": float((~wrong).mean()),
        "on_right": float(right.mean()),
        "n_wrong": int(wrong.sum()),
        "n_flagged": n_flag,
        "flag_precision": float((changed & wrong).sum() / n_flag) if n_flag else float("nan"),
        "flag_recall": float((changed & wrong).sum() / max(int(wrong.sum()), 1)),
        "moved_right": float((changed & right).sum() / n_flag) if n_flag else float("nan"),
    }


def peer_pairwise_flags(voltage: np.ndarray, gis: np.ndarray, threshold: float = 0.7) -> set:
    """The peer's first stage (Sandia pairing): a transformer is flagged when any pair of its customers'
    differenced voltages correlates below ``threshold``. (Its second stage, one regression per customer pair,
    ~1 ms each, is not run; its cost is O(n^2) pairs.)"""
    d = np.diff(voltage, axis=1)
    flagged = set()
    for tid, idx in pd.Series(np.arange(len(gis))).groupby(gis):
        idx = idx.to_numpy()
        if len(idx) < 2:
            continue
        c = pd.DataFrame(d[idx].T).corr(min_periods=10).to_numpy()
        if np.nanmin(c) < threshold:
            flagged.add(tid)
    return flagged


def group_flags(result: pd.DataFrame, gis: np.ndarray, truth: np.ndarray) -> dict:
    """Transformer-level flags: ours (a GIS group loses or gains a meter) vs truly wrong GIS groups."""
    prop = result["transformer"].astype(object).to_numpy()
    changed = result["transformer_changed"].to_numpy(bool)
    wrong_groups = set(gis[gis != truth]) | set(truth[gis != truth]) & set(gis)
    ours = set(gis[changed]) | (set(prop[changed]) & set(gis))
    return {
        "wrong_groups": len(wrong_groups),
        "our_flagged_groups": len(ours),
        "our_group_precision": len(ours & wrong_groups) / max(len(ours), 1),
    }


def run_ckt5(
    data: dict,
    days: float,
    accuracy_class: float,
    corruption: float,
    phase: str = "truth",
    seed: int = 0,
    config: TransformerConfig | None = None,
    peer: bool = False,
) -> dict:
    meters, truth = data["meters"], data["truth"]
    n_t = round(days * 86400 / data["interval_s"])
    v_true = data["voltage"][:, :n_t]
    v, _ = apply_measurement_model(
        v_true,
        MeasurementModel(accuracy_class=accuracy_class, resolution_v=0.1),
        interval_s=data["interval_s"],
        random_state=seed,
    )
    t_tx = truth["transformer_id"].astype(object).to_numpy()
    gis = corrupt_labels(
        meters["transformer_id"].astype(object).to_numpy(),
        t_tx,
        meters["feeder_id"].astype(object).to_numpy(),
        np.nanmean(data["voltage"], 1),
        corruption,
        seed,
    )
    m = pd.DataFrame(
        {
            "meter_id": meters["meter_id"],
            "feeder_id": meters["feeder_id"],
            "transformer_id": gis,
            "phase": truth["phase"] if phase == "truth" else meters["phase"],
            "phase_gis": meters["phase"],
            "usable": True,
        }
    )
    t0 = time.perf_counter()
    res, tx = map_transformers(
        v, m, config or TransformerConfig(), kw=data["kw"][:, :n_t], interval_s=data["interval_s"]
    )
    wall = time.perf_counter() - t0
    out = score(res, gis, t_tx)
    out.update(group_flags(res, gis, t_tx))
    if peer:
        t1 = time.perf_counter()
        pf = peer_pairwise_flags(v, gis)
        wg = set(gis[gis != t_tx]) | set(t_tx[gis != t_tx]) & set(gis)
        out.update(
            peer_flagged_groups=len(pf),
            peer_group_precision=len(pf & wg) / max(len(pf), 1),
            peer_stage1_seconds=round(time.perf_counter() - t1, 2),
        )
    out.update(
        dataset="ckt5",
        days=days,
        accuracy_class=accuracy_class,
        corruption=corruption,
        phase=phase,
        seconds=round(wall, 2),
        new_groups=int(tx["proposed_new"].sum()),
    )
    return out


def run_synthetic(
    n_meters: int,
    days: float,
    accuracy_class: float,
    corruption: float,
    seed: int = 0,
    config: TransformerConfig | None = None,
    workdir: str | None = None,
) -> dict:
    """A generated utility (``phaseid_hpc.synth.generate_utility``): the generator corrupts the GIS labels
    (``transformer_error_rate``) and applies the measurement model itself. Phase input: the true phase."""
    import tempfile

    from phaseid_hpc.synth import generate_utility

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        res = generate_utility(
            tmp,
            n_meters=n_meters,
            days=days,
            seed=seed,
            measurement=MeasurementModel(accuracy_class=accuracy_class, resolution_v=0.1),
            transformer_error_rate=corruption,
        )
        meters = pd.read_csv(res.paths["meters"])
        truth = pd.read_csv(res.paths["truth"]).set_index("meter_id").loc[meters["meter_id"]].reset_index()
        r = pd.read_parquet(res.paths["readings"])
        cols = ["voltage_v"] + [c for c in ("kw", "kvar") if c in r.columns]
        wide = r.pivot_table(index="meter_id", columns="timestamp", values=cols, sort=True, dropna=False)
        arrays = {c: wide[c].reindex(meters["meter_id"]).to_numpy(np.float64) for c in cols}
        interval_s = float(res.interval_s)
    gis = meters["transformer_id"].astype(object).to_numpy()
    t_tx = truth["transformer_id"].astype(object).to_numpy()
    m = pd.DataFrame(
        {
            "meter_id": meters["meter_id"],
            "feeder_id": meters["feeder_id"],
            "transformer_id": gis,
            "phase": truth["phase"],
            "phase_gis": meters["phase"],
            "usable": True,
        }
    )
    for c in ("lat", "lon"):
        if c in meters.columns:
            m[c] = meters[c].to_numpy()
    v, kw, kvar = arrays["voltage_v"], arrays.get("kw"), arrays.get("kvar")
    t0 = time.perf_counter()
    out_r, tx = map_transformers(v, m, config or TransformerConfig(), kw=kw, kvar=kvar, interval_s=interval_s)
    wall = time.perf_counter() - t0
    out = score(out_r, gis, t_tx)
    out.update(group_flags(out_r, gis, t_tx))
    out.update(
        dataset=f"synth{n_meters}",
        days=days,
        accuracy_class=accuracy_class,
        corruption=corruption,
        phase="truth",
        seconds=round(wall, 2),
        new_groups=int(tx["proposed_new"].sum()),
    )
    return out


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--days", type=float, nargs="+", default=[7.0, 14.0])
    ap.add_argument("--classes", type=float, nargs="+", default=[0.2, 0.5, 1.0])
    ap.add_argument("--corruption", type=float, nargs="+", default=[0.03, 0.10])
    ap.add_argument("--phase", choices=["truth", "gis"], nargs="+", default=["truth"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peer", action="store_true", help="also run the peer's pairwise flagging stage")
    ap.add_argument(
        "--synthetic",
        type=int,
        default=0,
        metavar="N_METERS",
        help="also run a generated utility of this many meters (0: no)",
    )
    ap.add_argument("--no-ckt5", action="store_true", help="skip the ckt5 runs")
    args = ap.parse_args(argv)
    rows = []
    if args.synthetic:
        for c in args.corruption:
            for d in args.days:
                for a in args.classes:
                    rows.append(run_synthetic(args.synthetic, d, a, c, args.seed))
                    print(rows[-1], flush=True)
    if args.no_ckt5:
        args.phase = []
    elif not CKT5.is_dir():
        print(f"ckt5 skipped: {CKT5} not found (it lives in ../shared/data)")
        args.phase = []
    else:
        data = load_ckt5()
    for ph in args.phase:
        for c in args.corruption:
            for d in args.days:
                for a in args.classes:
                    rows.append(run_ckt5(data, d, a, c, ph, args.seed, peer=args.peer))
                    print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    cols = [
        "dataset",
        "phase",
        "corruption",
        "days",
        "accuracy_class",
        "gis_right",
        "on_right",
        "n_wrong",
        "n_flagged",
        "flag_precision",
        "flag_recall",
        "moved_right",
        "new_groups",
        "seconds",
        "wrong_groups",
        "our_flagged_groups",
        "our_group_precision",
        "peer_flagged_groups",
        "peer_group_precision",
    ]
    cols = [c for c in cols if c in df.columns]
    print(df[cols].to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    return df


if __name__ == "__main__":
    main()
