"""Train on GKE: a JobSet (or an Indexed Job + headless Service) with one pod per host.

    python launch/gke.py --name=de-b16 --image=us-docker.pkg.dev/my-project/vlm/vlm:latest \\
        --tpu_type=v5p --tpu_topology=2x2x4 --dry_run \\
        -- vlm train --config=configs/dual_encoder.py:B/16 --workdir=gs://my-bucket/de_b16

    python launch/gke.py --name=de-gpu --image=... --gpus_per_host=8 --num_hosts=4 \\
        --gpu_type=nvidia-h100-80gb --dry_run -- vlm train ...

--dry_run prints the manifest (pipe it to `kubectl apply -f -` yourself); without it the launcher
runs `kubectl apply -f -` on it. With --xpk the launcher uses `xpk workload create` instead and
--dry_run prints that command.

Every pod runs the same command (the image's vlm, from its working directory) with:
  JAX_COORDINATOR_ADDRESS  pod 0's DNS name and --port: NAME-workers-0-0.NAME (JobSet) or NAME-0.NAME
                           (Indexed Job, through the headless Service NAME);
  JAX_NUM_PROCESSES        the number of pods;
  JAX_PROCESS_ID           the pod's completion index (batch.kubernetes.io/job-completion-index).
TPU multislice (--num_slices > 1, JobSet only) is the exception: one Job per slice, and JAX reads
its process index from GKE's TPU variables (TPU_WORKER_ID, TPU_WORKER_HOSTNAMES) and the slice's
from MEGASCALE_*, which the manifest sets (slice id from the JobSet's job index).
"""

from __future__ import annotations

import os
import re
import sys

if __package__ in (None, ""):  # run as a script: `python launch/gke.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch import common
from launch.common import LaunchError, join

PROG = "launch/gke.py"
EXAMPLE = "-- vlm train --config=configs/dual_encoder.py:B/16 --workdir=gs://BUCKET/runs/NAME"
JOB = "workers"  # the JobSet's replicated job
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
JOBSET_JOB_INDEX = "metadata.labels['jobset.sigs.k8s.io/job-index']"
TPU_PORT = 8471  # TPU runtime, between the hosts of a slice
NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
TOPOLOGY = re.compile(r"\d+x\d+(x\d+)?")


# TPU generation -> (GKE node label cloud.google.com/gke-tpu-accelerator, topology dimensions,
# xpk --tpu-type name as a function of the chip count).
TPU_TYPES = {
    "v4": ("tpu-v4-podslice", 3, lambda chips: f"v4-{2 * chips}"),
    "v5p": ("tpu-v5p-slice", 3, lambda chips: f"v5p-{2 * chips}"),
    "v5e": ("tpu-v5-lite-podslice", 2, lambda chips: f"v5litepod-{chips}"),
    "v6e": ("tpu-v6e-slice", 2, lambda chips: f"v6e-{chips}"),
}


def parser() -> common.Parser:
    p = common.Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                      usage=f"{PROG} --name=NAME --image=IMAGE (--tpu_type=T --tpu_topology=AxB[xC] | "
                            "--gpus_per_host=G --num_hosts=N) [flags] -- vlm train ...")
    p.add_argument("--name", help="Workload name: the JobSet/Job, its Service and pods' DNS names.")
    p.add_argument("--image", help="Container image with vlm installed and the repo as working directory.")
    p.add_argument("--kind", default="jobset", choices=("jobset", "indexed_job"),
                   help="jobset (needs the JobSet controller; GKE has it with TPUs) or indexed_job "
                        "(plain batch/v1 Job + headless Service).")
    p.add_argument("--tpu_type", choices=sorted(TPU_TYPES), help="TPU generation of the node pool.")
    p.add_argument("--tpu_topology", help="TPU slice topology, e.g. 2x2x4 (v4/v5p) or 4x4 (v5e/v6e).")
    p.add_argument("--num_slices", type=int, default=1, help="TPU multislice: this many slices (JobSet only).")
    p.add_argument("--gpus_per_host", type=int, help="GPU pods: GPUs per pod (one pod per node).")
    p.add_argument("--num_hosts", type=int, help="GPU pods: number of pods (nodes).")
    p.add_argument("--gpu_type", help="GPU node label cloud.google.com/gke-accelerator, e.g. nvidia-h100-80gb.")
    p.add_argument("--port", type=int, default=1234, help="JAX coordinator port on pod 0 (default 1234).")
    p.add_argument("--env", action="append", metavar="NAME=VALUE", help="Container environment (repeatable).")
    p.add_argument("--namespace", help="Kubernetes namespace (default: kubectl's).")
    p.add_argument("--service_account", help="Kubernetes service account of the pods (Workload Identity for gs://).")
    p.add_argument("--queue", help="Kueue LocalQueue (label kueue.x-k8s.io/queue-name).")
    p.add_argument("--max_restarts", type=int, default=0, help="JobSet: restart all pods up to this many times "
                   "after a failure; each restart resumes from the latest checkpoint.")
    p.add_argument("--working_dir", help="Container working directory (default: the image's WORKDIR).")
    p.add_argument("--xpk", action="store_true", help="Use `xpk workload create` instead of a manifest.")
    p.add_argument("--cluster", help="--xpk: the GKE cluster.")
    p.add_argument("--project", help="--xpk: Google Cloud project.")
    p.add_argument("--zone", help="--xpk: the cluster's zone.")
    p.add_argument("--dry_run", action="store_true", help="Print the manifest (or xpk command); apply nothing.")
    return p


