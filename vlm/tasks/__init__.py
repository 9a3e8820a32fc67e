"""Tasks: what is trained and how it is judged. The trainer knows only this interface.

A task turns a config into a model, a loss and an evaluation:

    task = tasks.get(config)
    model = task.build_model(nnx.Rngs(seed))        # called under nnx.eval_shape, then a jitted init
    feats = task.features(model, batch, rng)        # per-example part; leading dim = batch
    loss, metrics = task.loss(model, feats, batch)  # batch-level part; float32 scalar
    task.evaluate(model, step=..., workdir=..., mesh=...) -> {"eval/...": float}
    task.model_flops_per_step(...)                  # optional; else the trainer asks XLA

The split into `features` and `loss` is what makes gradient accumulation exact for
batch-level objectives (contrastive losses see the whole global batch): the trainer
computes features for each microbatch, the loss and its gradient on all of them, then
back-propagates each microbatch's share (GradCache). For per-example objectives
(captioning, diffusion) `features` returns the per-example losses and `loss` averages.
"""

from __future__ import annotations

import importlib

# task name → module in vlm/tasks/ defining `Task`.
REGISTRY = {
    "contrastive": "vlm.tasks.contrastive",
}


def get(config):
    name = config.task.name
    if name not in REGISTRY:
        from vlm.errors import ConfigError

        raise ConfigError(f"config.task.name={name!r} is not a known task; choose one of {', '.join(REGISTRY)}")
    return importlib.import_module(REGISTRY[name]).Task(config)
