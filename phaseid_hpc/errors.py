"""One exception hierarchy for phaseid-hpc.

Per-meter data problems are *results* (reason codes in the output), never exceptions. Exceptions are for
problems that stop a whole stage: an unreadable file, a store that does not match the contract, a bad
configuration key. Every message names the file, row, meter or key, what was expected and what was found.
"""

from __future__ import annotations


class PhaseIDError(Exception):
    """Base class of every error raised on purpose by phaseid-hpc."""


class ConfigError(PhaseIDError, ValueError):
    """A configuration key is missing, unknown or has a value outside the allowed set."""


class ContractError(PhaseIDError, ValueError):
    """An input file does not follow the data contract (missing column, unknown phase label, ...)."""


class StoreError(PhaseIDError):
    """The Zarr store is missing, corrupt, or does not match what the operation expects."""


class ClusterError(PhaseIDError):
    """A Dask deployment could not be started or reached."""


class BackendUnavailableError(PhaseIDError, ImportError):
    """An optional backend (CuPy, dask-cuda, dask-jobqueue) was asked for but cannot be used here."""


class DataError(ContractError):
    """An input's content is unusable: an empty, garbage or truncated file, a column of the wrong type.

    The command line exits with status 2 for it (as for every :class:`PhaseIDError`), distinct from a crash.
    """
