"""A run survives what goes wrong around it: damaged checkpoints, a second run on its workdir, a
resume with an incompatible config, bad values, crash leftovers in metrics.jsonl, failed saves,
and kill -9 at random moments.

In-process runs share one compiled Setup (`fast_train`): a resume costs a restore and a few steps.
Command-line runs are used where the exit code and the one-line message are the point.
"""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from benchmarks import fault_injection
from tests.helpers import SMALL_OVERRIDES, load_checkpoint_params, read_metrics, run_vlm, small_config
from vlm import checkpoint, config as config_lib, metrics, train, workdir as workdir_lib
from vlm.errors import ConfigError

SPEED_KEYS = ("time", "train/steps_per_s", "train/examples_per_s", "train/tflops_per_device",
              "train/model_flops_per_step", "train/data_wait_frac", "train/peak_memory_gib")
STEPS = 8


def run_config(tmp, **changes):
    """small_config on the 8 test devices: 8 steps, a checkpoint every 2 (keep 3), a row every step."""
    c = small_config()
    c.total_steps = STEPS
    c.log_every = 1
    c.checkpoint_every = 2
    c.eval_every = 1000
    c.checkpoint.keep = 3
    c.data.data_dir = str(tmp / "data")
    c.data.eval_size = 16
    for key, value in changes.items():
        node = c
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return c


@pytest.fixture(scope="module")
def fast_train():
    """train.train on one device, with one compiled Setup per model/optimizer config and no evaluators
    (their compiles are not what these tests are about)."""
    cache = {}
    build, create_mesh = train.build, train.sharding.create_mesh

    def cached_build(config, mesh):
        d = config.data
        key = json.dumps([config_lib.to_json(config[k]) for k in ("model", "optim", "task", "ema")]
                         + [d.num_frames, d.resolution, d.max_text_len, config.total_steps, config.batch_size,
                            config.microbatches, config.seed])
        if key not in cache:
            cache[key] = build(config, mesh)
        return cache[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "build", cached_build)
        patch.setattr(train.sharding, "create_mesh", lambda mesh, devices=None: create_mesh(mesh, jax.devices()[:1]))
        patch.setattr(train.evaluators_lib, "from_config", lambda config, task: [])
        yield train.train


@pytest.fixture(scope="module")
def reference(tmp_path_factory, fast_train):
    """8 uninterrupted steps: checkpoints 4, 6, 8 (keep 3). Returns (workdir, tmp)."""
    tmp = tmp_path_factory.mktemp("reliability")
    fast_train(run_config(tmp), str(tmp / "reference"))
    return tmp / "reference", tmp


