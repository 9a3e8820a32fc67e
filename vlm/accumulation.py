"""The loss and its gradient over a global batch: whole, or accumulated over microbatches.

Two kinds of objective (a task says which with `per_example_loss`):
- batch-level (contrastive): the loss couples every example of the global batch. With k > 1
  microbatches the gradient stays that of the full-batch loss (GradCache): features of each
  microbatch without gradients, the full-batch loss and its gradient w.r.t. the features, then
  each microbatch's vector-Jacobian product. Exact, at the cost of a second forward.
- per-example (captioning, diffusion): the loss is a mean of per-example terms, so the mean of
  the microbatch losses is the batch loss and their gradients simply add up: a `lax.scan` with
  one forward and one backward per microbatch, no second forward.
Either way peak activation memory is one microbatch's.

Frozen parameters (`trainable` False) are constants of the differentiated function: no gradient
is computed for them; their entries in the returned gradient are zeros.
Non-parameter model variables (`variables`: batch statistics, RNG counters, ...) are inputs of
the forward; the forward's updated values come back beside the loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


# Unrolling of the microbatch scans. XLA's cost analysis counts a loop body once whatever its trip
# count, so a test that compares the FLOPs of k microbatches with one batch unrolls them (True);
# training keeps the loop (1), which bounds activation memory to one microbatch.
SCAN_UNROLL: int | bool = 1


def microbatch_split(x: jax.Array, k: int) -> jax.Array:
    """[B, ...] → [k, B/k, ...] with microbatch i = rows i, i+k, i+2k, ...

    Strided (not contiguous) so that every device holds a slice of every microbatch.
    """
    return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)


def microbatch_merge(x: jax.Array) -> jax.Array:
    """Inverse of microbatch_split: [k, B/k, ...] → [B, ...] in the original row order."""
    return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def split_trainable(params, trainable):
    """(trainable part, frozen part) of `params`, each with None where the other has a leaf."""
    if trainable is None:
        return params, None
    train = jax.tree.map(lambda t, p: p if t else None, trainable, params)
    frozen = jax.tree.map(lambda t, p: None if t else p, trainable, params)
    return train, frozen


def join_trainable(train, frozen):
    """Inverse of split_trainable."""
    if frozen is None:
        return train
    return jax.tree.map(lambda t, f: f if t is None else t, train, frozen, is_leaf=lambda x: x is None)


class _Model:
    """Builds the model from (trainable, frozen, variables) and reads its variables back after a forward."""

    def __init__(self, graphdef, frozen, variables):
        self.graphdef, self.frozen, self.variables = graphdef, frozen, variables

    def __call__(self, train_params, variables=None) -> nnx.Module:
        params = join_trainable(train_params, self.frozen)
        variables = self.variables if variables is None else variables
        return nnx.merge(self.graphdef, params, variables) if variables else nnx.merge(self.graphdef, params)

    def variables_of(self, model: nnx.Module):
        if not self.variables:
            return self.variables
        return nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[2])


def loss_and_grads(task, graphdef, params, variables, batch, rng, *, microbatches: int, trainable=None):
    """→ (loss, metrics, new variables), grads (a tree like `params`).

    params: pure dict of parameters; variables: pure dict of the other model variables ({} if none);
    trainable: tree of bools like params (None = all train).
    """
    train, frozen = split_trainable(params, trainable)
    build = _Model(graphdef, frozen, variables)
    k = microbatches

    def full_loss(p, mb, r):
        model = build(p)
        loss, metrics = task.loss(model, task.features(model, mb, r), mb)
        return loss, (metrics, build.variables_of(model))

    if k == 1:
        (loss, (metrics, new_vars)), grads = jax.value_and_grad(full_loss, has_aux=True)(train, batch, rng)
    elif task.per_example_loss:
        (loss, metrics, new_vars), grads = _per_example(full_loss, train, batch, rng, k)
    else:
        (loss, metrics, new_vars), grads = _grad_cache(task, build, train, batch, rng, k)
    if frozen is not None:
        grads = join_trainable(grads, jax.tree.map(jnp.zeros_like, frozen))
    return (loss, metrics, new_vars), grads


def _per_example(full_loss, train, batch, rng, k):
    """Mean over k microbatches of (loss, metrics, grads): one forward + one backward each."""
    mbs = jax.tree.map(lambda x: microbatch_split(x, k), batch)  # leaves [k, B/k, ...]
    rngs = jax.random.split(rng, k)
    grad_fn = jax.value_and_grad(full_loss, has_aux=True)

    def step(acc, xs):
        (loss, (metrics, new_vars)), grads = grad_fn(train, *xs)
        acc = jax.tree.map(jnp.add, acc, (loss, metrics, grads))
        return acc, new_vars

    shapes = jax.eval_shape(grad_fn, train, jax.tree.map(lambda x: x[0], mbs), rngs[0])
    (loss_s, (metrics_s, _)), grads_s = shapes
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss_s, metrics_s, grads_s))
    (loss, metrics, grads), all_vars = jax.lax.scan(step, zeros, (mbs, rngs), unroll=SCAN_UNROLL)
    loss, metrics, grads = jax.tree.map(lambda x: x / k, (loss, metrics, grads))
    return (loss, metrics, jax.tree.map(lambda v: v[-1], all_vars)), grads


def _grad_cache(task, build: _Model, train, batch, rng, k):
    """Exact gradient of a batch-level loss over k microbatches (GradCache)."""

    def features_fn(p, mb, r):
        model = build(p)
        return task.features(model, mb, r), build.variables_of(model)

    def loss_fn(p, feats):
        return task.loss(build(p), feats, batch)

    mbs = jax.tree.map(lambda x: microbatch_split(x, k), batch)  # leaves [k, B/k, ...]
    rngs = jax.random.split(rng, k)
    feats, all_vars = jax.lax.map(lambda a: features_fn(train, *a), (mbs, rngs))  # leaves [k, B/k, ...]
    feats = jax.tree.map(microbatch_merge, feats)  # leaves [B, ...]
    (loss, metrics), (grads, feat_grads) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(train, feats)
    feat_grads = jax.tree.map(lambda g: microbatch_split(g, k), feat_grads)

    def accumulate(acc, a):
        mb, r, g = a
        _, vjp = jax.vjp(lambda p: features_fn(p, mb, r)[0], train)
        return jax.tree.map(jnp.add, acc, vjp(g)[0]), None

    grads, _ = jax.lax.scan(accumulate, grads, (mbs, rngs, feat_grads), unroll=SCAN_UNROLL)
    return (loss, metrics, jax.tree.map(lambda v: v[-1], all_vars)), grads
