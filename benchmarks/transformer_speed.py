"""CPU time of meter-to-transformer verification (``map_transformers``) on one simulated feeder.

The nightly budget is ~600 CPU-us per meter for the whole job at 30 days x 15 min; transformer mapping's share
is ~150 CPU-us per meter. BLAS runs single-threaded (as in a Dask worker): set ``OPENBLAS_NUM_THREADS=1``
before running. The machine is shared: the median of ``--repeat`` runs of ``time.process_time`` is reported,
timed inside :func:`phaseid_hpc._memory.heap_for_arrays` as the pipeline runs a block.

Run::

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/transformer_speed.py --meters 3000 --days 30
    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/transformer_speed.py --meters 3000 --days 30 --profile

Before and after a change: save a copy of ``phaseid_hpc/transformer_mapping.py`` first, then
``--baseline COPY`` times the copy and the working tree in alternation (same process, same data, so load on
a shared machine hits both alike), reports both medians and their ratio, and checks that the two give
identical tables::

    cp phaseid_hpc/transformer_mapping.py /tmp/tm_before.py   # before the change
    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/transformer_speed.py --meters 1500 --days 14 \
        --repeat 9 --baseline /tmp/tm_before.py
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd

from phaseid_hpc._memory import heap_for_arrays
from phaseid_hpc.config import TransformerConfig
from phaseid_hpc.synth import simulate_feeder
from phaseid_hpc.transformer_mapping import map_transformers


def load_feeder(n_meters: int, days: float, seed: int, cache: Path | None, error_rate: float = 0.03) -> dict:
    """A simulated feeder (``simulate_feeder``, default measurement model), cached as .npz + .parquet."""
    if cache is not None:
        stem = cache / f"feeder_{n_meters}_{days:g}_{seed}_{error_rate:g}".replace(".", "p")
        if stem.with_suffix(".npz").exists():
            arr = np.load(stem.with_suffix(".npz"))
            return {
                "voltage": arr["voltage"],
                "kw": arr["kw"],
                "kvar": arr["kvar"],
                "meters": pd.read_parquet(stem.with_suffix(".parquet")),
            }
    from phaseid_hpc.synth.measurement import MeasurementModel

    sim = simulate_feeder(
        n_meters, days, seed=seed, measurement=MeasurementModel(0.5, 0.1), transformer_error_rate=error_rate
    )
    mt = sim.meters
    meters = pd.DataFrame(
        {
            "meter_id": mt["meter_id"].to_numpy(),
            "feeder_id": sim.feeder_id,
            "transformer_id": mt["transformer_id"].to_numpy(),
            "phase": mt["true_phase"].to_numpy(),
            "phase_gis": mt["phase"].to_numpy(),
            "usable": True,
            "true_transformer_id": mt["true_transformer_id"].to_numpy(),
        }
    )
    for c in ("lat", "lon"):
        if c in mt.columns:
            meters[c] = mt[c].to_numpy()
    out = {"voltage": sim.measured, "kw": sim.kw, "kvar": sim.kvar, "meters": meters}
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        np.savez(stem.with_suffix(".npz"), voltage=sim.measured, kw=sim.kw, kvar=sim.kvar)
        meters.to_parquet(stem.with_suffix(".parquet"))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--meters", type=int, default=3000)
    ap.add_argument("--days", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--error-rate", type=float, default=0.03, help="share of wrong GIS transformer labels")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/phaseid-transformer-speed"))
    ap.add_argument("--profile", action="store_true", help="print a cProfile of one run")
    ap.add_argument("--sort", default="cumulative", help="cProfile sort key (cumulative, tottime)")
    ap.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="a saved copy of phaseid_hpc/transformer_mapping.py to time against the working tree",
    )
    args = ap.parse_args(argv)
    d = load_feeder(args.meters, args.days, args.seed, args.cache, args.error_rate)
    m = d["meters"]
    n = len(m)
    cfg = TransformerConfig()

    def once():
        return map_transformers(
            d["voltage"], m.drop(columns="true_transformer_id"), cfg, kw=d["kw"], kvar=d["kvar"]
        )

    if args.profile:
        import cProfile
        import pstats

        pr = cProfile.Profile(time.process_time)
        pr.enable()
        once()
        pr.disable()
        pstats.Stats(pr).sort_stats(args.sort).print_stats(35)
    if args.baseline is not None:
        return compare_with_baseline(args.baseline, d, cfg, args.repeat)
    cpu, wall = [], []
    with heap_for_arrays():  # as the pipeline runs a block: freed temporaries reused, not mapped afresh
        for _ in range(args.repeat):
            c0, w0 = time.process_time(), time.perf_counter()
            res, _tx = once()
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
    truth = m["true_transformer_id"].astype(object).to_numpy()
    gis = m["transformer_id"].astype(object).to_numpy()
    changed = res["transformer_changed"].to_numpy(bool)
    wrong = gis != truth
    out = {
        "n_meters": n,
        "n_time": d["voltage"].shape[1],
        "n_transformers": int(pd.Series(gis).nunique()),
        "cpu_s_median": round(statistics.median(cpu), 3),
        "wall_s_median": round(statistics.median(wall), 3),
        "cpu_us_per_meter": round(1e6 * statistics.median(cpu) / n, 1),
        "n_wrong": int(wrong.sum()),
        "n_flagged": int(changed.sum()),
        "flag_precision": float((changed & wrong).sum() / max(changed.sum(), 1)),
        "flag_recall": float((changed & wrong).sum() / max(wrong.sum(), 1)),
        "on_right": float((res["transformer"].astype(object).to_numpy() == truth).mean()),
    }
    print(out)
    return out


def compare_with_baseline(path: Path, d: dict, cfg: TransformerConfig, repeat: int) -> dict:
    """Median CPU time of a saved copy of the module and of the working tree, run in alternation."""
    spec = importlib.util.spec_from_file_location("phaseid_hpc._baseline_transformer_mapping", path)
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    m = d["meters"].drop(columns="true_transformer_id")
    runs = {"baseline": base.map_transformers, "current": map_transformers}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    out = {}
    for r in range(repeat):
        for name in sorted(runs, reverse=r % 2 == 1):  # alternate which goes first
            c0 = time.process_time()
            out[name] = runs[name](d["voltage"], m, cfg, kw=d["kw"], kvar=d["kvar"])
            cpu[name].append(time.process_time() - c0)
    same = all(
        a.equals(b)
        and a.attrs.get("diagnostics", pd.DataFrame()).equals(b.attrs.get("diagnostics", pd.DataFrame()))
        for a, b in zip(out["baseline"], out["current"])
    )
    med = {k: statistics.median(v) for k, v in cpu.items()}
    res = {
        "n_meters": len(m),
        "n_time": d["voltage"].shape[1],
        "repeat": repeat,
        "baseline_cpu_s_median": round(med["baseline"], 3),
        "current_cpu_s_median": round(med["current"], 3),
        "current_over_baseline": round(med["current"] / med["baseline"], 3),
        "baseline_cpu_s_min": round(min(cpu["baseline"]), 3),
        "current_cpu_s_min": round(min(cpu["current"]), 3),
        "identical_tables": bool(same),
    }
    print(res)
    return res


if __name__ == "__main__":
    main()
