"""Profiles of chosen train steps (`config.profile`), and where their time went, in the terminal.

    vlm train --config=... --workdir=W --config.profile.steps=3 [--config.profile.after_step=5]
    vlm profile --workdir=W                    # op time of the traced steps by XLA op kind, top ops
    pip install xprof && xprof --logdir=W/profile   # the trace viewer, op profile and memory views

Why: choosing a remat policy, an attention kernel, a batch size or an XLA flag needs to see where a step's
time goes, on the machine that runs it. MaxText's `profiler=xplane` with `skip_first_n_steps_for_profiler`
and `profiler_steps` is the model: the window starts after `after_step` steps (so the compile and the first,
slower steps stay out) and covers `steps` steps; jax.profiler writes W/profile/plugins/profile/<time>/
<host>.xplane.pb, the format XProf and TensorBoard read.

The summary reads that file with jax.profiler.ProfileData: every event that carries an `hlo_op` stat is one
XLA op executing (a fusion, a matmul, a copy, a collective) on one device; events of one execution of a
program share a `run_id`. Per program it gives the time from a run's first op to its last (the step as the
devices saw it) and the op time summed over devices and threads, by op kind (the op's name without its
".N" suffix: XLA names fusions after what they hold, e.g. `copy_bitcast_fusion`, `ynn_fusion`,
`all-reduce`). Op time can exceed the span: XLA:CPU runs independent ops at once on its threads, and
each device has its own. Checked on XLA:CPU traces (tests/test_profiling.py); GPU and TPU traces carry the same
stats but have not been summarised here.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
import re
import time
from typing import Callable

import jax

# Lines XProf derives from the raw events (present in some converted traces): counting them would count
# each op twice.
_DERIVED_LINES = ("XLA Ops", "XLA Modules", "Steps", "Framework Ops", "Framework Name Scope", "Source code")
WINDOW_FILE = "vlm_window.json"


class ProfileNotFound(FileNotFoundError):
    """No profile where one was asked for; the message (one line) says how to make one."""


class StepProfiler:
    """Traces train steps after_step+1 … after_step+steps (1-based, as logged) of one run.

    Use as a context manager around the train loop (an exception mid-window stops the trace), call
    `plan(start_step)` once the start step is known (a resume past the window's start traces nothing),
    then `before(step, state)`, `annotate(step)` around the step's dispatch and `after(step, outputs)`,
    with `step` the 0-based index of the step being run. Profiling never stops a run: a trace that cannot
    start or be written is one line in the log.
    """

    def __init__(self, profile_config, workdir: str, log: Callable[[str], None]):
        profile_config = profile_config or {}
        self.steps = int(profile_config.get("steps", 0))
        self.after_step = int(profile_config.get("after_step", 2))
        self.directory = os.path.join(workdir, "profile")
        self.log = log
        self.active = False
        self.tracing = False
        self._start = 0.0

    def plan(self, start_step: int) -> None:
        self.active = self.steps > 0 and start_step <= self.after_step
        if self.steps > 0 and not self.active:
            self.log(f"profile: steps {self.after_step + 1}–{self.after_step + self.steps} were run before this "
                     f"resume at step {start_step}; nothing traced (set config.profile.after_step ≥ {start_step})")

    def before(self, step: int, state) -> None:
        if not (self.active and step == self.after_step):
            return
        jax.block_until_ready(state)  # the steps before the window finish outside it
        try:
            jax.profiler.start_trace(self.directory)
        except Exception as e:  # another trace running, an unwritable folder: the run goes on
            self.active = False
            self.log(f"profile: could not start a trace in {self.directory} ({_one_line(e)}); training goes on")
            return
        self.tracing, self._start = True, time.perf_counter()

    def annotate(self, step: int):
        """Marks the dispatch of train step `step` (0-based) as step step+1 in the trace viewer."""
        if self.tracing:
            return jax.profiler.StepTraceAnnotation("train", step_num=step + 1)
        return _NULL

    def after(self, step: int, outputs) -> None:
        if self.tracing and step == self.after_step + self.steps - 1:
            jax.block_until_ready(outputs)
            self._stop(wall=time.perf_counter() - self._start)

    def _stop(self, wall: float | None) -> None:
        self.tracing, self.active = False, False
        try:
            jax.profiler.stop_trace()
        except Exception as e:
            self.log(f"profile: the trace could not be written to {self.directory} ({_one_line(e)})")
            return
        if wall is None:
            return
        first, last = self.after_step + 1, self.after_step + self.steps
        run = latest_run(self.directory)
        if jax.process_index() == 0:
            with open(os.path.join(run, WINDOW_FILE), "w") as f:
                json.dump({"first_step": first, "last_step": last, "wall_s": wall}, f)
            self.log(f"profile of steps {first}–{last} ({wall:.2f} s) written to {run}; "
                     f"`vlm profile --workdir=...` summarises it, `xprof --logdir={self.directory}` shows it")

    def __enter__(self) -> "StepProfiler":
        return self

    def __exit__(self, *exc) -> None:
        if self.tracing:  # the loop ended inside the window (an error, a preemption, exit_after_step)
            self._stop(wall=None)


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


_NULL = _Null()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def latest_run(profile_dir: str) -> str:
    """The newest <profile_dir>/plugins/profile/<time> folder (jax.profiler's layout)."""
    runs = sorted(glob.glob(os.path.join(profile_dir, "plugins", "profile", "*")), key=os.path.getmtime)
    runs = [r for r in runs if glob.glob(os.path.join(r, "*.xplane.pb"))]
    if not runs:
        raise ProfileNotFound(f"no profile in {profile_dir}: train with --config.profile.steps=N (and optionally "
                              f"--config.profile.after_step=K) to trace steps K+1..K+N")
    return runs[-1]


@dataclasses.dataclass
class ProgramProfile:
    """One XLA program's executions in a trace. Times in seconds."""

    module: str
    runs: int  # executions (distinct run_ids)
    devices: int  # devices it ran on
    span_s: float  # mean over runs: first op start to last op end, all devices
    op_s_by_kind: dict[str, float]  # summed over runs, devices and threads
    op_count_by_kind: dict[str, int]
    op_s_by_op: dict[str, float]

    @property
    def op_s(self) -> float:
        return sum(self.op_s_by_kind.values())


def summarize(run_dir: str) -> list[ProgramProfile]:
    """Every XLA program in the trace's xplane files, most op time first."""
    from jax.profiler import ProfileData

    files = sorted(glob.glob(os.path.join(run_dir, "*.xplane.pb")))
    if not files:
        raise ProfileNotFound(f"no *.xplane.pb in {run_dir}")
    by_module = collections.defaultdict(list)  # module → [(run, device, op, start_ns, dur_ns)]
    for host, path in enumerate(files):
        for plane in ProfileData.from_file(path).planes:
            for line in plane.lines:
                if line.name in _DERIVED_LINES:
                    continue
                for event in line.events:
                    stats = dict(event.stats)
                    op, module = stats.get("hlo_op"), stats.get("hlo_module")
                    if op is None or module is None:
                        continue
                    device = (host, plane.name, stats.get("device_ordinal"))
                    run = (host, stats.get("run_id"))
                    by_module[module].append((run, device, str(op), event.start_ns, event.duration_ns))
    programs = []
    for module, events in by_module.items():
        kinds, counts, ops = collections.Counter(), collections.Counter(), collections.Counter()
        spans = {}
        for run, _, op, start, dur in events:
            kind = re.sub(r"\.\d+$", "", op)
            kinds[kind] += dur * 1e-9
            counts[kind] += 1
            ops[op] += dur * 1e-9
            lo, hi = spans.get(run, (start, start + dur))
            spans[run] = (min(lo, start), max(hi, start + dur))
        runs = len(spans)
        programs.append(ProgramProfile(
            module=module, runs=runs, devices=len({e[1] for e in events}),
            span_s=sum(hi - lo for lo, hi in spans.values()) * 1e-9 / runs,
            op_s_by_kind=dict(kinds), op_count_by_kind=dict(counts), op_s_by_op=dict(ops)))
    return sorted(programs, key=lambda p: -p.op_s)


def report(workdir: str, top: int = 15) -> list[str]:
    """The `vlm profile` text: the newest trace of W/profile, one table per program."""
    run = latest_run(os.path.join(workdir, "profile"))
    window = {}
    if os.path.exists(os.path.join(run, WINDOW_FILE)):
        with open(os.path.join(run, WINDOW_FILE)) as f:
            window = json.load(f)
    lines = [f"profile {run}"]
    if window:
        steps = window["last_step"] - window["first_step"] + 1
        lines.append(f"train steps {window['first_step']}–{window['last_step']}: {window['wall_s']:.3f} s wall, "
                     f"{1e3 * window['wall_s'] / steps:.1f} ms per step (host clock, evals in the window included)")
    for p in summarize(run):
        per_run = 1e3 / p.runs
        lines += ["", f"{p.module}: {p.runs} run(s) on {p.devices} device(s); first op to last {1e3 * p.span_s:.1f} ms "
                      f"per run; op time {per_run * p.op_s:.1f} ms per run, summed over devices and threads "
                      f"({p.op_s / max(p.span_s * p.runs, 1e-12):.2f}× the span)",
                  f"  {'op kind':<36} {'ms/run':>9} {'share':>7} {'ops/run':>8}"]
        for kind, s in sorted(p.op_s_by_kind.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"  {kind:<36} {per_run * s:9.2f} {100 * s / p.op_s:6.1f}% "
                         f"{p.op_count_by_kind[kind] / p.runs:8.1f}")
        lines.append(f"  top ops: " + ", ".join(f"{op} {per_run * s:.2f}" for op, s in
                                                 sorted(p.op_s_by_op.items(), key=lambda kv: -kv[1])[:top // 2]))
    return lines
