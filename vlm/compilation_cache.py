"""JAX's persistent compilation cache, on by default for single-process `vlm` commands that compile.

Why: compiling is most of a short run's start-up. Run again with the cache warm, the tiny dual encoder's
2-step command takes 30.5 s instead of 84.6 s, and the README run reaches step 100 at 99 s instead of 153 s
after launch (benchmarks/README.md). A cached executable is the program XLA compiled before, so results stay
bit-identical. MaxText keeps the same cache on by default (`jax_cache_dir`).

Where: $JAX_COMPILATION_CACHE_DIR when it is set (JAX reads it itself; set it empty to turn the cache
off), else $VLM_CACHE_DIR/jax, else ~/.cache/vlm/jax. Only programs that took ≥ 1 s to compile are
stored (JAX's default); a local folder is kept under MAX_BYTES by JAX's least-recently-used eviction.

Jobs of several processes get no default folder: JAX writes entries from process 0 only, so with a folder
per host process 0 would load its programs while the others compile them, and wait for them (gloo's CPU
collectives give up after 30 s). Name one folder that every host shares to use it there.

A cache entry is machine code for the CPU that compiled it: on a home folder shared by machines with
different CPUs, or where XLA rejects its own entries (jax-ml/jax#38445), set JAX_COMPILATION_CACHE_DIR=.
"""

from __future__ import annotations

import os

MAX_BYTES = 4 << 30


def default_dir() -> str:
    """$VLM_CACHE_DIR/jax, else ~/.cache/vlm/jax."""
    root = os.environ.get("VLM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "vlm")
    return os.path.join(root, "jax")


def configure(default: bool = True) -> str | None:
    """Uses $JAX_COMPILATION_CACHE_DIR when set (empty: off), else default_dir() when `default`. Must run before
    the first compile that should be cached. Returns the folder in use, or None when off. Idempotent."""
    import jax

    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        folder = os.environ["JAX_COMPILATION_CACHE_DIR"] or None
    elif default:
        folder = default_dir()
        jax.config.update("jax_compilation_cache_dir", folder)
    else:
        folder = None
    if folder and "://" not in folder and "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
        # A max size also turns on JAX's file lock (the filelock package), so two processes never read an
        # entry while the other writes it. Not on gs:// and the like: the lock would be a local file.
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return folder
