"""CPU time of phase identification per meter on one synthetic feeder (``simulate_feeder``).

Run BLAS single-threaded, as Dask workers do, and read CPU time (``time.process_time``), not wall time:
the machine is shared. Prints the median of ``--repeat`` runs, the share of it spent in the kernel
(``sys``: mostly page faults of fresh memory), and a fingerprint of the result (the same input must give the
same output). The runs are timed inside :func:`phaseid_hpc._memory.heap_for_arrays`, as the pipeline runs a
block; ``--fresh-maps`` times them without (every large temporary a new memory map).

Examples
--------
    OPENBLAS_NUM_THREADS=1 python benchmarks/phase_speed.py --meters 3000 --days 14 30
    OPENBLAS_NUM_THREADS=1 python benchmarks/phase_speed.py --meters 3000 --days 30 --kw   # with the
                                                                     # load-compensated second pass
    OPENBLAS_NUM_THREADS=1 python benchmarks/phase_speed.py --profile     # cProfile of one run
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import hashlib
import os
import pstats
import time
from pathlib import Path

import numpy as np
import pandas as pd

from phaseid_hpc._memory import heap_for_arrays
from phaseid_hpc.config import PhaseConfig
from phaseid_hpc.phase_identification import identify_phases
from phaseid_hpc.synth.measurement import MeasurementModel

CACHE = Path("/tmp/phaseid_phase_speed")


def feeder(n_meters: int, days: float, seed: int = 0):
    """Measured voltage (n_meters, n_time) [V], meters table (GIS view), references (table, voltage), kW."""
    from phaseid_hpc.synth import simulate_feeder

    path = CACHE / f"feeder_kw_{n_meters}_{days:g}_{seed}.pkl"
    if path.exists():
        return pd.read_pickle(path)
    sim = simulate_feeder(n_meters, days=days, seed=seed, measurement=MeasurementModel(accuracy_class=0.5))
    meters = sim.meters.rename(columns={"phase": "phase_gis"}).assign(usable=True)
    refs = pd.DataFrame({"feeder_id": meters["feeder_id"].iloc[0], "phase": sim.references.index})
    out = (np.asarray(sim.measured, dtype=np.float64), meters, (refs, sim.references.to_numpy(np.float64)),
           np.asarray(sim.kw, dtype=np.float64))
    CACHE.mkdir(parents=True, exist_ok=True)
    pd.to_pickle(out, path)
    return out


def fingerprint(res: pd.DataFrame) -> str:
    text = res[["phase", "phase_class"]].astype(str).to_csv() + res["phase_confidence"].round(9).to_csv()
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--meters", type=int, default=3000)
    p.add_argument("--days", type=float, nargs="+", default=[14, 30])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="cProfile one run (first --days) instead")
    p.add_argument("--kw", action="store_true", help="give the meters' kW (the load-compensated second pass)")
    p.add_argument("--fresh-maps", action="store_true",
                   help="time outside heap_for_arrays (glibc's defaults: large temporaries freshly mapped)")
    a = p.parse_args(argv)
    for days in a.days:
        v, meters, refs, kw = feeder(a.meters, days, a.seed)
        kw = kw if a.kw else None
        truth = meters["true_phase"].to_numpy() if "true_phase" in meters else None
        if a.profile:
            prof = cProfile.Profile()
            prof.enable()
            identify_phases(v, meters, PhaseConfig(random_state=a.seed), references=refs, kw=kw)
            prof.disable()
            pstats.Stats(prof).sort_stats("cumulative").print_stats(35)
            return
        cpu, sys_s, prints = [], [], set()
        with contextlib.nullcontext() if a.fresh_maps else heap_for_arrays():
            for _ in range(a.repeat):
                t0 = os.times()
                tic = time.process_time()
                res = identify_phases(v, meters, PhaseConfig(random_state=a.seed), references=refs, kw=kw)
                cpu.append(time.process_time() - tic)
                sys_s.append(os.times().system - t0.system)
                prints.add(fingerprint(res))
        med = float(np.median(cpu))
        acc = float((res["phase"].to_numpy() == truth).mean()) if truth is not None else float("nan")
        conf = (res["phase_class"] == "confident").to_numpy()
        prec = float((res["phase"].to_numpy() == truth)[conf].mean()) if conf.any() else float("nan")
        print(f"meters={a.meters} days={days:g} kw={a.kw} n_time={v.shape[1]} cpu_s median={med:.3f} "
              f"(runs {', '.join(f'{c:.2f}' for c in cpu)}) per_meter_us={1e6 * med / a.meters:.0f} min_cpu_s={min(cpu):.3f} "
              f"sys_s median={float(np.median(sys_s)):.2f} "
              f"accuracy={acc:.4f} confident={conf.mean():.3f} conf_precision={prec:.4f} "
              f"deterministic={len(prints) == 1} fingerprint={min(prints)}", flush=True)


if __name__ == "__main__":
    main()
