"""Speed of transformer validation: the thermal kernel across many transformers, and a whole block.

Two measurements (single process, NumPy; CPU seconds of this process, so a shared machine's load does
not inflate them; the block also reports wall time):

1. ``kernel``: top-oil/hot-spot model + ageing (what ``validate_transformers`` runs per transformer) for
   ``--transformers`` units x ``--samples`` samples, in chunks of 4096 transformers (the labelled layer
   uses ``kernels.validation.THERMAL_CHUNK``); the load is generated per chunk outside the timed region.
2. ``block``: ``validate_transformers`` end to end (gap filling, aggregation, thermal model, health checks,
   flags) on one synthetic block of ``--block-meters`` meters, scaled to 1M meters.

Optionally (``--library N``) the same for N transformers with transformer-thermal-model (one ``Model`` per
transformer), to show why it is the reference in tests and not the engine.

BLAS runs single-threaded by default (``--blas-threads 1``, via threadpoolctl), as in a Dask worker (the
nanny sets ``OPENBLAS_NUM_THREADS=1``): on a shared 2-core machine extra BLAS threads only add CPU time.
``--repeat N`` runs the block N times and reports the median CPU time (quote medians on a shared machine).

Run:  .venv/bin/python benchmarks/validation_speed.py --transformers 3000 --samples 2880 --block-meters 9000 --repeat 5
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pandas as pd

from phaseid_hpc.config import ValidationConfig
from phaseid_hpc.kernels import thermal
from phaseid_hpc.validation import validate_transformers


def bench_kernel(n_tx: int, n_t: int, standard: str, chunk: int = 4096, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    model = thermal.iec_temperatures if standard == "iec" else thermal.ieee_temperatures
    params = ValidationConfig(thermal_standard=standard).thermal_parameters()
    daily = np.sin(np.arange(n_t) / 96 * 2 * np.pi)
    total = 0.0
    for start in range(0, n_tx, chunk):
        m = min(chunk, n_tx - start)
        k = np.abs(0.5 + 0.4 * daily + 0.1 * rng.standard_normal((m, n_t))).astype(np.float32)
        t0 = time.process_time()
        _, hot = model(k, 30.0, 15.0, **params)
        rate = thermal.relative_aging_rate(hot, "thermally_upgraded")
        thermal.equivalent_aging_factor(rate)
        hot.max(axis=1)
        total += time.process_time() - t0
    return total


def synthetic_block(n_meters: int, n_t: int, per_tx: int = 3, per_feeder: int = 600, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    n_tx = n_meters // per_tx
    tx_of = np.repeat(np.arange(n_tx), per_tx)[:n_meters]
    feeder_of_tx = np.arange(n_tx) // (per_feeder // per_tx)
    daily = 0.6 + 0.4 * np.sin(np.arange(n_t) / 96 * 2 * np.pi)
    kw = (1.5 * daily * (1 + 0.2 * rng.standard_normal((n_meters, n_t)))).astype(np.float32)
    kw[rng.random(kw.shape) < 0.01] = np.nan
    voltage = (240 * (1 + 0.01 * daily + 0.001 * rng.standard_normal((n_meters, n_t)))).astype(np.float32)
    meters = pd.DataFrame(
        {
            "meter_id": [f"M{i:07d}" for i in range(n_meters)],
            "feeder_id": [f"F{feeder_of_tx[t]:04d}" for t in tx_of],
            "transformer_id": [f"T{t:07d}" for t in tx_of],
            "phase": np.array(["A", "B", "C"])[feeder_of_tx[tx_of] % 3],
        }
    )
    transformers = pd.DataFrame(
        {
            "transformer_id": [f"T{t:07d}" for t in range(n_tx)],
            "feeder_id": [f"F{f:04d}" for f in feeder_of_tx],
            "kva_rating": 25.0,
            "n_phases": 1,
        }
    )
    times = pd.date_range("2026-06-01 00:15", periods=n_t, freq="15min").to_numpy()
    return {"kw": kw, "voltage": voltage, "meters": meters, "transformers": transformers, "times": times}


def bench_library(n_tx: int, n_t: int) -> float:
    from transformer_thermal_model.aging import days_aged
    from transformer_thermal_model.model import Model
    from transformer_thermal_model.schemas import InputProfile, UserTransformerSpecifications
    from transformer_thermal_model.transformer import DistributionTransformer, PaperInsulationType

    times = pd.date_range("2026-06-01 00:15", periods=n_t, freq="15min").to_numpy()
    load = np.abs(0.5 + 0.4 * np.sin(np.arange(n_t) / 96 * 2 * np.pi))
    amb = np.full(n_t, 30.0)
    specs = UserTransformerSpecifications(
        load_loss=5.0,
        no_load_loss=1.0,
        nom_load_sec_side=1.0,
        amb_temp_surcharge=0.0,
        top_oil_temp_rise=55.0,
        hot_spot_fac=1.0,
    )
    t0 = time.process_time()
    for _ in range(n_tx):
        out = Model(
            temperature_profile=InputProfile.create(times, load, amb),
            transformer=DistributionTransformer(user_specs=specs),
        ).run()
        days_aged(out.hot_spot_temp_profile, PaperInsulationType.THERMAL_UPGRADED)
    return time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transformers", type=int, default=100_000)
    ap.add_argument("--samples", type=int, default=2880)
    ap.add_argument("--standard", choices=["iec", "ieee"], default="iec")
    ap.add_argument("--block-meters", type=int, default=9_000, help="meters in the end-to-end block")
    ap.add_argument("--library", type=int, default=0, help="transformers to run through the library")
    ap.add_argument("--repeat", type=int, default=3, help="block runs; the median CPU time is reported")
    ap.add_argument("--blas-threads", type=int, default=1, help="BLAS threads (0: leave as is)")
    a = ap.parse_args()
    if a.blas_threads:
        try:
            from threadpoolctl import threadpool_limits

            threadpool_limits(a.blas_threads)
        except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
            pass
    res: dict = {"transformers": a.transformers, "samples": a.samples, "standard": a.standard}
    s = bench_kernel(a.transformers, a.samples, a.standard)
    res["kernel_cpu_s"] = round(s, 2)
    res["kernel_us_per_transformer"] = round(1e6 * s / a.transformers, 1)
    if a.block_meters:
        b = synthetic_block(a.block_meters, a.samples)
        cpu, wall = [], []
        for _ in range(max(a.repeat, 1)):
            t0, w0 = time.process_time(), time.perf_counter()
            out = validate_transformers(
                b["kw"],
                None,
                b["voltage"],
                b["meters"],
                b["transformers"],
                b["times"],
                ValidationConfig(thermal_standard=a.standard),
            )
            cpu.append(time.process_time() - t0)
            wall.append(time.perf_counter() - w0)
        s = float(np.median(cpu))
        res["block_wall_s"] = round(float(np.median(wall)), 2)
        res["block_cpu_s_runs"] = [round(c, 3) for c in cpu]
        res["block_meters"] = a.block_meters
        res["block_transformers"] = len(out)
        res["block_cpu_s"] = round(s, 3)
        res["extrapolated_1M_meters_cpu_s"] = round(s * 1_000_000 / a.block_meters, 1)
    if a.library:
        s = bench_library(a.library, a.samples)
        res["library_transformers"] = a.library
        res["library_cpu_s"] = round(s, 2)
        res["library_extrapolated_cpu_s"] = round(s * a.transformers / a.library, 0)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
