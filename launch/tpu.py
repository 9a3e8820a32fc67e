"""Train on a Cloud TPU VM slice (or several: multislice) with gcloud.

    python launch/tpu.py --tpu_name=de-v5p --zone=us-east5-a --project=my-project \\
        --accelerator_type=v5p-64 --create --setup --scp_dir=. --dry_run \\
        -- vlm train --config=configs/dual_encoder.py:B/16 --workdir=gs://my-bucket/de_b16

The steps, each printed by --dry_run exactly as it would run (the output is a bash script):
  1. --create: `gcloud compute tpus tpu-vm create`, or with --queued / --num_slices > 1 a queued
     resource (`gcloud compute tpus queued-resources create`) and a wait until it is ACTIVE;
  2. --setup: the code on every worker (--scp_dir: a tarball of a local checkout, copied with
     `scp --worker=all`; --repo/--branch: `git fetch` on every worker), then on every worker uv,
     a Python venv and `pip install -e . "jax[tpu]"`;
  3. train: one `gcloud ... ssh --worker=all` that runs the same command on every worker. A TPU VM
     slice tells JAX its coordinator, process count and index itself (JAX reads them from the
     TPU metadata), so the command carries no coordinator flags; with --num_slices > 1 the
     queued resource sets the MEGASCALE_* variables that join the slices, and the command should
     set --config.mesh.dcn.data=<num_slices>.
--detach runs the training under nohup on each worker (log ~/vlm_logs/train.log, appended; the
process group id in ~/vlm_logs/train.pid); --stop stops such a run on every worker.
"""

from __future__ import annotations

import os
import re
import shlex
import sys

if __package__ in (None, ""):  # run as a script: `python launch/tpu.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch import common
from launch.common import LaunchError, home_path, join, quote

PROG = "launch/tpu.py"
EXAMPLE = "-- vlm train --config=configs/dual_encoder.py:B/16 --workdir=gs://BUCKET/runs/NAME"
LOG_DIR = "~/vlm_logs"
TARBALL = "vlm-src.tar.gz"  # in the remote home directory
TAR_EXCLUDES = (".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache")
UV_INSTALLER = "https://astral.sh/uv/install.sh"
# The TPU VM software version that goes with each TPU generation (cloud.google.com/tpu/docs/runtimes).
RUNTIMES = (
    ("v5litepod", "v2-alpha-tpuv5-lite"),
    ("v5p", "v2-alpha-tpuv5"),
    ("v6e", "v2-alpha-tpuv6e"),
    ("v4", "tpu-ubuntu2204-base"),
    ("v3", "tpu-ubuntu2204-base"),
    ("v2", "tpu-ubuntu2204-base"),
)
ACCELERATOR = re.compile(r"(v2|v3|v4|v5p|v5litepod|v6e)-\d+")
NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def parser() -> common.Parser:
    p = common.Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                      usage=f"{PROG} --tpu_name=NAME --zone=ZONE [flags] -- vlm train --config=... --workdir=gs://...")
    p.add_argument("--tpu_name", help="TPU VM name (with --num_slices > 1: the queued resource id; "
                   "its slices are NAME-0, NAME-1, ...).")
    p.add_argument("--zone", help="e.g. us-east5-a (one that has your accelerator type and quota).")
    p.add_argument("--project", help="Google Cloud project (default: gcloud's configured project).")
    p.add_argument("--accelerator_type", help="--create: e.g. v5p-64, v5litepod-16, v6e-32, v4-32.")
    p.add_argument("--runtime_version", help="--create: TPU VM software version (default: the one that goes "
                   "with the accelerator, e.g. v2-alpha-tpuv5 for v5p).")
    p.add_argument("--create", action="store_true", help="First create the TPU VM (or queued resource).")
    p.add_argument("--spot", action="store_true", help="--create: Spot capacity (preemptible; resume by re-running).")
    p.add_argument("--queued", action="store_true", help="Use a queued resource even for one slice.")
    p.add_argument("--num_slices", type=int, default=1, help="Multislice: this many slices of --accelerator_type, "
                   "joined over the data-center network (implies a queued resource).")
    p.add_argument("--setup", action="store_true", help="Copy the code to every worker and install vlm + jax[tpu].")
    p.add_argument("--scp_dir", help="--setup: copy this local checkout (a tarball, without .git/.venv).")
    p.add_argument("--exclude", action="append", metavar="PATTERN", help="--scp_dir: also leave these out of the "
                   f"copy (repeatable; always left out: {', '.join(TAR_EXCLUDES)}).")
    p.add_argument("--repo", help="--setup: git URL every worker fetches (instead of --scp_dir).")
    p.add_argument("--branch", default="main", help="--setup with --repo: branch, tag or commit (default: main).")
    p.add_argument("--remote_dir", default="~/vlm", help="Where the code lives on the workers (default: ~/vlm).")
    p.add_argument("--venv", default="~/vlm_venv", help="The workers' Python venv (default: ~/vlm_venv).")
    p.add_argument("--python", default="3.12", help="--setup: Python version of the venv (uv fetches it).")
    p.add_argument("--env", action="append", metavar="NAME=VALUE", help="Environment for the training "
                   "command on every worker (repeatable), e.g. --env=LIBTPU_INIT_ARGS=...")
    p.add_argument("--detach", action="store_true", help="Run under nohup: survives ssh disconnects; "
                   f"each worker logs to {LOG_DIR}/train.log.")
    p.add_argument("--stop", action="store_true", help="Only stop a --detach run on every worker.")
    p.add_argument("--internal_ip", action="store_true", help="ssh/scp over internal IPs (from a VM in the VPC).")
    p.add_argument("--dry_run", action="store_true", help="Print the commands (a bash script); run nothing.")
    return p