def train_rows(workdir) -> dict[int, dict]:
    rows = [r for r in read_metrics(workdir) if "train/loss" in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"duplicate rows: {steps}"
    return {r["step"]: {k: v for k, v in r.items() if k not in SPEED_KEYS} for r in rows}


def assert_same_params(workdir_a, workdir_b, step):
    a, b = load_checkpoint_params(workdir_a, step), load_checkpoint_params(workdir_b, step)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def tree_digest(path) -> dict[str, str]:
    """{relative path: sha256} of every file under `path`."""
    out = {}
    for dirpath, _, files in os.walk(path):
        for name in files:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


def damage(step_dir, kind: str) -> None:
    if kind == "truncate":  # the parameters' array data files (.../d/<hash>) cut to half their size
        # (all of them: which ones a restore reads depends on the layout; with 8 devices only params/d/)
        for dirpath, _, files in os.walk(step_dir / "params"):
            for name in files:
                if os.path.basename(dirpath) == "d":
                    path = os.path.join(dirpath, name)
                    os.truncate(path, os.path.getsize(path) // 2)
    else:  # delete the item
        shutil.rmtree(step_dir / kind)


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith(("W1", "I1", "WARNING"))]


# ----- 2. a damaged latest checkpoint -----


@pytest.mark.parametrize("kind", ["truncate", "meta", "data"])
def test_damaged_latest_checkpoint_falls_back_and_ends_bit_identical(reference, fast_train, tmp_path, capsys, kind):
    ref, tmp = reference
    w = tmp_path / "w"
    shutil.copytree(ref, w)
    damage(w / "checkpoints" / "8", kind)
    capsys.readouterr()
    fast_train(run_config(tmp), str(w))  # the same command again: resumes from 6, trains 7 and 8
    out = capsys.readouterr().out.splitlines()
    damaged = [line for line in out if "is damaged" in line]
    assert len(damaged) == 1 and damaged[0].startswith("checkpoint 8 is damaged (")
    assert damaged[0].endswith(f"moved it to {w}/checkpoints/8.damaged; resuming from 6"), damaged[0]
    assert f"resumed from {w}/checkpoints/6" in out
    assert sorted(os.listdir(w / "checkpoints")) == ["4", "6", "8", "8.damaged"]
    # The run ends exactly as the undamaged one: every row (once), and the final parameters.
    assert train_rows(w) == train_rows(ref) and sorted(train_rows(w)) == list(range(1, STEPS + 1))
    assert_same_params(ref, w, STEPS)


def test_no_checkpoint_restores_is_one_error_and_nothing_moves(reference, fast_train, tmp_path):
    ref, tmp = reference
    w = tmp_path / "w"
    shutil.copytree(ref, w)
    for step in (4, 6, 8):
        damage(w / "checkpoints" / str(step), "meta")
    before = tree_digest(w)
    with pytest.raises(checkpoint.CheckpointError) as e:
        fast_train(run_config(tmp), str(w))
    message = str(e.value)
    assert message.startswith(f"no checkpoint in {w}/checkpoints could be restored (8: meta: Item \"meta\" was not "
                              f"found in the checkpoint.")
    assert "\n" not in message and message.endswith("; nothing was moved or deleted; fix or move them away to start over")
    assert all(f"; {s}: meta: " in message for s in (6, 4))
    assert tree_digest(w) == before  # never a silent start from scratch: nothing moved, nothing written


# ----- 3. two runs on one workdir -----


def write_lock(workdir, **holder):
    os.makedirs(workdir, exist_ok=True)
    holder = {"host": socket.gethostname(), "started": time.time(), "token": "other", **holder}
    with open(os.path.join(workdir, workdir_lib.LOCK_NAME), "w") as f:
        json.dump(holder, f)


def test_second_run_on_a_live_workdir_exits_2_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        write_lock(tmp_path / "w", pid=holder.pid, start_ticks=workdir_lib._process_start_ticks(holder.pid))
        proc = run_vlm("train", "--config=configs/dual_encoder.py:tiny", *SMALL_OVERRIDES, f"--workdir={tmp_path}/w",
                       f"--config.data.data_dir={tmp_path}/data")
    finally:
        holder.kill()
        holder.wait()
    lines = error_lines(proc)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"error: workdir {tmp_path}/w is in use by another run: pid {holder.pid} on host "
                               f"{socket.gethostname()}, started ")
    assert sorted(os.listdir(tmp_path / "w")) == [workdir_lib.LOCK_NAME]  # nothing else written


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_locks_are_taken_over_and_live_ones_are_not(tmp_path):
    w = str(tmp_path / "w")
    cases = [  # (lock holder, taken over?)
        (dict(pid=dead_pid()), True),  # a process that is gone
        (dict(pid=os.getppid(), start_ticks=1), True),  # a live pid that belongs to another process now
        (dict(pid=os.getpid()), True),  # our own pid: a previous process of this container
        (dict(pid=os.getppid(), start_ticks=workdir_lib._process_start_ticks(os.getppid())), False),
        (dict(pid=1, host="elsewhere"), False),  # another host, heartbeat fresh
    ]
    for holder, stale in cases:
        write_lock(w, **holder)
        lock = workdir_lib.Lock(w)
        if stale:
            with lock:
                assert lock.taken_over["pid"] == holder["pid"]
                assert json.load(open(os.path.join(w, workdir_lib.LOCK_NAME)))["token"] == lock.token
            assert not os.path.exists(os.path.join(w, workdir_lib.LOCK_NAME))  # released
        else:
            with pytest.raises(workdir_lib.WorkdirBusy, match=f"in use by another run: pid {holder['pid']} "):
                lock.__enter__()
            assert json.load(open(os.path.join(w, workdir_lib.LOCK_NAME)))["token"] == "other"
    # Another host's lock whose heartbeat stopped long ago is stale.
    write_lock(w, pid=1, host="elsewhere")
    old = time.time() - workdir_lib.STALE_AFTER_S - 10
    os.utime(os.path.join(w, workdir_lib.LOCK_NAME), (old, old))
    with workdir_lib.Lock(w) as lock:
        assert lock.taken_over["host"] == "elsewhere"


