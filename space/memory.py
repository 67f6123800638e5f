"""Host memory: how the C library hands large activations back to the system.

A training step allocates and frees hundreds of activations of 1 to 200 MiB. glibc serves blocks above
its mmap threshold with fresh mappings that go back to the system when freed, and the rest from its heap,
whose freed space stays resident; the threshold starts at 128 KiB but rises to 32 MiB after the first
large free, so most activations end up in the heap and the process's resident peak grows by the heap's
fragmentation. Fixing the threshold (mallopt M_MMAP_THRESHOLD) keeps it where it started being useful,
and PyTorch's own switch THP_MEM_ALLOC_ENABLE backs its allocations with transparent huge pages, so the
fresh mappings cost 512 times fewer page faults. Measured in BENCHMARKS.md ("SPACE training step").
"""

from __future__ import annotations

import ctypes
import os
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def lean_host_allocator(mmap_threshold_mib: int) -> bool:
    """Fix glibc's mmap threshold at this many MiB and turn on PyTorch's huge-page allocations.

    0 leaves the C library alone. PyTorch reads THP_MEM_ALLOC_ENABLE once, at its first allocation, so
    call this before any tensor exists (an explicit THP_MEM_ALLOC_ENABLE in the environment wins).
    Returns whether the threshold was set (False off Linux/glibc)."""
    if mmap_threshold_mib <= 0 or not sys.platform.startswith("linux"):
        return False
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold_mib) << 20))
