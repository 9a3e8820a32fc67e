"""Optimizer and learning-rate schedule from `config.optim` (optax), with frozen parameters and
per-group learning-rate multipliers.

Parameters are named by their `/`-joined paths in the model ("video/encoder/blocks/0/mlp/up/kernel").
`optim.frozen` (regexes) picks parameters that never change: they get no gradient, no optimizer
moments and no weight decay. `optim.lr_multipliers` ((regex, factor), ...) scales the learning
rate of the parameters each regex matches (the first matching entry wins). With neither, the
optimizer is the plain chain (clip → AdamW), exactly as without these options.
"""

from __future__ import annotations

import math
import re

import jax
import optax

from vlm.errors import ConfigError

SCHEDULES = ("cosine", "linear", "constant")
FROZEN = "frozen"  # group label of frozen parameters


def check_config(config) -> None:
    """`config.optim`'s values (ranges, enums, finite numbers, valid regexes): one line each, before building."""
    from vlm import config_checks as check

    check.one_of(config, "optim.name", ("adamw",))
    check.number(config, "optim.lr", low=0.0, low_open=True)
    check.integer(config, "optim.warmup_steps", low=0)
    check.one_of(config, "optim.schedule", SCHEDULES)
    check.number(config, "optim.end_lr_ratio", low=0.0, high=1.0)
    check.number(config, "optim.b1", low=0.0, high=1.0, high_open=True)
    check.number(config, "optim.b2", low=0.0, high=1.0, high_open=True)
    check.number(config, "optim.eps", low=0.0, low_open=True)
    check.number(config, "optim.weight_decay", low=0.0)
    check.number(config, "optim.grad_clip_norm", low=0.0)  # 0 = no clipping
    c = config.optim
    _regexes(c.get("frozen", ()) or (), "frozen")
    for entry in tuple(c.get("lr_multipliers", ()) or ()):
        if (not isinstance(entry, (list, tuple)) or len(entry) != 2 or isinstance(entry[1], bool)
                or not isinstance(entry[1], (int, float)) or not math.isfinite(entry[1]) or entry[1] < 0):
            raise ConfigError(f"config.optim.lr_multipliers entry {entry!r} must be (regex, factor ≥ 0)")
        _regexes([entry[0]], "lr_multipliers")


def learning_rate_schedule(optim_config, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine / linear decay to `lr * end_lr_ratio`, or constant."""
    c = optim_config
    if c.schedule not in SCHEDULES:
        raise ConfigError(f"config.optim.schedule={c.schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}")
    warmup = min(int(c.warmup_steps), total_steps)
    end = c.lr * c.end_lr_ratio
    if c.schedule == "constant":
        decay = optax.constant_schedule(c.lr)
    elif c.schedule == "cosine":
        decay = optax.cosine_decay_schedule(c.lr, max(total_steps - warmup, 1), alpha=c.end_lr_ratio)
    else:
        decay = optax.linear_schedule(c.lr, end, max(total_steps - warmup, 1))
    return optax.join_schedules([optax.linear_schedule(0.0, c.lr, warmup), decay], [warmup])


def weight_decay_mask(params):
    """Decay only matmul kernels: not norms, biases, embeddings, position tables or the temperature."""

    def decays(path, _):
        return getattr(path[-1], "key", None) == "kernel"

    return jax.tree_util.tree_map_with_path(decays, params)


def path_name(path) -> str:
    """A tree path as the `/`-joined name the config's regexes match: "video/encoder/blocks/0/mlp/up/kernel"."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _regexes(entries, key: str) -> list[re.Pattern]:
    out = []
    for pattern in entries:
        if not isinstance(pattern, str):
            raise ConfigError(f"config.optim.{key}: {pattern!r} must be a regex string")
        try:
            out.append(re.compile(pattern))
        except re.error as e:
            raise ConfigError(f"config.optim.{key}: {pattern!r} is not a valid regex ({e})") from None
    return out


def param_groups(optim_config, params) -> tuple[dict, dict[str, float]]:
    """(labels, multipliers): a tree like `params` of group labels, and each group's lr factor.

    Labels are FROZEN, "default" (factor 1) or "lr_<i>" for the i-th lr_multipliers entry. A regex
    is matched against the whole path (`re.fullmatch`). One that matches no parameter is a
    ConfigError, since a typo would otherwise silently train (or freeze) nothing.
    """
    c = optim_config
    frozen = _regexes(c.get("frozen", ()) or (), "frozen")
    entries = tuple(c.get("lr_multipliers", ()) or ())
    for entry in entries:
        if len(entry) != 2 or not isinstance(entry[1], (int, float)) or not math.isfinite(entry[1]) or entry[1] < 0:
            raise ConfigError(f"config.optim.lr_multipliers entry {entry!r} must be (regex, factor ≥ 0)")
    scaled = _regexes([e[0] for e in entries], "lr_multipliers")
    used = {("frozen", i): False for i in range(len(frozen))} | {("lr_multipliers", i): False for i in range(len(scaled))}

    def label(path, _):
        name = path_name(path)
        for i, rx in enumerate(frozen):
            if rx.fullmatch(name):
                used["frozen", i] = True
                return FROZEN
        for i, rx in enumerate(scaled):
            if rx.fullmatch(name):
                used["lr_multipliers", i] = True
                return f"lr_{i}"
        return "default"

    labels = jax.tree_util.tree_map_with_path(label, params)
    for (key, i), hit in used.items():
        if not hit:
            pattern = (frozen[i] if key == "frozen" else scaled[i]).pattern
            example = path_name(jax.tree_util.tree_leaves_with_path(params)[0][0])
            raise ConfigError(f"config.optim.{key}: {pattern!r} matches no parameter; names look like {example!r}")
    return labels, {"default": 1.0} | {f"lr_{i}": float(e[1]) for i, e in enumerate(entries)}


def trainable_mask(labels) -> dict:
    """True where a parameter trains (a tree of bools like `labels`)."""
    return jax.tree.map(lambda label: label != FROZEN, labels)


def _adamw(c, schedule) -> optax.GradientTransformation:
    return optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, mask=weight_decay_mask)


def create_optimizer(optim_config, total_steps: int, groups=None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """clip → AdamW, or with `groups` (from `param_groups`) clip → one AdamW per group, frozen groups untouched.

    Frozen parameters get `optax.set_to_zero` inside `optax.multi_transform`, which allocates no
    moments for them; their (zero) gradients still count in the global norm, i.e. not at all.
    """
    c = optim_config
    if c.name != "adamw":
        raise ConfigError(f"config.optim.name={c.name!r} is unknown; only 'adamw' is implemented")
    schedule = learning_rate_schedule(c, total_steps)
    chain = []
    if c.grad_clip_norm > 0:
        chain.append(optax.clip_by_global_norm(c.grad_clip_norm))
    labels, factors = groups if groups is not None else (None, {})
    used = set(jax.tree.leaves(labels)) if labels is not None else {"default"}
    if used == {"default"}:
        chain.append(_adamw(c, schedule))
    else:
        transforms = {}
        for group in sorted(used):
            if group == FROZEN:
                transforms[group] = optax.set_to_zero()
            else:
                factor = factors[group]
                transforms[group] = _adamw(c, lambda step, f=factor: f * schedule(step))
        chain.append(optax.multi_transform(transforms, labels))
    return optax.chain(*chain), schedule
