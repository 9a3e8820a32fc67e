"""config.profile: a trace of the chosen train steps, and `vlm profile`'s summary of it (vlm/profiling.py)."""

import json
import os

import jax
import jax.numpy as jnp
import pytest

from tests.helpers import run_vlm, small_config
from vlm import config as config_lib
from vlm import profiling


def test_the_window_traces_exactly_its_steps_on_every_device(ema_run):
    """ema_run traces steps 7-8 of 10 on 8 devices, between the evals after steps 6 and 8."""
    workdir, _ = ema_run
    runs = os.listdir(workdir / "profile" / "plugins" / "profile")
    assert len(runs) == 1
    run = profiling.latest_run(str(workdir / "profile"))
    with open(os.path.join(run, profiling.WINDOW_FILE)) as f:
        window = json.load(f)
    assert (window["first_step"], window["last_step"]) == (7, 8) and window["wall_s"] > 0
    assert window["partial"] is False
    programs, steps = profiling.summarize(run)
    assert steps == [7, 8]  # the StepTraceAnnotations the loop put around the traced steps
    programs = {p.module: p for p in programs}
    step = programs.pop("jit_train_step")
    assert (step.runs, step.devices) == (2, 8)
    # Every device runs the same program each step: the op events divide evenly.
    ops = sum(step.op_count_by_kind.values())
    assert ops > 0 and ops % (step.runs * step.devices) == 0
    assert step.op_s == pytest.approx(sum(step.op_s_by_op.values()))
    assert 0 < step.span_s <= window["wall_s"] / 2 * 1.05
    # The evals on either side stay out of the trace, and so does the step before the window.
    assert not [m for m in programs if "embed" in m or "train_step" in m], sorted(programs)


def test_vlm_profile_prints_the_summary(ema_run):
    workdir, _ = ema_run
    proc = run_vlm("profile", f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[1] == "train steps traced: 7–8"
    assert lines[2].startswith("window 7–8: ")
    header = next(i for i, line in enumerate(lines) if line.startswith("jit_train_step: 2 run(s) on 8 device(s)"))
    rows = lines[header + 2:lines.index("", header) if "" in lines[header:] else None]
    shares = [float(row.split()[2].rstrip("%")) for row in rows if not row.lstrip().startswith("top ops")]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100.05


def test_no_profile_is_one_line(tmp_path):
    with pytest.raises(profiling.ProfileNotFound, match="--config.profile.steps=N"):
        profiling.report(str(tmp_path))
    proc = run_vlm("profile", f"--workdir={tmp_path}")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("profile, message", [
    (dict(steps=3, after_step=8), "traces steps 9–11, past config.total_steps=10"),
    (dict(steps=-1, after_step=2), "config.profile.steps=-1 must be an integer ≥ 0"),
    (dict(steps=1, start=2), "unknown key(s) start"),
    (dict(steps=1, after_step=0), "config.profile.after_step=0 must be an integer ≥ 1"),
])
def test_a_bad_window_fails_before_anything_is_built(profile, message):
    config = small_config()
    config.profile = profile
    with pytest.raises(config_lib.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_lib.validate(config, jax.device_count())


def test_a_resume_past_the_window_traces_nothing(tmp_path):
    lines = []
    profiler = profiling.StepProfiler(dict(steps=2, after_step=3), str(tmp_path), log=lines.append)
    profiler.plan(start_step=3)  # step 4 would be this process's first: its compile would be in the trace
    with profiler:
        for step in range(3, 8):
            profiler.before(step, None)
            with profiler.annotate(step):
                pass
            assert not profiler.after(step, None)
    assert not profiler.tracing and not (tmp_path / "profile").exists()
    assert lines == ["profile: this run starts after step 3, not before the window's steps 4–5; nothing traced "
                     "(set config.profile.after_step ≥ 4)"]


def _loop(x, n):
    # A trip count known only at run time: XLA cannot unroll the loop, so it stays one `while`.
    return jax.lax.fori_loop(0, n, lambda i, y: jnp.tanh(y @ x), x)


def _profile_loop(tmp_path, steps: int, run_steps: int):
    """Runs `_loop` as steps 1..run_steps of a profiled "run" whose window is steps 2..steps+1."""
    lines = []
    step_fn, x, n = jax.jit(_loop), jnp.full((128, 128), 0.01), jnp.int32(5)
    y = step_fn(x, n)
    profiler = profiling.StepProfiler(dict(steps=steps, after_step=1), str(tmp_path), log=lines.append)
    profiler.plan(start_step=0)
    with profiler:
        for step in range(run_steps):
            profiler.before(step, y)
            with profiler.annotate(step):
                y = step_fn(x, n)
            profiler.after(step, y)
    return lines, profiling.latest_run(str(tmp_path / "profile"))


def test_loops_are_counted_once_and_a_run_stopped_inside_the_window_says_so(tmp_path):
    """XLA:CPU's `while` event encloses its body's ops: counting both would count the loop twice. A loop that
    ends inside the window (here after step 3 of 2–4) still writes the trace and names the steps it holds."""
    from jax.profiler import ProfileData

    lines, run = _profile_loop(tmp_path, steps=3, run_steps=3)
    assert lines[0].startswith("profile of steps 2–3 (the run stopped inside the window) written to ")
    with open(os.path.join(run, profiling.WINDOW_FILE)) as f:
        window = json.load(f)
    assert (window["first_step"], window["last_step"], window["partial"]) == (2, 3, True) and window["wall_s"] > 0
    raw = [dict(e.stats).get("hlo_op", "") for path in os.listdir(run) if path.endswith(".xplane.pb")
           for plane in ProfileData.from_file(os.path.join(run, path)).planes for line in plane.lines
           for e in line.events]
    assert any(op.startswith("while") for op in raw)  # the enclosing event is in the trace...
    (program,), steps = profiling.summarize(run)
    assert steps == [2, 3] and program.runs == 2
    assert not [k for k in program.op_count_by_kind if k in ("while", "call", "conditional")]  # ...not in the sums
    matmuls = [k for k in program.op_count_by_kind if "dot" in k or "ynn" in k]
    assert sum(program.op_count_by_kind[k] for k in matmuls) == 2 * 5  # 5 loop iterations per run


def test_a_trace_that_cannot_start_does_not_stop_the_run(tmp_path):
    lines = []
    profiler = profiling.StepProfiler(dict(steps=1, after_step=1), str(tmp_path / "w"), log=lines.append)
    profiler.plan(start_step=0)
    jax.profiler.start_trace(str(tmp_path / "other"))  # someone else's trace holds the profiler
    try:
        with profiler:
            for step in range(2):
                profiler.before(step, jnp.zeros(()))
                assert not profiler.after(step, None)
    finally:
        jax.profiler.stop_trace()
    assert not profiler.tracing
    assert len(lines) == 1 and lines[0].startswith(f"profile: could not start a trace in {tmp_path}/w/profile (")
