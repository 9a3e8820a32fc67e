"""Host allocator settings for the XLA:CPU runtime (glibc malloc), applied before JAX's backend starts.

Why: XLA:CPU allocates each step's temporaries (the tiny dual encoder's train step: ~0.7 GB) with
malloc and frees them after the step. Above glibc's mmap threshold (at most 32 MiB) every such block
is a fresh mmap, so every step page-faults through all of it again: 181k minor faults and 0.41 s of
kernel time per tiny step on the 2-core CPU machine, ~20 % of the step (benchmarks/README.md).
Serving large blocks from the heap, keeping freed memory for reuse instead of trimming it, and one
arena (XLA's worker threads otherwise each grow their own mmap'd heaps) brings that to 0 faults.

The cost: the process keeps its peak heap (it is not returned to the OS until exit), as with
TCMalloc or jemalloc, which PyTorch's CPU tuning guides recommend for the same reason.

`configure()` must run before the first JAX computation (threads created earlier keep their arenas):
`vlm` commands call it first thing. Set VLM_HOST_MALLOC=system to keep glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

_configured: bool | None = None


def configure() -> bool:
    """Tunes glibc malloc for XLA:CPU (see the module docstring). Returns whether it was applied: False
    off Linux/glibc, with VLM_HOST_MALLOC=system, or if mallopt refuses. Idempotent."""
    global _configured
    if _configured is not None:
        return _configured
    _configured = False
    if os.environ.get("VLM_HOST_MALLOC", "") == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success. Order: the arena limit first, as it only affects arenas made later.
    _configured = all(mallopt(param, value) == 1 for param, value in (
        (M_ARENA_MAX, 1),  # one arena: worker threads allocate from the main heap, which is reused
        (M_MMAP_MAX, 0),  # never serve a block by mmap (each would be unmapped on free and faulted in again)
        # keep freed heap memory for the next step instead of returning it: -1 = never trim (mallopt(3)). The
        # largest int, 2**31 - 1, is not enough: strace of a tiny run whose train step came from the
        # compilation cache showed glibc trimming 2.16 GB off the heap's top mid-run, which the next steps
        # faulted in again (tests/test_host_memory.py frees 2.2 GB: 537k faults per reuse before, 0 now).
        (M_TRIM_THRESHOLD, -1),
    ))
    return _configured
