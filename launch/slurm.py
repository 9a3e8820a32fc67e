"""Train on a SLURM GPU cluster: an sbatch script with one process per node (default) or per GPU.

    python launch/slurm.py --nodes=4 --gpus_per_node=8 --partition=gpu --time=24:00:00 --dry_run \\
        -- vlm train --config=configs/dual_encoder.py:B/16 --workdir=/shared/runs/de_b16

--dry_run prints the script; without it the launcher writes it to --script (default
<log_dir>/<job_name>.sbatch) and submits it with `sbatch`. Submit from the repository root on the
shared filesystem: the job starts in the directory it was submitted from (or --chdir).

In the script:
  JAX_COORDINATOR_ADDRESS  the first node of the allocation (scontrol show hostnames
                           "$SLURM_JOB_NODELIST" | head -n 1) and --port (default: derived from the
                           job id, as JAX does, so that two jobs sharing a node do not collide);
  JAX_NUM_PROCESSES        $SLURM_NTASKS, JAX_PROCESS_ID $SLURM_PROCID, per task;
  JAX_LOCAL_DEVICE_IDS     the GPUs each process drives: all of the node's (--tasks=per_node) or
                           GPU $SLURM_LOCALID (--tasks=per_gpu). Set explicitly because under srun
                           JAX otherwise restricts every process to GPU $SLURM_LOCALID, which for one
                           process per node would leave 7 of 8 GPUs idle.
`srun --kill-on-bad-exit=1` stops every process when one fails (the others would wait forever in
a collective); each task logs to <log_dir>/<job_name>-<job id>-<task>.out.
"""

from __future__ import annotations

import os
import re
import shlex
import sys

if __package__ in (None, ""):  # run as a script: `python launch/slurm.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch import common
from launch.common import LaunchError, join, quote

PROG = "launch/slurm.py"
EXAMPLE = "-- vlm train --config=configs/dual_encoder.py:B/16 --workdir=/shared/runs/NAME"
AUTO_PORT = "$((SLURM_JOB_ID % 4096 + 61440))"  # JAX's own choice for SLURM: one port per job
TIME = re.compile(r"\d+(-\d+)?(:\d+){0,2}")
JOB_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def parser() -> common.Parser:
    p = common.Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                      usage=f"{PROG} --nodes=N [--gpus_per_node=G] [--tasks=per_node|per_gpu] [flags] -- vlm train ...")
    p.add_argument("--nodes", type=int, help="Number of nodes.")
    p.add_argument("--gpus_per_node", type=int, default=8, help="GPUs per node (default 8).")
    p.add_argument("--tasks", default="per_node", choices=("per_node", "per_gpu"),
                   help="per_node: one process per node driving all its GPUs (default); "
                        "per_gpu: one process per GPU.")
    p.add_argument("--job_name", default="vlm", help="SLURM job name (default vlm).")
    p.add_argument("--time", help="Time limit, e.g. 24:00:00 or 2-00:00:00 (default: the partition's).")
    p.add_argument("--partition", help="SLURM partition.")
    p.add_argument("--account", help="SLURM account to charge.")
    p.add_argument("--qos", help="SLURM quality of service.")
    p.add_argument("--cpus_per_task", type=int, help="CPUs per process (data loading); srun gets it too, "
                   "since srun does not inherit it from sbatch on every SLURM version.")
    p.add_argument("--mem", help="Memory per node, e.g. 0 (all of it) or 512G.")
    p.add_argument("--exclusive", action="store_true", help="Whole nodes only (#SBATCH --exclusive).")
    p.add_argument("--chdir", help="Directory the job runs in (default: where sbatch is run).")
    p.add_argument("--log_dir", default="logs", help="Directory for the job and per-task logs (default logs).")
    p.add_argument("--port", default="auto", help="Coordinator port on the first node (default: "
                   f"{AUTO_PORT.replace('%', '%%')}, one port per job).")
    p.add_argument("--env", action="append", metavar="NAME=VALUE", help="Exported for every task (repeatable).")
    p.add_argument("--preamble", action="append", metavar="LINE", help="Shell line run before srun (repeatable), "
                   "e.g. 'module load cuda' or 'source ~/vlm_venv/bin/activate'.")
    p.add_argument("--container_image", help="Run in a container with pyxis/enroot (srun --container-image).")
    p.add_argument("--container_mounts", help="pyxis mounts, e.g. /shared:/shared (srun --container-mounts).")
    p.add_argument("--script", help="Where to write the script (default <log_dir>/<job_name>.sbatch).")
    p.add_argument("--dry_run", action="store_true", help="Print the script; submit nothing.")
    return p


