"""How a process decides whether and how to join a multi-process job, and the hybrid mesh."""

import jax
import pytest

from vlm import distributed, sharding


def test_explicit_flags_win():
    mode, kwargs = distributed.detect("10.0.0.1:1234", 4, 2, environ={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"})
    assert mode == "explicit"
    assert kwargs == dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=2)


def test_environment_variables():
    env = {"JAX_COORDINATOR_ADDRESS": "host0:8476", "JAX_NUM_PROCESSES": "16", "JAX_PROCESS_ID": "15"}
    assert distributed.detect(environ=env) == (
        "explicit", dict(coordinator_address="host0:8476", num_processes=16, process_id=15))


def test_partial_settings_are_a_clear_error():
    with pytest.raises(ValueError, match="missing num_processes, process_id"):
        distributed.detect(environ={"JAX_COORDINATOR_ADDRESS": "h:1"})
    with pytest.raises(ValueError, match=r"--process_id=4 must be in \[0, 4\)"):
        distributed.detect("h:1", 4, 4, environ={})


def test_slurm_tpu_and_single(monkeypatch):
    monkeypatch.setattr(distributed, "_has_libtpu", lambda: False)
    assert distributed.detect(environ={"SLURM_JOB_ID": "9", "SLURM_NTASKS": "4"}) == ("slurm", {})
    # One task per node: that task drives all of the node's GPUs.
    env = {"SLURM_JOB_ID": "9", "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "8"}
    assert distributed.detect(environ=env) == ("slurm", {"local_device_ids": list(range(8))})
    env = {"SLURM_JOB_ID": "9", "SLURM_NTASKS": "4", "JAX_LOCAL_DEVICE_IDS": "2,3"}
    assert distributed.detect(environ=env) == ("slurm", {"local_device_ids": [2, 3]})
    # A one-task SLURM allocation is a single process.
    assert distributed.detect(environ={"SLURM_JOB_ID": "9", "SLURM_NTASKS": "1"}) == ("single", {})
    assert distributed.detect(environ={"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}) == ("tpu", {})
    assert distributed.detect(environ={"TPU_WORKER_HOSTNAMES": "localhost"}) == ("single", {})
    assert distributed.detect(environ={}) == ("single", {})
    # A Cloud TPU VM (libtpu present): JAX finds the slice's hosts itself.
    monkeypatch.setattr(distributed, "_has_libtpu", lambda: True)
    assert distributed.detect(environ={}) == ("tpu", {})
    assert distributed.detect(environ={"JAX_PLATFORMS": "cpu"}) == ("single", {})


def test_axis_sizes_multiply_ici_and_dcn():
    mesh = {"data": 1, "fsdp": -1, "tensor": 2, "dcn": {"data": 4, "fsdp": 1, "tensor": 1}}
    # 64 chips in 4 slices of 16: fsdp fills 16 / 2 = 8 within a slice.
    assert sharding.axis_sizes(mesh, 64) == {"data": 4, "fsdp": 8, "context": 1, "tensor": 2}
    with pytest.raises(sharding.MeshError, match="asks for 4 slices"):
        sharding.axis_sizes(mesh, 6)


def test_single_slice_mesh_is_the_plain_mesh():
    mesh = sharding.create_mesh({"data": 2, "fsdp": 4, "tensor": 1, "dcn": {"data": 1, "fsdp": 1, "tensor": 1}})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "context": 1, "tensor": 1}
    assert list(mesh.devices.flat) == jax.devices()
