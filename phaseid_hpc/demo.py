"""The embedded default run: a synthetic utility, ingested, identified on a local cluster, scored, reported."""

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
    """Generate a synthetic utility, ingest it, run the job on a LocalCluster, score it and write the report.

    Parameters
    ----------
    out : path-like
        Demo folder: ``export/`` (the AMI export and truth), ``store.zarr``, ``results/``.
    n_meters : int
        Size of the synthetic utility [meters].
    days : float
        Length of the record [days].
    workers : int, optional
        LocalCluster workers (default: one per core).
    seed : int
        Seed of the generator (and of the measurement model).

    Returns
    -------
    dict
        The score against the truth (see :func:`phaseid_hpc.score.score_frames`).
    """
    from .ingest import ingest_files
    from .jobs import run_with_cluster
    from .report import write_report
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
    print(f"      {rep}")
    print(f"[3/4] identifying phases and transformers on a local Dask cluster -> {results}")
    summary = run_with_cluster(store, results, config=cfg, spec=ClusterSpec(kind="local", n_workers=workers))
    print(f"[4/4] scoring against {export / 'truth.csv'} and writing the report")
    score = score_results(results, export / "truth.csv")
    report = write_report(results, store=store)
    print(format_score_table(score))
    print(f"\nResults: {results}  (meters.parquet, corrections.csv, transformers.parquet, summary.json, run.log)")
    print(f"Report:  {report}")
    print(f"Counts:  {summary.counts}   total {time.perf_counter() - t0:.1f} s")
    return score
