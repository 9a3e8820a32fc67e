"""The one training loop, the same for every task.

Reads top to bottom: config check → mesh → data → abstract model → shardings →
jitted init (or restore) → jitted step → loop with logging, eval and checkpoints.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from etils import epath
import numpy as np
import optax
from flax import nnx

from vlm import checkpoint as checkpoint_lib
from vlm import config as config_lib
from vlm import metrics as metrics_lib
from vlm import optim, sharding, tasks

State = dict[str, Any]  # {"step": int32 [], "params": pure dict, "opt_state": optax state, "rng": uint32 [2]}


@dataclasses.dataclass
class Setup:
    """Everything built from a config and a mesh before the first step."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    rules: tuple
    task: Any
    graphdef: nnx.GraphDef
    abstract_state: State
    state_shardings: State
    schedule: optax.Schedule
    init: Callable[[], State]  # jitted; creates the state directly into its shards
    train_step: Callable[[State, dict], tuple[State, dict]]  # jitted, donates the state

    def model(self, params) -> nnx.Module:
        return nnx.merge(self.graphdef, params)


def microbatch_split(x: jax.Array, k: int) -> jax.Array:
    """[B, ...] → [k, B/k, ...] with microbatch i = rows i, i+k, i+2k, ...

    Strided (not contiguous) so that every device holds a slice of every microbatch.
    """
    return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)


def microbatch_merge(x: jax.Array) -> jax.Array:
    """Inverse of microbatch_split: [k, B/k, ...] → [B, ...] in the original row order."""
    return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def loss_and_grads(task, graphdef, params, batch, rng, microbatches: int):
    """(loss, metrics), grads of the task's loss over the whole batch.

    With k > 1 microbatches the gradient is still that of the full-batch loss
    (GradCache): features per microbatch without gradients, the batch-level loss
    and its gradient w.r.t. the features, then each microbatch's vector-Jacobian
    product accumulated in a scan. Exact for contrastive losses, at the cost of a
    second forward pass; peak activation memory is one microbatch's.
    """

    def features_fn(p, mb, r):
        return task.features(nnx.merge(graphdef, p), mb, r)

    def loss_fn(p, feats):
        return task.loss(nnx.merge(graphdef, p), feats, batch)

    if microbatches == 1:
        full = lambda p: loss_fn(p, features_fn(p, batch, rng))
        return jax.value_and_grad(full, has_aux=True)(params)

    mbs = jax.tree.map(lambda x: microbatch_split(x, microbatches), batch)  # leaves [k, B/k, ...]
    rngs = jax.random.split(rng, microbatches)
    feats = jax.lax.map(lambda a: features_fn(params, *a), (mbs, rngs))  # leaves [k, B/k, ...]
    feats = jax.tree.map(microbatch_merge, feats)  # leaves [B, ...]
    (loss, metrics), (grads, feat_grads) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(params, feats)
    feat_grads = jax.tree.map(lambda g: microbatch_split(g, microbatches), feat_grads)

    def accumulate(acc, a):
        mb, r, g = a
        _, vjp = jax.vjp(lambda p: features_fn(p, mb, r), params)
        return jax.tree.map(jnp.add, acc, vjp(g)[0]), None

    grads, _ = jax.lax.scan(accumulate, grads, (mbs, rngs, feat_grads))
    return (loss, metrics), grads


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Setup:
    """Abstract model → shardings → jitted init and train step. Nothing full-size is allocated."""
    rules = sharding.logical_rules(config.sharding_rules)
    task = tasks.get(config)
    tx, schedule = optim.create_optimizer(config.optim, config.total_steps)

    with sharding.use_mesh(mesh, rules):
        abstract_model = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(config.seed)))
        graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
        param_shardings = sharding.state_shardings(abstract_params, mesh, rules)
        sharding.check_divisible(nnx.to_pure_dict(abstract_params), param_shardings)

    def init() -> State:
        model = task.build_model(nnx.Rngs(config.seed))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "opt_state": tx.init(params),
            "rng": jax.random.key_data(jax.random.key(config.seed)),
        }

    abstract_state = jax.eval_shape(init)
    replicated = sharding.replicated(mesh)
    state_shardings = {
        "step": replicated,
        "params": param_shardings,
        # Optimizer moments are sharded like their parameters; counters are replicated.
        "opt_state": optax.tree_map_params(
            tx,
            lambda _, s: s,
            abstract_state["opt_state"],
            param_shardings,
            transform_non_params=lambda _: replicated,
        ),
        "rng": replicated,
    }

    def train_step(state: State, batch: dict[str, jax.Array]) -> tuple[State, dict]:
        step = state["step"]
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
        (loss, metrics), grads = loss_and_grads(task, graphdef, state["params"], batch, rng, config.microbatches)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {
            "train/loss": loss,
            "train/lr": schedule(step),
            "train/grad_norm": optax.tree.norm(grads),
            **metrics,
        }
        return {"step": step + 1, "params": params, "opt_state": opt_state, "rng": state["rng"]}, metrics

    with sharding.use_mesh(mesh, rules):
        jit_init = jax.jit(init, out_shardings=state_shardings)
        jit_step = jax.jit(
            train_step,
            in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
            out_shardings=(state_shardings, replicated),
            donate_argnums=0,
        )
    return Setup(config, mesh, rules, task, graphdef, abstract_state, state_shardings, schedule, jit_init, jit_step)