def test_lock_is_released_when_the_run_fails(tmp_path):
    w = tmp_path / "w"
    with pytest.raises(RuntimeError, match="boom"):
        with workdir_lib.Lock(str(w)):
            assert os.path.exists(w / workdir_lib.LOCK_NAME)
            raise RuntimeError("boom")
    assert not os.path.exists(w / workdir_lib.LOCK_NAME)
    with workdir_lib.Lock(str(w)):  # and can be taken again
        pass


# ----- 4. a rejected resume changes nothing -----


def test_rejected_resume_exits_2_naming_the_keys_and_changes_nothing(reference, tmp_path):
    ref, tmp = reference
    w = tmp_path / "w"
    shutil.copytree(ref, w)
    before = tree_digest(w)
    proc = run_vlm("train", "--config=configs/dual_encoder.py:tiny", *SMALL_OVERRIDES, f"--workdir={w}",
                   f"--config.data.data_dir={tmp}/data", "--config.model.video.width=64")
    lines = error_lines(proc)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"error: cannot resume {w} with this config: model.video.width (32 → 64) differ "
                               f"from its config.json"), lines[0]
    assert tree_digest(w) == before  # config.json and every checkpoint byte-identical; no lock left


def test_resume_check_classifies_keys(tmp_path):
    w = tmp_path / "w"
    os.makedirs(w / "checkpoints" / "4")
    saved = run_config(tmp_path)
    workdir_lib.write_config(saved, str(w))

    def changed(**kv):
        return workdir_lib.check_resume(run_config(tmp_path, **kv), str(w))

    # May change silently: length, cadences, mesh, microbatches, evaluators, retention, where data lives.
    assert changed(total_steps=100, log_every=5, eval_every=50, checkpoint_every=10, microbatches=2,
                   **{"mesh.data": 2, "mesh.fsdp": 4, "checkpoint.keep": 1, "data.data_dir": "/elsewhere",
                      "model.remat": "full", "model.context_parallel": "ring", "metrics.writers": ("wandb",)}) == []
    # May change, with a warning naming them.
    (warning,) = changed(batch_size=32, **{"optim.lr": 1e-4})
    assert warning.startswith(f"warning: resuming {w} with changed batch_size (16 → 32), optim.lr (0.001 → 0.0001)")
    # May not change: model shapes, the task, data shapes, the vocabulary, the optimizer's structure.
    for key, value in [("model.text.depth", 2), ("model.embed_dim", 64), ("task.loss", "sigmoid"),
                       ("data.num_frames", 8), ("data.max_text_len", 16), ("data.vocab_size", 64),
                       ("optim.frozen", ("video/.*",))]:
        with pytest.raises(ConfigError, match=rf"cannot resume .*: {key.replace('.', '[.]')} \("):
            changed(**{key: value})
    # No checkpoint yet: nothing to resume, any config goes (config.json is rewritten after the init).
    shutil.rmtree(w / "checkpoints")
    assert changed(**{"model.embed_dim": 64}) == []


