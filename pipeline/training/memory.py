"""The C allocator's settings for a training process."""

from __future__ import annotations

import ctypes
import ctypes.util

# glibc's mallopt() parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
NEVER_TRIM = 2**31 - 1


def reuse_freed_memory() -> bool:
    """Keep memory freed by one training step for the next instead of returning it to the kernel.

    Every step allocates and frees about 150 MB of activations. glibc serves blocks that large
    with fresh mmap()s, and the kernel zero-fills each new page on first touch; on virtual
    machines those page faults can cost as much as the arithmetic. Served from a heap that is
    never trimmed, every step after the first reuses pages already mapped. Returns whether the
    allocator (glibc) took the settings; elsewhere it changes nothing.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