class Shape:
    """Pods, devices per pod and node selector of the request."""

    def __init__(self, a):
        self.tpu = a.tpu_type is not None
        self.slices = a.num_slices
        if self.tpu:
            label, dims, self._xpk = TPU_TYPES[a.tpu_type]
            if not a.tpu_topology:
                raise LaunchError(f"missing --tpu_topology (e.g. {'2x2x4' if dims == 3 else '4x4'})")
            if not a.tpu_topology or not TOPOLOGY.fullmatch(a.tpu_topology) or a.tpu_topology.count("x") + 1 != dims:
                raise LaunchError(f"--tpu_topology={a.tpu_topology} must be {'AxBxC' if dims == 3 else 'AxB'} "
                                  f"for {a.tpu_type} (e.g. {'2x2x4' if dims == 3 else '4x4'})")
            self.chips = 1
            for d in a.tpu_topology.split("x"):
                self.chips *= int(d)
            if self.chips < 1:
                raise LaunchError(f"--tpu_topology={a.tpu_topology} has no chips")
            if dims == 3 or self.chips > 8:  # v4/v5p hosts have 4 chips; v5e/v6e: single host up to 8 chips
                if self.chips % 4:
                    raise LaunchError(f"--tpu_topology={a.tpu_topology}: {self.chips} chips is not a whole "
                                      "number of 4-chip hosts")
                self.per_host = 4
            else:
                self.per_host = self.chips
            self.hosts = self.chips // self.per_host
            self.resource = "google.com/tpu"
            self.node_selector = {"cloud.google.com/gke-tpu-accelerator": label,
                                  "cloud.google.com/gke-tpu-topology": a.tpu_topology}
        else:
            self.hosts, self.per_host, self.resource = a.num_hosts, a.gpus_per_host, "nvidia.com/gpu"
            self.node_selector = {"cloud.google.com/gke-accelerator": a.gpu_type} if a.gpu_type else {}

    def xpk_device(self, a) -> list[str]:
        if self.tpu:
            return [f"--tpu-type={self._xpk(self.chips)}", f"--num-slices={self.slices}"]
        # xpk's GPU device types are the node label without "nvidia-"/"nvidia-tesla-", and the GPU count.
        device = re.sub(r"^nvidia-(tesla-)?", "", a.gpu_type)
        return [f"--device-type={device}-{self.per_host}", f"--num-nodes={self.hosts}"]