def model_flops_per_step(setup: Setup, batch: dict[str, jax.Array]) -> float | None:
    """Model FLOPs of one train step: 3× the forward pass (fwd + 2× bwd), counted by XLA.

    Counted on the un-rematerialised forward graph, so recomputation is not credited (MFU,
    not hardware utilisation). The forward is lowered for one *CPU* device whatever the
    accelerator: `Lowered.cost_analysis` is not implemented by the PJRT plugins (CUDA, TPU),
    and a compiled GPU program's count leaves out the cuBLAS matmuls (measured on an H200:
    ~4% of the FLOPs). The count depends only on the program and its shapes.
    """
    task, graphdef = setup.task, setup.graphdef
    if setup.config.model.get("attention_impl", "xla") != "xla":
        # A fused GPU kernel has no CPU lowering; the same attention written in XLA counts the same FLOPs.
        config = ml_collections.ConfigDict(setup.config.to_dict())
        config.model.attention_impl = "xla"
        task = tasks.get(config)
        with sharding.use_mesh(setup.mesh, setup.rules):
            graphdef = nnx.split(nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0))), nnx.Param)[0]

    def forward(params, batch):
        model = nnx.merge(graphdef, params)
        return task.loss(model, task.features(model, batch, jax.random.key(0)), batch)[0]

    try:
        cpu_mesh = sharding.create_mesh({a: 1 for a in sharding.MESH_AXES}, jax.devices("cpu")[:1])
        on_cpu = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(cpu_mesh))
        params = jax.tree.map(on_cpu, setup.abstract_state["params"])
        shapes = jax.tree.map(on_cpu, dict(batch))
        with sharding.use_mesh(cpu_mesh, setup.rules):
            cost = jax.jit(forward).lower(params, shapes).cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return 3.0 * float(cost["flops"])
    except Exception as e:  # best effort: a missing count must never stop training
        logging.warning("model FLOPs not counted (%s); MFU will not be logged", e)
        return None


def pipeline_counters(local_batch: dict) -> dict[str, float]:
    """The input pipeline's "data/..." counters (e.g. records skipped), summed over processes."""
    counters = {k: np.asarray(v, np.float64) for k, v in local_batch.items() if k.startswith("data/")}
    if counters and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        counters = {k: multihost_utils.process_allgather(v).sum() for k, v in counters.items()}
    return {k: float(v) for k, v in counters.items()}


def _write_config(config, workdir: str) -> None:
    if jax.process_index() != 0:
        return
    # epath: the workdir may be a bucket (gs://...), as on a pod.
    path = epath.Path(workdir) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / "config.json.tmp"
    tmp.write_text(config_lib.to_json(config))
    tmp.replace(path)


def create_checkpointer(config, workdir: str) -> checkpoint_lib.Checkpointer:
    c = config.checkpoint
    return checkpoint_lib.Checkpointer(
        str(epath.Path(workdir) / "checkpoints"), keep=c.keep, keep_period=c.keep_period, async_save=c.async_save
    )