def validate(a, train: list[str]) -> None:
    if a.nodes is None:
        raise LaunchError("missing --nodes")
    if a.nodes < 1:
        raise LaunchError(f"--nodes={a.nodes} must be >= 1")
    if a.gpus_per_node < 1:
        raise LaunchError(f"--gpus_per_node={a.gpus_per_node} must be >= 1")
    if a.cpus_per_task is not None and a.cpus_per_task < 1:
        raise LaunchError(f"--cpus_per_task={a.cpus_per_task} must be >= 1")
    if a.time is not None and not TIME.fullmatch(a.time):
        raise LaunchError(f"--time={a.time!r} is not a SLURM time (MINUTES, HH:MM:SS or DAYS-HH:MM:SS)")
    if not JOB_NAME.fullmatch(a.job_name):
        raise LaunchError(f"--job_name={a.job_name!r} may only hold letters, digits, '_', '.' and '-'")
    if a.port != "auto" and not (a.port.isdigit() and 0 < int(a.port) < 65536):
        raise LaunchError(f"--port={a.port} must be 'auto' or in 1..65535")
    if not a.log_dir or "%" in a.log_dir:
        raise LaunchError(f"--log_dir={a.log_dir!r} must be a directory name without '%'")
    if a.container_mounts and not a.container_image:
        raise LaunchError("--container_mounts needs --container_image")
    common.check_train_command(train, EXAMPLE)
    common.parse_env(a.env)


def tasks_per_node(a) -> int:
    return a.gpus_per_node if a.tasks == "per_gpu" else 1


def render(a, train: list[str]) -> str:
    ntasks = tasks_per_node(a)
    log_dir = a.log_dir.rstrip("/") or "/"
    sbatch = [f"--job-name={a.job_name}", f"--nodes={a.nodes}", f"--ntasks-per-node={ntasks}",
              f"--gpus-per-node={a.gpus_per_node}"]
    sbatch += [f"--cpus-per-task={a.cpus_per_task}"] if a.cpus_per_task else []
    sbatch += [f"--mem={a.mem}"] if a.mem else []
    sbatch += [f"--time={a.time}"] if a.time else []
    sbatch += [f"--partition={a.partition}"] if a.partition else []
    sbatch += [f"--account={a.account}"] if a.account else []
    sbatch += [f"--qos={a.qos}"] if a.qos else []
    sbatch += ["--exclusive"] if a.exclusive else []
    sbatch += [f"--chdir={a.chdir}"] if a.chdir else []
    sbatch += [f"--output={log_dir}/%x-%j.out"]

    per = "node, driving all its GPUs" if a.tasks == "per_node" else "GPU"
    lines = ["#!/bin/bash", *(f"#SBATCH {common.quote_arg(s)}" for s in sbatch),
             f"# vlm on SLURM: {a.nodes} nodes x {a.gpus_per_node} GPUs, one process per {per} "
             f"({a.nodes * ntasks} processes). Generated by {PROG}.",
             "set -e",  # not -u: `module load` and conda's activate scripts read unset variables
             f"mkdir -p {quote(log_dir)}"]
    lines += list(a.preamble or [])
    lines += [f"export {name}={quote(value)}" for name, value in common.parse_env(a.env)]
    port = AUTO_PORT if a.port == "auto" else a.port
    lines += [
        "# JAX's coordinator is process 0, on the first node of the allocation.",
        f'export JAX_COORDINATOR_ADDRESS=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):{port}',
        'echo "vlm: $SLURM_JOB_NUM_NODES nodes, coordinator $JAX_COORDINATOR_ADDRESS"',
    ]
    devices = "$SLURM_LOCALID" if a.tasks == "per_gpu" else ",".join(str(i) for i in range(a.gpus_per_node))
    task = (f"JAX_NUM_PROCESSES=$SLURM_NTASKS JAX_PROCESS_ID=$SLURM_PROCID JAX_LOCAL_DEVICE_IDS={devices} "
            f"exec {join(train)}")
    srun = ["srun", "--kill-on-bad-exit=1", f"--output={log_dir}/%x-%j-%t.out"]
    srun += [f"--cpus-per-task={a.cpus_per_task}"] if a.cpus_per_task else []
    srun += [f"--container-image={a.container_image}"] if a.container_image else []
    srun += [f"--container-mounts={a.container_mounts}"] if a.container_mounts else []
    lines.append(f"{join(srun)} bash -c {shlex.quote(task)}")  # '...': expanded in each task
    return "\n".join(lines) + "\n"


def run(launcher_argv: list[str], train: list[str]) -> int:
    a = parser().parse_args(launcher_argv)
    validate(a, train)
    workdir = common.flag_value(train, "--workdir")
    if a.nodes > 1 and workdir and workdir.startswith(("/tmp", "/dev/shm", "/scratch/local")):
        common.warn(PROG, f"--workdir={workdir} looks node-local; every node must see the same workdir")
    text = render(a, train)
    if a.dry_run:
        sys.stdout.write(text)
        return 0
    path = a.script or os.path.join(a.log_dir, f"{a.job_name}.sbatch")
    # sbatch does not create the directory of --output (relative to the job's directory).
    os.makedirs(os.path.join(a.chdir or ".", a.log_dir), exist_ok=True)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    print(f"{PROG}: wrote {path}", file=sys.stderr, flush=True)
    common.run_program(["sbatch", path])
    return 0


def main(argv: list[str] | None = None) -> int:
    return common.main_wrapper(PROG, run, argv)


if __name__ == "__main__":
    sys.exit(main())
