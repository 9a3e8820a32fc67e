"""Fault injection: kill -9 a training run at random moments; every resume must end bit-identical.

    python benchmarks/fault_injection.py --kills=10 --steps=24 [--seed=0] [--workdir=/tmp/fi] [--json]

One uninterrupted reference run, then the same command again and again in a second workdir, each
process SIGKILLed at a random moment, until `--kills` kills are in; then once more to the end. A
kill comes either during start-up (a uniform time before the first progress line: while it locks
the workdir, restores, truncates metrics.jsonl, writes config.json) or after a random number of
progress lines, fewer than the steps left, plus up to 0.3 s (mid-step, during an asynchronous
checkpoint save). Tiny shapes (`tests.helpers.SMALL_OVERRIDES`), 1 CPU device, a checkpoint every
2 steps, async saves, keep 2, a persistent compilation cache.

Checks, after every process (killed or not): each complete row of metrics.jsonl equals the
reference's row of that step bit for bit (losses, gradient norms, eval metrics; not the timings)
and nothing but a kill-torn last line is malformed. A kill *survived* when the process started
after it ran without an error of its own and passed that check. At the end: every logged step (and
the final evaluation) has exactly one row (lost / duplicated rows), and the final parameters equal
the reference's. Exit status 1 unless all kills survived and the end checks pass.

The run processes are `vlm train` (`vlm.main.run`) in children forked from this process after it
has imported the framework (nothing of JAX initialised, no threads), so each start-up costs its
tracing and cache loads, not 4 s of imports; `--spawn` starts them as `python -m vlm.main` instead.
`tests/test_reliability.py` runs this with 10 kills over 24 steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from tests.helpers import SMALL_OVERRIDES  # noqa: E402

CHECKPOINT_EVERY = 2
TIMING_KEYS = ("time", "train/steps_per_s", "train/examples_per_s", "train/tflops_per_device",
               "train/model_flops_per_step", "train/model_flops_per_s", "train/mfu", "train/data_wait_frac",
               "train/peak_memory_gib")
ENV_MARK = "VLM_FAULT_INJECTION_CACHE"  # set once this process runs under `environment()`


def command(workdir, data_dir, steps: int) -> list[str]:
    return [sys.executable, "-m", "vlm.main", "train", "--config=configs/dual_encoder.py:tiny", *SMALL_OVERRIDES,
            f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", f"--config.total_steps={steps}",
            "--config.log_every=1", f"--config.checkpoint_every={CHECKPOINT_EVERY}", "--config.eval_every=100000",
            "--config.data.eval_size=16", "--config.checkpoint.keep=2", "--config.checkpoint.async_save=True"]


def environment(cache_dir) -> dict:
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
                JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1", **{ENV_MARK: str(cache_dir)})


@dataclasses.dataclass
class Report:
    steps: int
    faults_injected: int = 0
    survived: int = 0
    processes: int = 0
    resumes: int = 0  # processes that restored a checkpoint ("resumed from")
    damaged_moved: int = 0  # checkpoints moved aside as damaged
    stale_locks_taken_over: int = 0
    mismatched_rows: int = 0  # rows (seen after any process) that differ from the reference's
    lost_rows: int = 0  # logged steps (train rows, and the final eval row) missing from metrics.jsonl at the end
    duplicate_rows: int = 0
    losses_identical: bool = False
    params_identical: bool = False
    wall_s: float = 0.0
    # (kind: "start" (a time before its first progress line) or "step" (after some progress lines), the
    # step it resumed from or "-", progress lines waited for, seconds after spawn or after that line)
    kill_points: list = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.survived == self.faults_injected and not self.lost_rows and not self.duplicate_rows
                and not self.mismatched_rows and self.losses_identical and self.params_identical)

    def table(self) -> str:
        rows = [("faults injected (kill -9)", self.faults_injected), ("survived", self.survived),
                ("processes started", self.processes), ("resumed from a checkpoint", self.resumes),
                ("stale workdir locks taken over", self.stale_locks_taken_over),
                ("checkpoints moved aside as damaged", self.damaged_moved),
                ("rows differing from the reference (any time)", self.mismatched_rows),
                ("lost metrics rows", self.lost_rows), ("duplicated metrics rows", self.duplicate_rows),
                ("every loss bit-identical", self.losses_identical),
                ("final parameters bit-identical", self.params_identical), ("wall time s", f"{self.wall_s:.1f}")]
        return "| measure | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)


class Process:
    """One `vlm train` process whose stdout is read line by line without threads (it may be forked
    from this process, which must then stay single-threaded)."""

    def __init__(self, argv: list[str], env: dict, err_path: str, fork: bool):
        self.started = time.perf_counter()
        self.buffer, self.lines, self.returncode = b"", [], None
        self.first_progress_s = None  # seconds from spawn to its first progress line
        read_fd, write_fd = os.pipe()
        err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        if fork:
            sys.stdout.flush()  # or the child would write this process's buffered output again
            sys.stderr.flush()
            self.pid = os.fork()
            if self.pid == 0:  # the child: `vlm train ARGS` with stdout into the pipe
                os.close(read_fd)
                os.dup2(write_fd, 1)
                os.dup2(err, 2)
                _run_vlm_main(argv[3:])
        else:
            self.pid = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=write_fd, stderr=err).pid
        os.close(write_fd)
        os.close(err)
        self.fd = read_fd

    def progress_lines(self) -> int:
        return sum(line.startswith("[") for line in self.lines)

    def read(self, timeout: float) -> bool:
        """Reads what is there within `timeout` s; False once the output ended."""
        ready, _, _ = select.select([self.fd], [], [], max(timeout, 0.0))
        if not ready:
            return True
        chunk = os.read(self.fd, 65536)
        if not chunk:
            return False
        self.buffer += chunk
        *done, self.buffer = self.buffer.split(b"\n")
        self.lines += [line.decode(errors="replace") for line in done]
        if self.first_progress_s is None and self.progress_lines():
            self.first_progress_s = time.perf_counter() - self.started
        return True

    def wait_for(self, progress_lines: int | None = None, seconds: float | None = None) -> bool:
        """Reads until `progress_lines` progress lines (or `seconds` since spawn); False if it ended first."""
        while True:
            if progress_lines is not None and self.progress_lines() >= progress_lines:
                return True
            left = None if seconds is None else self.started + seconds - time.perf_counter()
            if left is not None and left <= 0:
                return True
            if not self.read(1.0 if left is None else min(left, 1.0)):
                return False

    def kill(self) -> None:
        """SIGKILL (a process that already ended is only reaped), then reads the rest of its output."""
        os.kill(self.pid, signal.SIGKILL)
        self.finish()

    def finish(self) -> int:
        while self.read(10.0):
            pass
        os.close(self.fd)
        _, status = os.waitpid(self.pid, 0)
        self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def _run_vlm_main(args: list[str]) -> None:
    """In a forked child: `vlm ARGS`, then exit without running the parent's cleanup."""
    code = 1
    try:
        sys.argv = ["vlm", *args]
        from vlm import main

        main.run()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _preimport() -> bool:
    """Imports what every run imports, in this (parent) process; True if forking is then safe."""
    import configs.dual_encoder  # noqa: F401
    import grain  # noqa: F401
    import orbax.checkpoint  # noqa: F401
    import tensorboardX  # noqa: F401

    import input_pipeline.pipeline  # noqa: F401
    import vlm.eval.evaluators  # noqa: F401
    import vlm.main  # noqa: F401
    import vlm.tasks.contrastive  # noqa: F401
    import vlm.train  # noqa: F401

    return threading.active_count() == 1


