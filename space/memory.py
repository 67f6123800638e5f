"""Host memory: how the C library hands large activations to a training step and takes them back.

A training step allocates and frees hundreds of activations of 1 to 200 MiB. glibc serves blocks above
its mmap threshold with fresh mappings that go back to the system when freed, and the rest from its heap,
whose freed space it keeps and reuses; the threshold starts at 128 KiB and rises with the blocks freed, up
to 32 MiB. Every fresh mapping costs the kernel a page fault and a zeroed page per 4 KiB touched, which on
the machines measured was a fifth to a third of a 3D-Room step's time (BENCHMARKS.md, "Host memory").

train.host_allocator picks one of three behaviours, set once before any tensor exists:
- "heap": no block is mapped (mallopt M_MMAP_MAX 0); every activation comes from the heap, and a freed
  block is reused by the next step without a fault. The fastest; the resident peak is higher by the heap's
  fragmentation.
- "lean": the threshold fixed at train.malloc_mmap_threshold_mib (mallopt M_MMAP_THRESHOLD), with PyTorch's
  switch THP_MEM_ALLOC_ENABLE backing its blocks with transparent huge pages (512 times fewer faults): every
  block above the threshold goes back to the system when freed, for the lowest resident peak.
- "glibc": the C library's own dynamic threshold.
"""

from __future__ import annotations

import ctypes
import os
import sys

from .config import HOST_ALLOCATORS

# glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4


def set_host_allocator(mode: str, mmap_threshold_mib: int = 1) -> bool:
    """Set how glibc serves large blocks (train.host_allocator, module docstring); "lean" uses
    mmap_threshold_mib (train.malloc_mmap_threshold_mib).

    PyTorch reads THP_MEM_ALLOC_ENABLE once, at its first allocation, so call this before any tensor
    exists (an explicit THP_MEM_ALLOC_ENABLE in the environment wins). Returns whether glibc took the
    setting (False for "glibc", for "lean" with 0, and off Linux/glibc)."""
    if mode not in HOST_ALLOCATORS:
        raise ValueError(f"train.host_allocator: one of {', '.join(HOST_ALLOCATORS)}, got {mode!r}")
    if mode == "glibc" or (mode == "lean" and mmap_threshold_mib <= 0) or not sys.platform.startswith("linux"):
        return False
    if mode == "lean":
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    if mode == "heap":
        return bool(libc.mallopt(M_MMAP_MAX, 0))
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold_mib) << 20))
