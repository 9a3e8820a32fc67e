"""Fault injection: kill -9 a training run at random moments; every resume must end bit-identical.

    python benchmarks/fault_injection.py --kills=10 --steps=24 [--seed=0] [--workdir=/tmp/fi]

One uninterrupted reference run, then the same command run again and again in a second workdir,
each process killed with SIGKILL at a random moment (after a random number of its progress
lines, fewer than the steps left to run, plus up to 0.3 s: during a step, an asynchronous checkpoint
save, the restore, the metrics truncation), until `--kills` kills are injected; then once more to
the end. Tiny shapes
(`tests.helpers.SMALL_OVERRIDES`), 1 CPU device, a checkpoint every 2 steps, async saves on, a
shared persistent compilation cache (so a resumed process does not recompile).

Prints one Markdown table: faults injected, survived (kills after which the next process resumed
and the run still ended bit-identical), lost and duplicated metrics rows, whether every step's loss
and the final parameters equal the reference bit for bit, wall time. Exit status 1 if not all survived.
`tests/test_reliability.py` runs the same with 3 kills.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from tests.helpers import SMALL_OVERRIDES  # noqa: E402

CHECKPOINT_EVERY = 2


def command(workdir, data_dir, steps: int) -> list[str]:
    return [sys.executable, "-m", "vlm.main", "train", "--config=configs/dual_encoder.py:tiny", *SMALL_OVERRIDES,
            f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", f"--config.total_steps={steps}",
            "--config.log_every=1", f"--config.checkpoint_every={CHECKPOINT_EVERY}", "--config.eval_every=100000",
            "--config.data.eval_size=16", "--config.checkpoint.keep=2", "--config.checkpoint.async_save=True"]


def environment(cache_dir) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    return env


@dataclasses.dataclass
class Report:
    steps: int
    faults_injected: int = 0
    survived: int = 0
    processes: int = 0
    resumes: int = 0  # processes that restored a checkpoint ("resumed from")
    damaged_moved: int = 0  # checkpoints moved aside as damaged
    lost_rows: int = 0  # logged steps (train rows, and the final eval row) missing from metrics.jsonl
    duplicate_rows: int = 0
    losses_identical: bool = False
    params_identical: bool = False
    wall_s: float = 0.0
    # (step the killed process resumed from, "-" if it was killed before its restore finished or started
    # from scratch; its progress lines before the kill (0: killed after its first line of any kind); + s)
    kill_points: list = dataclasses.field(default_factory=list)

    def table(self) -> str:
        rows = [("faults injected (kill -9)", self.faults_injected), ("survived", self.survived),
                ("processes started", self.processes), ("resumed from a checkpoint", self.resumes),
                ("checkpoints moved aside as damaged", self.damaged_moved), ("lost metrics rows", self.lost_rows),
                ("duplicated metrics rows", self.duplicate_rows),
                ("every loss bit-identical", self.losses_identical),
                ("final parameters bit-identical", self.params_identical), ("wall time s", f"{self.wall_s:.1f}")]
        return "| measure | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)


def _reader(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _run_and_kill(cmd, env, progress_lines: int, delay: float) -> tuple[bool, str]:
    """Runs `cmd`; SIGKILLs it `delay` s after its `progress_lines`-th progress line (0: its first line
    of any kind). Returns (killed, stdout)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    err = threading.Thread(target=proc.stderr.read, daemon=True)
    err.start()
    out, seen = [], 0
    while True:
        line = lines.get()
        if line is None:  # ended before the kill point
            proc.wait()
            return False, "".join(out)
        out.append(line)
        seen += line.startswith("[")
        if seen >= progress_lines:
            break
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    while (line := lines.get()) is not None:
        out.append(line)
    return proc.returncode == -signal.SIGKILL, "".join(out)


def _listdir(path) -> list[str]:
    return os.listdir(path) if os.path.isdir(path) else []


def _rows(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _params(workdir, step):
    from tests.helpers import load_checkpoint_params

    import jax

    return [np.asarray(x) for x in jax.tree.leaves(load_checkpoint_params(workdir, step))]


def run(root, *, kills: int, steps: int = 24, seed: int = 0, cache_dir=None, log=print) -> Report:
    """The experiment in directory `root` (created); see the module docstring. `cache_dir`: the JAX
    compilation cache (default root/jax_cache)."""
    root = os.path.abspath(root)
    os.makedirs(root, exist_ok=True)
    data, cache = os.path.join(root, "data"), cache_dir or os.path.join(root, "jax_cache")
    env = environment(cache)
    start = time.perf_counter()
    report = Report(steps)
    reference, faulty = os.path.join(root, "reference"), os.path.join(root, "faulty")
    for path in (reference, faulty):
        shutil.rmtree(path, ignore_errors=True)
    proc = subprocess.run(command(reference, data, steps), cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"reference run failed: {proc.stderr[-3000:]}")
    rng = np.random.default_rng(seed)
    outputs = []
    while report.faults_injected < kills:
        # Kill within the steps still to run from the newest complete checkpoint.
        remaining = steps - max([int(p) for p in _listdir(os.path.join(faulty, "checkpoints")) if p.isdigit()] or [0])
        lines, delay = int(rng.integers(0, max(remaining, 1))), float(rng.uniform(0.0, 0.3))
        killed, out = _run_and_kill(command(faulty, data, steps), env, lines, delay)
        report.processes += 1
        outputs.append(out)
        if not killed:
            log(f"the run ended before the kill point ({lines} lines + {delay:.2f} s)")
            break
        report.faults_injected += 1
        resumed = [line.rsplit("/", 1)[-1].strip() for line in out.splitlines() if line.startswith("resumed from ")]
        report.kill_points.append((int(resumed[0]) if resumed else "-", lines, round(delay, 3)))
    final = subprocess.run(command(faulty, data, steps), cwd=ROOT, env=env, capture_output=True, text=True)
    report.processes += 1
    outputs.append(final.stdout)
    if final.returncode != 0:
        raise RuntimeError(f"the last run failed (rc={final.returncode}): {final.stderr[-3000:]}")
    text = "".join(outputs)
    report.resumes = text.count("resumed from ")
    report.damaged_moved = text.count(" is damaged (")

    ref_rows, rows = _rows(reference), _rows(faulty)
    expected = [("train", s) for s in range(1, steps + 1)] + [("eval", steps)]
    got = [("train" if "train/loss" in r else "eval", r["step"]) for r in rows]
    report.lost_rows = len(set(expected) - set(got))
    report.duplicate_rows = len(got) - len(set(got)) + len(set(got) - set(expected))
    ref_losses = {r["step"]: r["train/loss"] for r in ref_rows if "train/loss" in r}
    losses = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    report.losses_identical = ref_losses == losses and len(losses) == steps
    report.params_identical = all(np.array_equal(a, b) for a, b in zip(_params(reference, steps),
                                                                         _params(faulty, steps), strict=True))
    ok = report.losses_identical and report.params_identical and not report.lost_rows and not report.duplicate_rows
    report.survived = report.faults_injected if ok else 0
    report.wall_s = time.perf_counter() - start
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="")
    args = parser.parse_args()
    root = args.workdir or tempfile.mkdtemp(prefix="vlm_fault_injection_")
    report = run(root, kills=args.kills, steps=args.steps, seed=args.seed)
    print(report.table(), end="")
    print(f"kill points (started from step, progress lines seen, + s): {report.kill_points}")
    sys.exit(0 if report.survived == report.faults_injected else 1)


if __name__ == "__main__":
    main()
