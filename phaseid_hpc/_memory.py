"""Process memory settings for array-heavy blocks of work (Dask workers)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator

__all__ = ["heap_for_arrays"]


#: mallopt parameters (glibc malloc.h) and glibc's defaults, restored after a block where the environment
#: does not set them
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_DEFAULTS = {
    _M_TRIM_THRESHOLD: ("MALLOC_TRIM_THRESHOLD_", 128 * 1024),
    _M_MMAP_THRESHOLD: ("MALLOC_MMAP_THRESHOLD_", 128 * 1024),
    _M_MMAP_MAX: ("MALLOC_MMAP_MAX_", 65536),
}


def _glibc() -> ctypes.CDLL | None:
    """The C library where it is glibc (whose ``mallopt`` this module sets), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return None
    return libc


@contextlib.contextmanager
def heap_for_arrays() -> Iterator[None]:
    """Serve every array of a block from the heap and keep freed memory for the next one; trim after.

    glibc hands out large allocations as fresh memory maps whose pages fault in one by one, every time: a
    block allocates hundreds of (meter, time) temporaries, and faulting them in cost a third of a block's
    CPU (more where Dask's nanny sets ``MALLOC_TRIM_THRESHOLD_``, which also pins the map threshold at
    128 kB). Inside this context the heap serves them (``M_MMAP_MAX = 0``; a thread with its own malloc
    arena still maps what exceeds that arena's 64 MB heaps, hence ``MALLOC_ARENA_MAX=1`` on the local
    cluster's workers) and freed memory stays for reuse (``M_TRIM_THRESHOLD`` 1 GiB); on exit the settings
    of the environment (or glibc's defaults) are restored and the free memory is returned to the system.
    Elsewhere (not glibc) it does nothing.
    """
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**30)
    try:
        yield
    finally:
        for param, (env, default) in _DEFAULTS.items():
            libc.mallopt(param, int(os.environ.get(env, default)))
        libc.malloc_trim(0)
