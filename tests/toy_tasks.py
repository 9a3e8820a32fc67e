"""Tasks used only by tests: the dual encoder under objectives the trainer must handle generically.

Registered under names of their own in `vlm.tasks.REGISTRY` by `register()`.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from vlm import tasks
from vlm.tasks import contrastive


def register() -> None:
    tasks.REGISTRY["toy_alignment"] = "tests.toy_tasks"
    tasks.REGISTRY["toy_alignment_with_variables"] = "tests.toy_tasks"


class CountingDualEncoder(nnx.Module):
    """The dual encoder plus non-parameter variables: a forward counter (a batch statistic) and
    dropout with its own RNG stream held by the module."""

    def __init__(self, inner, rngs: nnx.Rngs):
        self.inner = inner
        self.calls = nnx.BatchStat(jnp.zeros((), jnp.float32))
        self.dropout = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=7))

    def __call__(self, video, tokens):
        self.calls[...] = self.calls[...] + 1.0
        v, t = self.inner(video, tokens)
        return self.dropout(v), t

    @property
    def logit_scale(self):
        return self.inner.logit_scale


class Task(contrastive.Task):
    """Per-example objective: the mean over examples of 1 − cos(video_i, text_i)."""

    per_example_loss = True

    def build_model(self, rngs):
        model = super().build_model(rngs)
        if self.config.task.name == "toy_alignment_with_variables":
            model = CountingDualEncoder(model, rngs)
        return model

    def loss(self, model, features, batch):
        per_example = 1.0 - jnp.sum(features["video"] * features["text"], axis=-1)  # [B]
        return per_example.mean(), {"train/alignment": 1.0 - per_example.mean()}
