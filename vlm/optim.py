"""Optimizer and learning-rate schedule from `config.optim` (optax)."""

from __future__ import annotations

import jax
import optax

SCHEDULES = ("cosine", "linear", "constant")


def learning_rate_schedule(optim_config, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine / linear decay to `lr * end_lr_ratio`, or constant."""
    c = optim_config
    if c.schedule not in SCHEDULES:
        raise ValueError(f"config.optim.schedule={c.schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}")
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


def create_optimizer(optim_config, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    c = optim_config
    if c.name != "adamw":
        raise ValueError(f"config.optim.name={c.name!r} is unknown; only 'adamw' is implemented")
    schedule = learning_rate_schedule(c, total_steps)
    chain = []
    if c.grad_clip_norm > 0:
        chain.append(optax.clip_by_global_norm(c.grad_clip_norm))
    chain.append(optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, mask=weight_decay_mask))
    return optax.chain(*chain), schedule
