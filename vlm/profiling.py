"""Profiles of chosen train steps (`config.profile`), and where their time went, in the terminal.

    vlm train --config=... --workdir=W --config.profile.steps=3 [--config.profile.after_step=5]
    vlm profile --workdir=W                    # op time of the traced steps by XLA op kind, top ops
    pip install xprof && xprof --logdir=W/profile   # the trace viewer, op profile and memory views

Why: choosing a remat policy, an attention kernel, a batch size or an XLA flag needs to see where a step's
time goes, on the machine that runs it. MaxText's `profiler=xplane` with `skip_first_n_steps_for_profiler`
and `profiler_steps` is the model: the window starts after `after_step` ≥ 1 steps of this process (so the
compile stays out) and covers `steps` steps; an eval that falls due inside it is traced too. jax.profiler
writes W/profile/plugins/profile/<time>/<host>.xplane.pb, the format XProf and TensorBoard read (with
several processes each writes under W/profile/process_<i>/, so two on one host never share a file).

The summary reads that file with jax.profiler.ProfileData: every event that carries an `hlo_op` stat is an
XLA op executing (a fusion, a matmul, a copy, a collective) on one device; events of one execution of a
program share a `run_id`. Per program it gives the time from a run's first op to its last (the step as the
devices saw it) and the op time summed over devices and threads, by op kind (the op's name without its
".N" suffix: XLA names fusions after what they hold, e.g. `copy_bitcast_fusion`, `ynn_fusion`,
`all-reduce`). Op time can exceed the span: XLA:CPU runs independent ops at once on its threads, and
each device has its own. XLA:CPU's `while`/`conditional`/`call` events enclose the events of the ops they run
(a scan over layers, accumulation), so they are left out of the op time. Checked on XLA:CPU traces only
(tests/test_profiling.py); on a GPU or TPU, where a device plane has an "XLA Ops" line only that line is read.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import re
import time
from typing import Callable

import jax
from etils import epath

from vlm.errors import one_line

WINDOW_FILE = "vlm_window.json"
_CONTROL_FLOW = ("while", "conditional", "call")  # enclose their bodies' op events (XLA:CPU)


def _kind(op: str) -> str:
    """An XLA op's kind: its name without the ".N" suffix ("copy_bitcast_fusion.12" → "copy_bitcast_fusion")."""
    return re.sub(r"\.\d+$", "", op)
ANNOTATION = "train"  # the StepTraceAnnotation name of a traced train step


class ProfileNotFound(FileNotFoundError):
    """No (readable) profile where one was asked for; the message (one line) says how to make one."""


def profile_dir(workdir: str, process_index: int = 0, process_count: int = 1) -> str:
    """Where this process's traces go: W/profile, or W/profile/process_<i> when there are several processes."""
    base = os.path.join(workdir, "profile")
    return base if process_count == 1 else os.path.join(base, f"process_{process_index}")


