"""Named evaluators with their own cadence; `vlm eval --evals=`; evaluation uses the EMA."""

import jax
import numpy as np
import pytest

from flax import nnx

from tests.helpers import jax_traces, load_checkpoint_params, read_metrics, run_vlm, small_config
from vlm import sharding, train
from vlm.errors import ConfigError
from vlm.eval import evaluators


def test_each_evaluator_runs_at_its_own_steps(ema_run):
    workdir, _ = ema_run
    rows = read_metrics(workdir)
    assert [r["step"] for r in rows if "eval/t2v_r1" in r] == [2, 4, 6, 8, 10]
    assert [r["step"] for r in rows if "slow/t2v_r1" in r] == [5, 10]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 11))


def test_eval_command_runs_only_the_named_evaluator(ema_run):
    workdir, _ = ema_run
    proc = run_vlm("eval", f"--workdir={workdir}", "--evals=slow", devices=8)
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = dict(kv.split("=") for kv in proc.stdout.strip().splitlines()[-1].split())
    assert int(printed["step"]) == 10
    assert any(k.startswith("slow/") for k in printed) and not any(k.startswith("eval/") for k in printed)
    # The same numbers as the train-time evaluation of this checkpoint (which used the EMA weights).
    logged = [r for r in read_metrics(workdir) if "slow/t2v_r1" in r][-1]
    for key in ("slow/t2v_r1", "slow/t2v_r5", "slow/v2t_medr"):
        assert float(printed[key]) == pytest.approx(logged[key], abs=1e-3)


def test_evaluation_and_loading_use_the_ema_unless_told_not_to(ema_run):
    workdir, _ = ema_run
    saved_ema, saved_params = (load_checkpoint_params(workdir, 10, item) for item in ("ema", "params"))
    diff = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), saved_ema, saved_params)
    assert max(jax.tree.leaves(diff)) > 1e-4  # the EMA really differs from the last weights
    for use_ema, expected in ((None, saved_ema), (True, saved_ema), (False, saved_params)):
        model, _, step = train.load_model(str(workdir), use_ema=use_ema)
        kernel = np.asarray(model.video.encoder.blocks[0].mlp.up.kernel[...])
        np.testing.assert_array_equal(kernel, expected["video"]["encoder"]["blocks"]["0"]["mlp"]["up"]["kernel"])
    ema_metrics = train.evaluate(str(workdir), evals="fast")
    logged = [r for r in read_metrics(workdir) if r["step"] == 10 and "eval/t2v_meanr" in r][-1]
    assert ema_metrics["eval/t2v_meanr"] == pytest.approx(logged["eval/t2v_meanr"], rel=1e-6)


def test_evaluator_config_errors_are_one_line():
    config = small_config()
    from vlm import tasks

    task = tasks.get(config)
    with config.unlocked():
        config.evals = dict(a=dict(type="captions"))
    with pytest.raises(ConfigError, match="config.evals.a.type='captions' is not an evaluator of task"):
        evaluators.from_config(config, task)
    with config.unlocked():
        config.evals = dict(a=dict(type="retrieval"), b=dict(type="retrieval", every=3))
    with pytest.raises(ConfigError, match="both 'retrieval' evaluators writing under 'eval/'"):
        evaluators.from_config(config, task)
    with config.unlocked():
        config.evals = dict(a=dict(type="retrieval", every=-1))
    with pytest.raises(ConfigError, match="must be a positive number of steps"):
        evaluators.from_config(config, task)
    with config.unlocked():
        config.evals = {}
    defaults = evaluators.from_config(config, task)  # empty: every evaluator of the task, at eval_every
    assert [(e.name, e.every, e.prefix) for e in defaults] == [("retrieval", config.eval_every, "eval/")]
    with pytest.raises(ConfigError, match="--evals: nope not among"):
        evaluators.select(defaults, "nope")


def test_an_evaluator_compiles_once_per_run(ema_run):
    """The loop evaluates a new model object each time (`setup.eval_model(state)`) with the run's one task: after
    the first eval nothing is traced or compiled again, and the same weights give the same numbers."""
    workdir, config = ema_run
    mesh = sharding.create_mesh(config.mesh)
    setup, model, step = train.restore_params(config, str(workdir), mesh)
    chosen = evaluators.from_config(config, setup.task)
    jax.clear_caches()  # (ema_run evaluated this model in this process)
    with sharding.use_mesh(mesh, setup.rules), jax_traces() as traced:
        first = evaluators.run(chosen, model, mesh=mesh, step=step, workdir=None)
        assert traced  # the embedding step
        del traced[:]
        again = evaluators.run(chosen, nnx.merge(*nnx.split(model)), mesh=mesh, step=step, workdir=None)
    assert traced == [] and again == first