def _rows(workdir) -> tuple[list[dict], int]:
    """(complete rows, malformed lines other than a kill-torn last line)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return [], 0
    with open(path) as f:
        text = f.read()
    lines = text.split("\n")
    rows, bad = [], 0
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            bad += bool(line) and i != len(lines) - 1  # the last line may be cut by the kill
    return rows, bad


def _key(row: dict) -> tuple[str, int]:
    return ("train" if "train/loss" in row else "eval", int(row["step"]))


def _values(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING_KEYS}


def _mismatches(workdir, reference: dict) -> set[str]:
    """Rows (as text) of workdir's metrics.jsonl that differ from the reference's row of their step,
    and malformed lines other than a kill-torn last one."""
    rows, bad = _rows(workdir)
    return {json.dumps(r) for r in rows if _values(r) != reference.get(_key(r))} | {f"malformed {i}" for i in range(bad)}


def _latest_checkpoint(workdir) -> int:
    path = os.path.join(workdir, "checkpoints")
    return max([int(p) for p in os.listdir(path) if p.isdigit()] or [0]) if os.path.isdir(path) else 0


def run(root, *, kills: int, steps: int = 24, seed: int = 0, cache_dir=None, fork: bool = True,
        log=print) -> Report:
    """The experiment in directory `root` (created); see the module docstring. Must run under
    `environment(cache_dir)` (JAX reads it at import); `main()` sees to that."""
    root = os.path.abspath(root)
    os.makedirs(root, exist_ok=True)
    data, cache = os.path.join(root, "data"), cache_dir or os.path.join(root, "jax_cache")
    env = environment(cache)
    fork = fork and _preimport()
    start = time.perf_counter()
    report = Report(steps)
    reference, faulty = os.path.join(root, "reference"), os.path.join(root, "faulty")
    for path in (reference, faulty):
        shutil.rmtree(path, ignore_errors=True)

    def spawn(workdir) -> Process:
        report.processes += workdir == faulty
        return Process(command(workdir, data, steps), env, os.path.join(root, f"stderr.{report.processes}"), fork)

    proc = spawn(reference)
    if proc.finish() != 0:
        raise RuntimeError(f"reference run failed (rc={proc.returncode}): "
                           f"{open(os.path.join(root, 'stderr.0')).read()[-3000:]}")
    ref_rows, _ = _rows(reference)
    expected = {_key(r): _values(r) for r in ref_rows}
    rng = np.random.default_rng(seed)
    warm_start_s = None  # seconds from spawn to the first progress line of a resumed process
    outputs, seen_mismatches = [], set()

    def check(proc: Process, killed_by_us: bool) -> bool:
        outputs.append(proc.text)
        mismatched = _mismatches(faulty, expected)
        report.mismatched_rows += len(mismatched - seen_mismatches)  # each differing row counted once
        seen_mismatches.update(mismatched)
        clean = proc.returncode == (-signal.SIGKILL if killed_by_us else 0)
        if not clean:
            log(f"process {report.processes} ended with {proc.returncode}: "
                f"{open(os.path.join(root, f'stderr.{report.processes}')).read()[-2000:]}")
        return clean and not mismatched

    while report.faults_injected < kills:
        remaining = steps - _latest_checkpoint(faulty)
        at_start = warm_start_s is not None and rng.uniform() < 0.3
        proc = spawn(faulty)
        if at_start:
            lines, delay = 0, float(rng.uniform(0.0, warm_start_s))
            proc.wait_for(seconds=delay)
        else:
            lines, delay = int(rng.integers(1, max(remaining, 2))), float(rng.uniform(0.0, 0.3))
            if proc.wait_for(progress_lines=lines):
                time.sleep(delay)
        proc.kill()
        if proc.first_progress_s is not None:
            warm_start_s = min(warm_start_s or np.inf, proc.first_progress_s)
        if proc.returncode != -signal.SIGKILL:  # it ended on its own before the kill point
            log(f"the run ended before the kill point ({lines} lines + {delay:.2f} s)")
            report.survived += check(proc, killed_by_us=False) and report.faults_injected > 0
            break
        passed = check(proc, killed_by_us=True)
        if report.faults_injected:
            report.survived += passed  # the previous kill: this process resumed after it and did right
        report.faults_injected += 1
        resumed = [line.rsplit("/", 1)[-1].strip() for line in proc.lines if line.startswith("resumed from ")]
        report.kill_points.append(("start" if at_start else "step", int(resumed[0]) if resumed else "-", lines,
                                   round(delay, 3)))
    final = spawn(faulty)
    final.finish()
    report.survived += check(final, killed_by_us=False) and report.faults_injected > 0
    text = "\n".join(outputs)
    report.resumes = text.count("resumed from ")
    report.damaged_moved = text.count(" is damaged (")
    report.stale_locks_taken_over = text.count("workdir lock of a run that is gone")

    rows, _ = _rows(faulty)
    got = [_key(r) for r in rows]
    report.lost_rows = len(set(expected) - set(got))
    report.duplicate_rows = len(got) - len(set(got)) + len(set(got) - set(expected))
    losses = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    ref_losses = {r["step"]: r["train/loss"] for r in ref_rows if "train/loss" in r}
    report.losses_identical = losses == ref_losses and len(losses) == steps
    report.params_identical = _same_params(reference, faulty, steps)
    report.wall_s = time.perf_counter() - start
    return report


def _same_params(a, b, step) -> bool:
    """Compares the final parameters (initialises JAX here: after the last fork)."""
    import jax

    from tests.helpers import load_checkpoint_params

    leaves = [jax.tree.leaves(load_checkpoint_params(w, step)) for w in (a, b)]
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(*leaves, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="")
    parser.add_argument("--cache_dir", default="", help="JAX compilation cache (default: WORKDIR/jax_cache)")
    parser.add_argument("--spawn", action="store_true", help="start each run as `python -m vlm.main` (no fork)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON line instead")
    args = parser.parse_args()
    root = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="vlm_fault_injection_"))
    cache = os.path.abspath(args.cache_dir or os.path.join(root, "jax_cache"))
    if os.environ.get(ENV_MARK) != cache:  # JAX reads its flags at import: run again under them
        os.makedirs(root, exist_ok=True)
        argv = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], f"--workdir={root}", f"--cache_dir={cache}"]
        os.execve(sys.executable, argv, environment(cache))
    os.chdir(ROOT)  # `--config=configs/...` is relative to the repository
    report = run(root, kills=args.kills, steps=args.steps, seed=args.seed, cache_dir=cache, fork=not args.spawn,
                 log=lambda line: print(line, file=sys.stderr))
    if args.json:
        print(json.dumps({**dataclasses.asdict(report), "ok": report.ok}))
    else:
        print(report.table(), end="")
        print(f"kill points (kind, started from step, progress lines seen, + s): {report.kill_points}")
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
