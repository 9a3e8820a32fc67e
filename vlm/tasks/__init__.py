"""Tasks: what is trained and how it is judged. The trainer knows only the `Task` protocol below.

A new family is a model in `vlm/models/`, a task here (registered in REGISTRY) and a config file
in `configs/`; `vlm/train.py` does not change.

    task = tasks.get(config)                         # validates the task's keys (ConfigError, one line)
    model = task.build_model(nnx.Rngs(seed))         # under nnx.eval_shape, then a jitted init
    feats = task.features(model, batch, rng)         # the per-example part; leading dim = batch
    loss, metrics = task.loss(model, feats, batch)   # float32 scalar, {"train/...": scalar}
    task.evaluators()["retrieval"](model, mesh=..., step=..., workdir=..., **options) -> {"t2v_r1": ...}

`per_example_loss` says how microbatches combine (`vlm/accumulation.py`): False for a loss that
couples the whole batch (contrastive: exact GradCache accumulation, a second forward), True for a
mean of per-example terms (captioning, diffusion: plain accumulation, one forward and backward per
microbatch). Randomness comes only from `rng` (derived from (seed, step)), so a step is
reproducible from its number.

Optional hooks, used when a task has them:
    task.model_flops_per_step(batch) -> float   # else the trainer counts the forward with XLA
    task.commands() -> {name: fn(loaded, argv, flags)}   # extra `vlm <name>` commands (sampling, captioning)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import jax
from flax import nnx

from vlm.errors import ConfigError

# evaluator(model, *, mesh, step, workdir, **options) → {metric name (no prefix): float}
Evaluator = Callable[..., Mapping[str, float]]


@runtime_checkable
class Task(Protocol):
    config: Any
    per_example_loss: bool

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module: ...

    def features(self, model: nnx.Module, batch: Mapping[str, jax.Array], rng: jax.Array) -> Any: ...

    def loss(self, model: nnx.Module, features: Any, batch: Mapping[str, jax.Array]
             ) -> tuple[jax.Array, Mapping[str, jax.Array]]: ...

    def evaluators(self) -> Mapping[str, Evaluator]: ...


# task name → module in vlm/tasks/ defining `Task`.
REGISTRY = {
    "contrastive": "vlm.tasks.contrastive",
    "captioning": "vlm.tasks.captioning",
    "autoencoding": "vlm.tasks.autoencoding",
    "diffusion": "vlm.tasks.diffusion",
}


def get(config) -> Task:
    name = config.task.name
    if name not in REGISTRY:
        raise ConfigError(f"config.task.name={name!r} is not a known task; choose one of {', '.join(REGISTRY)}")
    task = importlib.import_module(REGISTRY[name]).Task(config)
    if not isinstance(task, Task):
        missing = [m for m in ("per_example_loss", "build_model", "features", "loss", "evaluators") if not hasattr(task, m)]
        raise TypeError(f"task {name!r} ({REGISTRY[name]}) does not implement the Task protocol: missing {missing}")
    return task