def validate(a, train: list[str]) -> Shape:
    if not a.name:
        raise LaunchError("missing --name")
    if not NAME.fullmatch(a.name) or len(a.name) > 40:
        raise LaunchError(f"--name={a.name!r} must be at most 40 lowercase letters, digits and '-', "
                          "starting with a letter (it becomes pod DNS names)")
    if not a.image:
        raise LaunchError("missing --image (a container image with vlm installed)")
    gpu = a.gpus_per_host is not None or a.num_hosts is not None
    if (a.tpu_type is not None) == gpu:
        raise LaunchError("choose the accelerator: --tpu_type=... --tpu_topology=... or --gpus_per_host=G --num_hosts=N")
    if a.num_slices < 1:
        raise LaunchError(f"--num_slices={a.num_slices} must be >= 1")
    if gpu:
        for flag in ("gpus_per_host", "num_hosts"):
            if getattr(a, flag) is None:
                raise LaunchError(f"missing --{flag} (GPU pods need --gpus_per_host=G --num_hosts=N)")
        if a.gpus_per_host < 1:
            raise LaunchError(f"--gpus_per_host={a.gpus_per_host} must be >= 1")
        if a.num_hosts < 1:
            raise LaunchError(f"--num_hosts={a.num_hosts} must be >= 1")
        if a.num_slices != 1:
            raise LaunchError("--num_slices is for TPUs; GPU pods are counted with --num_hosts")
    if a.num_slices > 1 and a.kind != "jobset":
        raise LaunchError("--num_slices > 1 needs --kind=jobset (one Job per slice)")
    if a.max_restarts < 0:
        raise LaunchError(f"--max_restarts={a.max_restarts} must be >= 0")
    if a.max_restarts and a.kind != "jobset":
        raise LaunchError("--max_restarts needs --kind=jobset (a Job restarts pods one by one, and a JAX process "
                          "cannot rejoin a running job)")
    if not 0 < a.port < 65536:
        raise LaunchError(f"--port={a.port} must be in 1..65535")
    if a.xpk:
        if not a.cluster:
            raise LaunchError("--xpk needs --cluster")
        if gpu and not a.gpu_type:
            raise LaunchError("--xpk with GPUs needs --gpu_type (e.g. nvidia-h100-80gb)")
    elif a.cluster:
        raise LaunchError("--cluster only applies with --xpk (kubectl uses its current context)")
    common.check_train_command(train, EXAMPLE)
    common.parse_env(a.env)
    return Shape(a)


def coordinator_host(a) -> str:
    return f"{a.name}-{JOB}-0-0.{a.name}" if a.kind == "jobset" else f"{a.name}-0.{a.name}"


def env_list(a, shape: Shape) -> list[dict]:
    env = []
    if shape.slices == 1:
        env += [
            {"name": "JAX_COORDINATOR_ADDRESS", "value": f"{coordinator_host(a)}:{a.port}"},
            {"name": "JAX_NUM_PROCESSES", "value": str(shape.hosts)},
            {"name": "JAX_PROCESS_ID", "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX}}},
        ]
    else:
        env += [
            {"name": "MEGASCALE_COORDINATOR_ADDRESS", "value": coordinator_host(a)},
            {"name": "MEGASCALE_NUM_SLICES", "value": str(shape.slices)},
            {"name": "MEGASCALE_SLICE_ID", "valueFrom": {"fieldRef": {"fieldPath": JOBSET_JOB_INDEX}}},
            {"name": "JAX_COORDINATOR_PORT", "value": str(a.port)},  # read by JAX's own TPU detection
        ]
    env += [{"name": name, "value": value} for name, value in common.parse_env(a.env)]
    return env


def pod_spec(a, shape: Shape, train: list[str]) -> dict:
    container = {"name": "vlm", "image": a.image, "command": list(train)}
    if a.working_dir:
        container["workingDir"] = a.working_dir
    container["env"] = env_list(a, shape)
    ports = [{"containerPort": a.port, "name": "coordinator"}]
    if shape.tpu:
        ports.append({"containerPort": TPU_PORT, "name": "tpu"})
    container["ports"] = ports
    container["resources"] = {"requests": {shape.resource: shape.per_host}, "limits": {shape.resource: shape.per_host}}
    # Grain's worker processes pass batches through shared memory; a pod's default /dev/shm is 64 MiB.
    container["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    spec = {"restartPolicy": "Never"}
    if a.kind == "indexed_job":
        spec["subdomain"] = a.name  # pod NAME-<index> resolves as NAME-<index>.NAME through the Service
    if a.service_account:
        spec["serviceAccountName"] = a.service_account
    if shape.node_selector:
        spec["nodeSelector"] = shape.node_selector
    spec["containers"] = [container]
    spec["volumes"] = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    return spec


def job_spec(a, shape: Shape, train: list[str]) -> dict:
    return {
        "parallelism": shape.hosts,
        "completions": shape.hosts,
        "completionMode": "Indexed",
        "backoffLimit": 0,  # one failed pod fails the job: the others cannot go on without it
        "template": {"spec": pod_spec(a, shape, train)},
    }


def metadata(a, annotations: dict | None = None, labels: bool = True) -> dict:
    meta = {"name": a.name}
    if a.namespace:
        meta["namespace"] = a.namespace
    if labels and a.queue:
        meta["labels"] = {"kueue.x-k8s.io/queue-name": a.queue}
    if annotations:
        meta["annotations"] = annotations
    return meta


def manifests(a, shape: Shape, train: list[str]) -> list[dict]:
    if a.kind == "jobset":
        # One slice per node pool: the hosts of a TPU slice must be the nodes of one pool.
        annotations = {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"} if shape.tpu else None
        spec = {}
        if a.max_restarts:
            spec["failurePolicy"] = {"maxRestarts": a.max_restarts}
        spec["network"] = {"enableDNSHostnames": True}  # pods resolve as NAME-workers-<slice>-<index>.NAME
        spec["replicatedJobs"] = [{"name": JOB, "replicas": shape.slices,
                                   "template": {"spec": job_spec(a, shape, train)}}]
        return [{"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "metadata": metadata(a, annotations),
                 "spec": spec}]
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": metadata(a, labels=False),
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": {"job-name": a.name},
                 "ports": [{"name": "coordinator", "port": a.port}]},
    }
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata(a), "spec": job_spec(a, shape, train)}
    return [service, job]


