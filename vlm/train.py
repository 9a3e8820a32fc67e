"""The one training loop, the same for every task.

Reads top to bottom: config check → workdir lock and resume check → mesh → abstract model →
shardings → jitted init (or restore of the newest intact checkpoint, or init from another run) →
config.json → jitted step → loop with logging, evaluators and checkpoints. The state is the dict of
`train_state.py`; gradients come from `accumulation.py`; the lock and the resume check are in
`workdir.py`, damaged checkpoints and failed saves in `checkpoint.py`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from flax import nnx

from vlm import accumulation, init_from, optim, profiling, run_tokenizer, sharding, tasks, train_state, xla_flags
from vlm import checkpoint as checkpoint_lib
from vlm import config as config_lib
from vlm import metrics as metrics_lib
from vlm import workdir as workdir_lib
from vlm.errors import TrainingDiverged
from vlm.eval import evaluators as evaluators_lib
from vlm.flops import model_flops_per_step
from vlm.preemption import PreemptionFlag

State = train_state.State


@dataclasses.dataclass
class Setup:
    """Everything built from a config and a mesh before the first step."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    rules: tuple
    task: tasks.Task
    graphdef: nnx.GraphDef
    abstract_state: State
    state_shardings: State
    schedule: optax.Schedule
    trainable: Any  # tree of bools like params (True = trains), or None when nothing is frozen
    init: Callable[[], State]  # jitted; creates the state directly into its shards
    train_step: Callable[[State, dict], tuple[State, dict]]  # jitted, donates the state

    def model(self, params, variables=None) -> nnx.Module:
        return nnx.merge(self.graphdef, params, variables or {})

    def eval_model(self, state: State, use_ema: bool | None = None) -> nnx.Module:
        """The model evaluation sees: the EMA weights when the run keeps them (unless use_ema=False)."""
        ema = "ema" in state and (use_ema is None or use_ema)
        return self.model(state["ema" if ema else "params"], state.get("model_state"))


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Setup:
    """Abstract model → shardings → jitted init and train step. Nothing full-size is allocated."""
    rules = sharding.logical_rules(config.sharding_rules)
    task = tasks.get(config)
    with sharding.use_mesh(mesh, rules):
        abstract_model = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(config.seed)))
        graphdef, abstract_params, abstract_vars = nnx.split(abstract_model, nnx.Param, ...)
        param_shardings = sharding.state_shardings(abstract_params, mesh, rules)
        variable_shardings = sharding.state_shardings(abstract_vars, mesh, rules)
        sharding.check_divisible(nnx.to_pure_dict(abstract_params), param_shardings)
    groups = optim.param_groups(config.optim, nnx.to_pure_dict(abstract_params))
    trainable = optim.trainable_mask(groups[0])
    trainable = None if all(jax.tree.leaves(trainable)) else trainable
    tx, schedule = optim.create_optimizer(config.optim, config.total_steps, groups)
    ema_decay, ema_start = train_state.ema_config(config)

    def state_around(params, variables) -> State:
        """The train state around a fresh model's parameters and other variables (pure dicts)."""
        state = {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "opt_state": tx.init(params),
            "rng": jax.random.key_data(jax.random.key(config.seed)),
            "skipped": train_state.skipped_init(),
        }
        if ema_decay > 0:
            state["ema"] = jax.tree.map(jnp.copy, params)
        if jax.tree.leaves(variables):
            state["model_state"] = variables
        return state

    def init() -> State:
        model = task.build_model(nnx.Rngs(config.seed))
        _, params, variables = nnx.split(model, nnx.Param, ...)
        return state_around(nnx.to_pure_dict(params), nnx.to_pure_dict(variables))

    # From the abstract model, not by tracing init: building a model under a trace costs O(leaves²) in flax 0.12
    # (each rngs.params() compares tracer shardings, whose error message scans the whole trace): B/16 6.6 s.
    abstract_state = jax.eval_shape(state_around, nnx.to_pure_dict(abstract_params), nnx.to_pure_dict(abstract_vars))
    state_shardings = train_state.shardings(abstract_state, param_shardings, variable_shardings, mesh)

    def train_step(state: State, batch: dict[str, jax.Array]) -> tuple[State, dict]:
        step = state["step"]
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
        (loss, metrics, variables), grads = accumulation.loss_and_grads(
            task, graphdef, state["params"], state.get("model_state", {}), batch, rng,
            microbatches=config.microbatches, trainable=trainable)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        if trainable is not None:  # frozen parameters stay bit-identical (p + 0 is not, for p = -0.0)
            params = jax.tree.map(lambda t, new, old: new if t else old, trainable, params, state["params"])
        new = {**state, "step": step + 1, "params": params, "opt_state": opt_state}
        if "ema" in state:
            new["ema"] = train_state.ema_update(state["ema"], params, step + 1, ema_decay, ema_start, trainable)
        if "model_state" in state:
            new["model_state"] = variables
        # Non-finite guard: such a step changes nothing (the data iterator has still advanced).
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & train_state.all_finite(params)
        new = train_state.guard(ok, new, state)
        metrics = {
            "train/loss": loss,
            "train/lr": schedule(step),
            "train/grad_norm": grad_norm,
            **metrics,
            "train/skipped_steps": new["skipped"]["total"],
            "train/consecutive_skips": new["skipped"]["consecutive"],  # read by the loop, not logged
        }
        return new, metrics

    with sharding.use_mesh(mesh, rules):
        jit_init = jax.jit(init, out_shardings=state_shardings)
        jit_step = jax.jit(
            train_step,
            in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
            out_shardings=(state_shardings, sharding.replicated(mesh)),
            donate_argnums=0,
        )
    return Setup(config, mesh, rules, task, graphdef, abstract_state, state_shardings, schedule, trainable,
                 jit_init, jit_step)


