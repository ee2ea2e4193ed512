"""Dask deployment only: local cluster, existing scheduler, SLURM (dask-jobqueue), GPU (dask-cuda), TLS.

Backends are imported lazily, so importing :mod:`phaseid_hpc` never imports dask-jobqueue or dask-cuda.
Clustering of *meters* lives in :mod:`phaseid_hpc.kernels`, never here.
"""

from .deploy import ClusterSpec, get_client, load_cluster_spec

__all__ = ["ClusterSpec", "get_client", "load_cluster_spec"]
