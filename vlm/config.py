"""Config checks that run before anything is built or compiled: one line per error."""

from __future__ import annotations

import json

import ml_collections

from vlm import sharding
from vlm.errors import ConfigError  # noqa: F401  (re-exported: callers catch vlm.config.ConfigError)

# Trainer keys added after the first runs: a config.json saved before them loads with these values.
TRAINER_DEFAULTS = {
    "ema": {"decay": 0.0, "start_step": 0},
    "max_skipped_steps": 10,
    "init_from": {"workdir": "", "step": -1, "mapping": (), "strict": True, "use_ema": True},
    "evals": {},
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
        if int(config[key]) <= 0:
            raise ConfigError(f"config.{key}={config[key]} must be a positive integer")
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
    from vlm import tasks
    from vlm.eval import evaluators

    task = tasks.get(config)  # each task checks its own keys (raises ConfigError)
    evaluators.from_config(config, task)


def _validate_trainer_keys(config) -> None:
    ema = config.get("ema") or {}
    decay = float(ema.get("decay", 0.0))
    if not 0.0 <= decay < 1.0:
        raise ConfigError(f"config.ema.decay={decay} must be in [0, 1) (0 = no EMA; e.g. 0.9999)")
    if int(ema.get("start_step", 0)) < 0:
        raise ConfigError(f"config.ema.start_step={ema.get('start_step')} must be ≥ 0")
    if int(config.get("max_skipped_steps", 10)) < 1:
        raise ConfigError(f"config.max_skipped_steps={config.get('max_skipped_steps')} must be ≥ 1")
    init = config.get("init_from") or {}
    unknown = sorted(set(init) - set(TRAINER_DEFAULTS["init_from"]))
    if unknown:
        raise ConfigError(f"config.init_from has unknown key(s) {', '.join(unknown)}; "
                          f"its keys: {', '.join(TRAINER_DEFAULTS['init_from'])}")


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