def pipeline_counters(local_batch: dict) -> dict[str, float]:
    """The input pipeline's "data/..." counters (e.g. records skipped), summed over processes."""
    counters = {k: np.asarray(v, np.float64) for k, v in local_batch.items() if k.startswith("data/")}
    if counters and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        counters = {k: multihost_utils.process_allgather(v).sum() for k, v in counters.items()}
    return {k: float(v) for k, v in counters.items()}


def create_checkpointer(config, workdir: str) -> checkpoint_lib.Checkpointer:
    c = config.checkpoint
    return checkpoint_lib.Checkpointer(
        str(epath.Path(workdir) / "checkpoints"), keep=c.keep, keep_period=c.keep_period, async_save=c.async_save
    )


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def train(config: ml_collections.ConfigDict, workdir: str, *, exit_after_step: int | None = None) -> dict[str, float]:
    """Trains (or resumes) in `workdir`. Returns the last logged train and eval metrics.

    Before anything is built: the config is checked (ConfigError), the workdir locked (WorkdirBusy
    while another live run holds it) and, when resuming, the saved config compared with this one
    (ConfigError naming the keys that may not change); W/config.json is written only after the
    restore. `exit_after_step` stops this run after that step (checkpointing it), as a preemption
    would. Raises TrainingDiverged after `config.max_skipped_steps` consecutive non-finite steps,
    SaveFailed when a checkpoint cannot be written, CheckpointError when none of W's checkpoints restores.
    """
    xla_flags.apply(config.get("xla_flags") or {}, log=_log)  # before jax.device_count() starts the backend
    config_lib.validate(config, jax.device_count())
    with workdir_lib.Lock(workdir) as lock:
        if lock.taken_over:
            _log(f"workdir lock of a run that is gone ({lock.describe(lock.taken_over)}) taken over")
        for line in workdir_lib.check_resume(config, workdir):
            _log(line)
        return _train(config, workdir, exit_after_step)


