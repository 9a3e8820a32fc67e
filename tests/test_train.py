"""The training loop end to end: exact resume across a process exit, reshard restore, eval."""

import os

import jax
import numpy as np
import pytest

from tests.helpers import SMALL_OVERRIDES, load_checkpoint_params, read_metrics, run_vlm, small_config
from vlm import sharding, train

SPEED_KEYS = ("time", "train/steps_per_s", "train/examples_per_s", "train/tflops_per_device",
              "train/model_flops_per_step", "train/data_wait_frac", "train/peak_memory_gib")  # timing: differs between runs


def train_losses(workdir) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in read_metrics(workdir) if "train/loss" in m}


def load_params(workdir, step):
    return load_checkpoint_params(workdir, step)


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory):
    """2N steps straight vs N steps, process exit, restart, N more (N = 4), on 2 devices."""
    tmp = tmp_path_factory.mktemp("resume")
    common = ["train", "--config=configs/dual_encoder.py:tiny", *SMALL_OVERRIDES, f"--config.data.data_dir={tmp}/data",
              "--config.total_steps=8", "--config.log_every=1", "--config.checkpoint_every=100",
              "--config.eval_every=100"]
    straight, interrupted = tmp / "straight", tmp / "interrupted"
    for args in ([f"--workdir={straight}"], [f"--workdir={interrupted}", "--exit_after_step=4"],
                 [f"--workdir={interrupted}"]):
        proc = run_vlm(*common, *args, devices=2)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return straight, interrupted, proc


def test_exact_resume_losses_bit_for_bit(resumed_runs):
    straight, interrupted, last_proc = resumed_runs
    assert "resumed from" in last_proc.stdout and "/4" in last_proc.stdout
    a, b = train_losses(straight), train_losses(interrupted)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert [a[s] for s in range(5, 9)] == [b[s] for s in range(5, 9)]  # exact float equality
    assert a[8] < a[1]  # and it is learning, not standing still
    # Every other train metric too (grad norm, lr, temperature), bit for bit.
    rows_a = {m["step"]: m for m in read_metrics(straight) if "train/loss" in m}
    rows_b = {m["step"]: m for m in read_metrics(interrupted) if "train/loss" in m}
    for s in range(5, 9):
        for k in rows_a[s]:
            if k not in SPEED_KEYS:
                assert rows_a[s][k] == rows_b[s][k], (s, k)


def test_exact_resume_final_parameters_identical(resumed_runs):
    straight, interrupted, _ = resumed_runs
    pa, pb = load_params(straight, 8), load_params(interrupted, 8)
    leaves_a, leaves_b = jax.tree.leaves(pa), jax.tree.leaves(pb)
    assert len(leaves_a) == len(leaves_b) > 10
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # Checkpoints of both runs exist at 4 (the interruption) and 8.
    assert sorted(os.listdir(interrupted / "checkpoints")) == ["4", "8"]