# ----- 5. bad values: one line, exit 2, nothing written -----


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("data.num_frames", 0, "config.data.num_frames=0 must be an integer ≥ 1"),
        ("model.video.width", 131, "config.model.video.width=131 is not divisible by config.model.video.num_heads=2"),
        ("model.video.num_heads", 0, "config.model.video.num_heads=0 must be an integer ≥ 1"),
        ("model.text.num_heads", 3, "config.model.text.width=32 is not divisible by config.model.text.num_heads=3"),
        ("optim.schedule", "bogus", "config.optim.schedule='bogus' is unknown; choose one of cosine, linear, constant"),
        ("data.max_text_len", 0, "config.data.max_text_len=0 must be an integer ≥ 1"),
        ("optim.lr", -1.0, "config.optim.lr=-1.0 must be a finite number > 0.0"),
        ("optim.lr", float("nan"), "config.optim.lr=nan must be a finite number > 0.0"),
        ("optim.warmup_steps", -5, "config.optim.warmup_steps=-5 must be an integer ≥ 0"),
        ("checkpoint.keep", 0, "config.checkpoint.keep=0 must be an integer ≥ 1"),
        ("optim.b2", 1.0, "config.optim.b2=1.0 must be a finite number ≥ 0.0 and < 1.0"),
        ("optim.eps", 0.0, "config.optim.eps=0.0 must be a finite number > 0.0"),
        ("optim.grad_clip_norm", float("inf"), "config.optim.grad_clip_norm=inf must be a finite number ≥ 0.0"),
        ("optim.end_lr_ratio", 2.0, "config.optim.end_lr_ratio=2.0 must be a finite number ≥ 0.0 and ≤ 1.0"),
        ("optim.name", "sgd", "config.optim.name='sgd' is unknown; choose one of adamw"),
        ("optim.frozen", ("video/(",), "config.optim.frozen: 'video/(' is not a valid regex"),
        ("model.embed_dim", 0, "config.model.embed_dim=0 must be an integer ≥ 1"),
        ("model.video.tubelet", (2, 0, 8), "config.model.video.tubelet=(2, 0, 8) must be 3 integers ≥ 1"),
        ("task.max_logit_scale", 0.0, "config.task.max_logit_scale=0.0 must be a finite number > 0.0"),
        ("data.resolution", 0, "config.data.resolution=0 must be an integer ≥ 1"),
        ("data.vocab_size", 3, "config.data.vocab_size=3 must be an integer ≥ 5"),
        ("data.eval_size", 0, "config.data.eval_size=0 must be an integer ≥ 1"),
        ("data.sample_fps", -1.0, "config.data.sample_fps=-1.0 must be a finite number ≥ 0"),
        ("data.worker_count", -1, "config.data.worker_count=-1 must be an integer ≥ 0"),
        ("seed", -1, "config.seed=-1 must be an integer ≥ 0"),
        ("eval_batch_size", 0, "config.eval_batch_size=0 must be an integer ≥ 1"),
        ("microbatches", 0, "config.microbatches=0 must be an integer ≥ 1"),
        ("checkpoint.keep_period", -1, "config.checkpoint.keep_period=-1 must be an integer ≥ 0"),
        ("ema.decay", float("nan"), "config.ema.decay=nan must be in [0, 1)"),
        ("init_from.step", -2, "config.init_from.step=-2 must be an integer ≥ -1"),
        ("sharding_rules", [["embed", "fdsp"]], "config.sharding_rules entry ['embed', 'fdsp'] must be"),
    ],
)
def test_bad_value_is_one_line(key, value, message):
    c = small_config()
    node = c
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    start = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        config_lib.validate(c, num_devices=8)
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)
    assert time.perf_counter() - start < 2.0  # a pure function of the config: nothing built


@pytest.mark.parametrize("args, message", [
    (["--config.data.num_frames=0"], "error: config.data.num_frames=0 must be an integer ≥ 1"),
    (["--config.optim.lr=nan", "--config.checkpoint.keep=0"], "error: config.checkpoint.keep=0 must be an integer ≥ 1"),
])
def test_cli_bad_value_is_one_line_and_writes_nothing(tmp_path, args, message):
    proc = run_vlm("train", "--config=configs/dual_encoder.py:tiny", *SMALL_OVERRIDES, f"--workdir={tmp_path}/w",
                   f"--config.data.data_dir={tmp_path}/data", *args)
    lines = error_lines(proc)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr[-2000:]
    assert not os.path.exists(tmp_path / "w")


# ----- 7. crash leftovers -----