def default_runtime(accelerator_type: str) -> str:
    return next(v for prefix, v in RUNTIMES if accelerator_type.startswith(prefix + "-"))


def validate(a, train: list[str]) -> None:
    if not a.tpu_name:
        raise LaunchError("missing --tpu_name")
    if not NAME.fullmatch(a.tpu_name):
        raise LaunchError(f"--tpu_name={a.tpu_name!r} must be lowercase letters, digits and '-', starting with a letter")
    if not a.zone:
        raise LaunchError("missing --zone (e.g. --zone=us-east5-a)")
    if a.num_slices < 1:
        raise LaunchError(f"--num_slices={a.num_slices} must be >= 1")
    if a.create:
        if not a.accelerator_type:
            raise LaunchError("--create needs --accelerator_type (e.g. v5p-64)")
        if not ACCELERATOR.fullmatch(a.accelerator_type):
            raise LaunchError(f"--accelerator_type={a.accelerator_type!r} is not TYPE-SIZE with TYPE one of "
                              "v2, v3, v4, v5p, v5litepod, v6e (e.g. v5p-64)")
    for path, flag in ((a.remote_dir, "--remote_dir"), (a.venv, "--venv")):
        if path.rstrip("/") in ("", "~", "/") or any(c in path for c in "\n'\"$`"):
            raise LaunchError(f"{flag}={path!r} must name a directory of its own, e.g. ~/vlm")
    if a.stop:
        if a.create or a.setup:
            raise LaunchError("--stop runs alone (no --create or --setup)")
        if train:
            raise LaunchError("--stop takes no training command")
        return
    if a.setup:
        if bool(a.scp_dir) == bool(a.repo):
            raise LaunchError("--setup needs exactly one of --scp_dir=LOCAL_CHECKOUT or --repo=GIT_URL")
        if a.scp_dir and not os.path.isfile(os.path.join(a.scp_dir, "pyproject.toml")):
            raise LaunchError(f"--scp_dir={a.scp_dir} has no pyproject.toml; point it at the vlm checkout")
    elif a.scp_dir or a.repo:
        raise LaunchError("--scp_dir/--repo only apply with --setup")
    if a.exclude and not a.scp_dir:
        raise LaunchError("--exclude only applies with --scp_dir")
    common.check_train_command(train, EXAMPLE)
    config = common.flag_value(train, "--config")
    if a.scp_dir and config and not os.path.isabs(config):
        path = config.split(":", 1)[0]
        if not os.path.isfile(os.path.join(a.scp_dir, path)):
            raise LaunchError(f"--config={config}: {path} is not in --scp_dir={a.scp_dir} (the workers run from its copy)")


class Gcloud:
    """The gcloud command lines for one TPU VM, or for all slices of a queued resource."""

    def __init__(self, a):
        self.a = a
        self.multi = a.num_slices > 1
        self.group = "queued-resources" if self.multi else "tpu-vm"
        self.location = [f"--zone={a.zone}"] + ([f"--project={a.project}"] if a.project else [])
        self.targets = ["--node=all", "--worker=all"] if self.multi else ["--worker=all"]
        self.ip = ["--internal-ip"] if a.internal_ip else []

    def ssh(self, remote_command: str) -> str:
        argv = ["gcloud", "compute", "tpus", self.group, "ssh", self.a.tpu_name, *self.location, *self.targets, *self.ip]
        return f"{join(argv)} --command={shlex.quote(remote_command)}"  # '...': expanded on the workers only

    def scp(self, local: str, remote: str) -> str:
        argv = ["gcloud", "compute", "tpus", self.group, "scp", local, f"{self.a.tpu_name}:{remote}",
                *self.location, *self.targets, *self.ip]
        return join(argv)

    def create(self) -> list[tuple[str, str]]:
        a = self.a
        runtime = a.runtime_version or default_runtime(a.accelerator_type)
        spot = ["--spot"] if a.spot else []
        if not (self.multi or a.queued):
            argv = ["gcloud", "compute", "tpus", "tpu-vm", "create", a.tpu_name, *self.location,
                    f"--accelerator-type={a.accelerator_type}", f"--version={runtime}", *spot]
            return [(f"Create the TPU VM slice {a.tpu_name} ({a.accelerator_type}).", join(argv))]
        nodes = [f"--node-count={a.num_slices}", f"--node-prefix={a.tpu_name}"] if self.multi else [f"--node-id={a.tpu_name}"]
        argv = ["gcloud", "compute", "tpus", "queued-resources", "create", a.tpu_name, *self.location,
                f"--accelerator-type={a.accelerator_type}", f"--runtime-version={runtime}", *nodes, *spot]
        describe = join(["gcloud", "compute", "tpus", "queued-resources", "describe", a.tpu_name, *self.location,
                         "--format=value(state.state)"])
        wait = (f"until state=$({describe}) && [ \"$state\" = ACTIVE ]; do "
                f"case \"$state\" in FAILED|SUSPENDED) echo \"queued resource {a.tpu_name} is $state\" >&2; exit 1;; esac; "
                "sleep 30; done")
        what = f"{a.num_slices} x {a.accelerator_type}" if self.multi else a.accelerator_type
        return [(f"Request the queued resource {a.tpu_name} ({what}).", join(argv)),
                ("Wait until it is ACTIVE (queued resources are granted when capacity frees up).", wait)]


