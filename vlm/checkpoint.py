"""Orbax checkpoints of the train state and the data iterator.

Layout of W/checkpoints/<step>/:
  params/     model parameters (pure dict, sharded arrays)
  opt_state/  optimizer state
  train/      {"step", "rng"}
  data/       the Grain iterator state, one JSON file per process
  meta/       {"step", "process_count", "device_count", ...}
Splitting params from the rest lets evaluation and downstream users read the
parameters alone (`restore_params`) without allocating the optimizer state.
Orbax writes each step into a temporary directory and renames it when complete,
so an interrupted save never replaces the last good checkpoint.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

STATE_ITEMS = ("params", "opt_state", "train")


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


def _to_items(state: dict[str, Any]) -> dict[str, Any]:
    """Train state {"step", "params", "opt_state", "rng"} → checkpoint items."""
    return {"params": state["params"], "opt_state": state["opt_state"], "train": {"step": state["step"], "rng": state["rng"]}}


def _from_items(items: dict[str, Any]) -> dict[str, Any]:
    return {"params": items["params"], "opt_state": items["opt_state"], **items["train"]}


def _abstract(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings: Orbax restores (and reshards) onto them."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, keep_period: int = 0, async_save: bool = True):
        self.directory = os.path.abspath(directory)
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

    def save(self, step: int, state: dict[str, Any], data_iterator=None, *, force: bool = False) -> bool:
        items = {name: ocp.args.StandardSave(tree) for name, tree in _to_items(state).items()}
        if data_iterator is not None:
            import grain  # here, not at the top: params-only users (eval, benchmarks) need no Grain

            items["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iterator))
        items["meta"] = ocp.args.JsonSave(
            {"step": int(step), "process_count": jax.process_count(), "device_count": jax.device_count()}
        )
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: dict[str, Any], shardings: dict[str, Any], data_iterator=None) -> dict[str, Any]:
        """Restores the train state onto `shardings` (any mesh) and, if given, the iterator in place."""
        abstract, target = _to_items(abstract_state), _to_items(shardings)
        items = {name: ocp.args.StandardRestore(_abstract(abstract[name], target[name])) for name in STATE_ITEMS}
        if data_iterator is not None:
            import grain

            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return _from_items({name: restored[name] for name in STATE_ITEMS})

    def saved_process_count(self, step: int) -> int:
        """How many processes wrote checkpoint `step` (each wrote its own data-iterator file)."""
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        return int(meta["process_count"])

    def restore_params(self, step: int | None, abstract_params, shardings) -> tuple[Any, int]:
        """Parameters only (no optimizer state): for eval and downstream use."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}; train first or pass --workdir of a trained run")
        restored = self.manager.restore(
            step, args=ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(abstract_params, shardings)))
        )
        return restored["params"], step

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
