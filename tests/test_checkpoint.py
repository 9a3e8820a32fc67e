"""Checkpoint retention and crash safety (without training: a small state is enough)."""

import os

import jax
import jax.numpy as jnp
import numpy as np

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
