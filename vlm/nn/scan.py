"""Scanned layers: identical blocks stored stacked and applied by one `nnx.scan`.

An unrolled stack of L blocks is traced and compiled L times; a scanned one holds each parameter
once with a leading [L, ...] axis (logical name "layers", unsharded by the default rules) and
compiles the block body once, so compile time does not grow with depth (MaxText's scan_layers).

Parameter layouts (pure dicts, as in checkpoints), for a stack at path `prefix`:
  unrolled          {prefix: {0: tree, 1: tree, ..., L-1: tree}}
  scanned, group 1  {prefix: tree with every leaf [L, ...]}
  scanned, group g  {prefix: {j: tree with every leaf [L/g, ...] holding blocks j, j+g, j+2g, ...}}, j < g
A group scans several different blocks per step (e.g. the DiT's alternating spatial / temporal pair).
`stack_layers` / `unstack_layers` convert between them (e.g. to restore a checkpoint written with the
other setting).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

LAYERS = "layers"  # logical name of the stacked axis
_METADATA = {nnx.PARTITION_NAME: LAYERS}  # nnx transforms insert / remove it in each parameter's axes

M = TypeVar("M", bound=nnx.Module)
X = TypeVar("X")


def create(make_layer: Callable[[nnx.Rngs], M], count: int, rngs: nnx.Rngs) -> M:
    """`count` layers built by `make_layer(rngs)`, stacked along a leading "layers" axis.

    Each layer gets its own split of `rngs` (so its initial values differ from an unrolled stack
    built from the same seed; convert a trained unrolled stack with `stack_layers`).
    """

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=_METADATA)
    def build(rngs: nnx.Rngs) -> M:
        return make_layer(rngs)

    return build(rngs)


def apply(layers: nnx.Module, body: Callable[[nnx.Module, X], X], x: X, *, remat: str = "none") -> X:
    """x ← body(layer, x) for each layer stacked in `layers`, in order, as one scan.

    `remat` (a REMAT_POLICIES name) applies to the scanned body: the backward pass keeps what the policy
    saves inside one step and the carries between steps.
    """
    if remat != "none":
        from vlm.nn.transformer import REMAT_POLICIES  # not at the top: transformer imports this module

        body = nnx.remat(body, policy=REMAT_POLICIES[remat])
    step = nnx.scan(body, in_axes=(0, nnx.Carry), out_axes=nnx.Carry, transform_metadata=_METADATA)
    return step(layers, x)


def _get(tree: Mapping, prefix: str) -> Any:
    for key in prefix.split("/"):
        if key not in tree:
            raise KeyError(f"no parameters at {prefix!r} (missing {key!r}; present: {', '.join(map(str, tree))})")
        tree = tree[key]
    return tree


def _replace(tree: Mapping, prefix: str, value: Any) -> dict:
    """A copy of `tree` with the subtree at `prefix` replaced (the rest shared, not copied)."""
    head, _, rest = prefix.partition("/")
    return {**tree, head: _replace(tree[head], rest, value) if rest else value}


def _layer_keys(layers: Mapping) -> list:
    """The keys of an unrolled stack in layer order (int keys from nnx, or their strings from a checkpoint)."""
    try:
        keys = sorted(layers, key=int)
    except (TypeError, ValueError):
        raise ValueError(f"expected unrolled layers keyed 0..L-1, got keys {list(layers)[:5]}") from None
    if [int(k) for k in keys] != list(range(len(keys))):
        raise ValueError(f"unrolled layers must be numbered 0..{len(keys) - 1}, got {[int(k) for k in keys]}")
    return keys


def stack_layers(params: Mapping, prefix: str, group: int = 1) -> dict:
    """Unrolled → scanned layout of the stack at `prefix` ("/"-joined path, e.g. "blocks")."""
    layers = _get(params, prefix)
    keys = _layer_keys(layers)
    if group < 1 or len(keys) % group:
        raise ValueError(f"{len(keys)} layers at {prefix!r} do not form groups of {group}")
    stack = lambda ks: jax.tree.map(lambda *xs: jnp.stack(xs), *(layers[k] for k in ks))
    if group == 1:
        return _replace(params, prefix, stack(keys))
    return _replace(params, prefix, {j: stack(keys[j::group]) for j in range(group)})


def unstack_layers(params: Mapping, prefix: str, group: int = 1) -> dict:
    """Scanned → unrolled layout of the stack at `prefix` (the inverse of `stack_layers`)."""
    stacked = _get(params, prefix)
    groups = [stacked] if group == 1 else [stacked[j] for j in _layer_keys(stacked)]
    if len(groups) != group:
        raise ValueError(f"the scanned stack at {prefix!r} has {len(groups)} groups, not {group}")
    steps = {x.shape[0] for g in groups for x in jax.tree.leaves(g)}
    if len(steps) != 1:
        raise ValueError(f"the scanned stack at {prefix!r} has leaves of different depths {sorted(steps)}")
    (steps,) = steps
    return _replace(params, prefix, {
        i * group + j: jax.tree.map(lambda x: x[i], groups[j]) for i in range(steps) for j in range(group)
    })



def _shapes(tree: Mapping) -> dict[str, tuple]:
    """{"/"-joined path: shape}; int and string keys alike (nnx uses ints, checkpoints strings)."""
    flat = jax.tree_util.tree_leaves_with_path(tree)
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(x.shape) for path, x in flat}


def match_layout(params: Mapping, like: Mapping, prefix: str, group: int = 1) -> dict:
    """`params` with the stack at `prefix` in the layout (unrolled or scanned) it has in `like` (e.g. the
    model's abstract parameters): loads a checkpoint written with the other `scan_layers` setting."""
    target = _shapes(_get(like, prefix))
    for convert in (dict, lambda p: stack_layers(p, prefix, group), lambda p: unstack_layers(p, prefix, group)):
        try:
            candidate = convert(params)
        except (ValueError, KeyError, TypeError, IndexError):
            continue
        if _shapes(_get(candidate, prefix)) == target:
            return candidate
    raise ValueError(f"the parameters at {prefix!r} match neither the unrolled nor the scanned layout (group {group}) "
                     f"of the model; were they written by a model of another depth or width?")
