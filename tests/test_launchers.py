"""The cluster launchers (launch/tpu.py, gke.py, slurm.py): each dry run against the commands or
manifest it must produce, and the produced commands executed against fake gcloud / kubectl /
sbatch / srun / scontrol / vlm programs, so that quoting, tilde expansion and the per-process
coordinator variables are checked by a real shell, not by string matching alone.
No cloud tools are needed; everything runs in well under a second or two.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import common, gke, slurm, tpu

from tests.launcher_helpers import (REPO, TRAIN, TRICKY, assert_one_line_error, bash_syntax_ok, commands, fake_program,
                                     launch, records)

# --- shared quoting and YAML --------------------------------------------------------------------------------

@pytest.mark.parametrize("single", [False, True])
def test_join_is_split_back_into_the_same_argv_by_bash(single):
    argv = ["vlm", "train", *TRICKY, "plain", "", "a'b\"c", "x=~/y", "--flag=", "!bang", "new\nline"]
    line = common.join(argv, single=single)
    assert shlex.split(line) == argv
    proc = subprocess.run(["bash", "-c", f"printf '%s\\0' {line}"], capture_output=True, text=True, check=True)
    assert proc.stdout.split("\0")[:-1] == argv
    assert common.join(["--config.data.name=my data"]) == '--config.data.name="my data"'
    assert common.join(["--config.mesh.fsdp=-1"]) == "--config.mesh.fsdp=-1"


def test_yaml_writer_matches_pyyaml():
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed; the YAML text is checked field by field")
    obj = {"a": [{"b": 1, "c": ["x", "2x2", "true", "", "it's \"q\""]}, []], "d": {}, "e": {"f": True},
           "g": "metadata.annotations['batch.kubernetes.io/job-completion-index']", "h": "1234", "i": "ü"}
    assert yaml.safe_load(common.to_yaml(obj)) == obj


def test_env_flags_are_validated():
    assert common.parse_env(["A=1", "B_2=x=y", "C="]) == [("A", "1"), ("B_2", "x=y"), ("C", "")]
    for bad in ("A", "1A=2", "A-B=1"):
        with pytest.raises(common.LaunchError):
            common.parse_env([bad])


@pytest.mark.parametrize("module,argv", [
    (tpu, ["--tpu_name=t", "--zone=z"]),
    (gke, ["--name=n", "--image=i", "--gpus_per_host=8", "--num_hosts=2"]),
    (slurm, ["--nodes=2"]),
])
def test_every_launcher_rejects_bad_training_commands(module, argv):
    assert_one_line_error(module, argv, "no training command after `--`")
    assert_one_line_error(module, [*argv, "--"], "no training command after `--`")
    for flag in ("--process_id=0", "--coordinator_address=h:1", "--num_processes=2"):
        assert_one_line_error(module, [*argv, "--", *TRAIN, flag], f"remove {flag.split('=')[0]}")
    assert_one_line_error(module, [*argv, "--", "vlm", "train", "--config=c.py"], "has no --workdir")
    assert_one_line_error(module, [*argv, "--dry-run", "--", *TRAIN], "unrecognized arguments: --dry-run")


@pytest.mark.parametrize("script,argv", [
    ("tpu.py", ["--tpu_name=t", "--zone=z", "--dry_run"]),
    ("gke.py", ["--name=n", "--image=i", "--tpu_type=v5e", "--tpu_topology=2x4", "--dry_run"]),
    ("slurm.py", ["--nodes=2", "--dry_run"]),
])
def test_launchers_run_as_standalone_scripts(script, argv, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "launch" / script), *argv, "--", *TRAIN],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "vlm" in proc.stdout and "train" in proc.stdout
    help_proc = subprocess.run([sys.executable, str(REPO / "launch" / script), "--help"], capture_output=True,
                               text=True, cwd=tmp_path)
    assert help_proc.returncode == 0 and "--dry_run" in help_proc.stdout


# --- TPU VM ----------------------------------------------------------------------------------------------------

def checkout(tmp_path: Path) -> Path:
    src = tmp_path / "checkout"
    (src / "configs").mkdir(parents=True)
    (src / "pyproject.toml").write_text("[project]\nname = 'vlm'\n")
    (src / "configs" / "dual_encoder.py").write_text("")
    return src


def test_tpu_create_setup_train_commands(tmp_path):
    src = checkout(tmp_path)
    rc, out, err = launch(tpu, "--tpu_name=de-v5p", "--zone=us-east5-a", "--project=my-proj",
                          "--accelerator_type=v5p-64", "--create", "--setup", f"--scp_dir={src}", "--dry_run",
                          "--", *TRAIN, "--config.mesh.fsdp=-1", "--config.data.name=my data")
    assert rc == 0 and err == ""
    bash_syntax_ok(out)
    where = "--zone=us-east5-a --project=my-proj"
    assert commands(out) == [
        f"gcloud compute tpus tpu-vm create de-v5p {where} --accelerator-type=v5p-64 --version=v2-alpha-tpuv5",
        f"COPYFILE_DISABLE=1 tar -czf /tmp/vlm-de-v5p.tar.gz --exclude=.git --exclude=.venv --exclude=__pycache__ "
        f'--exclude="*.egg-info" --exclude=.pytest_cache -C {src} .',
        f"gcloud compute tpus tpu-vm scp /tmp/vlm-de-v5p.tar.gz de-v5p:vlm-src.tar.gz {where} --worker=all",
        f"gcloud compute tpus tpu-vm ssh de-v5p {where} --worker=all --command='mkdir -p ~/vlm && "
        "tar -xzf ~/vlm-src.tar.gz -C ~/vlm && rm ~/vlm-src.tar.gz && export PATH=\"$HOME/.local/bin:$PATH\" && "
        "{ command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; } && "
        "{ [ -x ~/vlm_venv/bin/python ] || uv venv -q --python 3.12 ~/vlm_venv; } && "
        "uv pip install -q --python ~/vlm_venv/bin/python -e ~/vlm \"jax[tpu]\"'",
        # One ssh to all workers, the same command everywhere, no coordinator flags or variables.
        f"gcloud compute tpus tpu-vm ssh de-v5p {where} --worker=all --command='cd ~/vlm && "
        ". ~/vlm_venv/bin/activate && vlm train --config=configs/dual_encoder.py:B/16 "
        "--workdir=gs://bucket/runs/de --config.mesh.fsdp=-1 --config.data.name=\"my data\"'",
    ]
    assert "JAX_" not in out and "coordinator" not in out


def test_tpu_repo_setup_and_defaults(tmp_path):
    rc, out, _ = launch(tpu, "--tpu_name=t", "--zone=z", "--setup", "--repo=https://github.com/me/vlm.git",
                        "--branch=0123abc", "--dry_run", "--", *TRAIN)
    assert rc == 0
    setup, train = commands(out)
    assert setup.startswith("gcloud compute tpus tpu-vm ssh t --zone=z --worker=all --command='git init -q ~/vlm && "
                            "git -C ~/vlm fetch -q --depth=1 https://github.com/me/vlm.git 0123abc && "
                            "git -C ~/vlm checkout -q --force FETCH_HEAD && ")
    assert "--project" not in out  # gcloud's configured project
    assert train.startswith("gcloud compute tpus tpu-vm ssh t --zone=z --worker=all --command='cd ~/vlm && ")
    for accelerator, runtime in (("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v6e-32", "v2-alpha-tpuv6e"),
                                 ("v4-32", "tpu-ubuntu2204-base")):
        _, out, _ = launch(tpu, "--tpu_name=t", "--zone=z", "--create", f"--accelerator_type={accelerator}",
                           "--spot", "--dry_run", "--", *TRAIN)
        assert commands(out)[0] == (f"gcloud compute tpus tpu-vm create t --zone=z --accelerator-type={accelerator} "
                                    f"--version={runtime} --spot")


def remote_command(line: str) -> str:
    argv = shlex.split(line)
    assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in argv
    (command,) = [a[len("--command="):] for a in argv if a.startswith("--command=")]
    return command


def fake_worker_home(tmp_path: Path) -> tuple[Path, dict]:
    """A worker's home: ~/vlm, and ~/vlm_venv whose `vlm` records its argv, working directory and env."""
    home = tmp_path / "home"
    (home / "vlm").mkdir(parents=True)
    venv_bin = home / "vlm_venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "activate").write_text('export PATH="$HOME/vlm_venv/bin:$PATH"\n')
    fake_program(venv_bin, "vlm", "record(argv=argv, cwd=os.getcwd(), env={k: v for k, v in env.items() "
                 "if k.startswith(('JAX_', 'TF_', 'MEGASCALE'))})\n"
                 "import time; time.sleep(float(env.get('FAKE_SLEEP', 0)))\n")
    env = {"HOME": str(home), "PATH": os.environ["PATH"], "RECORD": str(tmp_path / "vlm.jsonl")}
    return home, env