def _train(config: ml_collections.ConfigDict, workdir: str, exit_after_step: int | None) -> dict[str, float]:
    from input_pipeline import pipeline

    mesh = sharding.create_mesh(config.mesh)
    setup = build(config, mesh)
    evaluators = evaluators_lib.from_config(config, setup.task)
    checkpointer = create_checkpointer(config, workdir)
    init_plan = None
    if not checkpointer.all_steps() and config.init_from.workdir:  # metadata only: fails before compiling
        init_plan = init_from.plan(config.init_from, setup.abstract_state["params"])
    config = run_tokenizer.save_to_workdir(config, workdir)  # W/tokenizer.model; its sha256 in config.json
    preempted = PreemptionFlag()
    profiler = profiling.StepProfiler(config.get("profile"), workdir, log=_log)
    timer, pending_skips, warned_data_wait = None, None, False
    last: dict[str, float] = {}

    def data_iterator(start_batch: int):
        return pipeline.create_train_iterator(config.data, global_batch_size=config.batch_size, seed=config.seed,
                                              start_batch=start_batch)

    with sharding.use_mesh(mesh, setup.rules), preempted, profiler:
        # The newest checkpoint that restores; damaged newer ones are moved aside (one line each).
        restored = checkpointer.restore_latest(setup.abstract_state, setup.state_shardings, data_iterator, log=_log)
        if restored is None:
            data_iter, state, start_step = data_iterator(0), setup.init(), 0
            if init_plan is not None:
                state["params"] = init_from.apply(init_plan, state["params"], setup.state_shardings["params"])
                if "ema" in state:
                    state["ema"] = jax.tree.map(jnp.copy, state["params"])
                _log(init_plan.summary())
        else:
            data_iter, start_step = restored.data_iterator, restored.step
            state = train_state.fill_missing(restored.state, restored.missing, setup.abstract_state,
                                             setup.state_shardings)
            # Each process saved its own iterator state, which cannot be re-divided among a different
            # number of processes. The global batch stream does not depend on the process count, so
            # then the stream restarts at the checkpoint's step: the batches the original run read.
            if restored.resharded:
                _log(f"checkpoint {start_step} was written by {restored.saved_by} processes, this run has "
                     f"{jax.process_count()}: model and optimizer state restored; the data iterator is "
                     f"re-sharded from global batch {start_step} (the same batches the original run would "
                     f"have read)")
            _log(f"resumed from {checkpointer.directory}/{start_step}")
        workdir_lib.write_config(config, workdir)
        # Rows a stopped run wrote after its last checkpoint are dropped: they are written again.
        writer = metrics_lib.MetricWriter(workdir, config.total_steps, config=config, resume_step=start_step)
        profiler.plan(start_step)
        for step in range(start_step, config.total_steps):
            wait_start = time.perf_counter()
            local_batch = next(data_iter)
            if timer is not None:
                timer.data_wait(time.perf_counter() - wait_start)
            batch = sharding.global_batch(local_batch, mesh)
            profiler.before(step, state)
            with profiler.annotate(step):
                state, step_metrics = setup.train_step(state, batch)
            done = step + 1
            if timer is None:  # FLOPs counted on the host while the device runs the first step (async dispatch)
                timer = metrics_lib.StepTimer(config.batch_size, model_flops_per_step(setup, batch), config.total_steps)
            if profiler.after(step, step_metrics):  # after_step > start_step: the timer has started
                timer.start(done)  # writing the trace is not train time
            if step == start_step:  # time steps after the compile
                jax.block_until_ready(step_metrics)
                timer.start(done)
            checkpointer.check_saves()  # a failed background save stops the run here (SaveFailed)
            # The guard's verdict on the previous step, read one step late so the device stays busy.
            if pending_skips is not None:
                _check_skips(int(pending_skips), done - 1, config.max_skipped_steps, checkpointer)
            pending_skips = step_metrics["train/consecutive_skips"]
            if done % config.log_every == 0 or done == config.total_steps:
                host = {k: float(v) for k, v in jax.device_get(step_metrics).items() if k != "train/consecutive_skips"}
                host.update(pipeline_counters(local_batch))
                speed, eta = timer.lap(done)
                if not warned_data_wait:  # once per run
                    warned_data_wait = _warn_data_wait(speed.get("train/data_wait_frac", 0.0), done, config.data)
                last.update(host)
                writer.write(done, {**host, **speed}, eta_s=eta)
            was_preempted = preempted.is_set()
            # Evaluate before checkpointing: a checkpoint of step N means every row up to N is written.
            due = [] if was_preempted else [e for e in evaluators if e.due(done, config.total_steps)]
            if due:
                eval_metrics = evaluators_lib.run(due, setup.eval_model(state), mesh=mesh, step=done, workdir=workdir)
                last.update(eval_metrics)
                writer.write(done, eval_metrics)
                timer.start(done)  # eval time is not train time
            if (done % config.checkpoint_every == 0 or done == config.total_steps or done == exit_after_step
                    or was_preempted):
                checkpointer.save(done, state, data_iter)
            if was_preempted:
                _log(f"preempted (SIGTERM): checkpointed step {done}; the same command resumes")
                break
            if exit_after_step is not None and done >= exit_after_step:
                break
        if pending_skips is not None and not preempted.is_set():
            _check_skips(int(pending_skips), done, config.max_skipped_steps, checkpointer)
    checkpointer.close()
    writer.close()
    return last


