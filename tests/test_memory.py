"""Tests of phaseid_hpc/_memory.py: where a block's arrays come from (glibc on Linux only)."""

from __future__ import annotations

import numpy as np
import pytest

from phaseid_hpc._memory import _glibc, heap_for_arrays

pytestmark = pytest.mark.skipif(_glibc() is None, reason="glibc's mallopt is not available on this platform")


def _in_heap(address: int) -> bool:
    """Whether ``address`` lies in the process's brk heap (``[heap]`` of /proc/self/maps)."""
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith("[heap]"):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                if lo <= address < hi:
                    return True
    return False


def test_large_arrays_come_from_the_heap_inside_the_context_only():
    n = 100 * 2**20 // 8  # 100 MB: far above glibc's largest map threshold (32 MB)
    outside = np.empty(n)
    assert not _in_heap(outside.ctypes.data)  # glibc maps it afresh
    del outside
    with heap_for_arrays():
        a = np.empty(n)
        assert _in_heap(a.ctypes.data)
        del a
        b = np.empty(n)  # freed memory is kept and reused: again from the heap
        assert _in_heap(b.ctypes.data)
        del b
    after = np.empty(n)  # settings restored on exit
    assert not _in_heap(after.ctypes.data)
