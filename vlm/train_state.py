"""The train state: a dict built from what the config asks, and the pieces of a step that act on it.

    {"step": int32 [], "params": pure dict, "opt_state": optax state, "rng": uint32 [2],
     "skipped": {"total": int32 [], "consecutive": int32 []},   # non-finite steps (the guard)
     "ema": like params,            # when config.ema.decay > 0
     "model_state": pure dict}      # the model's non-parameter variables, when it has any

Shardings, the jitted init, the step's donation and the checkpoint items all follow from this dict
(`shardings` below; `checkpoint.py` saves one item per key).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

State = dict[str, Any]

PARAM_LIKE = ("params", "ema")  # sharded like the parameters


def ema_config(config) -> tuple[float, int]:
    """(decay, start_step); decay 0 = no EMA (also for configs saved before EMA existed)."""
    ema = config.get("ema") or {}
    return float(ema.get("decay", 0.0) or 0.0), int(ema.get("start_step", 0) or 0)


def skipped_init() -> dict[str, jax.Array]:
    return {"total": jnp.zeros((), jnp.int32), "consecutive": jnp.zeros((), jnp.int32)}


def shardings(abstract_state: State, param_shardings, variable_shardings, mesh) -> State:
    """NamedShardings for every entry of the state: parameter-like trees like the parameters,
    optimizer moments like their parameters, model variables by their logical axes, the rest
    (counters, rng) replicated."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    out = {}
    for key, tree in abstract_state.items():
        if key in PARAM_LIKE:
            out[key] = param_shardings
        elif key == "opt_state":
            out[key] = optimizer_shardings(tree, abstract_state["params"], param_shardings, replicated)
        elif key == "model_state":
            out[key] = variable_shardings
        else:
            out[key] = jax.tree.map(lambda _: replicated, tree)
    return out


def optimizer_shardings(opt_state, abstract_params, param_shardings, replicated):
    """Moments are sharded like their parameters, everything else (counts) is replicated.

    A moment is found by its tree path: it ends with a parameter's full path and has its shape.
    (`optax.tree_map_params` cannot do this once `multi_transform` has masked some parameters out.)
    """
    by_path = {}
    for (path, p), (_, s) in zip(jax.tree_util.tree_leaves_with_path(abstract_params),
                                 jax.tree_util.tree_leaves_with_path(param_shardings), strict=True):
        by_path[_keys(path)] = (p.shape, s)
    depth = max((len(k) for k in by_path), default=0)

    def one(path, leaf):
        keys = _keys(path)
        for n in range(min(depth, len(keys)), 0, -1):
            hit = by_path.get(keys[-n:])
            if hit is not None and hit[0] == leaf.shape:
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(one, opt_state)


def _keys(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)


def ema_update(ema, params, count: jax.Array, decay: float, start_step: int, trainable=None):
    """ema ← decay·ema + (1 − decay)·params after update number `count` (1-based); a copy of the
    parameters while count ≤ start_step. float32, like the parameters. Frozen parameters' EMA is
    the parameter itself (bit for bit)."""
    warm = count <= start_step
    mix = lambda e, p: jnp.where(warm, p, decay * e + (1.0 - decay) * p)
    if trainable is None:
        return jax.tree.map(mix, ema, params)
    return jax.tree.map(lambda t, e, p: mix(e, p) if t else p, trainable, ema, params)


def all_finite(tree) -> jax.Array:
    """Whether every float in `tree` is finite: bool [].

    x·0 is ±0 for a finite x and NaN for ±inf or NaN, so Σ_leaves Σ x·0 is NaN exactly when some entry is not
    finite. The sum ends in a sqrt for XLA's sake: the guard's select reads this flag in every leaf of the
    parameters, both Adam moments and the EMA (4·N fusions for N leaves), and XLA duplicates a chain of cheap
    scalar ops (N per-leaf `isfinite` flags joined by `&`) into each consumer fusion, but not an expensive op
    like sqrt. Joined by `&`, tiny's train step (N = 107) compiled to 130k lines of HLO in 25–30 s; this way
    to 37k lines in 12–13 s (benchmarks/README.md, "Compile time"); tests/test_train_state.py checks both.
    """
    total = sum((jnp.sum(x * 0) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)),
                jnp.zeros((), jnp.float32))
    return jnp.isfinite(jnp.sqrt(total.astype(jnp.float32)))


def guard(ok: jax.Array, new: State, old: State, keys=("params", "opt_state", "ema", "model_state")) -> State:
    """`new`, except that where `ok` is False the entries `keys` keep their `old` values exactly."""
    out = dict(new)
    for key in keys:
        if key in new:
            out[key] = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new[key], old[key])
    s = old["skipped"]
    out["skipped"] = {"total": s["total"] + jnp.where(ok, 0, 1).astype(jnp.int32),
                      "consecutive": jnp.where(ok, 0, s["consecutive"] + 1).astype(jnp.int32)}
    return out


def fill_missing(state: State, missing: list[str], abstract_state: State, state_shardings: State) -> State:
    """Entries an older checkpoint lacks: the EMA starts as the restored parameters, counters at zero."""
    state = dict(state)
    for key in missing:
        if key == "ema":
            state[key] = jax.tree.map(jnp.copy, state["params"])
        elif key == "skipped":
            state[key] = jax.device_put(skipped_init(), state_shardings[key])
        else:
            raise ValueError(f"the checkpoint has no {key!r} item, which this run's state needs")
    return state