def test_truncate_rows_drops_rows_past_the_step_and_torn_lines(tmp_path):
    from etils import epath

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "train/loss": 1.0 / s} for s in range(1, 7)] + [{"step": 4, "eval/r1": 0.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "train/lo')  # a kill mid-write
    assert metrics.truncate_rows(epath.Path(path), 4) == 3  # steps 5, 6 and the torn line
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:4] + [rows[-1]]
    assert metrics.truncate_rows(epath.Path(path), 4) == 0
    path.write_text(json.dumps(rows[0]))  # a whole row whose newline the kill cut: the next row must not join it
    metrics.truncate_rows(epath.Path(path), 4)
    assert path.read_text() == json.dumps(rows[0]) + "\n"


def test_failed_async_save_stops_the_run_at_once_and_keeps_the_last_checkpoint(reference, fast_train, tmp_path,
                                                                               monkeypatch):
    ref, tmp = reference
    meta = checkpoint.Checkpointer._meta

    def unserialisable_at_4(self, step, state):  # fails in Orbax's background thread (json.dumps)
        return {**meta(self, step, state), **({"bad": object()} if step == 4 else {})}

    monkeypatch.setattr(checkpoint.Checkpointer, "_meta", unserialisable_at_4)
    w = tmp_path / "w"
    config = run_config(tmp, **{"checkpoint.keep": 1})  # retention may not delete 2 for a save that failed
    with pytest.raises(checkpoint.SaveFailed) as e:
        fast_train(config, str(w))
    assert str(e.value) == (f"saving checkpoint 4 failed: Object of type object is not JSON serializable; the run "
                            f"stopped; the last complete checkpoint is step 2 in {w}/checkpoints, from which the same "
                            f"command resumes")
    assert max(r["step"] for r in read_metrics(w)) < 6  # noticed before the next save, not at it
    assert [p for p in os.listdir(w / "checkpoints") if p.isdigit()] == ["2"]
    assert not os.path.exists(w / workdir_lib.LOCK_NAME)
    monkeypatch.setattr(checkpoint.Checkpointer, "_meta", meta)
    fast_train(config, str(w))  # the same command resumes from 2 and ends as the uninterrupted run
    assert train_rows(w) == train_rows(ref)
    assert_same_params(ref, w, STEPS)


# ----- kill -9 at random moments -----


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A persistent JAX compilation cache shared by the command-line runs below (1 device, tiny shapes):
    only the first of them compiles."""
    return tmp_path_factory.mktemp("jax_cache")


def test_ten_kills_at_random_moments_each_resume_bit_identical(tmp_path, compile_cache):
    """benchmarks/fault_injection.py: 10 kill -9 over a 24-step run (during start-up, steps and async
    saves); after every process each metrics row equals the uninterrupted run's bit for bit; at the end
    one row per logged step and the same final parameters."""
    proc = subprocess.run([sys.executable, "benchmarks/fault_injection.py", "--kills=10", "--steps=24", "--seed=1",
                           f"--workdir={tmp_path}", f"--cache_dir={compile_cache}", "--json"],
                          cwd=fault_injection.ROOT, capture_output=True, text=True, timeout=900)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, (report, proc.stderr[-3000:])
    assert report["faults_injected"] == 10 and report["survived"] == 10, report
    assert report["mismatched_rows"] == 0 and report["lost_rows"] == 0 and report["duplicate_rows"] == 0, report
    assert report["losses_identical"] and report["params_identical"], report
    assert report["resumes"] >= 5, report  # most kills came after a checkpoint: the resumes were exercised


def test_cli_failed_save_is_one_line_exit_1(tmp_path, compile_cache):
    script = ("import sys; from vlm import checkpoint, main; meta = checkpoint.Checkpointer._meta; "
              "checkpoint.Checkpointer._meta = lambda self, step, state: {**meta(self, step, state), "
              "**({'bad': object()} if step == 4 else {})}; sys.argv[0] = 'vlm'; main.run()")
    cmd = fault_injection.command(tmp_path / "w", tmp_path / "data", 24)  # the fault-injection run: compiled
    proc = subprocess.run([sys.executable, "-c", script, *cmd[3:]], cwd=fault_injection.ROOT,
                          env=fault_injection.environment(compile_cache), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert error_lines(proc) == [f"error: saving checkpoint 4 failed: Object of type object is not JSON serializable; "
                                 f"the run stopped; the last complete checkpoint is step 2 in {tmp_path}/w/checkpoints, "
                                 f"from which the same command resumes"], proc.stderr[-3000:]
    assert max(r["step"] for r in read_metrics(tmp_path / "w")) < 6  # stopped before the next save
