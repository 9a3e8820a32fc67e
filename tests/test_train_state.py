"""The general train state: EMA, the non-finite guard, non-parameter variables, old checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import toy_tasks
from tests.helpers import SMALL_OVERRIDES, random_batch, read_metrics, run_vlm, small_config
from vlm import checkpoint, sharding, train


def setup_on(config, devices=1):
    mesh = sharding.create_mesh(config.mesh, jax.devices()[:devices])
    return train.build(config, mesh), mesh


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_ema_is_the_closed_form_and_resumes_bit_for_bit(tmp_path):
    config = small_config(data=1, fsdp=1, tensor=1)
    config.ema.update(dict(decay=0.9, start_step=1))
    setup, mesh = setup_on(config)
    with sharding.use_mesh(mesh, setup.rules):
        state = setup.init()
        params = [host(state["params"])]
        assert_trees_equal(state["ema"], params[0])  # the EMA starts as the parameters
        saved = None
        for i in range(3):
            state, _ = setup.train_step(state, sharding.global_batch(random_batch(config, seed=i), mesh))
            params.append(host(state["params"]))
            if i == 1:  # checkpoint after step 2, then continue
                ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), async_save=False)
                ckpt.save(2, state)
                saved = ckpt
        ema = host(state["ema"])
        # Updates 1..3 with start_step=1: ema1 = p1 (copy), then ema ← d·ema + (1 − d)·p.
        d = np.float32(0.9)
        expected = jax.tree.map(lambda p1, p2, p3: d * (d * p1 + (1 - d) * p2) + (1 - d) * p3, *params[1:])
        for e, x in zip(jax.tree.leaves(ema), jax.tree.leaves(expected)):
            np.testing.assert_allclose(e, x, rtol=2e-6, atol=1e-7)
        assert max(float(np.abs(e - p).max()) for e, p in zip(jax.tree.leaves(ema), jax.tree.leaves(params[3]))) > 1e-5
        # Restore step 2 and redo step 3: the EMA (and everything else) is bit-identical.
        restored, missing = saved.restore(2, setup.abstract_state, setup.state_shardings)
        assert missing == []
        resumed, _ = setup.train_step(restored, sharding.global_batch(random_batch(config, seed=2), mesh))
        assert_trees_equal(host(resumed), host(state))
        saved.close()
    # Evaluation sees the EMA when it is on.
    model = setup.eval_model(state)
    np.testing.assert_array_equal(np.asarray(model.video.embed.proj.kernel[...]),
                                  ema["video"]["embed"]["proj"]["kernel"])
    model = setup.eval_model(state, use_ema=False)
    np.testing.assert_array_equal(np.asarray(model.video.embed.proj.kernel[...]),
                                  params[3]["video"]["embed"]["proj"]["kernel"])


def test_non_finite_step_changes_nothing_and_is_counted():
    config = small_config(data=1, fsdp=1, tensor=1)
    config.optim.lr = 1e30  # step 1 moves the weights to ~1e30: every later loss is NaN
    setup, mesh = setup_on(config)
    with sharding.use_mesh(mesh, setup.rules):
        state = setup.init()
        state, m1 = setup.train_step(state, sharding.global_batch(random_batch(config, seed=0), mesh))
        after_first = host(state)
        assert np.isfinite(m1["train/loss"]) and int(m1["train/skipped_steps"]) == 0
        for i in (1, 2):
            state, m = setup.train_step(state, sharding.global_batch(random_batch(config, seed=i), mesh))
            assert not np.isfinite(m["train/loss"])
            assert int(m["train/skipped_steps"]) == i and int(m["train/consecutive_skips"]) == i
    now = host(state)
    for key in ("params", "opt_state", "rng"):
        assert_trees_equal(now[key], after_first[key])
    assert int(now["step"]) == 3  # the step counter (and the data) moved on
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(now["params"]))


def test_all_finite_is_exact():
    from vlm import train_state

    big = {"a": jnp.full((3, 4), 3e38), "b": jnp.array([-0.0, 1e-45]), "i": jnp.array([7], jnp.int32)}
    assert bool(train_state.all_finite(big))  # huge, negative zero, subnormal: finite (no overflow in the check)
    for bad in (jnp.inf, -jnp.inf, jnp.nan):
        assert not bool(train_state.all_finite({**big, "b": jnp.array([0.0, bad])}))
        assert not bool(train_state.all_finite({**big, "c": jnp.array([bad], jnp.bfloat16)}))
    assert bool(train_state.all_finite({"i": jnp.array([1])}))


def test_guard_program_grows_linearly_with_the_leaf_count():
    """The guard's flag reaches every leaf's select (params, moments, EMA). Built from per-leaf flags joined by
    `&`, XLA copied the whole chain into each select's fusion: HLO ∝ N² (3.4x the lines for 2x the leaves)."""
    from vlm import train_state

    def compiled_lines(n):
        params = {f"w{i}": jnp.ones((4, 8 + i % 3)) for i in range(n)}

        def step(params, grads):
            new = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
            moment = jax.tree.map(lambda g: 0.9 * g, grads)
            old = {"params": params, "opt_state": grads, "ema": params, "skipped": train_state.skipped_init()}
            return train_state.guard(train_state.all_finite(new),
                                     {**old, "params": new, "opt_state": moment, "ema": new}, old)

        return jax.jit(step).lower(params, params).compile().as_text().count("\n")

    ratio = compiled_lines(60) / compiled_lines(30)
    assert ratio < 2.5, ratio  # measured 1.98 (3.43 before)


