"""N processes train exactly like one: launch/local.py runs 2 processes x 4 CPU devices (gloo)."""

import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.helpers import SMALL_OVERRIDES, load_checkpoint_params, multiprocess_env, read_metrics, run_vlm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch", "local.py")
STEPS = 6


def train_args(workdir, data_dir, *extra, hybrid=False):
    """The same (data=2, fsdp=4) mesh in every run; with `hybrid`, data spans the 2 processes as DCN."""
    mesh = (["--config.mesh.data=1", "--config.mesh.dcn.data=2"] if hybrid else ["--config.mesh.data=2"])
    return ["train", "--config=configs/dual_encoder.py:tiny", *SMALL_OVERRIDES, f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}", f"--config.total_steps={STEPS}", "--config.log_every=1",
            "--config.checkpoint_every=100", "--config.eval_every=100", *mesh, "--config.mesh.fsdp=4", *extra]


def launch(*args, processes=2, devices=4, log_dir=None, timeout=300):
    cmd = [sys.executable, LAUNCH, f"--processes={processes}", f"--devices_per_process={devices}"]
    if log_dir:
        cmd.append(f"--log_dir={log_dir}")
    cmd += ["--", sys.executable, "-m", "vlm.main", *args]
    env = multiprocess_env()
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def losses(workdir):
    return {m["step"]: m["train/loss"] for m in read_metrics(workdir) if "train/loss" in m}


def params(workdir, step):
    return jax.tree.leaves(load_checkpoint_params(workdir, step))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mp")
    data = tmp / "data"
    out = {}
    # 2 processes x 4 devices, uninterrupted: the reference.
    proc = launch(*train_args(tmp / "two", data, hybrid=True), log_dir=tmp / "logs_two")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out["two"] = tmp / "two"
    # 2 processes, interrupted after step 3; resumed by 2 processes and (a copy) by 1 process x 8 devices,
    # which also shows 1 process computing the steps after 3 as 2 processes do.
    proc = launch(*train_args(tmp / "cut", data, "--exit_after_step=3", hybrid=True), log_dir=tmp / "logs_cut")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    shutil.copytree(tmp / "cut", tmp / "cut_one")
    proc = launch(*train_args(tmp / "cut", data, hybrid=True), log_dir=tmp / "logs_cut2")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out["resumed_two"], out["resumed_two_stdout"] = tmp / "cut", proc.stdout
    proc = run_vlm(*train_args(tmp / "cut_one", data), devices=8)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out["resumed_one"], out["resumed_one_stdout"] = tmp / "cut_one", proc.stdout
    out["logs"] = tmp / "logs_two"
    return out


def test_two_processes_train_like_one(runs):
    """2 processes x 4 devices (data across processes via a hybrid DCN mesh) vs 1 x 8, same mesh shape: the
    1-process run resumes the 2-process checkpoint of step 3 and computes steps 4..STEPS as 2 processes do."""
    two, one = losses(runs["two"]), losses(runs["resumed_one"])
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    later = range(4, STEPS + 1)
    np.testing.assert_allclose([one[s] for s in later], [two[s] for s in later], rtol=1e-5)
    assert two[STEPS] < two[1]
    for a, b in zip(params(runs["two"], STEPS), params(runs["resumed_one"], STEPS)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_only_process_zero_writes(runs):
    logs = runs["logs"]
    assert "loss=" in (logs / "process_0.log").read_text()
    assert "loss=" not in (logs / "process_1.log").read_text()  # no duplicate console progress
    train_rows = [m["step"] for m in read_metrics(runs["two"]) if "train/loss" in m]
    assert train_rows == list(range(1, STEPS + 1))  # one metrics writer: each step's row once


def test_checkpoint_of_two_processes_resumes_in_two_and_in_one(runs):
    reference = losses(runs["two"])
    resumed_two = losses(runs["resumed_two"])
    later = range(4, STEPS + 1)
    # Same processes: bit for bit.
    assert [resumed_two[s] for s in later] == [reference[s] for s in later]
    assert "resumed from" in runs["resumed_two_stdout"]
    # One process (8 devices): model state restored, data re-sharded from the step (numbers: the test above).
    assert "was written by 2 processes, this run has 1" in runs["resumed_one_stdout"]


def test_killing_one_process_ends_the_job(tmp_path):
    cmd = [sys.executable, LAUNCH, "--processes=2", "--devices_per_process=2", f"--log_dir={tmp_path}/logs", "--",
           sys.executable, "-m", "vlm.main", *train_args(tmp_path / "w", tmp_path / "data")[:-2],
           "--config.mesh.data=-1", "--config.mesh.fsdp=1", "--config.total_steps=100000"]
    env = multiprocess_env()
    job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = []
    while len(pids) < 2:
        line = job.stdout.readline()
        assert line, "launcher ended before starting both processes"
        if line.startswith("[launch] process"):
            pids.append(int(line.split(" pid ")[1].split(",")[0]))
    # Wait until training runs (process 0 logs steps), then kill process 1.
    deadline = time.time() + 240
    while "loss=" not in (tmp_path / "logs" / "process_0.log").read_text():
        assert time.time() < deadline and job.poll() is None
        time.sleep(0.5)
    os.kill(pids[1], signal.SIGKILL)
    killed_at = time.time()
    _, stderr = job.communicate(timeout=60)
    assert job.returncode != 0
    assert time.time() - killed_at < 15  # promptly, not after a collective timeout
    assert "process 1 failed (killed by signal 9)" in stderr
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)  # process 0 is gone too: no orphan