def render(a, shape: Shape, train: list[str]) -> str:
    what = (f"{shape.slices} x " if shape.slices > 1 else "") + (
        f"TPU {a.tpu_type} {a.tpu_topology}" if shape.tpu else f"{shape.per_host} GPUs")
    header = (f"# vlm on GKE: {a.name}, {shape.hosts * shape.slices} pods ({what}, {shape.per_host} "
              f"{shape.resource} each). Generated by {PROG}; apply with: kubectl apply -f FILE\n")
    return header + "---\n".join(common.to_yaml(m) for m in manifests(a, shape, train))


def xpk_command(a, shape: Shape, train: list[str]) -> str:
    argv = ["xpk", "workload", "create", f"--cluster={a.cluster}", f"--workload={a.name}",
            f"--docker-image={a.image}"]
    argv += [f"--project={a.project}"] if a.project else []
    argv += [f"--zone={a.zone}"] if a.zone else []
    argv += shape.xpk_device(a)
    if a.max_restarts:
        argv += [f"--max-restarts={a.max_restarts}", "--restart-on-user-code-failure"]
    argv += [f"--env={name}={value}" for name, value in common.parse_env(a.env)]
    command = join(train, single=True)  # xpk also puts the command in a double-quoted YAML string
    if not shape.tpu:
        # xpk's GPU pods get JAX_COORDINATOR_ADDRESS without the port (JAX_COORDINATOR_PORT), NNODES and
        # NODE_RANK; vlm reads JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
        command = (f"JAX_COORDINATOR_ADDRESS=$JAX_COORDINATOR_ADDRESS:$JAX_COORDINATOR_PORT "
                   f"JAX_NUM_PROCESSES=$NNODES JAX_PROCESS_ID=$NODE_RANK {command}")
    argv.append(f"--command={command}")
    return join(argv)


def run(launcher_argv: list[str], train: list[str]) -> int:
    a = parser().parse_args(launcher_argv)
    shape = validate(a, train)
    for message in common.shared_storage_warnings(train, shape.slices):
        common.warn(PROG, message)
    if a.xpk:
        command = xpk_command(a, shape, train)
        if a.dry_run:
            print(command)
        else:
            common.run_steps([("xpk workload create", command)], PROG)
        return 0
    text = render(a, shape, train)
    if a.dry_run:
        sys.stdout.write(text)
    else:
        common.run_program(["kubectl", "apply", "-f", "-"], input=text)
    return 0


def main(argv: list[str] | None = None) -> int:
    return common.main_wrapper(PROG, run, argv)


if __name__ == "__main__":
    sys.exit(main())