def test_cli_divergence_exits_1_with_one_line_and_no_bad_checkpoint(tmp_path):
    proc = run_vlm("train", "--config=configs/dual_encoder.py:tiny", *SMALL_OVERRIDES, f"--workdir={tmp_path}/w",
                   f"--config.data.data_dir={tmp_path}/data", "--config.optim.lr=1e30", "--config.total_steps=40",
                   "--config.checkpoint_every=4", "--config.eval_every=1000", "--config.log_every=1",
                   "--config.max_skipped_steps=5", "--config.checkpoint.keep=100", devices=1)
    lines = [l for l in proc.stderr.splitlines() if l.strip() and not l.startswith(("W1", "I1", "WARNING"))]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: training diverged: 5 consecutive non-finite steps up to "
                                                   "step "), lines
    assert "the last checkpoint is step" in lines[0]
    skipped = [l for l in proc.stdout.splitlines() if "the update was skipped" in l]
    assert len(skipped) == 5
    rows = read_metrics(tmp_path / "w")
    assert max(r["train/skipped_steps"] for r in rows if "train/skipped_steps" in r) >= 4
    steps = sorted(int(p.name) for p in (tmp_path / "w" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps  # checkpoints were written while (and after) steps were skipped ...
    from tests.helpers import load_checkpoint_params

    for step in steps:  # ... and none holds a NaN or an Inf
        for item in ("params", "opt_state"):
            assert all(np.isfinite(x).all() for x in jax.tree.leaves(load_checkpoint_params(tmp_path / "w", step, item)))


def test_non_parameter_variables_are_state_and_checkpointed(tmp_path):
    toy_tasks.register()
    config = small_config(data=1, fsdp=1, tensor=1)
    config.task.name = "toy_alignment_with_variables"
    setup, mesh = setup_on(config)
    assert set(setup.abstract_state) == {"step", "params", "opt_state", "rng", "skipped", "model_state"}
    with sharding.use_mesh(mesh, setup.rules):
        state = setup.init()
        for i in range(2):
            state, _ = setup.train_step(state, sharding.global_batch(random_batch(config, seed=i), mesh))
        assert float(state["model_state"]["calls"]) == 2.0  # the forward's updates are kept
        assert int(state["model_state"]["dropout"]["rngs"]["count"]) == 2
        ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), async_save=False)
        ckpt.save(2, state)
        restored, missing = ckpt.restore(2, setup.abstract_state, setup.state_shardings)
        ckpt.close()
    assert missing == []
    key = restored["model_state"]["dropout"]["rngs"]["key"]
    assert jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)  # a typed key again
    assert_trees_equal(jax.random.key_data(key), jax.random.key_data(state["model_state"]["dropout"]["rngs"]["key"]))
    assert float(restored["model_state"]["calls"]) == 2.0


def test_checkpoints_of_the_first_trainer_still_restore(tmp_path):
    """The first trainer saved items params / opt_state / train {step, rng}: they restore into today's state,
    which initialises what they lack (the EMA from the parameters, the skip counters at zero)."""
    import orbax.checkpoint as ocp

    from vlm import train_state

    config = small_config(data=1, fsdp=1, tensor=1)
    config.ema.decay = 0.99
    setup, mesh = setup_on(config)
    with sharding.use_mesh(mesh, setup.rules):
        state = setup.init()
        state, _ = setup.train_step(state, sharding.global_batch(random_batch(config), mesh))
    manager = ocp.CheckpointManager(str(tmp_path / "ckpt"))
    manager.save(1, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state["params"]), opt_state=ocp.args.StandardSave(state["opt_state"]),
        train=ocp.args.StandardSave({"step": state["step"], "rng": state["rng"]}),
        meta=ocp.args.JsonSave({"step": 1, "process_count": 1, "device_count": 1})))
    manager.wait_until_finished()
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
    restored, missing = ckpt.restore(1, setup.abstract_state, setup.state_shardings)
    assert sorted(missing) == ["ema", "skipped"]
    restored = train_state.fill_missing(restored, missing, setup.abstract_state, setup.state_shardings)
    ckpt.close()
    for key in ("params", "opt_state", "step", "rng"):
        assert_trees_equal(host(restored[key]), host(state[key]))
    assert_trees_equal(host(restored["ema"]), host(state["params"]))
    assert int(restored["skipped"]["total"]) == 0


def test_task_protocol_and_no_import_circles():
    import subprocess
    import sys

    from vlm import tasks

    assert isinstance(tasks.get(small_config()), tasks.Task)
    code = ("import sys, {m}; bad = [x for x in sys.modules if x in {forbidden}]; print(bad); sys.exit(bool(bad))")
    for module, forbidden in (("input_pipeline.pipeline", ["vlm.config", "vlm.train"]),
                              ("vlm.config", ["vlm.tasks", "vlm.nn.transformer", "vlm.train"]),
                              ("vlm.errors", ["vlm.config", "jax"])):
        proc = subprocess.run([sys.executable, "-c", code.format(m=module, forbidden=forbidden)], capture_output=True,
                              text=True)
        assert proc.returncode == 0, (module, proc.stdout, proc.stderr[-500:])
