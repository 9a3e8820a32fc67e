"""Starting JAX's multi-process runtime: one process per host (TPU VM, GPU node) or per CPU group.

`initialize()` picks, in order:
  1. explicit arguments (`--coordinator_address/--num_processes/--process_id`), else the
     variables JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (set by
     launch/local.py, GKE manifests, ...);
  2. SLURM (`srun` sets SLURM_JOB_ID, SLURM_NTASKS > 1): JAX reads the coordinator, process
     count and id from SLURM's environment (with one task per node, each process takes all
     of its node's GPUs);
  3. a Cloud TPU VM (libtpu installed, or TPU_WORKER_HOSTNAMES on GKE): JAX reads the
     slice's hosts from the TPU metadata;
  4. otherwise a single process, and nothing is initialised.
It must run before anything asks JAX for its devices.
"""

from __future__ import annotations

import os

import jax


def detect(coordinator_address: str | None = None, num_processes: int | None = None,
           process_id: int | None = None, environ=None) -> tuple[str, dict]:
    """(mode, kwargs for jax.distributed.initialize). Pure: reads only `environ`."""
    env = os.environ if environ is None else environ
    address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    count = num_processes if num_processes is not None else _env_int_from(env, "JAX_NUM_PROCESSES")
    index = process_id if process_id is not None else _env_int_from(env, "JAX_PROCESS_ID")
    if address or count is not None or index is not None:
        missing = [n for n, v in (("coordinator_address", address), ("num_processes", count), ("process_id", index))
                   if v is None]
        if missing:
            raise ValueError(
                f"multi-process run needs --coordinator_address, --num_processes and --process_id "
                f"(or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID); missing {', '.join(missing)}"
            )
        if not 0 <= index < count:
            raise ValueError(f"--process_id={index} must be in [0, {count}) for --num_processes={count}")
        return "explicit", dict(coordinator_address=address, num_processes=count, process_id=index)
    if env.get("SLURM_JOB_ID") and (_env_int_from(env, "SLURM_NTASKS") or 1) > 1:
        return "slurm", _slurm_local_devices(env)
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if len(hosts) > 1 or (_has_libtpu() and not env.get("JAX_PLATFORMS", "").startswith("cpu")):
        # On a Cloud TPU VM JAX reads the slice's hosts from the metadata server; with one
        # host this is a one-process "cluster", which is harmless.
        return "tpu", {}
    return "single", {}


def _has_libtpu() -> bool:
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


def _slurm_local_devices(env) -> dict:
    """One task per node should drive all of the node's GPUs.

    JAX's SLURM detection gives each process only GPU $SLURM_LOCALID, right for one task
    per GPU but leaving 7 of 8 idle with one task per node.
    """
    if env.get("JAX_LOCAL_DEVICE_IDS"):
        return dict(local_device_ids=[int(i) for i in env["JAX_LOCAL_DEVICE_IDS"].split(",")])
    per_node = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_STEP_TASKS_PER_NODE", "").split("(")[0]
    gpus = _env_int_from(env, "SLURM_GPUS_ON_NODE")
    if per_node == "1" and gpus:
        return dict(local_device_ids=list(range(gpus)))
    return {}


def _env_int_from(env, name: str) -> int | None:
    value = env.get(name)
    return int(value) if value not in (None, "") else None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> str:
    """Initialises jax.distributed as `detect` decides; returns the mode."""
    mode, kwargs = detect(coordinator_address, num_processes, process_id)
    if mode == "single":
        return mode
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        # CPU processes exchange collectives through gloo (no accelerator interconnect).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    return mode
