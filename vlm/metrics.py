"""Metric writers (console, JSONL, TensorBoard, and trackers), step timing, model FLOPs and MFU.

Only process 0 writes; other processes get a writer that drops everything. Besides the console
and W/metrics.jsonl (always), `config.metrics.writers` names the sinks: "tensorboard" (the
default), "wandb" and "mlflow" (`vlm/tracking.py`).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping

import jax
from etils import epath

# Peak dense bf16 FLOP/s per chip (vendor datasheets). Matched against device_kind.
PEAK_BF16_FLOPS = (
    ("TPU v6", 918e12),  # Trillium (v6e; device_kind "TPU v6 lite")
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("H200", 989e12),
    ("H100", 989e12),  # SXM; dense, without sparsity
    ("A100", 312e12),
)


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
    """Peak bf16 FLOP/s of one device, or None where unknown (CPU)."""
    kind = (device or jax.devices()[0]).device_kind
    for key, peak in PEAK_BF16_FLOPS:
        if key.lower() in kind.lower():
            return peak
    return None


def truncate_rows(path: epath.Path, last_step: int) -> int:
    """Drops the rows of a metrics.jsonl past `last_step` and any torn line (a write cut by a kill),
    by writing the kept rows to a new file and renaming it over the old one: a kill during this
    leaves either file whole. Returns the number of lines dropped."""
    if not path.exists():
        return 0
    text = path.read_text()
    kept, dropped = [], 0
    for line in text.splitlines():
        try:
            row = json.loads(line)
            keep = int(row["step"]) <= last_step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped or (text and not text.endswith("\n")):  # also a whole last row cut before its newline
        tmp = path.parent / (path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
    return dropped


WRITERS = ("tensorboard", "wandb", "mlflow")
DEFAULT_WRITERS = ("tensorboard",)


def writer_names(config) -> tuple[str, ...]:
    """`config.metrics.writers` (("tensorboard",) for a config without it); a one-line
    ConfigError for an unknown name."""
    from vlm.errors import ConfigError

    metrics = (config.get("metrics") if config is not None else None) or {}
    names = metrics.get("writers", DEFAULT_WRITERS)
    names = (names,) if isinstance(names, str) else tuple(names)
    unknown = [n for n in names if n not in WRITERS]
    if unknown:
        raise ConfigError(f"config.metrics.writers has unknown writer(s) {', '.join(map(repr, unknown))}; "
                          f"choose from {', '.join(WRITERS)}")
    return names


def _tensorboardx_writer():
    """tensorboardX's SummaryWriter, imported without PyTorch.

    tensorboardX's writer imports torch whenever it is installed, only to accept torch tensors: 2.1 s of a
    run's start-up on the 2-core CPU box (0.15 s without), for nothing, as vlm logs Python floats. While
    tensorboardX loads, `import torch` is made to fail (a None entry in sys.modules), which it handles;
    the entry is removed after, so torch imports normally later. A process that has torch already is left as is.
    """
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return SummaryWriter


class MetricWriter:
    """Console progress line, W/metrics.jsonl and the config's sinks (TensorBoard, trackers),
    all from one `write` call. `config` gives `config.metrics.writers` (default: TensorBoard);
    `tensorboard=False` leaves TensorBoard out whatever the config says.

    A run that resumes from the checkpoint of step `resume_step` first drops the rows written after
    that step by the run that stopped (they are written again, the same), so metrics.jsonl holds one
    row per logged step and evaluation; TensorBoard hides those events (`purge_step`). The trainer
    evaluates before it checkpoints, so every row up to a checkpoint's step exists when it resumes.
    """

    def __init__(self, workdir: str | None, total_steps: int, *, enabled: bool | None = None, tensorboard: bool = True,
                 config=None, resume_step: int | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.total_steps = total_steps
        self._jsonl = None
        self._tb = None
        self._trackers = []
        names = writer_names(config)  # checked on every process: a typo fails everywhere alike
        if self.enabled and workdir:
            root = epath.Path(workdir)  # local or a bucket (gs://...)
            root.mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                truncate_rows(root / "metrics.jsonl", resume_step)
            self._jsonl = (root / "metrics.jsonl").open("a")
            if tensorboard and "tensorboard" in names:
                SummaryWriter = _tensorboardx_writer()
                purge = {} if resume_step is None else {"purge_step": resume_step + 1}
                self._tb = SummaryWriter(str(root / "tensorboard"), **purge)
            if any(n != "tensorboard" for n in names):
                from vlm import tracking

                self._trackers = [tracking.create(n, workdir, config) for n in names if n != "tensorboard"]

    def write(self, step: int, metrics: Mapping[str, float], *, eta_s: float | None = None) -> None:
        if not self.enabled:
            return
        metrics = {k: float(v) for k, v in metrics.items()}
        if self._jsonl:
            self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **metrics}) + "\n")
            self._jsonl.flush()
        if self._tb:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        for tracker in self._trackers:
            tracker.write(step, metrics)
        print(self.format_line(step, metrics, eta_s), file=sys.stdout, flush=True)

    def format_line(self, step: int, metrics: Mapping[str, float], eta_s: float | None) -> str:
        pct = 100.0 * step / max(self.total_steps, 1)
        parts = [f"[{step:>6}/{self.total_steps} {pct:5.1f}%]"]
        for k, v in metrics.items():
            parts.append(f"{k.split('/', 1)[-1] if k.startswith('train/') else k}={_fmt(v)}")
        if eta_s is not None:
            parts.append(f"eta={_fmt_duration(eta_s)}")
        return " ".join(parts)

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()
        for tracker in self._trackers:
            tracker.close()


def _fmt(v: float) -> str:
    if v == 0 or math.isnan(v) or math.isinf(v):
        return str(v)
    if abs(v) >= 1e5 or abs(v) < 1e-3:
        return f"{v:.3e}"
    return f"{v:.4g}"


def _fmt_duration(s: float) -> str:
    s = int(s)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"


def peak_memory_bytes() -> int | None:
    """The largest peak_bytes_in_use over this process's devices; None where the backend keeps no
    such statistics (XLA:CPU)."""
    peaks = []
    for device in jax.local_devices():
        try:
            stats = device.memory_stats()
        except Exception:  # noqa: BLE001 - not every backend implements memory_stats
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


class StepTimer:
    """Wall time between log points → steps/s, examples/s, achieved FLOP/s, MFU, ETA."""

    def __init__(self, batch_size: int, flops_per_step: float | None, total_steps: int):
        self.batch_size = batch_size
        self.flops_per_step = flops_per_step
        self.total_steps = total_steps
        self.peak = peak_flops_per_device()
        self.num_devices = jax.device_count()
        self._t = None
        self._step = None
        self._data_wait = 0.0  # seconds blocked on the input pipeline since the last lap

    def start(self, step: int) -> None:
        self._t, self._step = time.perf_counter(), step
        self._data_wait = 0.0

    def data_wait(self, seconds: float) -> None:
        """Time the loop spent blocked on the input pipeline (`next(data_iter)`) since the last lap."""
        self._data_wait += seconds

    def lap(self, step: int) -> tuple[dict[str, float], float | None]:
        """Metrics since the last lap (call after the step's results are on host)."""
        now = time.perf_counter()
        dt, dsteps = now - self._t, step - self._step
        self._t, self._step = now, step
        if dsteps <= 0 or dt <= 0:
            return {}, None
        steps_per_s = dsteps / dt
        out = {"train/steps_per_s": steps_per_s, "train/examples_per_s": steps_per_s * self.batch_size,
               # Dispatch is asynchronous, so the device computes while the host waits for data: this is
               # the share of wall time the loop could not issue steps (0 = the pipeline keeps up).
               "train/data_wait_frac": min(self._data_wait / dt, 1.0)}
        self._data_wait = 0.0
        peak = peak_memory_bytes()
        if peak is not None:
            out["train/peak_memory_gib"] = peak / 2**30
        if self.flops_per_step:
            out["train/model_flops_per_step"] = self.flops_per_step
            achieved = self.flops_per_step * steps_per_s / self.num_devices
            out["train/tflops_per_device"] = achieved / 1e12
            if self.peak:
                out["train/mfu"] = achieved / self.peak
        return out, (self.total_steps - step) / steps_per_s
