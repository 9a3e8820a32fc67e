"""Config checks that run before anything is built, compiled or written: one line per error.

`validate` checks the trainer's keys here, `config.optim` in `optim.check_config`, `config.data` in
`input_pipeline.pipeline.check_data_values`, and the model and task keys in the task's `validate()`
(run by `tasks.get`); the checks themselves are the one-liners of `config_checks.py`.
"""

from __future__ import annotations

import json

import ml_collections

from vlm import config_checks as check
from vlm import sharding
from vlm.errors import ConfigError  # noqa: F401  (re-exported: callers catch vlm.config.ConfigError)

# Trainer keys added after the first runs: a config.json saved before them loads with these values.
TRAINER_DEFAULTS = {
    "ema": {"decay": 0.0, "start_step": 0},
    "max_skipped_steps": 10,
    "init_from": {"workdir": "", "step": -1, "mapping": (), "strict": True, "use_ema": True},
    "evals": {},
    "xla_flags": {"cpu": (), "gpu": (), "tpu": ()},
    "profile": {"steps": 0, "after_step": 2},
}

REQUIRED_KEYS = (
    "seed", "total_steps", "batch_size", "log_every", "eval_every", "checkpoint_every",
    "mesh", "optim", "model", "data", "task",
)


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raises ConfigError for the first problem found."""
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise ConfigError(f"config is missing {', '.join(missing)}; every config file defines {', '.join(REQUIRED_KEYS)}")
    for key in ("total_steps", "batch_size", "log_every", "eval_every", "checkpoint_every"):
        if not check.is_int(config[key]) or config[key] <= 0:
            raise ConfigError(f"config.{key}={config[key]!r} must be a positive integer")
    check.integer(config, "seed", low=0)
    for key in ("eval_batch_size", "microbatches"):
        if key in config:
            check.integer(config, key, low=1)
    if "checkpoint" in config:
        # keep ≥ 1: retention can never delete the newest checkpoint (Orbax deletes old steps only
        # after a newer save has committed).
        check.integer(config, "checkpoint.keep", low=1)
        check.integer(config, "checkpoint.keep_period", low=0)
        check.boolean(config, "checkpoint.async_save")
    _check_sharding_rules(config.get("sharding_rules") or ())
    from vlm import xla_flags

    xla_flags.check(config.get("xla_flags") or {})
    try:
        sizes = sharding.axis_sizes(config.mesh, num_devices)
    except sharding.MeshError as e:
        raise ConfigError(str(e)) from None
    shards = sizes["data"] * sizes["fsdp"]
    per_slice = config.batch_size // max(config.microbatches, 1)
    if config.microbatches < 1 or config.batch_size % config.microbatches:
        raise ConfigError(
            f"config.microbatches={config.microbatches} must be ≥ 1 and divide config.batch_size={config.batch_size}"
        )
    if per_slice % shards:
        raise ConfigError(
            f"config.batch_size={config.batch_size} (microbatch {per_slice}) does not divide over the batch axes "
            f"data*fsdp={shards}; use a batch size that is a multiple of {shards * config.microbatches}"
        )
    if config.eval_batch_size % shards:
        raise ConfigError(
            f"config.eval_batch_size={config.eval_batch_size} does not divide over data*fsdp={shards}; "
            f"use a multiple of {shards}"
        )
    from vlm.nn.transformer import REMAT_POLICIES

    if config.model.remat not in REMAT_POLICIES:
        raise ConfigError(f"config.model.remat={config.model.remat!r} is unknown; choose one of {', '.join(REMAT_POLICIES)}")
    from vlm.nn.attention import ATTENTION_IMPLS

    impl = config.model.get("attention_impl", "xla")
    if impl not in ATTENTION_IMPLS:
        raise ConfigError(f"config.model.attention_impl={impl!r} is unknown; choose one of {', '.join(ATTENTION_IMPLS)}")
    if impl == "cudnn" and config.model.dtype == "float32":
        raise ConfigError("config.model.attention_impl='cudnn' needs config.model.dtype=bfloat16 (cuDNN has no float32 kernel)")
    from vlm.nn.attention import CONTEXT_PARALLEL_KINDS

    cp = config.model.get("context_parallel", "none")
    if cp not in CONTEXT_PARALLEL_KINDS:
        raise ConfigError(f"config.model.context_parallel={cp!r} is unknown; choose one of {', '.join(CONTEXT_PARALLEL_KINDS)}")
    if config.model.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"config.model.dtype={config.model.dtype!r} is unknown; use float32 or bfloat16")
    _validate_trainer_keys(config)
    from input_pipeline import pipeline
    from vlm import optim

    optim.check_config(config)
    pipeline.check_data_values(config.data)
    from vlm import tasks
    from vlm.eval import evaluators

    task = tasks.get(config)  # each task checks its own keys (raises ConfigError)
    evaluators.from_config(config, task)


def _validate_trainer_keys(config) -> None:
    ema = config.get("ema") or {}
    decay = ema.get("decay", 0.0)
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
        raise ConfigError(f"config.ema.decay={decay!r} must be in [0, 1) (0 = no EMA; e.g. 0.9999)")
    start = ema.get("start_step", 0)
    if not check.is_int(start) or start < 0:
        raise ConfigError(f"config.ema.start_step={start!r} must be an integer ≥ 0")
    skips = config.get("max_skipped_steps", 10)
    if not check.is_int(skips) or skips < 1:
        raise ConfigError(f"config.max_skipped_steps={skips!r} must be an integer ≥ 1")
    _check_profile(config)
    init = config.get("init_from") or {}
    unknown = sorted(set(init) - set(TRAINER_DEFAULTS["init_from"]))
    if unknown:
        raise ConfigError(f"config.init_from has unknown key(s) {', '.join(unknown)}; "
                          f"its keys: {', '.join(TRAINER_DEFAULTS['init_from'])}")
    if init:
        if not isinstance(init.get("workdir", ""), str):
            raise ConfigError(f"config.init_from.workdir={init['workdir']!r} must be a path (\"\" = off)")
        check.integer(config, "init_from.step", low=-1)
        check.boolean(config, "init_from.strict")
        check.boolean(config, "init_from.use_ema")


def _check_profile(config) -> None:
    """config.profile: trace steps after_step+1 … after_step+steps (vlm/profiling.py); steps=0 is off."""
    profile = config.get("profile") or {}
    unknown = sorted(set(profile) - set(TRAINER_DEFAULTS["profile"]))
    if unknown:
        raise ConfigError(f"config.profile has unknown key(s) {', '.join(unknown)}; its keys: steps, after_step")
    steps, after = profile.get("steps", 0), profile.get("after_step", 2)
    for key, value, low in (("steps", steps, 0), ("after_step", after, 1)):
        if not check.is_int(value) or value < low:  # after_step ≥ 1: the first step (the compile) stays out
            raise ConfigError(f"config.profile.{key}={value!r} must be an integer ≥ {low}")
    if steps and after + steps > config.total_steps:
        raise ConfigError(f"config.profile traces steps {after + 1}–{after + steps}, past "
                          f"config.total_steps={config.total_steps}; lower profile.after_step or profile.steps")


def _check_sharding_rules(rules) -> None:
    """[[logical axis, mesh axis | [mesh axes] | None], ...]; mesh axes from sharding.MESH_AXES."""
    for rule in rules:
        ok = isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str)
        axes = rule[1] if ok else None
        axes = axes if isinstance(axes, (list, tuple)) else () if axes is None else (axes,)
        if not ok or any(a not in sharding.MESH_AXES for a in axes):
            raise ConfigError(f"config.sharding_rules entry {rule!r} must be [logical axis, mesh axis or [axes] or None] "
                              f"with mesh axes from {', '.join(sharding.MESH_AXES)}")


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def from_json(text: str) -> ml_collections.ConfigDict:
    """The resolved config saved in W/config.json, locked like the original (trainer keys added
    since it was written get their defaults)."""
    values = json.loads(text)
    for key, default in TRAINER_DEFAULTS.items():
        if isinstance(default, dict) and isinstance(values.get(key), dict):
            values[key] = {**default, **values[key]}
        else:
            values.setdefault(key, default)
    config = ml_collections.ConfigDict(values)
    config.lock()
    return config
