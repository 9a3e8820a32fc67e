"""vlm/host_memory.py: with it, XLA:CPU's per-call temporaries stop page-faulting in afresh each call."""

import subprocess
import sys
import textwrap

import pytest

# Minor page faults over 8 calls of a jitted function with a 36 MB temporary, after 2 warm-up calls.
PROBE = textwrap.dedent("""
    import resource, sys
    from vlm import host_memory
    applied = host_memory.configure()
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x: jnp.tanh(x @ x.T) @ x)  # a [3000, 3000] float32 temporary: 36 MB, over glibc's
    x = jnp.ones((3000, 512))                     # largest mmap threshold (32 MiB)
    for _ in range(2):
        f(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):
        f(x).block_until_ready()
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _probe_output(probe: str, malloc: str) -> list[str]:
    """The last two words a probe prints, run with VLM_HOST_MALLOC=malloc ("" = vlm's tuning, "system")."""
    import os

    # conftest.py sets VLM_HOST_MALLOC=system and the test XLA_FLAGS for the processes tests start
    env = {**os.environ, "VLM_HOST_MALLOC": malloc, "XLA_FLAGS": ""}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300,
                         check=True)
    return out.stdout.split()[-2:]


def _faults(env_value: str) -> tuple[str, int]:
    applied, faults = _probe_output(PROBE, env_value)
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_tuned_malloc_stops_per_call_page_faults():
    applied, tuned = _faults("")
    default_applied, default = _faults("system")
    assert (applied, default_applied) == ("True", "False")
    # glibc's defaults mmap each large temporary and unmap it on free: every call faults it in again
    # (measured: 78-79k faults over the 8 calls). Tuned, freed blocks are reused; the heap still grows now
    # and then while fragmentation settles (measured: 11-18k).
    assert default > 8 * 8_000, default
    assert tuned < 0.6 * default, (tuned, default)


# Faults of reusing a 2.2 GB block, malloc'd, filled and freed twice: its free leaves > 2**31 - 1 bytes at
# the heap's top, over the largest trim threshold mallopt takes as a positive int.
TRIM_PROBE = textwrap.dedent("""
    import ctypes, resource
    from vlm import host_memory
    assert host_memory.configure()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
    n = 2_200_000_000
    faults = []
    for _ in range(2):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(n)
        ctypes.memset(p, 1, n)
        libc.free(p)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(*faults)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_freed_heap_over_2_gib_is_kept():
    first, second = map(int, _probe_output(TRIM_PROBE, ""))
    # The first fill faults in all 537k pages; with the old threshold (2**31 - 1) glibc trimmed the freed
    # top and the second fill faulted all of them again (measured: 537,077); never trimming, it faults none.
    assert first > 500_000, first
    assert second < 1_000, second
