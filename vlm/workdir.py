"""One live run per workdir, and a resume that fits the run already there.

    with workdir.Lock(W):                        # W/run.lock; WorkdirBusy (one line) if a live run holds it
        for line in workdir.check_resume(config, W):  # ConfigError naming the keys that may not change
            print(line)                          # warnings: keys that may change but change the training
        ...                                      # restore or init; only then
        workdir.write_config(config, W)          # W/config.json

The lock file holds {pid, host, process start time, token}. A lock whose process is gone is stale
and taken over: on the same host when `os.kill(pid, 0)` finds no such process (or the pid now
belongs to a process started at another time: a reused pid); from another host when the holder
stopped refreshing the file's modification time (a heartbeat thread touches it every
HEARTBEAT_S; stale after STALE_AFTER_S). Multi-process runs lock once, in process 0, and every
process learns the outcome. On a bucket (gs://...) the lock is best effort: no atomic create and
no heartbeat, so only a same-host holder can be found dead.

The resume check compares W/config.json with the new config before anything in W is touched, so
a rejected resume leaves config.json and the checkpoints as they were. Keys present in only one of
the two (keys added to the code since) are not compared.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

import jax
from etils import epath

from vlm import config as config_lib
from vlm.errors import ConfigError

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0

# Keys that a resume may not change: the checkpoint would not fit, or the run would silently become
# another experiment. A prefix ending in "." covers the whole group.
FIXED = ("model.", "task.", "data.num_frames", "data.resolution", "data.max_text_len", "data.vocab_size",
         "data.tokenizer", "optim.name", "optim.frozen", "optim.lr_multipliers")
# ... except these, which change how the same model is computed, not what it is (dtype: with a warning).
FREE_IN_FIXED = ("model.dtype", "model.remat", "model.attention_impl", "model.context_parallel")
# Keys that may change without a word: length, cadences, the mesh, where things are, evaluation.
FREE = ("total_steps", "log_every", "eval_every", "checkpoint_every", "checkpoint.", "mesh.", "sharding_rules",
        "microbatches", "eval_batch_size", "evals", "max_skipped_steps", "init_from.", "data.data_dir",
        "data.worker_count", "data.prefetch", "data.decode_threads", "data.eval_split", "data.eval_size",
        "model.remat", "model.attention_impl", "model.context_parallel", "metrics.", "xla_flags.", "profile.")
# Every other change (batch_size, seed, optim.lr, data.name, ema, ...) is allowed with a warning.


class WorkdirBusy(RuntimeError):
    """Another live run holds the workdir; the message (one line) names it."""


def _matches(key: str, patterns) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) or key.startswith(p + ".") for p in patterns)


def _flatten(tree, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _show(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def saved_steps(workdir: str) -> list[int]:
    """Complete checkpoint steps in W/checkpoints (Orbax renames a finished save to its step number)."""
    path = epath.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()) if path.exists() else []


def check_resume(config, workdir: str) -> list[str]:
    """Raises ConfigError (one line naming the keys) when `config` may not resume the run in `workdir`;
    returns warning lines for allowed changes that alter the training. Touches nothing."""
    path = epath.Path(workdir) / "config.json"
    if not saved_steps(workdir) or not path.exists():
        return []  # nothing to resume: a fresh run (config.json is rewritten after its init)
    saved = _flatten(json.loads(path.read_text()))
    new = _flatten(json.loads(config_lib.to_json(config)))
    changed = sorted(k for k in saved.keys() & new.keys() if saved[k] != new[k])
    fixed = [k for k in changed if _matches(k, FIXED) and not _matches(k, FREE_IN_FIXED)]
    if fixed:
        shown = ", ".join(f"{k} ({_show(saved[k])} → {_show(new[k])})" for k in fixed[:4])
        more = f" and {len(fixed) - 4} more" if len(fixed) > 4 else ""
        raise ConfigError(
            f"cannot resume {workdir} with this config: {shown}{more} differ from its config.json, and the model, "
            f"task, data shapes, vocabulary and optimizer structure cannot change on resume; use a new --workdir "
            f"(--config.init_from.workdir={workdir} starts it from this run's weights)")
    warned = [k for k in changed if not _matches(k, FREE)]
    if not warned:
        return []
    shown = ", ".join(f"{k} ({_show(saved[k])} → {_show(new[k])})" for k in warned)
    return [f"warning: resuming {workdir} with changed {shown}; the run continues with the new values"]


def write_config(config, workdir: str) -> None:
    """W/config.json, atomically (process 0). Only after the resume check and the restore succeeded."""
    if jax.process_index() != 0:
        return
    path = epath.Path(workdir) / "config.json"  # epath: the workdir may be a bucket (gs://...)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / "config.json.tmp"
    tmp.write_text(config_lib.to_json(config))
    tmp.replace(path)


# ----- the lock -----


def _process_start_ticks(pid: int) -> int | None:
    """Start time of process `pid` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive_here(holder: dict) -> bool:
    pid = int(holder.get("pid", -1))
    if pid <= 0 or pid == os.getpid():
        return False  # our own pid: a previous process of this container, not us
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    ticks = holder.get("start_ticks")
    return ticks is None or _process_start_ticks(pid) in (None, ticks)