def train(config: ml_collections.ConfigDict, workdir: str, *, exit_after_step: int | None = None) -> dict[str, float]:
    """Trains (or resumes) in `workdir`. Returns the last logged train and eval metrics.

    `exit_after_step` stops this run after that step (checkpointing it), as a preemption would.
    """
    from input_pipeline import pipeline

    config_lib.validate(config, jax.device_count())
    _write_config(config, workdir)
    mesh = sharding.create_mesh(config.mesh)
    setup = build(config, mesh)

    checkpointer = create_checkpointer(config, workdir)
    writer = metrics_lib.MetricWriter(workdir, config.total_steps)
    preempted = _PreemptionFlag()
    timer = None
    last: dict[str, float] = {}
    start_step = checkpointer.latest_step()
    # Each process saved its own iterator state, which cannot be re-divided among a different number
    # of processes. The global batch stream does not depend on the process count, so then the stream
    # restarts at the checkpoint's step instead: the same batches the original run would have read.
    saved_by = checkpointer.saved_process_count(start_step) if start_step is not None else jax.process_count()
    reshard_data = saved_by != jax.process_count()
    data_iter = pipeline.create_train_iterator(
        config.data, global_batch_size=config.batch_size, seed=config.seed,
        start_batch=start_step if reshard_data else 0,
    )
    with sharding.use_mesh(mesh, setup.rules), preempted:
        if start_step is None:
            state = setup.init()
            start_step = 0
        else:
            restored_iter = None if reshard_data else data_iter
            state = checkpointer.restore(start_step, setup.abstract_state, setup.state_shardings, restored_iter)
            if jax.process_index() == 0:
                if reshard_data:
                    print(f"checkpoint {start_step} was written by {saved_by} processes, this run has "
                          f"{jax.process_count()}: model and optimizer state restored; the data iterator is "
                          f"re-sharded from global batch {start_step} (the same batches the original run would "
                          f"have read)", flush=True)
                print(f"resumed from {checkpointer.directory}/{start_step}", flush=True)
        for step in range(start_step, config.total_steps):
            local_batch = next(data_iter)
            batch = sharding.global_batch(local_batch, mesh)
            if timer is None:
                flops = model_flops_per_step(setup, batch)
                timer = metrics_lib.StepTimer(config.batch_size, flops, config.total_steps)
            state, step_metrics = setup.train_step(state, batch)
            done = step + 1
            if step == start_step:  # time steps after the compile
                jax.block_until_ready(step_metrics)
                timer.start(done)
            if done % config.log_every == 0 or done == config.total_steps:
                host = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                host.update(pipeline_counters(local_batch))
                speed, eta = timer.lap(done)
                last.update(host)
                writer.write(done, {**host, **speed}, eta_s=eta)
            was_preempted = preempted.is_set()
            if (done % config.checkpoint_every == 0 or done == config.total_steps or done == exit_after_step
                    or was_preempted):
                checkpointer.save(done, state, data_iter)
            if was_preempted:
                if jax.process_index() == 0:
                    print(f"preempted (SIGTERM): checkpointed step {done}; the same command resumes", flush=True)
                break
            if done % config.eval_every == 0 or done == config.total_steps:
                eval_metrics = setup.task.evaluate(setup.model(state["params"]), mesh=mesh, step=done, workdir=workdir)
                last.update(eval_metrics)
                writer.write(done, eval_metrics)
                timer.start(done)  # eval time is not train time
            if exit_after_step is not None and done >= exit_after_step:
                break
    checkpointer.close()
    writer.close()
    return last


class _PreemptionFlag:
    """Set by SIGTERM (how TPU/GKE/SLURM announce preemption): the loop checkpoints and exits.

    Every process gets the signal, but acting on it must be collective (the checkpoint is a
    collective write), so the flag is agreed across processes each step it is consulted.
    """

    def __init__(self):
        self._local = False
        self._previous = None

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc):
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame):
        self._local = True

    def is_set(self) -> bool:
        if jax.process_count() == 1:
            return self._local
        from jax.experimental import multihost_utils

        return bool(multihost_utils.process_allgather(np.asarray(self._local)).any())


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a `vlm train` run saved in its workdir."""
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; --workdir must be the workdir of a `vlm train` run")
    return config_lib.from_json(path.read_text())


def load_model(workdir: str, *, step: int | None = None, devices=None) -> tuple[nnx.Module, ml_collections.ConfigDict, int]:
    """(model, config, step) from a run's checkpoint, parameters only: for downstream use.

        model, config, step = vlm.train.load_model("/tmp/vlm_tiny")
        video_emb, text_emb = model(video, tokens)

    By default the model lives on one device (data parallel over `devices` if given).
    """
    config = load_config(workdir)
    devices = list(devices or jax.devices()[:1])
    config.mesh.update(dict(data=-1, fsdp=1, tensor=1))
    config.mesh.dcn.update(dict(data=1, fsdp=1, tensor=1))
    mesh = sharding.create_mesh(config.mesh, devices)
    setup = build(config, mesh)
    checkpointer = create_checkpointer(config, workdir)
    params, step = checkpointer.restore_params(step, setup.abstract_state["params"], setup.state_shardings["params"])
    checkpointer.close()
    return setup.model(params), config, step


def evaluate(workdir: str, *, step: int | None = None, config: ml_collections.ConfigDict | None = None) -> dict[str, float]:
    """Evaluates a checkpoint of `workdir` (latest, or `step`) with the run's saved config."""
    config = config or load_config(workdir)
    config_lib.validate(config, jax.device_count())
    mesh = sharding.create_mesh(config.mesh)
    setup = build(config, mesh)
    checkpointer = create_checkpointer(config, workdir)
    params, step = checkpointer.restore_params(step, setup.abstract_state["params"], setup.state_shardings["params"])
    with sharding.use_mesh(mesh, setup.rules):
        metrics = setup.task.evaluate(setup.model(params), mesh=mesh, step=step, workdir=workdir)
    checkpointer.close()
    return {"step": step, **metrics}