class StepProfiler:
    """Traces train steps after_step+1 … after_step+steps (1-based, as logged) of one run.

    Use as a context manager around the train loop (a loop that ends inside the window still stops the trace
    and says which steps it holds), call `plan(start_step)` once the start step is known, then
    `before(step, state)`, `annotate(step)` around the step's dispatch and `after(step, outputs)`, with `step`
    the 0-based index of the step being run. Profiling never stops a run: a trace that cannot start or be
    written is one line in the log.
    """

    def __init__(self, profile_config, workdir: str, log: Callable[[str], None]):
        profile_config = profile_config or {}
        self.steps = int(profile_config.get("steps", 0))
        self.after_step = int(profile_config.get("after_step", 2))
        self.directory = profile_dir(workdir, jax.process_index(), jax.process_count())
        self.log = log
        self.active = False
        self.tracing = False
        self._start, self._last_done, self._last_outputs = 0.0, 0, None

    def plan(self, start_step: int) -> None:
        # At least one step of this process runs before the window, so its compile stays out of the trace.
        self.active = self.steps > 0 and start_step < self.after_step
        if self.steps > 0 and not self.active:
            self.log(f"profile: this run starts after step {start_step}, not before the window's steps "
                     f"{self.after_step + 1}–{self.after_step + self.steps}; nothing traced (set "
                     f"config.profile.after_step ≥ {start_step + 1})")

    def before(self, step: int, state) -> None:
        if not (self.active and step == self.after_step):
            return
        jax.block_until_ready(state)  # the steps before the window finish outside it
        try:
            jax.profiler.start_trace(self.directory)
        except Exception as e:  # e.g. another trace is running: the run goes on
            self.active = False
            self.log(f"profile: could not start a trace in {self.directory} ({one_line(e)}); training goes on")
            return
        self.tracing, self._start = True, time.perf_counter()

    def annotate(self, step: int):
        """Marks the dispatch of train step `step` (0-based) as step step+1 in the trace viewer."""
        if self.tracing:
            return jax.profiler.StepTraceAnnotation(ANNOTATION, step_num=step + 1)
        return contextlib.nullcontext()

    def after(self, step: int, outputs) -> bool:
        """→ whether the window ended with this step (the trace is then written: time the step timer leaves out)."""
        if not self.tracing:
            return False
        self._last_done, self._last_outputs = step + 1, outputs
        if step < self.after_step + self.steps - 1:
            return False
        jax.block_until_ready(outputs)
        self._stop()
        return True

    def _stop(self) -> None:
        wall = time.perf_counter() - self._start
        self.tracing, self.active, self._last_outputs = False, False, None
        first, last = self.after_step + 1, self._last_done
        partial = last < self.after_step + self.steps
        try:
            jax.profiler.stop_trace()
            if jax.process_index() == 0:
                run = latest_run(self.directory)
                (epath.Path(run) / WINDOW_FILE).write_text(json.dumps(
                    {"first_step": first, "last_step": last, "wall_s": wall, "partial": partial}))
                self.log(f"profile of steps {first}–{last}{' (the run stopped inside the window)' if partial else ''}"
                         f" written to {run}; `vlm profile --workdir=...` summarises it, "
                         f"`xprof --logdir={self.directory}` shows it")
        except Exception as e:  # an unwritable or unreachable folder: the run goes on
            self.log(f"profile: the trace could not be written to {self.directory} ({one_line(e)})")

    def __enter__(self) -> "StepProfiler":
        return self

    def __exit__(self, *exc) -> None:
        if self.tracing:  # the loop ended inside the window (an error, a preemption, exit_after_step)
            try:
                jax.block_until_ready(self._last_outputs)  # the steps it ran, whole
            except Exception:  # outputs of a step that failed: write what was traced
                pass
            self._stop()


def latest_run(directory: str) -> str:
    """The newest <directory>/plugins/profile/<time> folder holding a trace (jax.profiler's layout)."""
    root = epath.Path(directory) / "plugins" / "profile"
    runs = sorted(r for r in (root.iterdir() if root.exists() else []) if list(r.glob("*.xplane.pb")))
    if not runs:  # the folder names are times (YYYY_MM_DD_HH_MM_SS): the last sorts last
        raise ProfileNotFound(f"no profile in {directory}: train with --config.profile.steps=N (and optionally "
                              f"--config.profile.after_step=K) to trace steps K+1..K+N")
    return str(runs[-1])


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


