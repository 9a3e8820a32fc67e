"""One-line checks of config values, for `vlm/config.py` and for each task's `validate()`.

Every check takes the config and a dotted key and raises a ConfigError naming the key, its value
and what it must be:

    config_checks.integer(c, "data.num_frames", low=1)        # config.data.num_frames=0 must be an integer ≥ 1
    config_checks.number(c, "optim.lr", low=0, low_open=True)  # finite, > 0
    config_checks.one_of(c, "optim.schedule", SCHEDULES)
    config_checks.transformer(c, "model.video")               # width, depth, num_heads, mlp_dim; width % num_heads

A task checks its own keys in `Task.validate()` (called from `Task.__init__`, which
`vlm.config.validate` runs before anything is built), so a new family adds its checks there and
the trainer's stay in `vlm/config.py`. A leaf module: it imports nothing of vlm but the errors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from vlm.errors import ConfigError


def get(config, key: str) -> Any:
    """config["a"]["b"] for key "a.b"."""
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(config, key: str, *, low: int | None = None, high: int | None = None) -> int:
    """An int (not a bool) in [low, high]."""
    value = get(config, key)
    if not is_int(value) or (low is not None and value < low) or (high is not None and value > high):
        bounds = _bounds(low, high, False, False)
        raise ConfigError(f"config.{key}={value!r} must be an integer{bounds}")
    return value


def number(config, key: str, *, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> float:
    """A finite int or float in the interval (open ends where asked)."""
    value = get(config, key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ConfigError(f"config.{key}={value!r} must be a finite number{_bounds(low, high, low_open, high_open)}")
    return float(value)


def boolean(config, key: str) -> bool:
    value = get(config, key)
    if not isinstance(value, bool):
        raise ConfigError(f"config.{key}={value!r} must be True or False")
    return value


def one_of(config, key: str, choices: Sequence[Any]) -> Any:
    value = get(config, key)
    if value not in choices:
        raise ConfigError(f"config.{key}={value!r} is unknown; choose one of {', '.join(map(str, choices))}")
    return value


def integers(config, key: str, length: int, *, low: int = 1) -> tuple[int, ...]:
    """A sequence of `length` ints, each ≥ low (e.g. a tubelet (t, p, q))."""
    value = get(config, key)
    items = tuple(value) if isinstance(value, (list, tuple)) else None
    if items is None or len(items) != length or not all(is_int(v) and v >= low for v in items):
        raise ConfigError(f"config.{key}={value!r} must be {length} integers ≥ {low}")
    return items


def divisible(config, key: str, by_key: str) -> None:
    """config[key] % config[by_key] == 0 (both already checked to be positive ints)."""
    value, by = get(config, key), get(config, by_key)
    if value % by:
        raise ConfigError(f"config.{key}={value} is not divisible by config.{by_key}={by}; "
                          f"use a multiple of {by} (e.g. {max(by, value // by * by)})")


def transformer(config, key: str) -> None:
    """A transformer's sizes under `key`: width, depth, num_heads, mlp_dim ≥ 1; width % num_heads == 0."""
    for name in ("width", "depth", "num_heads", "mlp_dim"):
        integer(config, f"{key}.{name}", low=1)
    divisible(config, f"{key}.width", f"{key}.num_heads")


def _bounds(low, high, low_open, high_open) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '≥'} {low}")
    if high is not None:
        parts.append(f"{'<' if high_open else '≤'} {high}")
    return (" " + " and ".join(parts)) if parts else ""
