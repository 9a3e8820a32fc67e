"""XLA flags chosen by the config (`config.xla_flags`), set before JAX's backend starts.

Why: the flags a pod or GPU job needs belong with the rest of its config, not in a launch script
that a rerun can forget. `config.xla_flags` maps a platform to flags:

    c.xla_flags = dict(gpu=("--xla_gpu_enable_latency_hiding_scheduler=true",))

XLA reads XLA_FLAGS once, when the backend starts; later changes are ignored. So `vlm train` applies
them first thing (vlm/main.py), and `train.train` does when called before anything else touched JAX;
otherwise it says in one line that they were not applied. Flags already in the environment's
XLA_FLAGS win over the config's (a launch script's choice is deliberate) and are named in the log.

The platform is the one JAX will pick: the first of JAX_PLATFORMS when set, else TPU when libtpu is
installed, else GPU when a CUDA or ROCm plugin is, else CPU (jax's own order of preference). An
unknown flag name would abort the process when the backend starts; `apply` tries the flags in a
CPU-only subprocess first (1.2 s here) and raises a one-line ConfigError instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import re
import subprocess
import sys
from collections.abc import Callable, Mapping

from vlm.errors import ConfigError

PLATFORMS = ("cpu", "gpu", "tpu")
# What NVIDIA's JAX-Toolbox images bake in and MaxText's GPU guides start from: let the scheduler move
# collectives (FSDP all-gathers, gradient reduce-scatters) to overlap with compute.
GPU_FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true",)
_FLAG = re.compile(r"--(xla_[a-z0-9_]+)=(\S*)")


def check(flags: Mapping) -> dict[str, tuple[str, ...]]:
    """config.xla_flags → {platform: flags}; raises ConfigError on an unknown platform or a malformed flag."""
    out = {}
    for platform, values in dict(flags or {}).items():
        if platform not in PLATFORMS:
            raise ConfigError(f"config.xla_flags has platform {platform!r}; use {', '.join(PLATFORMS)}")
        values = (values,) if isinstance(values, str) else tuple(values or ())
        for flag in values:
            if not isinstance(flag, str) or not _FLAG.fullmatch(flag):
                raise ConfigError(f"config.xla_flags.{platform} has {flag!r}; each flag is one '--xla_name=value' "
                                  f"string, e.g. '--xla_gpu_enable_latency_hiding_scheduler=true'")
        out[platform] = values
    return out


def platform() -> str:
    """The platform JAX will start: JAX_PLATFORMS's first entry, else TPU > GPU > CPU by installed plugins."""
    requested = os.environ.get("JAX_PLATFORMS", "").split(",")[0].strip().lower()
    if requested:
        return {"cuda": "gpu", "rocm": "gpu"}.get(requested, requested)
    if importlib.util.find_spec("libtpu") is not None:
        return "tpu"
    # jax-cuda12-plugin and its kin install `jax_cuda12_plugin` and `jax_plugins.xla_cuda12` (ROCm alike).
    names = {m.name for m in pkgutil.iter_modules()}
    if importlib.util.find_spec("jax_plugins") is not None:
        names |= {m.name for m in pkgutil.iter_modules(importlib.import_module("jax_plugins").__path__)}
    if any(re.fullmatch(r"(jax_(cuda|rocm)\d+_plugin|xla_(cuda|rocm)\d+)", name) for name in names):
        return "gpu"
    return "cpu"


def merge(environment: str, flags: tuple[str, ...]) -> tuple[str, list[str], list[str]]:
    """(XLA_FLAGS with the config's flags it lacks appended, those flags, the config's flag names it sets to other
    values)."""
    present = {m.group(1): m.group(2) for m in _FLAG.finditer(environment)}
    named = [(*_FLAG.fullmatch(f).groups(), f) for f in flags]  # (name, value, flag); check() vetted the format
    kept = [name for name, value, _ in named if name in present and present[name] != value]
    added = [flag for name, _, flag in named if name not in present]
    return " ".join([environment.strip(), *added]).strip(), added, kept


def _try_in_subprocess(value: str) -> None:
    """Starts a CPU backend with XLA_FLAGS=value in a child; raises ConfigError with XLA's line if it aborts."""
    env = {**os.environ, "XLA_FLAGS": value, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env, capture_output=True,
                            text=True, timeout=300)
    if result.returncode:
        lines = [l for l in result.stderr.splitlines() if "XLA_FLAGS" in l or "flag" in l.lower()]
        why = (lines or result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
        why = why.split("] ", 1)[-1]  # drop absl's "F1129 15:40:18.2 12743 file.cc:234] " prefix
        raise ConfigError(f"config.xla_flags: XLA refuses them ({why}); fix or remove the flag "
                          f"(`XLA_FLAGS=--help python -c 'import jax; jax.devices()'` lists this jaxlib's flags)")


def apply(xla_flags: Mapping, log: Callable[[str], None] = print) -> list[str]:
    """Adds config.xla_flags for this platform to XLA_FLAGS before the backend starts. Returns the flags added.

    `log` is called only after XLA_FLAGS is set, so a logger that touches JAX cannot start the backend early.
    """
    checked = check(xla_flags)
    if not any(checked.values()):  # the common case: no plugin scan
        return []
    where = platform()
    flags = checked.get(where, ())
    if not flags:
        return []
    from jax._src import xla_bridge

    environment = os.environ.get("XLA_FLAGS", "")
    value, added, kept = merge(environment, flags)
    lines = [f"XLA_FLAGS from the environment keep their values for {', '.join(kept)} (config.xla_flags differs)"
             ] if kept else []
    if added and xla_bridge.backends_are_initialized():
        lines.append(f"config.xla_flags not applied: JAX's backend started before them ({' '.join(added)}); put them "
                     f"in XLA_FLAGS before starting Python, or train with `vlm train`")
        added = []
    elif added:
        _try_in_subprocess(value)
        os.environ["XLA_FLAGS"] = value
        lines.append(f"XLA_FLAGS += {' '.join(added)} (config.xla_flags, {where})")
    for line in lines:
        log(line)
    return added
