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

Failures:
- A damaged checkpoint (a truncated file, a missing item) is found when restoring it:
  `restore_latest` then tries the next older one, and once one restores, moves the damaged newer
  ones aside to `<step>.damaged` (one log line each; Orbax ignores such names). If none restores,
  nothing is moved and `CheckpointError` says why for each: never a silent start from scratch.
- An asynchronous save runs in Orbax's background threads; its error is kept there until
  `CheckpointManager.wait_until_finished()` re-raises it (`check_for_errors()` does not: the
  finalize thread has already consumed it). `check_saves()`, cheap enough for every step, polls
  `is_saving_in_progress()` and, once the save is over, waits on it: a failure raises `SaveFailed`
  (one line) at the first step after it. Orbax deletes old steps only after the new one committed,
  so a failed save never costs an older checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from vlm.errors import one_line

OWN_ITEMS = ("data", "meta")
LEGACY_TRAIN = "train"  # {"step", "rng"} in checkpoints written before the state became a general dict


class CheckpointError(RuntimeError):
    """No checkpoint of a workdir that has some could be restored; one line, naming each and why."""


class SaveFailed(RuntimeError):
    """A checkpoint save failed (in the background, for async saves); one line naming the step and the cause."""


@dataclasses.dataclass
class Restored:
    step: int
    state: dict[str, Any]
    missing: list[str]  # keys of the abstract state the checkpoint lacks (the caller initialises them)
    data_iterator: Any
    saved_by: int  # processes that wrote the checkpoint (each its own data-iterator state)

    @property
    def resharded(self) -> bool:
        """The data iterator restarts at the step instead of from the saved per-process states."""
        return self.saved_by != jax.process_count()


def _all_ok(ok: bool) -> bool:
    """True only where every process says True (a damaged file may be one process's)."""
    if jax.process_count() == 1:
        return ok
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(multihost_utils.process_allgather(np.int32(ok)).min())


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
        self._saving: int | None = None  # the step of the save that may still be running
        self._closed = False

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
        items["meta"] = ocp.args.JsonSave(self._meta(step, state))
        self.wait()  # the previous save: its failure is reported as its own
        self._saving = step
        try:
            return self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as e:
            raise self._failed(step, e) from e

    def _meta(self, step: int, state: dict[str, Any]) -> dict[str, Any]:
        return {"step": int(step), "process_count": jax.process_count(), "device_count": jax.device_count(),
                "state_keys": sorted(state)}

    def _failed(self, step: int, error: BaseException) -> SaveFailed:
        """The error to raise for a failed save; the manager is closed (its threads finish their
        work first: a process exiting under them prints their tracebacks)."""
        self._saving = None
        try:
            self.manager.reload()
            latest = self.manager.latest_step()
            self.manager.close()
        except Exception:  # the storage itself may be what failed
            latest = None
        self._closed = True
        if latest is None:
            return SaveFailed(f"saving checkpoint {step} failed: {one_line(error)}; the run stopped before its first "
                              f"checkpoint; the same command starts it again")
        return SaveFailed(f"saving checkpoint {step} failed: {one_line(error)}; the run stopped; the last complete "
                          f"checkpoint is step {latest} in {self.directory}, from which the same command resumes")

    def check_saves(self) -> None:
        """Raises SaveFailed if the last save failed; returns at once while it is still running.

        Cheap (a flag under a lock), so the loop calls it after every step."""
        if self._saving is not None and not self.manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Waits for the running save; raises SaveFailed if it failed."""
        step, self._saving = self._saving, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._failed(step, e) from e

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

    def restore_latest(self, abstract_state: dict[str, Any], shardings: dict[str, Any],
                       data_iterator: Callable[[int], Any], log: Callable[[str], None] = print) -> Restored | None:
        """The newest checkpoint that restores, or None when there is none at all.

        `data_iterator(start_batch)` makes a fresh iterator: from batch 0 to be restored in place, or
        from the checkpoint's step when it was written by another number of processes. Checkpoints
        newer than the one restored are damaged: each is moved aside (`move_aside`) with one log line.
        """
        failed: list[tuple[int, str]] = []
        for step in sorted(self.all_steps(), reverse=True):
            restored, reason = None, None
            try:
                meta = self.meta(step)
                saved_by = int(meta["process_count"])
                lost = sorted(set(meta.get("state_keys", ())) - self.items(step))  # saved, but gone
                if lost:
                    reason = f"its item(s) {', '.join(lost)} are missing"
            except Exception as e:
                reason = f"meta: {one_line(e)}"
            if reason is None:
                resharded = saved_by != jax.process_count()
                iterator = data_iterator(step if resharded else 0)  # an error here is not the checkpoint's
                try:
                    state, missing = self.restore(step, abstract_state, shardings, None if resharded else iterator)
                    restored = Restored(step, state, missing, iterator, saved_by)
                except Exception as e:
                    reason = one_line(e)
            if not _all_ok(reason is None):
                failed.append((step, reason or "failed on another process"))
                continue
            for bad, why in failed:
                log(f"checkpoint {bad} is damaged ({why}); moved it to {self.move_aside(bad)}; resuming from {step}")
            return restored
        if failed:
            raise CheckpointError(
                f"no checkpoint in {self.directory} could be restored ({'; '.join(f'{s}: {r}' for s, r in failed)}); "
                f"nothing was moved or deleted; fix or move them away to start over")
        return None

    def move_aside(self, step: int) -> str:
        """Renames checkpoint `step` to `<step>.damaged` (`.damaged.1`, ... if taken); returns the new path."""
        root = epath.Path(self.directory)
        target = root / f"{step}.damaged"
        n = 0
        while target.exists():
            n += 1
            target = root / f"{step}.damaged.{n}"
        if jax.process_index() == 0:
            (root / str(step)).rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"vlm_move_aside_{step}")
        self.manager.reload()
        return str(target)

    def meta(self, step: int) -> dict[str, Any]:
        """Checkpoint `step`'s own record: {"step", "process_count", "device_count", "state_keys"}."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

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

    def close(self) -> None:
        if not self._closed:
            self.wait()
            self.manager.close()
            self._closed = True
