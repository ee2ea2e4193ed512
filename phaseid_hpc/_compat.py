"""The one gate for optional backends (CuPy, dask-cuda, dask-jobqueue).

Nothing GPU-related is imported when :mod:`phaseid_hpc` is imported. CuPy imports fine on a machine without
a GPU and fails at first use, so real capability is checked here, once, and nowhere else.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any

import numpy as np

from .errors import BackendUnavailableError

__all__ = ["array_namespace", "get_xp", "gpu_available", "require", "to_numpy"]


@functools.cache
def gpu_available() -> bool:
    """Return True when CuPy is installed *and* a CUDA device can run a kernel."""
    try:
        import cupy

        if not cupy.cuda.is_available():
            return False
        # A real round trip: driver/runtime mismatches only show at first use.
        return bool(int((cupy.arange(3) + 1).sum()) == 6)
    except Exception:  # pragma: no cover - depends on the machine
        return False


def require(module: str, extra: str) -> ModuleType:
    """Import an optional module or raise a clear error naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendUnavailableError(
            f"{module!r} is needed for this feature but is not installed; "
            f"install it with: pip install 'phaseid-hpc[{extra}]'"
        ) from exc


def get_xp(device: str = "cpu") -> ModuleType:
    """Array namespace for a device name.

    Parameters
    ----------
    device : {"cpu", "gpu"}
        ``"cpu"`` gives NumPy; ``"gpu"`` gives CuPy and fails clearly when no usable GPU is present.
    """
    if device == "cpu":
        return np
    if device == "gpu":
        if not gpu_available():
            raise BackendUnavailableError(
                "device='gpu' was requested but CuPy cannot use a CUDA device on this machine "
                "(install phaseid-hpc[gpu] on a machine with an NVIDIA GPU, or use device='cpu')"
            )
        import cupy

        return cupy
    raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")


def array_namespace(*arrays: Any) -> ModuleType:
    """The array-API namespace of the inputs (NumPy, CuPy, array-api-strict, ...)."""
    from array_api_compat import array_namespace as _ns

    return _ns(*arrays)


def to_numpy(x: Any) -> np.ndarray:
    """Copy any supported array (NumPy, CuPy, array-api-strict) to a NumPy array on the host."""
    if isinstance(x, np.ndarray):
        return x
    mod = type(x).__module__
    if mod.startswith("cupy"):
        return x.get()
    return np.asarray(x)