def test_tpu_worker_command_runs_the_exact_training_argv(tmp_path):
    train = [*TRAIN, *TRICKY]
    rc, out, err = launch(tpu, "--tpu_name=t", "--zone=z", "--env=TF_CPP_MIN_LOG_LEVEL=0", "--env=TF_X=a b",
                          "--dry_run", "--", *train)
    assert rc == 0, err
    home, env = fake_worker_home(tmp_path)
    subprocess.run(["bash", "-c", remote_command(commands(out)[-1])], env=env, check=True)
    (rec,) = records(tmp_path / "vlm.jsonl")
    assert rec["argv"] == train[1:]
    assert rec["cwd"] == str(home / "vlm")
    assert rec["env"] == {"TF_CPP_MIN_LOG_LEVEL": "0", "TF_X": "a b"}  # no JAX_* coordinator variables


def alive(pid: int) -> bool:
    """Running (a killed process whose parent has not reaped it yet is a zombie: not alive)."""
    if Path("/proc/self/stat").exists():
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False
    try:  # no /proc (macOS): ask the kernel
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_tpu_detach_survives_the_shell_and_stop_kills_it(tmp_path):
    rc, out, _ = launch(tpu, "--tpu_name=t", "--zone=z", "--detach", "--dry_run", "--", *TRAIN)
    assert rc == 0
    train_line = commands(out)[-1]
    assert "setsid nohup vlm train" in train_line and ">> ~/vlm_logs/train.log 2>&1 < /dev/null &" in train_line
    home, env = fake_worker_home(tmp_path)
    env["FAKE_SLEEP"] = "60"
    start = time.monotonic()
    proc = subprocess.run(["bash", "-c", remote_command(train_line)], env=env, capture_output=True, text=True,
                          check=True, timeout=10)
    assert time.monotonic() - start < 5 and "started, log ~/vlm_logs/train.log" in proc.stdout  # returned at once
    pid = int((home / "vlm_logs" / "train.pid").read_text())
    try:
        for _ in range(100):  # the fake vlm records as soon as it starts
            if records(tmp_path / "vlm.jsonl"):
                break
            time.sleep(0.05)
        assert records(tmp_path / "vlm.jsonl")[0]["argv"] == TRAIN[1:]
        assert os.getpgid(pid) == pid  # its own process group, which --stop kills
        _, stop_out, _ = launch(tpu, "--tpu_name=t", "--zone=z", "--stop", "--dry_run")
        subprocess.run(["bash", "-c", remote_command(commands(stop_out)[-1])], env=env, check=True, timeout=10)
        for _ in range(200):
            if not alive(pid):
                break
            time.sleep(0.02)
        else:
            pytest.fail("--stop did not stop the detached run")
        assert not (home / "vlm_logs" / "train.pid").exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def test_tpu_multislice_uses_a_queued_resource(tmp_path):
    rc, out, err = launch(tpu, "--tpu_name=de", "--zone=us-east5-a", "--accelerator_type=v5p-128", "--num_slices=2",
                          "--create", "--dry_run", "--", *TRAIN)
    assert rc == 0
    assert "--config.mesh.dcn.data=2" in err  # warned: no DCN mesh in the command
    bash_syntax_ok(out)
    create, wait, train = commands(out)
    assert create == ("gcloud compute tpus queued-resources create de --zone=us-east5-a --accelerator-type=v5p-128 "
                      "--runtime-version=v2-alpha-tpuv5 --node-count=2 --node-prefix=de")
    assert wait.startswith('until state=$(gcloud compute tpus queued-resources describe de --zone=us-east5-a '
                           '--format="value(state.state)") && [ "$state" = ACTIVE ]; do')
    assert train.startswith("gcloud compute tpus queued-resources ssh de --zone=us-east5-a --node=all --worker=all "
                            "--command='cd ~/vlm && ")
    rc, _, err = launch(tpu, "--tpu_name=de", "--zone=z", "--num_slices=2", "--dry_run", "--", *TRAIN,
                        "--config.mesh.dcn.data=2")
    assert rc == 0 and err == ""


