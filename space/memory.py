"""Host memory: how the C library hands large activations to a training step and takes them back.

A training step allocates and frees hundreds of activations of 1 to 200 MiB. glibc serves blocks above
its mmap threshold with fresh mappings that go back to the system when freed, and the rest from its heap,
whose freed space it keeps and reuses; the threshold starts at 128 KiB and rises with the blocks freed, up
to 32 MiB. Every fresh mapping costs the kernel a page fault and a zeroed page per 4 KiB touched, which on
the machines measured was a fifth to a third of a 3D-Room step's time (BENCHMARKS.md, "Host memory").

train.host_allocator picks one of these, set once before any tensor exists:
- "tcmalloc": gperftools' tcmalloc serves every allocation instead of glibc. It keeps freed blocks for
  reuse as glibc's heap does, without the heap's fragmentation: measured 8-11% faster than "heap" on the
  paper presets, in a fifth less resident memory. It must be loaded before the process starts
  (LD_PRELOAD), so `python -m space train` runs itself again with it preloaded (`exec_with_tcmalloc`).
- "heap": no block is mapped (mallopt M_MMAP_MAX 0); every activation comes from glibc's heap, and a
  freed block is reused by the next step without a fault. The resident peak is higher by the heap's
  fragmentation.
- "lean": the threshold fixed at train.malloc_mmap_threshold_mib (mallopt M_MMAP_THRESHOLD), with PyTorch's
  switch THP_MEM_ALLOC_ENABLE backing its blocks with transparent huge pages (512 times fewer faults): every
  block above the threshold goes back to the system when freed, for the lowest resident peak.
- "glibc": the C library's own dynamic threshold.
- "auto" (the default): "tcmalloc" where it is installed (Debian and Ubuntu: `apt install
  libtcmalloc-minimal4`; conda: `gperftools`), else "heap".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import warnings
from pathlib import Path

from .config import HOST_ALLOCATORS, ConfigError

# glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4


# gperftools' tcmalloc, by the names its packages install (libtcmalloc-minimal4, conda's gperftools)
TCMALLOC_FILES = ("libtcmalloc_minimal.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so.4", "libtcmalloc.so")
# Set by `exec_with_tcmalloc` for the command it runs again: LD_PRELOAD as it was before, so that it is
# restored for the processes this one starts, and so that a preload that did not take is not tried twice.
PRELOAD_MARK = "SPACE_LD_PRELOAD_BEFORE"


def find_tcmalloc() -> str | None:
    """tcmalloc's library: in the Python environment's lib folder (conda's gperftools), else where the
    system's loader finds it (apt's libtcmalloc-minimal4); None if neither has it."""
    for name in TCMALLOC_FILES:
        path = Path(sys.prefix) / "lib" / name
        if path.is_file():
            return str(path)
    for name in ("tcmalloc_minimal", "tcmalloc"):
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def tcmalloc_loaded() -> bool:
    """Whether tcmalloc serves this process's allocations (it is mapped into it)."""
    try:
        return "libtcmalloc" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def exec_with_tcmalloc(mode: str) -> None:
    """For a command started from the shell (`python -m space train`, a bench script), before it has done
    anything: if train.host_allocator `mode` wants tcmalloc and it is not loaded, run the same command
    again (os.execve: the same process id) with the library in LD_PRELOAD. Returns when there is nothing to
    do; raises ConfigError for "tcmalloc" where it cannot be preloaded. In the command run again,
    LD_PRELOAD is restored to what it was, so the processes it starts are not preloaded by this.

    "auto" leaves the process as it is where the user preloads something already (another allocator, a
    sanitizer, which must come first), under a debugger or coverage (sys.gettrace: running again would
    restart them), and where the library's path would not survive LD_PRELOAD's spaces and colons."""
    if PRELOAD_MARK in os.environ:  # this is the command run again (or preloading did not take): once only
        before = os.environ.pop(PRELOAD_MARK)
        if before:
            os.environ["LD_PRELOAD"] = before
        else:
            os.environ.pop("LD_PRELOAD", None)
        return
    if mode not in ("tcmalloc", "auto") or tcmalloc_loaded():
        return
    preloaded = os.environ.get("LD_PRELOAD", "").strip()
    if mode == "auto" and (preloaded or sys.gettrace() is not None):
        return
    library = find_tcmalloc() if sys.platform.startswith("linux") else None
    if library is None:
        if mode == "tcmalloc":
            raise ConfigError("train.host_allocator=tcmalloc: tcmalloc is not installed; install it (Debian and "
                              "Ubuntu: apt install libtcmalloc-minimal4, conda: gperftools) or set "
                              "train.host_allocator=auto (tcmalloc where installed, else heap)")
        return
    if any(c in library for c in " :\t"):
        if mode == "tcmalloc":
            raise ConfigError(f"train.host_allocator=tcmalloc: the library's path {library!r} has a space or a colon, "
                              "which LD_PRELOAD cannot carry; install it where the path has neither, or set "
                              "train.host_allocator=auto (tcmalloc where it can be preloaded, else heap)")
        return
    env = dict(os.environ)
    env[PRELOAD_MARK] = preloaded
    env["LD_PRELOAD"] = " ".join(filter(None, [library, preloaded]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def set_host_allocator(mode: str, mmap_threshold_mib: int = 1) -> str:
    """Set how large blocks are served (train.host_allocator, module docstring); "lean" uses
    mmap_threshold_mib (train.malloc_mmap_threshold_mib). Returns the allocator in effect: "tcmalloc" when
    it serves this process (for "tcmalloc" and "auto"; `exec_with_tcmalloc` preloads it), else glibc's
    setting as taken ("heap", "lean"), or "glibc" where glibc did not take one (off Linux, "lean" with 0).
    "tcmalloc" asked for where it is not loaded (training started from Python, not from the shell) warns
    and takes "heap".

    PyTorch reads THP_MEM_ALLOC_ENABLE once, at its first allocation, so call this before any tensor
    exists (an explicit THP_MEM_ALLOC_ENABLE in the environment wins)."""
    if mode not in HOST_ALLOCATORS:
        raise ValueError(f"train.host_allocator: one of {', '.join(HOST_ALLOCATORS)}, got {mode!r}")
    if mode in ("tcmalloc", "auto"):
        if tcmalloc_loaded():
            return "tcmalloc"
        if mode == "tcmalloc":
            warnings.warn("train.host_allocator=tcmalloc: tcmalloc is not loaded in this process (it must be "
                          "preloaded at start-up, as `python -m space train` does); using heap", stacklevel=2)
        mode = "heap"
    if mode == "glibc" or (mode == "lean" and mmap_threshold_mib <= 0) or not sys.platform.startswith("linux"):
        return "glibc"
    if mode == "lean":
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return "glibc"
    if mode == "heap":
        return "heap" if libc.mallopt(M_MMAP_MAX, 0) else "glibc"
    return "lean" if libc.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold_mib) << 20) else "glibc"
