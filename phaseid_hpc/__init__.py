"""phaseid-hpc: map smart meters to their service transformer and phase from AMI voltage, at utility scale.

The data flows one way: contract files -> Zarr store -> feeder partitions -> array kernels ->
consolidated results -> report. See the README for the data contract and the CLI.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("phaseid-hpc")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0+unknown"

from .config import RunConfig, load_config
from .errors import (
    ClusterError,
    ConfigError,
    ContractError,
    PhaseIDError,
    StoreError,
)

__all__ = [
    "ClusterError",
    "ConfigError",
    "ContractError",
    "PhaseIDError",
    "RunConfig",
    "StoreError",
    "__version__",
    "load_config",
]
