"""JAX's persistent compilation cache, on by default for `vlm` commands.

Why: compiling is most of a short run's start-up. The tiny dual encoder's README command spends ~50 s of
its first minute in XLA (train step 32-41 s, parameter init 7-8 s, eval 2-3 s on the 2-core CPU machine);
run again with the cache warm, the whole 2-step command takes 29 s instead of 71 s (benchmarks/README.md).
A cached executable is the program XLA compiled before, so results stay bit-identical. MaxText keeps the
same cache on by default (`jax_cache_dir`).

Where: $JAX_COMPILATION_CACHE_DIR when it is set (JAX reads it itself; set it empty to turn the cache
off), else $VLM_CACHE_DIR/jax, else ~/.cache/vlm/jax. Only programs that took ≥ 1 s to compile are
stored (JAX's default), and the folder is kept under MAX_BYTES by JAX's least-recently-used eviction. On
a multi-host job JAX writes entries from process 0 only: point every host at one shared folder (a
gs:// path works) for the others to hit too.

`configure()` must run before the first compile: `vlm` commands call it first thing.
"""

from __future__ import annotations

import os

MAX_BYTES = 4 << 30

_configured_dir: str | None = None


def default_dir() -> str:
    """$VLM_CACHE_DIR/jax, else ~/.cache/vlm/jax."""
    root = os.environ.get("VLM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "vlm")
    return os.path.join(root, "jax")


def configure(default: bool = True) -> str | None:
    """Turns the cache on in default_dir() (when `default`) unless $JAX_COMPILATION_CACHE_DIR decides (set: JAX
    uses it; empty: off). Returns the folder in use, or None when off. Idempotent."""
    global _configured_dir
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        _configured_dir = os.environ["JAX_COMPILATION_CACHE_DIR"] or None
        return _configured_dir
    if _configured_dir is None and default:
        import jax

        _configured_dir = default_dir()
        jax.config.update("jax_compilation_cache_dir", _configured_dir)
        if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
            # A max size also turns on JAX's file lock (the filelock package), so two processes never read an
            # entry while the other writes it.
            jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return _configured_dir
