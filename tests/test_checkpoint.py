"""Checkpoint retention and crash safety (without training: a small state is enough)."""

import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm import checkpoint


def tiny_state(step: int):
    return {
        "step": jnp.asarray(step, jnp.int32),
        "params": {"w": {"kernel": jnp.full((4, 4), float(step))}},
        "opt_state": ({"mu": jnp.zeros((4, 4))},),
        "rng": jax.random.key_data(jax.random.key(0)),
    }


def shardings_like(state):
    s = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda _: s, state)


def test_keeps_latest_k_and_every_period(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2, keep_period=4, async_save=True)
    for step in range(1, 10):
        ckpt.save(step, tiny_state(step))
    ckpt.wait()
    assert ckpt.all_steps() == [4, 8, 9]  # latest 2 (8, 9) plus every 4th (4, 8)
    ckpt.close()


def test_unfinished_save_never_replaces_the_last_good_checkpoint(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=3, async_save=False)
    ckpt.save(5, tiny_state(5))
    ckpt.close()
    # A save of step 6 that died half-way leaves only Orbax's temporary directory behind.
    broken = tmp_path / "6.orbax-checkpoint-tmp"
    (broken / "params").mkdir(parents=True)
    (broken / "params" / "garbage").write_bytes(b"\0" * 100)
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=3, async_save=False)
    assert ckpt.latest_step() == 5
    state = tiny_state(0)
    restored, missing = ckpt.restore(5, jax.eval_shape(lambda: state), shardings_like(state))
    assert missing == []
    np.testing.assert_array_equal(restored["params"]["w"]["kernel"], np.full((4, 4), 5.0))
    assert int(restored["step"]) == 5
    ckpt.close()


def test_restore_params_without_checkpoint_is_a_clear_error(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path / "none"), keep=1)
    state = tiny_state(0)
    try:
        ckpt.restore_params(None, jax.eval_shape(lambda: state["params"]), shardings_like(state["params"]))
    except FileNotFoundError as e:
        assert "no complete checkpoint" in str(e)
    else:
        raise AssertionError("expected FileNotFoundError")
    assert os.path.isdir(tmp_path / "none")


def test_restore_latest_skips_damaged_checkpoints_and_moves_them_aside(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=5, async_save=False)
    for step in (1, 2, 3):
        ckpt.save(step, tiny_state(step))
    ckpt.close()
    shutil.rmtree(tmp_path / "3" / "meta")  # damaged in two ways: 3 lacks its meta item, 2 its parameters
    shutil.rmtree(tmp_path / "2" / "params")
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=5, async_save=False)
    state, logged = tiny_state(0), []
    restored = ckpt.restore_latest(jax.eval_shape(lambda: state), shardings_like(state), lambda start: None,
                                   log=logged.append)
    assert restored.step == 1 and restored.missing == [] and not restored.resharded
    np.testing.assert_array_equal(restored.state["params"]["w"]["kernel"], np.full((4, 4), 1.0))
    assert [line.split(" (")[0] for line in logged] == ["checkpoint 3 is damaged", "checkpoint 2 is damaged"]
    assert logged[0].endswith(f"moved it to {tmp_path}/3.damaged; resuming from 1")
    assert sorted(os.listdir(tmp_path)) == ["1", "2.damaged", "3.damaged"] and ckpt.all_steps() == [1]
    ckpt.save(2, tiny_state(2))  # the step can be written again
    assert ckpt.all_steps() == [1, 2]
    ckpt.close()


def test_failed_async_save_raises_once_and_keeps_the_older_checkpoint(tmp_path, monkeypatch):
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1, async_save=True)
    ckpt.save(1, tiny_state(1))
    ckpt.wait()
    meta = checkpoint.Checkpointer._meta
    monkeypatch.setattr(checkpoint.Checkpointer, "_meta", lambda self, step, state: {**meta(self, step, state),
                                                                                     "bad": object()})
    ckpt.save(2, tiny_state(2))  # json.dumps fails in Orbax's background thread
    with pytest.raises(checkpoint.SaveFailed, match=r"^saving checkpoint 2 failed: Object of type object is not JSON "
                                                    r"serializable; the run stopped; the last complete checkpoint is "
                                                    r"step 1 in "):
        for _ in range(1000):  # what the training loop does after every step
            ckpt.check_saves()
            time.sleep(0.01)
    assert [p for p in os.listdir(tmp_path) if p.isdigit()] == ["1"]  # keep=1 did not rotate out step 1
    ckpt.close()  # no second report
