"""The array backends every kernel is tested on: NumPy and the array-API reference (array-api-strict)."""

from __future__ import annotations

import numpy as np
import pytest

from phaseid_hpc._compat import to_numpy

array_api_strict = pytest.importorskip("array_api_strict")

#: Every kernel runs on NumPy and on the array-API reference namespace.
BACKENDS = pytest.mark.parametrize("xp", [np, array_api_strict], ids=["numpy", "array_api_strict"])


def to_np(x) -> np.ndarray:
    """Any backend's array as a NumPy array (for assertions)."""
    return np.asarray(to_numpy(x))
