"""Frozen parameters and per-group learning rates (`config.optim.frozen`, `config.optim.lr_multipliers`)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.helpers import random_batch, small_config
from vlm import optim, sharding, train
from vlm.errors import ConfigError


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def frozen_run():
    """5 steps with the video tower frozen, on 1 device."""
    config = small_config(data=1, fsdp=1, tensor=1)
    config.optim.frozen = ("video/.*",)
    mesh = sharding.create_mesh(config.mesh, jax.devices()[:1])
    setup = train.build(config, mesh)
    with sharding.use_mesh(mesh, setup.rules):
        state = setup.init()
        init = jax.device_get(state["params"])
        batch = sharding.global_batch(random_batch(config), mesh)
        compiled = setup.train_step.lower(state, batch).compile()
        for i in range(5):
            state, metrics = setup.train_step(state, sharding.global_batch(random_batch(config, seed=i), mesh))
    return config, setup, init, jax.device_get(state), compiled


def test_frozen_parameters_stay_bit_identical_and_the_rest_trains(frozen_run):
    _, _, init, state, _ = frozen_run
    video_before, video_after = jax.tree.leaves(init["video"]), jax.tree.leaves(state["params"]["video"])
    assert len(video_after) > 10
    for a, b in zip(video_before, video_after):
        np.testing.assert_array_equal(a, b)
    moved = [float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(init["text"]),
                                                          jax.tree.leaves(state["params"]["text"]))]
    assert min(moved) > 0 or sorted(moved)[len(moved) // 2] > 1e-4  # the text tower trains


def test_frozen_parameters_have_no_optimizer_moments(frozen_run):
    config, setup, _, state, _ = frozen_run
    plain = small_config(data=1, fsdp=1, tensor=1)
    plain_setup = train.build(plain, sharding.create_mesh(plain.mesh, jax.devices()[:1]))  # abstract: no compile
    video_bytes = nbytes(setup.abstract_state["params"]["video"])
    saved = nbytes(plain_setup.abstract_state["opt_state"]) - nbytes(setup.abstract_state["opt_state"])
    assert saved == 2 * video_bytes  # Adam's mu and nu of every video parameter
    assert nbytes(state["opt_state"]) == nbytes(setup.abstract_state["opt_state"])


def test_frozen_tower_costs_no_backward(frozen_run):
    """No gradient is computed for the frozen tower (nor through it): the compiled step does fewer FLOPs."""
    config, setup, _, _, compiled = frozen_run
    plain = small_config(data=1, fsdp=1, tensor=1)
    mesh = sharding.create_mesh(plain.mesh, jax.devices()[:1])
    plain_setup = train.build(plain, mesh)
    with sharding.use_mesh(mesh, plain_setup.rules):
        batch = sharding.global_batch(random_batch(plain), mesh)
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                plain_setup.abstract_state, plain_setup.state_shardings)
        plain_flops = plain_setup.train_step.lower(abstract, batch).compile().cost_analysis()["flops"]
    frozen_flops = compiled.cost_analysis()["flops"]
    assert frozen_flops < 0.8 * plain_flops, (frozen_flops, plain_flops)


def test_lr_multipliers_scale_each_groups_update():
    c = small_config().optim
    c.warmup_steps, c.schedule = 0, "constant"
    params = {"video": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}, "text": {"kernel": jnp.full((2, 2), 2.0)}}
    grads = jax.tree.map(lambda p: jnp.linspace(-1.0, 1.0, p.size).reshape(p.shape) + 0.3, params)
    base_tx, _ = optim.create_optimizer(c, 10)
    base, _ = base_tx.update(grads, base_tx.init(params), params)
    c.lr_multipliers = (("video/.*", 0.1),)
    groups = optim.param_groups(c, params)
    assert groups[0] == {"video": {"kernel": "lr_0", "bias": "lr_0"}, "text": {"kernel": "default"}}
    tx, _ = optim.create_optimizer(c, 10, groups)
    scaled, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(scaled["video"]["kernel"], 0.1 * base["video"]["kernel"], rtol=1e-6)
    np.testing.assert_allclose(scaled["video"]["bias"], 0.1 * base["video"]["bias"], rtol=1e-6)
    np.testing.assert_allclose(scaled["text"]["kernel"], base["text"]["kernel"], rtol=1e-6)
    # Frozen wins over a multiplier; a frozen group has no moments.
    c.frozen = ("text/.*",)
    groups = optim.param_groups(c, params)
    tx, _ = optim.create_optimizer(c, 10, groups)
    state = tx.init(params)
    assert nbytes(state) < nbytes(base_tx.init(params)) - 2 * 4 * 4 + 1
    updates, _ = tx.update(grads, state, params)
    np.testing.assert_array_equal(updates["text"]["kernel"], np.zeros((2, 2)))


@pytest.mark.parametrize("key, value, message", [
    ("frozen", ("vidoe/.*",), "config.optim.frozen: 'vidoe/.*' matches no parameter; names look like"),
    ("lr_multipliers", (("txt/.*", 0.1),), "config.optim.lr_multipliers: 'txt/.*' matches no parameter"),
    ("lr_multipliers", (("text/.*", -1.0),), "must be (regex, factor ≥ 0)"),
    ("frozen", ("video/(",), "is not a valid regex"),
])
def test_group_config_errors_are_one_line(key, value, message):
    config = small_config()
    config.optim[key] = value
    with pytest.raises(ConfigError) as e:
        train.build(config, sharding.create_mesh(config.mesh))
    assert message in str(e.value) and "\n" not in str(e.value)