def summarize(run_dir: str) -> tuple[list[ProgramProfile], list[int]]:
    """Every XLA program in the trace's xplane files, most op time first, and the traced train steps' numbers."""
    from jax.profiler import ProfileData

    files = sorted(epath.Path(run_dir).glob("*.xplane.pb"))
    if not files:
        raise ProfileNotFound(f"no *.xplane.pb in {run_dir}")
    by_module = collections.defaultdict(list)  # module → [(host, run_id, device, op, start_ns, dur_ns)]
    steps = set()
    for host, path in enumerate(files):
        try:
            planes = ProfileData.from_serialized_xspace(path.read_bytes()).planes
        except Exception as e:
            raise ProfileNotFound(f"{path} is not a readable trace ({one_line(e)})") from None
        for plane in planes:
            lines = list(plane.lines)
            # A device plane with an "XLA Ops" line (TPU; GPU traces XProf has converted): that line holds each
            # op once, the others the same ops again (per stream, per module).
            lines = [line for line in lines if line.name == "XLA Ops"] or lines
            for line in lines:
                for event in line.events:
                    stats = dict(event.stats)
                    if event.name == ANNOTATION and "step_num" in stats:
                        steps.add(int(stats["step_num"]))
                    op, module = stats.get("hlo_op"), stats.get("hlo_module")
                    if op is None or module is None or _kind(str(op)) in _CONTROL_FLOW:
                        continue
                    device = (host, plane.name, stats.get("device_ordinal"))
                    by_module[module].append((host, stats.get("run_id"), device, str(op), event.start_ns,
                                              event.duration_ns))
    programs = []
    for module, events in by_module.items():
        kinds, counts, ops = collections.Counter(), collections.Counter(), collections.Counter()
        spans = {}
        for host, run_id, _, op, start, dur in events:
            kind = _kind(op)
            kinds[kind] += dur * 1e-9
            counts[kind] += 1
            ops[op] += dur * 1e-9
            lo, hi = spans.get((host, run_id), (start, start + dur))
            spans[(host, run_id)] = (min(lo, start), max(hi, start + dur))
        runs_per_host = collections.Counter(host for host, _ in spans)
        programs.append(ProgramProfile(
            module=module, runs=max(runs_per_host.values()), devices=len({e[2] for e in events}),
            span_s=sum(hi - lo for lo, hi in spans.values()) * 1e-9 / len(spans),
            op_s_by_kind=dict(kinds), op_count_by_kind=dict(counts), op_s_by_op=dict(ops)))
    return sorted(programs, key=lambda p: -p.op_s), sorted(steps)


def report(workdir: str, top: int = 15) -> list[str]:
    """The `vlm profile` text: the newest trace of W/profile (process 0's, with several), one table per program."""
    directory = os.path.join(workdir, "profile")
    if not epath.Path(directory, "plugins").exists() and epath.Path(directory, "process_0").exists():
        directory = os.path.join(directory, "process_0")
    run = latest_run(directory)
    window_file = epath.Path(run) / WINDOW_FILE
    window = json.loads(window_file.read_text()) if window_file.exists() else {}
    programs, steps = summarize(run)
    lines = [f"profile {run}", f"train steps traced: {_ranges(steps) or 'none marked'}"]
    if window:
        n = window["last_step"] - window["first_step"] + 1
        lines.append(f"window {window['first_step']}–{window['last_step']}"
                     f"{' (the run stopped inside it)' if window.get('partial') else ''}: {window['wall_s']:.3f} s "
                     f"wall, {1e3 * window['wall_s'] / n:.1f} ms per step (host clock; an eval due inside is included)")
    for p in programs:
        per_run = 1e3 / p.runs
        lines += ["", f"{p.module}: {p.runs} run(s) on {p.devices} device(s); first op to last {1e3 * p.span_s:.1f} ms "
                      f"per run; op time {per_run * p.op_s:.1f} ms per run, summed over devices and threads "
                      f"({p.op_s / max(p.span_s * p.runs, 1e-12):.2f}× the span)",
                  f"  {'op kind':<36} {'ms/run':>9} {'share':>7} {'ops/run':>8}"]
        for kind, s in sorted(p.op_s_by_kind.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"  {kind:<36} {per_run * s:9.2f} {100 * s / p.op_s:6.1f}% "
                         f"{p.op_count_by_kind[kind] / p.runs:8.1f}")
        lines.append("  top ops (ms/run): " + ", ".join(f"{op} {per_run * s:.2f}" for op, s in
                                                        sorted(p.op_s_by_op.items(), key=lambda kv: -kv[1])[:top // 2]))
    return lines


def _ranges(numbers: list[int]) -> str:
    """[3, 4, 5, 9] → "3–5, 9"."""
    out, i = [], 0
    while i < len(numbers):
        j = i
        while j + 1 < len(numbers) and numbers[j + 1] == numbers[j] + 1:
            j += 1
        out.append(f"{numbers[i]}–{numbers[j]}" if j > i else f"{numbers[i]}")
        i = j + 1
    return ", ".join(out)