DATA_WAIT_WARNING = 0.10  # warn when the loop waits on the input pipeline more than this share of the time


def _warn_data_wait(frac: float, step: int, data_config) -> bool:
    """One line when the input pipeline holds the steps back, with the worker count to try; → warned."""
    if frac <= DATA_WAIT_WARNING:
        return False
    workers = int(data_config.get("worker_count", 0))
    suggest = max(2 * workers, min(os.cpu_count() or 1, 4), workers + 1)
    _log(f"step {step}: {100 * frac:.0f}% of the time went to waiting for input batches "
         f"(train/data_wait_frac); try --config.data.worker_count={suggest} (now {workers})")
    return True


def _check_skips(consecutive: int, step: int, limit: int, checkpointer) -> None:
    """Logs a skipped (non-finite) step; stops the run after `limit` of them in a row."""
    if consecutive == 0:
        return
    _log(f"step {step}: loss or gradient not finite; the update was skipped ({consecutive} in a row)")
    if consecutive >= limit:
        checkpointer.wait()
        raise TrainingDiverged(
            f"training diverged: {consecutive} consecutive non-finite steps up to step {step} "
            f"(config.max_skipped_steps={limit}); the last checkpoint is step {checkpointer.latest_step()} "
            f"in {checkpointer.directory}; lower config.optim.lr or check the data")


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a `vlm train` run saved in its workdir (keys added since filled with defaults)."""
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; --workdir must be the workdir of a `vlm train` run")
    return run_tokenizer.use_folder_copy(config_lib.from_json(path.read_text()), workdir)  # W/tokenizer.model


def restore_params(config, workdir: str, mesh, *, step: int | None = None, use_ema: bool | None = None):
    """(setup, model, step): a checkpoint's parameters (the EMA when the run kept one, unless
    use_ema=False) on `mesh`, without the optimizer state."""
    setup = build(config, mesh)
    checkpointer = create_checkpointer(config, workdir)
    step = checkpointer.resolve_step(step)
    item = "ema" if (use_ema is None or use_ema) and "ema" in checkpointer.items(step) else "params"
    params, step = checkpointer.restore_params(step, setup.abstract_state["params"], setup.state_shardings["params"],
                                               item=item)
    variables = None
    if "model_state" in setup.abstract_state:
        state, _ = checkpointer.restore(step, {"model_state": setup.abstract_state["model_state"]},
                                        {"model_state": setup.state_shardings["model_state"]})
        variables = state["model_state"]
    checkpointer.close()
    return setup, setup.model(params, variables), step


def load_model(workdir: str, *, step: int | None = None, devices=None, use_ema: bool | None = None
               ) -> tuple[nnx.Module, ml_collections.ConfigDict, int]:
    """(model, config, step) from a run's checkpoint, parameters only: for downstream use.

        model, config, step = vlm.train.load_model("/tmp/vlm_tiny")
        video_emb, text_emb = model(video, tokens)

    By default the model lives on one device (data parallel over `devices` if given).
    """
    config = load_config(workdir)
    devices = list(devices or jax.devices()[:1])
    with config.unlocked():  # (configs saved before the context axis lack it)
        config.mesh.update(dict(data=-1, fsdp=1, context=1, tensor=1))
        config.mesh.dcn.update(dict(data=1, fsdp=1, context=1, tensor=1))
    mesh = sharding.create_mesh(config.mesh, devices)
    _, model, step = restore_params(config, workdir, mesh, step=step, use_ema=use_ema)
    return model, config, step


def evaluate(workdir: str, *, step: int | None = None, config: ml_collections.ConfigDict | None = None,
             evals: str | None = None, use_ema: bool | None = None) -> dict[str, float]:
    """Runs the run's evaluators (or those named in `evals`, comma-separated) on a checkpoint of
    `workdir` (latest, or `step`) with the run's saved config."""
    config = config or load_config(workdir)
    config_lib.validate(config, jax.device_count())
    mesh = sharding.create_mesh(config.mesh)
    setup, model, step = restore_params(config, workdir, mesh, step=step, use_ema=use_ema)
    chosen = evaluators_lib.select(evaluators_lib.from_config(config, setup.task), evals)
    with sharding.use_mesh(mesh, setup.rules):
        metrics = evaluators_lib.run(chosen, model, mesh=mesh, step=step, workdir=workdir)
    return {"step": step, **metrics}