class Lock:
    """W/run.lock while the run lives (a context manager); see the module docstring."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = epath.Path(workdir) / LOCK_NAME
        self.local = "://" not in workdir
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread = None
        self.taken_over: dict | None = None  # the stale holder this lock replaced, if any
        self._made_workdir = False

    def __enter__(self):
        error = None
        if jax.process_index() == 0:
            try:
                self.acquire()
            except WorkdirBusy as e:
                error = e
        if jax.process_count() > 1:
            import numpy as np
            from jax.experimental import multihost_utils

            busy = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
            if busy and error is None:
                error = WorkdirBusy(f"workdir {self.workdir} is in use by another run (see process 0's error)")
        if error is not None:
            raise error
        return self

    def __exit__(self, *exc):
        self.release()

    def describe(self, holder: dict) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
        return f"pid {holder.get('pid')} on host {holder.get('host')}, started {started}"

    def acquire(self) -> None:
        self._made_workdir = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "start_ticks": _process_start_ticks(os.getpid()), "token": self.token}
        for _ in range(5):
            if self._create(json.dumps(me)):
                self._start_heartbeat()
                return
            holder = self._read()
            if holder is None:
                continue  # released (or being written) meanwhile: try again
            if self._is_live(holder):
                raise WorkdirBusy(f"workdir {self.workdir} is in use by another run: {self.describe(holder)} "
                                  f"({self.path}); wait for it to end or use another --workdir")
            self._break(holder)
        raise WorkdirBusy(f"could not lock {self.path}: other runs keep taking it; is another run starting?")

    def _create(self, text: str) -> bool:
        """Creates the lock file with its whole content, atomically; False if it exists."""
        if not self.local:
            if self.path.exists():
                return False
            self.path.write_text(text)
            return True
        tmp = f"{self.path}.{self.token}"
        with open(tmp, "w") as f:
            f.write(text)
        try:
            os.link(tmp, self.path)  # fails if the lock exists; the file appears with its content
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def _read(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
            if self.local:
                holder["age_s"] = time.time() - os.stat(self.path).st_mtime
            return holder
        except (FileNotFoundError, ValueError):
            return None

    def _is_live(self, holder: dict) -> bool:
        if holder.get("host") == socket.gethostname():
            return _alive_here(holder)
        return not (self.local and holder.get("age_s", 0.0) > STALE_AFTER_S)

    def _break(self, holder: dict) -> None:
        """Removes a stale lock, unless another starting run replaced it meanwhile."""
        aside = epath.Path(f"{self.path}.stale-{self.token}")
        try:
            self.path.rename(aside)
        except FileNotFoundError:
            return
        if json.loads(aside.read_text()).get("token") != holder.get("token"):
            aside.rename(self.path)  # a fresh lock: give it back
            return
        aside.unlink()
        self.taken_over = holder

    def _start_heartbeat(self) -> None:
        if not self.local:
            return

        def beat():
            while not self._stop.wait(HEARTBEAT_S):
                try:
                    os.utime(self.path)
                except OSError:
                    return

        self._thread = threading.Thread(target=beat, name="workdir_lock_heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if jax.process_index() != 0:
            return
        holder = self._read()
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink()
            if self._made_workdir and not any(self.path.parent.iterdir()):
                self.path.parent.rmdir()  # a run that failed before writing anything leaves no trace