def test_eval_command_reproduces_the_train_time_eval(resumed_runs):
    straight, _, _ = resumed_runs
    eval_rows = [m for m in read_metrics(straight) if "eval/t2v_r1" in m]
    assert [m["step"] for m in eval_rows] == [8]
    proc = run_vlm("eval", f"--workdir={straight}", devices=2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = dict(kv.split("=") for kv in proc.stdout.strip().splitlines()[-1].split())
    assert int(printed["step"]) == 8
    for key in ("eval/t2v_r1", "eval/t2v_r5", "eval/v2t_r10", "eval/t2v_medr"):
        assert float(printed[key]) == pytest.approx(eval_rows[0][key], abs=1e-3)
    table = (straight / "samples" / "8" / "retrieval.txt").read_text()
    assert "text→video" in table and "held-out pairs" in table


def test_restore_onto_another_mesh(tmp_path):
    """Saved with fsdp=8 (8 devices), restored with data=2 (2 devices): same parameters, new shardings."""
    config = small_config(data=1, fsdp=8, tensor=1)
    config.total_steps = 2
    config.data.data_dir = str(tmp_path / "data")
    config.eval_every = config.checkpoint_every = 1000
    train.train(config, str(tmp_path / "w"))

    saved_mesh = sharding.create_mesh(config.mesh)
    saved_setup = train.build(config, saved_mesh)
    checkpointer = train.create_checkpointer(config, str(tmp_path / "w"))
    saved, _ = checkpointer.restore(2, saved_setup.abstract_state, saved_setup.state_shardings)
    kernel = saved["params"]["video"]["encoder"]["blocks"][0]["mlp"]["up"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")  # [embed, mlp]
    assert kernel.sharding.mesh.shape["fsdp"] == 8 and kernel.addressable_shards[0].data.shape[0] == 32 // 8

    config2 = small_config(data=2, fsdp=1, tensor=1)
    config2.total_steps = 2
    mesh2 = sharding.create_mesh(config2.mesh, jax.devices()[:2])
    setup2 = train.build(config2, mesh2)
    restored, _ = checkpointer.restore(2, setup2.abstract_state, setup2.state_shardings)
    kernel2 = restored["params"]["video"]["encoder"]["blocks"][0]["mlp"]["up"]["kernel"]
    assert kernel2.sharding.mesh.shape == {"data": 2, "fsdp": 1, "context": 1, "tensor": 1}
    assert len(kernel2.sharding.device_set) == 2
    for x, y in zip(jax.tree.leaves(saved), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert int(restored["step"]) == 2

    # Params-only restore (evaluation, downstream use) gives the same parameters, no optimizer state.
    params, step = checkpointer.restore_params(None, setup2.abstract_state["params"], setup2.state_shardings["params"])
    assert step == 2
    for x, y in zip(jax.tree.leaves(saved["params"]), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    checkpointer.close()


def test_run_writes_tensorboard_and_progress(resumed_runs):
    straight, _, last_proc = resumed_runs
    events = [f for f in os.listdir(straight / "tensorboard") if f.startswith("events.out.tfevents")]
    assert events and os.path.getsize(straight / "tensorboard" / events[0]) > 100
    # Progress line: step counter, loss, speed and an ETA.
    lines = [l for l in last_proc.stdout.splitlines() if l.startswith("[") and "loss=" in l]
    assert [l.split("/")[0].strip("[ ") for l in lines] == ["5", "6", "7", "8"]
    # The first step after a (re)start includes compilation, so speed and ETA start at the second.
    assert all("steps_per_s=" in l and "eta=" in l for l in lines[1:])
    row = read_metrics(straight)[1]  # step 2: the first row with speed (step 1 includes the compile)
    for key in ("step", "train/loss", "train/lr", "train/grad_norm", "train/steps_per_s", "train/examples_per_s",
                "train/model_flops_per_step", "train/data_wait_frac"):
        assert key in row, key
    assert 0.0 <= row["train/data_wait_frac"] <= 1.0
    assert "train/peak_memory_gib" not in row  # XLA:CPU keeps no memory statistics


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    """Preemption (SIGTERM): the step in flight finishes, is checkpointed, and the process exits 0."""
    import signal
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "vlm.main", "train", "--config=configs/dual_encoder.py:tiny", *SMALL_OVERRIDES,
           f"--workdir={tmp_path}/w", f"--config.data.data_dir={tmp_path}/data", "--config.total_steps=100000",
           "--config.log_every=1", "--config.checkpoint_every=100000", "--config.eval_every=100000"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(cmd, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while "loss=" not in proc.stdout.readline():
        assert time.time() < deadline and proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-2000:]
    assert "preempted (SIGTERM): checkpointed step" in stdout
    step = int(stdout.split("checkpointed step ")[1].split(";")[0])
    assert os.listdir(tmp_path / "w" / "checkpoints") == [str(step)]
    assert max(m["step"] for m in read_metrics(tmp_path / "w")) == step


def test_load_model_for_downstream_use(resumed_runs):
    """A user loads the trained dual encoder from the workdir and embeds held-out pairs."""
    import jax.numpy as jnp

    from input_pipeline import pipeline
    from vlm.eval import retrieval

    straight, _, _ = resumed_runs
    model, config, step = train.load_model(str(straight))
    assert step == 8 and config.batch_size == 16
    batch = next(iter(pipeline.create_eval_iterator(config.data, global_batch_size=256, process_index=0,
                                                    process_count=1)))
    video_emb, text_emb = model(jnp.asarray(batch["video"]), jnp.asarray(batch["tokens"]))
    assert video_emb.shape == (256, config.model.embed_dim)
    # The same numbers as the train-time evaluation of this checkpoint.
    metrics = retrieval.retrieval_metrics(np.asarray(text_emb @ video_emb.T))
    train_eval = [m for m in read_metrics(straight) if "eval/t2v_r1" in m][-1]
    assert metrics["t2v_r1"] == pytest.approx(train_eval["eval/t2v_r1"], abs=1 / 256 + 1e-9)