def setup_steps(a, g: Gcloud) -> list[tuple[str, str]]:
    remote_dir, venv = home_path(a.remote_dir), home_path(a.venv)
    steps = []
    if a.scp_dir:
        local = os.path.abspath(a.scp_dir)
        tarball = f"/tmp/vlm-{a.tpu_name}.tar.gz"
        excludes = [f"--exclude={e}" for e in (*TAR_EXCLUDES, *(a.exclude or []))]
        tar = "COPYFILE_DISABLE=1 " + join(["tar", "-czf", tarball, *excludes, "-C", local, "."])
        steps.append((f"Pack the checkout {local}.", tar))
        steps.append(("Copy it to every worker.", g.scp(tarball, TARBALL)))
        fetch = [f"mkdir -p {remote_dir}", f"tar -xzf ~/{TARBALL} -C {remote_dir}", f"rm ~/{TARBALL}"]
    else:
        fetch = [f"git init -q {remote_dir}",
                 f"git -C {remote_dir} fetch -q --depth=1 {quote(a.repo)} {quote(a.branch)}",
                 f"git -C {remote_dir} checkout -q --force FETCH_HEAD"]
    install = [
        'export PATH="$HOME/.local/bin:$PATH"',
        f"{{ command -v uv >/dev/null || curl -LsSf {UV_INSTALLER} | sh; }}",
        f"{{ [ -x {venv}/bin/python ] || uv venv -q --python {quote(a.python)} {venv}; }}",
        f'uv pip install -q --python {venv}/bin/python -e {remote_dir} "jax[tpu]"',
    ]
    what = "Fetch the code and install" if a.repo else "Install"
    steps.append((f"{what} vlm and jax[tpu] on every worker.", g.ssh(" && ".join(fetch + install))))
    return steps


def train_command(a, train: list[str]) -> str:
    """The remote command: the same on every worker."""
    env = "".join(f"{name}={quote(value)} " for name, value in common.parse_env(a.env))
    prefix = f"cd {home_path(a.remote_dir)} && . {home_path(a.venv)}/bin/activate && "
    if not a.detach:
        return prefix + env + join(train)
    log, pid = f"{LOG_DIR}/train.log", f"{LOG_DIR}/train.pid"
    return (prefix + f"mkdir -p {LOG_DIR} && {{ {env}setsid nohup {join(train)} >> {log} 2>&1 < /dev/null & "
            f"echo $! > {pid}; echo \"$(hostname): started, log {log}\"; }}")


def stop_command() -> str:
    pid = f"{LOG_DIR}/train.pid"
    return (f"if [ -f {pid} ]; then kill -- -\"$(cat {pid})\" 2>/dev/null && echo \"$(hostname): stopped\"; "
            f"rm -f {pid}; fi; true")


def plan(a, train: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(header lines, steps)."""
    g = Gcloud(a)
    where = f"zone {a.zone}" + (f", project {a.project}" if a.project else "")
    slices = f"{a.num_slices} slices" if g.multi else "one slice"
    header = [f"vlm on Cloud TPU {a.tpu_name} ({slices}), {where}. Generated by {PROG}."]
    if a.stop:
        return header, [("Stop the detached training run on every worker.", g.ssh(stop_command()))]
    steps = []
    if a.create:
        steps += g.create()
    if a.setup:
        steps += setup_steps(a, g)
    mode = "in the background (log ~/vlm_logs/train.log)" if a.detach else ""
    steps.append((f"Train: the same command on every worker{', ' + mode if mode else ''}.",
                  g.ssh(train_command(a, train))))
    return header, steps


def run(launcher_argv: list[str], train: list[str]) -> int:
    a = parser().parse_args(launcher_argv)
    validate(a, train)
    if not a.stop:
        for message in common.shared_storage_warnings(train, a.num_slices):
            common.warn(PROG, message)
    header, steps = plan(a, train)
    if a.dry_run:
        sys.stdout.write(common.script(header, steps))
    else:
        common.run_steps(steps, PROG)
    return 0


def main(argv: list[str] | None = None) -> int:
    return common.main_wrapper(PROG, run, argv)


if __name__ == "__main__":
    sys.exit(main())
