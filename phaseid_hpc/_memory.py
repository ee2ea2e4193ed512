"""Process memory settings for array-heavy blocks of work (Dask workers)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator

__all__ = ["heap_for_arrays"]


@contextlib.contextmanager
def heap_for_arrays() -> Iterator[None]:
    """Keep freed array memory for reuse while a block runs, where the process asked glibc to return it at once.

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_`` set, which also pins glibc's mmap threshold
    at 128 kB: then every temporary array is a fresh mmap whose pages fault in one by one (a third of a
    generator worker's CPU time). Inside this context large arrays come from the heap (up to glibc's
    32 MB mmap limit) and freed memory is kept; on exit it is trimmed and the settings from the
    environment are restored. Elsewhere (no such variable, or not glibc) it does nothing.
    """
    trim_env = os.environ.get("MALLOC_TRIM_THRESHOLD_")
    libc = None
    if trim_env is not None and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError:
            libc = None
    if libc is None:
        yield
        return
    m_trim, m_mmap = -1, -3  # mallopt parameters M_TRIM_THRESHOLD, M_MMAP_THRESHOLD
    libc.mallopt(m_mmap, 32 * 2**20)
    libc.mallopt(m_trim, 2**30)
    try:
        yield
    finally:
        libc.mallopt(m_trim, int(trim_env))
        libc.mallopt(m_mmap, int(os.environ.get("MALLOC_MMAP_THRESHOLD_", "131072")))
        libc.malloc_trim(0)
