"""Run the job on a cluster described by a :class:`~phaseid_hpc.cluster.ClusterSpec` (what ``phaseid run`` calls)."""

from __future__ import annotations

import os
from typing import Any

from .cluster import ClusterSpec, get_client
from .config import RunConfig
from .pipeline import RunSummary, check_output_writable, run_job

__all__ = ["run_with_cluster"]


def run_with_cluster(
    store: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    config: RunConfig | None = None,
    spec: ClusterSpec | None = None,
    in_process: bool = False,
    progress: bool = True,
    log_json: bool = False,
    since: str | os.PathLike[str] | None = None,
    events: str | os.PathLike[str] | None = None,
    echo: Any = print,
) -> RunSummary:
    """Start or join the cluster, run :func:`~phaseid_hpc.pipeline.run_job`, close what was started.

    The output folder is checked writable before any cluster starts, so a permissions problem fails at once
    with a clear message instead of after minutes of work.

    Parameters
    ----------
    store, out : path-like
        Input store and results folder.
    config : RunConfig, optional
    spec : ClusterSpec, optional
        Where to run (default: a LocalCluster with one worker per core).
    in_process : bool
        Run blocks in this process without Dask distributed (debugging, tiny stores).
    progress, log_json : bool
        Terminal progress bar; JSON-lines ``run.log``.
    since, events : path-like, optional
        Delta run: previous results folder and an events CSV (``meter_id, timestamp, event``); only the
        feeders with events are recomputed, the rest is copied from ``since``.
    """
    config = config or RunConfig()
    check_output_writable(out)
    kwargs: dict[str, Any] = dict(config=config, progress=progress, log_json=log_json, echo=echo)
    if since is not None or events is not None:
        from .delta import run_delta

        runner: Any = run_delta
        kwargs.update(since=since, events=events)
    else:
        runner = run_job
    if in_process:
        return runner(store, out, client=None, **kwargs)
    with get_client(spec or ClusterSpec()) as client:
        return runner(store, out, client=client, **kwargs)