def test_tpu_runs_exactly_what_the_dry_run_prints(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_program(bin_dir, "gcloud", "record(argv=argv)\nprint('ACTIVE' if 'describe' in argv else '')\n")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("RECORD", str(tmp_path / "gcloud.jsonl"))
    argv = ["--tpu_name=de", "--zone=z", "--project=p", "--accelerator_type=v5p-16", "--queued", "--create",
            "--setup", "--repo=https://example.com/vlm.git", "--", *TRAIN, *TRICKY]
    rc, dry, _ = launch(tpu, "--dry_run", *argv)
    assert rc == 0
    rc, out, err = launch(tpu, *argv)
    assert rc == 0 and out == "", err
    ran = [r["argv"] for r in records(tmp_path / "gcloud.jsonl")]
    create, wait, setup, train = commands(dry)
    describe = shlex.split(wait.split("state=$(", 1)[1].split(") && [", 1)[0])  # the command inside $(...)
    assert ran == [shlex.split(create)[1:], describe[1:], shlex.split(setup)[1:], shlex.split(train)[1:]]
    assert "--node-id=de" in ran[0] and ran[3][:4] == ["compute", "tpus", "tpu-vm", "ssh"]


@pytest.mark.parametrize("argv,expected", [
    (["--zone=z"], "missing --tpu_name"),
    (["--tpu_name=t"], "missing --zone"),
    (["--tpu_name=My_TPU", "--zone=z"], "--tpu_name='My_TPU' must be lowercase"),
    (["--tpu_name=t", "--zone=z", "--create"], "--create needs --accelerator_type"),
    (["--tpu_name=t", "--zone=z", "--create", "--accelerator_type=v5p"], "is not TYPE-SIZE"),
    (["--tpu_name=t", "--zone=z", "--num_slices=0"], "--num_slices=0 must be >= 1"),
    (["--tpu_name=t", "--zone=z", "--setup"], "--setup needs exactly one of --scp_dir"),
    (["--tpu_name=t", "--zone=z", "--setup", "--scp_dir=/nonexistent"], "has no pyproject.toml"),
    (["--tpu_name=t", "--zone=z", "--repo=u"], "only apply with --setup"),
    (["--tpu_name=t", "--zone=z", "--exclude=W"], "--exclude only applies with --scp_dir"),
    (["--tpu_name=t", "--zone=z", "--remote_dir=~"], "--remote_dir='~' must name a directory"),
    (["--tpu_name=t", "--zone=z", "--num_slices=x"], "invalid int value"),
])
def test_tpu_input_errors_are_one_line(argv, expected):
    assert_one_line_error(tpu, [*argv, "--dry_run", "--", *TRAIN], expected)


def test_tpu_config_must_be_in_the_copied_checkout(tmp_path):
    src = checkout(tmp_path)
    assert_one_line_error(tpu, ["--tpu_name=t", "--zone=z", "--setup", f"--scp_dir={src}", "--", "vlm", "train",
                                "--config=configs/nope.py:tiny", "--workdir=gs://b/w"], "configs/nope.py is not in")
    assert_one_line_error(tpu, ["--tpu_name=t", "--zone=z", "--stop", "--", *TRAIN], "--stop takes no training")


# --- GKE ---------------------------------------------------------------------------------------------------------

def gke_manifests(*argv: str) -> tuple[str, list[dict]]:
    """(dry-run text, the manifests as dicts: parsed with PyYAML when it is installed)."""
    rc, out, err = launch(gke, "--dry_run", *argv)
    assert rc == 0, err
    a = gke.parser().parse_args(common.split_argv(list(argv))[0])
    train = common.split_argv(list(argv))[1]
    expected = gke.manifests(a, gke.Shape(a), train)
    try:
        import yaml
    except ImportError:  # the dicts the text was written from are checked instead
        return out, expected
    assert list(yaml.safe_load_all(out)) == expected
    return out, expected


def container(job_spec: dict) -> dict:
    (c,) = job_spec["template"]["spec"]["containers"]
    return c


def test_gke_jobset_for_a_tpu_slice():
    train = [*TRAIN, *TRICKY]
    _, (jobset,) = gke_manifests("--name=de-b16", "--image=us-docker.pkg.dev/p/r/vlm:1", "--tpu_type=v5p",
                                 "--tpu_topology=2x2x4", "--port=2222", "--service_account=ksa", "--queue=lq",
                                 "--max_restarts=3", "--env=TF_CPP_MIN_LOG_LEVEL=0", "--", *train)
    assert jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and jobset["kind"] == "JobSet"
    assert jobset["metadata"]["labels"] == {"kueue.x-k8s.io/queue-name": "lq"}
    assert jobset["metadata"]["annotations"] == {"alpha.jobset.sigs.k8s.io/exclusive-topology":
                                                 "cloud.google.com/gke-nodepool"}
    assert jobset["spec"]["failurePolicy"] == {"maxRestarts": 3}
    assert jobset["spec"]["network"] == {"enableDNSHostnames": True}
    (rjob,) = jobset["spec"]["replicatedJobs"]
    assert rjob["name"] == "workers" and rjob["replicas"] == 1
    job = rjob["template"]["spec"]
    # 2x2x4 = 16 chips = 4 hosts of 4 chips: 4 pods, indexed, one failure fails them all.
    assert (job["parallelism"], job["completions"], job["completionMode"], job["backoffLimit"]) == (4, 4, "Indexed", 0)
    pod = job["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                   "cloud.google.com/gke-tpu-topology": "2x2x4"}
    assert pod["serviceAccountName"] == "ksa" and pod["restartPolicy"] == "Never"
    c = container(job)
    assert c["image"] == "us-docker.pkg.dev/p/r/vlm:1"
    assert c["command"] == train  # verbatim: no shell in between
    assert c["resources"] == {"requests": {"google.com/tpu": 4}, "limits": {"google.com/tpu": 4}}
    assert c["env"] == [
        {"name": "JAX_COORDINATOR_ADDRESS", "value": "de-b16-workers-0-0.de-b16:2222"},  # pod 0 of job 0
        {"name": "JAX_NUM_PROCESSES", "value": "4"},
        {"name": "JAX_PROCESS_ID", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
        {"name": "TF_CPP_MIN_LOG_LEVEL", "value": "0"},
    ]
    assert {"containerPort": 2222, "name": "coordinator"} in c["ports"]


def test_gke_indexed_job_with_headless_service_for_gpus():
    out, (service, job) = gke_manifests("--name=de-gpu", "--image=img", "--kind=indexed_job", "--gpus_per_host=8",
                                        "--num_hosts=16", "--gpu_type=nvidia-h100-80gb", "--namespace=ml", "--",
                                        *TRAIN)
    assert out.count("\n---\n") == 1
    assert service["kind"] == "Service" and service["metadata"] == {"name": "de-gpu", "namespace": "ml"}
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["selector"] == {"job-name": "de-gpu"}
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    spec = job["spec"]
    assert (spec["parallelism"], spec["completions"], spec["completionMode"]) == (16, 16, "Indexed")
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == "de-gpu"  # pod i is de-gpu-i.de-gpu
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    env = {e["name"]: e for e in container(spec)["env"]}
    assert env["JAX_COORDINATOR_ADDRESS"]["value"] == "de-gpu-0.de-gpu:1234"
    assert env["JAX_NUM_PROCESSES"]["value"] == "16"
    assert env["JAX_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == gke.COMPLETION_INDEX
    assert container(spec)["resources"]["limits"] == {"nvidia.com/gpu": 8}


def test_gke_tpu_multislice_sets_megascale_not_process_ids():
    _, (jobset,) = gke_manifests("--name=ms", "--image=img", "--tpu_type=v6e", "--tpu_topology=4x4",
                                 "--num_slices=4", "--", *TRAIN, "--config.mesh.dcn.data=4")
    (rjob,) = jobset["spec"]["replicatedJobs"]
    assert rjob["replicas"] == 4 and rjob["template"]["spec"]["parallelism"] == 4  # 16 chips / 4 per host
    env = {e["name"]: e for e in container(rjob["template"]["spec"])["env"]}
    assert env["MEGASCALE_NUM_SLICES"]["value"] == "4"
    assert env["MEGASCALE_COORDINATOR_ADDRESS"]["value"] == "ms-workers-0-0.ms"
    assert env["MEGASCALE_SLICE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == gke.JOBSET_JOB_INDEX
    assert not any(name in env for name in ("JAX_PROCESS_ID", "JAX_NUM_PROCESSES", "JAX_COORDINATOR_ADDRESS"))


@pytest.mark.parametrize("tpu_type,topology,hosts,chips", [
    ("v5e", "2x4", 1, 8), ("v5e", "4x4", 4, 4), ("v6e", "1x1", 1, 1), ("v4", "2x2x1", 1, 4), ("v4", "2x2x2", 2, 4),
    ("v5p", "4x4x8", 32, 4),
])
def test_gke_tpu_hosts_from_topology(tpu_type, topology, hosts, chips):
    a = gke.parser().parse_args(["--name=n", "--image=i", f"--tpu_type={tpu_type}", f"--tpu_topology={topology}"])
    shape = gke.Shape(a)
    assert (shape.hosts, shape.per_host) == (hosts, chips)


def test_gke_xpk_commands():
    rc, out, _ = launch(gke, "--name=de", "--image=img", "--tpu_type=v5p", "--tpu_topology=2x2x4", "--num_slices=2",
                        "--xpk", "--cluster=c", "--project=p", "--zone=z", "--dry_run", "--", *TRAIN,
                        "--config.mesh.dcn.data=2")
    assert rc == 0
    assert out == ("xpk workload create --cluster=c --workload=de --docker-image=img --project=p --zone=z "
                   "--tpu-type=v5p-32 --num-slices=2 --command=\"vlm train --config=configs/dual_encoder.py:B/16 "
                   "--workdir=gs://bucket/runs/de --config.mesh.dcn.data=2\"\n")
    rc, out, _ = launch(gke, "--name=de", "--image=img", "--gpus_per_host=8", "--num_hosts=2", "--gpu_type=nvidia-h100-80gb",
                        "--xpk", "--cluster=c", "--max_restarts=1", "--dry_run", "--", *TRAIN, *TRICKY)
    argv = shlex.split(out)
    assert argv[:6] == ["xpk", "workload", "create", "--cluster=c", "--workload=de", "--docker-image=img"]
    assert {"--device-type=h100-80gb-8", "--num-nodes=2", "--max-restarts=1"} <= set(argv)
    command = argv[-1][len("--command="):]
    assert "--config.data.name='my data'" in command  # single quotes: xpk pastes it into a "YAML string"
    words = shlex.split(command)
    assert words[:3] == ["JAX_COORDINATOR_ADDRESS=$JAX_COORDINATOR_ADDRESS:$JAX_COORDINATOR_PORT",
                         "JAX_NUM_PROCESSES=$NNODES", "JAX_PROCESS_ID=$NODE_RANK"]
    assert words[3:] == [*TRAIN, *TRICKY]


def test_gke_without_dry_run_pipes_the_manifest_to_kubectl(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_program(bin_dir, "kubectl", "record(argv=argv, stdin=sys.stdin.read())\n")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("RECORD", str(tmp_path / "kubectl.jsonl"))
    argv = ["--name=n", "--image=i", "--gpus_per_host=4", "--num_hosts=2", "--", *TRAIN]
    _, dry, _ = launch(gke, "--dry_run", *argv)
    assert launch(gke, *argv) == (0, "", "")
    assert records(tmp_path / "kubectl.jsonl") == [{"argv": ["apply", "-f", "-"], "stdin": dry}]


@pytest.mark.parametrize("argv,expected", [
    (["--image=i", "--gpus_per_host=8", "--num_hosts=2"], "missing --name"),
    (["--name=Bad_Name", "--image=i", "--gpus_per_host=8", "--num_hosts=2"], "must be at most 40 lowercase"),
    (["--name=n", "--gpus_per_host=8", "--num_hosts=2"], "missing --image"),
    (["--name=n", "--image=i"], "choose the accelerator"),
    (["--name=n", "--image=i", "--tpu_type=v5p", "--tpu_topology=2x2x4", "--num_hosts=2"], "choose the accelerator"),
    (["--name=n", "--image=i", "--gpus_per_host=8", "--num_hosts=0"], "--num_hosts=0 must be >= 1"),
    (["--name=n", "--image=i", "--gpus_per_host=8"], "missing --num_hosts"),
    (["--name=n", "--image=i", "--tpu_type=v5p"], "missing --tpu_topology (e.g. 2x2x4)"),
    (["--name=n", "--image=i", "--tpu_type=v5p", "--tpu_topology=4x4"], "must be AxBxC for v5p"),
    (["--name=n", "--image=i", "--tpu_type=v5e", "--tpu_topology=3x3"], "9 chips is not a whole number"),
    (["--name=n", "--image=i", "--tpu_type=v7"], "invalid choice: 'v7'"),
    (["--name=n", "--image=i", "--tpu_type=v6e", "--tpu_topology=4x4", "--num_slices=2", "--kind=indexed_job"],
     "--num_slices > 1 needs --kind=jobset"),
    (["--name=n", "--image=i", "--gpus_per_host=8", "--num_hosts=2", "--kind=indexed_job", "--max_restarts=1"],
     "--max_restarts needs --kind=jobset"),
    (["--name=n", "--image=i", "--gpus_per_host=8", "--num_hosts=2", "--xpk"], "--xpk needs --cluster"),
    (["--name=n", "--image=i", "--gpus_per_host=8", "--num_hosts=2", "--xpk", "--cluster=c"], "needs --gpu_type"),
    (["--name=n", "--image=i", "--gpus_per_host=8", "--num_hosts=2", "--env=1=2"], "--env='1=2' must be NAME=VALUE"),
])
def test_gke_input_errors_are_one_line(argv, expected):
    assert_one_line_error(gke, [*argv, "--dry_run", "--", *TRAIN], expected)


def test_failures_of_the_cluster_tools_are_one_line(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_program(bin_dir, "gcloud", "sys.exit(3)\n")
    (bin_dir / "bash").symlink_to(shutil.which("bash"))
    monkeypatch.setenv("PATH", str(bin_dir))  # bash and a failing gcloud; no kubectl, no sbatch
    rc, _, err = launch(tpu, "--tpu_name=t", "--zone=z", "--", *TRAIN)
    assert rc == 1 and err.splitlines()[-1] == (
        "launch/tpu.py: error: step 1 (Train: the same command on every worker.) failed with exit status 3")
    rc, _, err = launch(gke, "--name=n", "--image=i", "--gpus_per_host=1", "--num_hosts=2", "--", *TRAIN)
    assert rc == 1 and err == ("launch/gke.py: error: kubectl not found; install it, or use --dry_run and run the "
                               "output elsewhere\n")
    monkeypatch.chdir(tmp_path)
    rc, _, err = launch(slurm, "--nodes=2", "--", *TRAIN)
    assert rc == 1 and err.splitlines()[-1] == ("launch/slurm.py: error: sbatch not found; install it, or use "
                                                "--dry_run and run the output elsewhere")
