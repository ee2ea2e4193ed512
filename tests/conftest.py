"""Shared fixtures and markers: the shared dataset gate, a GPU gate, an in-process Dask client."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CKT5 = SHARED / "data" / "epri-ckt5"


def ckt5_path() -> Path:
    """Path of the shared ckt5 dataset, or skip the calling test with the reason."""
    if not (CKT5 / "readings.parquet").is_file():
        pytest.skip(f"shared dataset not found at {CKT5} (only present beside the developers' checkout)")
    return CKT5


def requires_gpu(func):
    """Mark a test as needing CuPy on a real CUDA device (the one gate: phaseid_hpc._compat)."""
    from phaseid_hpc._compat import gpu_available

    return pytest.mark.requires_gpu(
        pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA device")(func)
    )


@pytest.fixture
def ckt5() -> Path:
    return ckt5_path()
