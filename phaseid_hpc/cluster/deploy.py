"""Start or join a Dask cluster from one small spec: the same command on a laptop and on a cluster.

========================  ==========================================================
``kind = "local"``        a :class:`distributed.LocalCluster` (default: all cores)
``kind = "scheduler"``    join an existing scheduler (``tcp://`` or ``tls://`` address)
``kind = "slurm"``        :class:`dask_jobqueue.SLURMCluster` (extra ``hpc``)
``kind = "gpu"``          :class:`dask_cuda.LocalCUDACluster` (extra ``gpu``), one worker per GPU
========================  ==========================================================

TLS (``distributed.security.Security``) is built from the ``[tls]`` table of a deployment config.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .._compat import require
from ..config import read_config_file
from ..errors import ClusterError, ConfigError

__all__ = ["ClusterSpec", "get_client", "load_cluster_spec", "make_security"]


@dataclass(frozen=True)
class ClusterSpec:
    """Where the job runs.

    Attributes
    ----------
    kind : {"local", "scheduler", "slurm", "gpu"}
    n_workers : int or None
        Local or GPU workers; ``None`` means one per core (local) or per GPU (gpu).
    threads_per_worker : int
        Threads per local worker. The kernels release the GIL inside BLAS, so one thread per worker
        and one worker per core is the default.
    memory_limit : str
        Per-worker memory limit (Dask syntax, e.g. ``"4GiB"`` or ``"auto"``).
    address : str or None
        Scheduler address for ``kind="scheduler"``.
    slurm : dict
        Keyword arguments for :class:`dask_jobqueue.SLURMCluster` plus ``jobs`` (how many to scale to).
    tls : dict
        ``ca_file``, ``cert``, ``key`` paths; enables TLS when present.
    dashboard_address : str
        Local dashboard address (``":0"`` or ``None`` picks a free port, so two runs never collide).
    """

    kind: Literal["local", "scheduler", "slurm", "gpu"] = "local"
    n_workers: int | None = None
    threads_per_worker: int = 1
    memory_limit: str = "auto"
    address: str | None = None
    slurm: dict[str, Any] = field(default_factory=dict)
    tls: dict[str, str] = field(default_factory=dict)
    dashboard_address: str | None = ":0"


def load_cluster_spec(path: str | os.PathLike[str]) -> ClusterSpec:
    """Read a deployment config (``configs/cluster-*.toml``).

    The file has a ``[cluster]`` table with the fields of :class:`ClusterSpec`, and optional
    ``[cluster.slurm]`` and ``[cluster.tls]`` tables.
    """
    p = Path(path)
    data = read_config_file(p, what="cluster config", toml_only=True)
    table = data.get("cluster", {})
    allowed = set(ClusterSpec.__dataclass_fields__)
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"cluster config {str(p)!r}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    if table.get("kind", "local") not in ("local", "scheduler", "slurm", "gpu"):
        raise ConfigError(
            f"cluster config {str(p)!r}: kind must be one of local, scheduler, slurm, gpu; got {table['kind']!r}"
        )
    return ClusterSpec(**table)


def make_security(tls: dict[str, str]) -> Any:
    """A :class:`distributed.security.Security` requiring TLS, from certificate paths.

    Parameters
    ----------
    tls : dict
        ``ca_file``, ``cert`` and ``key``: paths to PEM files (client and worker share them here).
    """
    from distributed.security import Security

    missing = [k for k in ("ca_file", "cert", "key") if not tls.get(k)]
    if missing:
        raise ConfigError(f"[cluster.tls] needs ca_file, cert and key; missing: {missing}")
    for k in ("ca_file", "cert", "key"):
        if not Path(tls[k]).is_file():
            raise ConfigError(f"[cluster.tls] {k} = {tls[k]!r} does not exist")
    return Security(
        tls_ca_file=tls["ca_file"],
        tls_client_cert=tls["cert"],
        tls_client_key=tls["key"],
        tls_scheduler_cert=tls["cert"],
        tls_scheduler_key=tls["key"],
        tls_worker_cert=tls["cert"],
        tls_worker_key=tls["key"],
        require_encryption=True,
    )


@contextlib.contextmanager
def get_client(spec: ClusterSpec | None = None, *, timeout_s: float = 60.0) -> Iterator[Any]:
    """Start or join the cluster a spec describes and yield a connected :class:`distributed.Client`.

    Everything started here is closed on exit; a joined external cluster is left running.
    """
    import dask
    from distributed import Client, LocalCluster

    spec = spec or ClusterSpec()
    security = make_security(spec.tls) if spec.tls else None
    cluster = None
    try:
        if spec.kind == "local":
            n = spec.n_workers or os.cpu_count() or 1
            kwargs: dict[str, Any] = dict(
                n_workers=n,
                threads_per_worker=spec.threads_per_worker,
                processes=True,
                memory_limit=spec.memory_limit,
                dashboard_address=spec.dashboard_address or ":0",
            )
            if security is not None:
                kwargs.update(security=security, protocol="tls")
            # one malloc arena per worker process: the block's arrays then come from the heap that
            # heap_for_arrays keeps (a task thread's own arena maps and faults in every large array afresh)
            with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_ARENA_MAX": 1}):
                cluster = LocalCluster(**kwargs)
            client = Client(cluster, security=security, timeout=timeout_s)
        elif spec.kind == "scheduler":
            if not spec.address:
                raise ConfigError("cluster kind 'scheduler' needs an address (e.g. tcp://host:8786)")
            try:
                client = Client(spec.address, security=security, timeout=timeout_s)
            except OSError as exc:
                raise ClusterError(
                    f"could not reach the Dask scheduler at {spec.address!r} within {timeout_s:.0f} s: {exc}"
                ) from exc
        elif spec.kind == "slurm":
            jobqueue = require("dask_jobqueue", "hpc")
            slurm = dict(spec.slurm)
            jobs = int(slurm.pop("jobs", 1))
            if security is not None:
                slurm.setdefault("security", security)
                slurm.setdefault("protocol", "tls://")
            cluster = jobqueue.SLURMCluster(**slurm)
            cluster.scale(jobs=jobs)
            client = Client(cluster, security=security, timeout=timeout_s)
        elif spec.kind == "gpu":
            dask_cuda = require("dask_cuda", "gpu")
            kwargs = dict(dashboard_address=spec.dashboard_address or ":0")
            if spec.n_workers:
                kwargs["n_workers"] = spec.n_workers
            cluster = dask_cuda.LocalCUDACluster(**kwargs)
            client = Client(cluster, timeout=timeout_s)
        else:  # pragma: no cover - guarded by load_cluster_spec
            raise ConfigError(f"unknown cluster kind {spec.kind!r}")
    except Exception:
        if cluster is not None:
            cluster.close()
        raise
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
