"""launch/slurm.py: the sbatch script per node or per GPU, each task's coordinator and index under a fake
srun / scontrol, submission, and one-line input errors."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from launch import slurm
from tests.launcher_helpers import TRAIN, TRICKY, assert_one_line_error, bash_syntax_ok, fake_program, launch, records


# --- SLURM -------------------------------------------------------------------------------------------------------

def test_slurm_script_one_process_per_node():
    rc, out, err = launch(slurm, "--nodes=4", "--gpus_per_node=8", "--partition=gpu", "--account=proj",
                          "--time=2-00:00:00", "--cpus_per_task=32", "--exclusive", "--job_name=de-b16",
                          "--preamble=source ~/vlm_venv/bin/activate", "--env=NCCL_DEBUG=WARN", "--dry_run",
                          "--", *TRAIN, "--config.data.name=my data")
    assert rc == 0 and err == ""
    bash_syntax_ok(out)
    lines = out.splitlines()
    assert [l for l in lines if l.startswith("#SBATCH")] == [
        "#SBATCH --job-name=de-b16", "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=32", "#SBATCH --time=2-00:00:00", "#SBATCH --partition=gpu",
        "#SBATCH --account=proj", "#SBATCH --exclusive", "#SBATCH --output=logs/%x-%j.out",
    ]
    assert lines[0] == "#!/bin/bash"
    assert "source ~/vlm_venv/bin/activate" in lines and "export NCCL_DEBUG=WARN" in lines
    assert ('export JAX_COORDINATOR_ADDRESS=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
            ':$((SLURM_JOB_ID % 4096 + 61440))') in lines
    assert lines[-1] == (
        "srun --kill-on-bad-exit=1 --output=logs/%x-%j-%t.out --cpus-per-task=32 bash -c "
        "'JAX_NUM_PROCESSES=$SLURM_NTASKS JAX_PROCESS_ID=$SLURM_PROCID JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7 "
        "exec vlm train --config=configs/dual_encoder.py:B/16 --workdir=gs://bucket/runs/de "
        "--config.data.name=\"my data\"'")


def test_slurm_script_one_process_per_gpu():
    rc, out, _ = launch(slurm, "--nodes=2", "--gpus_per_node=4", "--tasks=per_gpu", "--port=23456",
                        "--container_image=nvcr.io#nvidia/jax:25.04-py3", "--container_mounts=/shared:/shared",
                        "--dry_run", "--", *TRAIN)
    assert rc == 0
    assert "#SBATCH --ntasks-per-node=4" in out and "#SBATCH --gpus-per-node=4" in out
    assert '| head -n 1):23456\n' in out
    srun = out.splitlines()[-1]
    assert srun.startswith('srun --kill-on-bad-exit=1 --output=logs/%x-%j-%t.out '
                           '--container-image="nvcr.io#nvidia/jax:25.04-py3" --container-mounts=/shared:/shared ')
    assert "JAX_LOCAL_DEVICE_IDS=$SLURM_LOCALID exec vlm train" in srun


def fake_slurm(tmp_path: Path, nodes: int, tasks_per_node: int) -> dict:
    """scontrol, srun (runs `bash -c SCRIPT` once per task with SLURM's per-task variables) and vlm."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_program(bin_dir, "scontrol", f"assert argv == ['show', 'hostnames', 'gpu[001-{nodes:03d}]'], argv\n"
                 f"print('\\n'.join('gpu%03d' % (i + 1) for i in range({nodes})))\n")
    fake_program(bin_dir, "srun", f"""
import subprocess
i = argv.index('bash')
assert argv[i + 1] == '-c'
for task in range({nodes * tasks_per_node}):
    task_env = dict(env, SLURM_NTASKS='{nodes * tasks_per_node}', SLURM_PROCID=str(task),
                    SLURM_LOCALID=str(task % {tasks_per_node}), SLURM_NODEID=str(task // {tasks_per_node}))
    subprocess.run(argv[i:], env=task_env, check=True)
""")
    fake_program(bin_dir, "vlm", "record(argv=argv, env={k: v for k, v in env.items() if k.startswith('JAX_')})\n")
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(tmp_path / "vlm.jsonl"),
            "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": f"gpu[001-{nodes:03d}]", "SLURM_JOB_NUM_NODES": str(nodes)}


@pytest.mark.parametrize("tasks,per_node,devices", [
    ("per_node", 1, lambda local: "0,1,2,3"),
    ("per_gpu", 4, lambda local: str(local)),
])
def test_slurm_script_gives_each_task_its_coordinator_and_index(tmp_path, tasks, per_node, devices):
    train = [*TRAIN, *TRICKY]
    rc, out, _ = launch(slurm, "--nodes=3", "--gpus_per_node=4", f"--tasks={tasks}", "--dry_run", "--", *train)
    assert rc == 0
    env = fake_slurm(tmp_path, nodes=3, tasks_per_node=per_node)
    proc = subprocess.run(["bash", "-c", out], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    port = 4242 % 4096 + 61440
    assert f"vlm: 3 nodes, coordinator gpu001:{port}" in proc.stdout
    recs = records(tmp_path / "vlm.jsonl")
    assert len(recs) == 3 * per_node
    for task, rec in enumerate(recs):
        assert rec["argv"] == train[1:]
        assert rec["env"] == {"JAX_COORDINATOR_ADDRESS": f"gpu001:{port}", "JAX_NUM_PROCESSES": str(3 * per_node),
                              "JAX_PROCESS_ID": str(task), "JAX_LOCAL_DEVICE_IDS": devices(task % per_node)}
    assert (tmp_path / "logs").is_dir()


def test_slurm_without_dry_run_writes_the_script_and_submits_it(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_program(bin_dir, "sbatch", "record(argv=argv, script=open(argv[0]).read())\nprint('Submitted batch job 7')\n")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("RECORD", str(tmp_path / "sbatch.jsonl"))
    monkeypatch.chdir(tmp_path)
    argv = ["--nodes=2", "--job_name=run1", "--", *TRAIN]
    _, dry, _ = launch(slurm, "--dry_run", *argv)
    rc, _, err = launch(slurm, *argv)
    assert rc == 0 and "wrote logs/run1.sbatch" in err
    assert records(tmp_path / "sbatch.jsonl") == [{"argv": ["logs/run1.sbatch"], "script": dry}]


@pytest.mark.parametrize("argv,expected", [
    ([], "missing --nodes"),
    (["--nodes=0"], "--nodes=0 must be >= 1"),
    (["--nodes=-3"], "--nodes=-3 must be >= 1"),
    (["--nodes=2", "--gpus_per_node=0"], "--gpus_per_node=0 must be >= 1"),
    (["--nodes=2", "--tasks=per_host"], "invalid choice: 'per_host'"),
    (["--nodes=2", "--time=tomorrow"], "is not a SLURM time"),
    (["--nodes=2", "--port=99999"], "--port=99999 must be 'auto' or in 1..65535"),
    (["--nodes=2", "--job_name=my job"], "may only hold letters"),
    (["--nodes=2", "--container_mounts=/a:/a"], "--container_mounts needs --container_image"),
])
def test_slurm_input_errors_are_one_line(argv, expected):
    assert_one_line_error(slurm, [*argv, "--dry_run", "--", *TRAIN], expected)
