"""The embedded default run: a synthetic utility, ingested, identified on a local cluster (with the report),
scored."""

from __future__ import annotations

import os
import time
from pathlib import Path

from .cluster import ClusterSpec
from .config import RunConfig

__all__ = ["run_demo"]


def run_demo(
    out: str | os.PathLike[str] = "demo",
    *,
    n_meters: int = 3000,
    days: float = 14,
    workers: int | None = None,
    seed: int = 0,
    config: RunConfig | None = None,
) -> dict:
    """Generate a synthetic utility, ingest it, run the job on a LocalCluster (writes the report), score it.

    Parameters
    ----------
    out : path-like
        Demo folder: ``export/`` (the AMI export and truth), ``store.zarr``, ``results/``.
    n_meters : int
        Size of the synthetic utility [meters].
    days : float
        Length of the record [days].
    workers : int, optional
        LocalCluster workers (default: one per core; 0 runs the blocks in this process).
    seed : int
        Seed of the generator (and of the measurement model).

    Returns
    -------
    dict
        The score against the truth (see :func:`phaseid_hpc.score.score_frames`).
    """
    from .console import format_duration, format_ingest, format_run, store_period
    from .ingest import ingest_files
    from .jobs import run_with_cluster
    from .score import format_score_table, score_results
    from .synth import generate_utility

    root = Path(out)
    export, store, results = root / "export", root / "store.zarr", root / "results"
    cfg = config or RunConfig()
    t0 = time.perf_counter()
    print(f"[1/4] generating a synthetic utility: {n_meters} meters x {days:g} days -> {export}")
    generate_utility(export, n_meters=n_meters, days=days, seed=seed)
    print(f"[2/4] ingesting the export into {store}")
    rep = ingest_files(
        sorted(str(p) for p in export.glob("readings*.parquet")),
        export / "meters.csv",
        store,
        transformers_path=export / "transformers.csv",
        references_path=export / "references.parquet",
        config=cfg.ingest,
    )
    print("      " + format_ingest(rep).replace("\n", "\n      "))
    print(f"[3/4] identifying phases and transformers on a local Dask cluster -> {results}")
    summary = run_with_cluster(store, results, config=cfg, spec=ClusterSpec(kind="local", n_workers=workers),
                               in_process=workers == 0)
    print("      " + format_run(summary, period=store_period(store)).replace("\n", "\n      "))
    print(f"[4/4] scoring against {export / 'truth.csv'} (the generator's ground truth)")
    score = score_results(results, export / "truth.csv")
    print(format_score_table(score))
    print(f"\nResults: {results}/  (corrections.csv is the field worklist, review.csv the review list)")
    if "report" in summary.files:
        print(f"Report:  {summary.files['report']}  (open it in a browser; works offline)")
    print(f"Demo finished in {format_duration(time.perf_counter() - t0)}")
    return score
