"""Orbax checkpoints of the train state and the data iterator.

Layout of W/checkpoints/<step>/: one Orbax item per top-level key of the train state, whatever
the config put in it, plus two of its own:
  params/ opt_state/ step/ rng/   always
  ema/ model_state/ guard/ ...    when the train state has them (EMA, non-parameter variables, ...)
  data/                           the Grain iterator state, one JSON file per process
  meta/                           {"step", "process_count", "device_count", "state_keys"}
Checkpoints of the first trainer kept `step` and `rng` in one item `train/`; they restore too.
Splitting the state into items lets evaluation and downstream users read the parameters (or the
EMA) alone without allocating the optimizer state. Orbax writes each step into a temporary
directory and renames it when complete, so an interrupted save never replaces the last good one.
PRNG key arrays (e.g. an `nnx.Rngs` held by a module) are stored as their uint32 key data.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

OWN_ITEMS = ("data", "meta")
LEGACY_TRAIN = "train"  # {"step", "rng"} in checkpoints written before the state became a general dict


class _IteratorSnapshot:
    """The iterator's state frozen at save time.

    Saving is asynchronous: the data iterator keeps moving after `save` returns, so the
    state is captured now and handed to Grain's handler as bytes (the same JSON it writes).
    """

    def __init__(self, iterator):
        state = iterator.get_state()
        self._state = state if isinstance(state, bytes) else json.dumps(state, indent=4).encode()

    def get_state(self) -> bytes:
        return self._state


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree):
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _data_to_keys(tree, abstract):
    return jax.tree.map(lambda x, a: jax.random.wrap_key_data(x, impl=a.dtype._impl) if _is_key(a) else x,
                        tree, abstract)


def _wrap(tree):
    """Orbax's standard handler saves trees, not lone arrays: a leaf (the step, the rng) goes in a dict."""
    return {"value": tree} if not isinstance(tree, (dict, list, tuple)) else tree


def _unwrap(tree, like):
    return tree["value"] if not isinstance(like, (dict, list, tuple)) else tree


def _abstract(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings: Orbax restores (and reshards) onto them."""

    def one(x, s):
        if _is_key(x):
            x = jax.eval_shape(jax.random.key_data, x)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    return jax.tree.map(one, tree, shardings)


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, keep_period: int = 0, async_save: bool = True):
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            keep_period=keep_period or None,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest *complete* checkpoint (unfinished saves are never listed)."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def items(self, step: int) -> set[str]:
        """Names of the items checkpoint `step` holds."""
        return {p.name for p in (epath.Path(self.directory) / str(step)).iterdir() if p.is_dir()}

    def save(self, step: int, state: dict[str, Any], data_iterator=None, *, force: bool = False) -> bool:
        clash = set(state) & set(OWN_ITEMS + (LEGACY_TRAIN,))
        if clash:
            raise ValueError(f"train state keys {sorted(clash)} are reserved checkpoint item names")
        items = {name: ocp.args.StandardSave(_wrap(_keys_to_data(tree))) for name, tree in state.items()}
        if data_iterator is not None:
            import grain  # here, not at the top: params-only users (eval, benchmarks) need no Grain

            items["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iterator))
        items["meta"] = ocp.args.JsonSave({
            "step": int(step), "process_count": jax.process_count(), "device_count": jax.device_count(),
            "state_keys": sorted(state),
        })
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: dict[str, Any], shardings: dict[str, Any], data_iterator=None
                ) -> tuple[dict[str, Any], list[str]]:
        """(state, missing): the train state restored onto `shardings` (any mesh), and the keys of
        `abstract_state` the checkpoint does not hold (e.g. `ema` when EMA was switched on since);
        the caller initialises those. The data iterator, if given, is restored in place."""
        present = self.items(step)
        legacy = LEGACY_TRAIN in present and "step" not in present
        wanted = [k for k in abstract_state if k in present or (legacy and k in ("step", "rng"))]
        items = {}
        for name in wanted:
            if legacy and name in ("step", "rng"):
                continue
            items[name] = ocp.args.StandardRestore(_wrap(_abstract(abstract_state[name], shardings[name])))
        if legacy:
            train = {k: abstract_state[k] for k in ("step", "rng")}
            items[LEGACY_TRAIN] = ocp.args.StandardRestore(_abstract(train, {k: shardings[k] for k in train}))
        if data_iterator is not None:
            import grain

            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        state = {name: _unwrap(restored[name], abstract_state[name]) for name in wanted if name in items}
        if legacy:
            state.update(restored[LEGACY_TRAIN])
        state = {k: _data_to_keys(v, abstract_state[k]) for k, v in state.items()}
        return state, [k for k in abstract_state if k not in state]

    def saved_process_count(self, step: int) -> int:
        """How many processes wrote checkpoint `step` (each wrote its own data-iterator file)."""
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        return int(meta["process_count"])

    def resolve_step(self, step: int | None) -> int:
        """`step`, or the latest complete one; a clear error when there is none."""
        step = self.latest_step() if step is None or step < 0 else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}; train first or pass --workdir of a trained run")
        if step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory}; it has {self.all_steps()}")
        return step

    def restore_params(self, step: int | None, abstract_params, shardings, *, item: str = "params") -> tuple[Any, int]:
        """Parameters only (no optimizer state), from `item` ("params" or "ema"): for eval and downstream use."""
        step = self.resolve_step(step)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(_abstract(abstract_params, shardings))})
        )
        return restored[item], step

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
