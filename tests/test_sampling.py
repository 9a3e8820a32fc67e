"""Rectified flow: timestep sampling and shift, loss weights, Euler/Heun samplers, classifier-free guidance,
sharded sampling."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.diffusion_helpers import forward, inputs, mesh_2x2x2, normal, place, tiny_dit
from vlm import flow, sharding
from vlm.sampling import guided, sample, timesteps


@pytest.fixture(scope="module")
def model():
    return tiny_dit(random=True)


def test_shift_one_is_the_identity_and_larger_shifts_are_noisier():
    t = jnp.linspace(0.0, 1.0, 101)
    np.testing.assert_array_equal(flow.shift_timesteps(t, 1.0), t)
    shifted = flow.shift_timesteps(t, 3.0)
    np.testing.assert_allclose(np.asarray(shifted)[[0, -1]], [0.0, 1.0])  # endpoints fixed
    assert bool((shifted[1:-1] > t[1:-1]).all())
    np.testing.assert_allclose(flow.shift_timesteps(0.5, 3.0), 0.75)  # 3·½ / (1 + 2·½)
    key = jax.random.key(0)
    means = [float(flow.sample_timesteps(key, 4096, shift=s).mean()) for s in (1.0, 3.0, 6.0)]
    assert abs(means[0] - 0.5) < 0.02  # logit-normal(0, 1) is symmetric around ½
    assert means[0] < means[1] < means[2]
    t = flow.sample_timesteps(key, 4096, mean=0.5, std=0.5)
    assert 0.0 < float(t.min()) and float(t.max()) < 1.0
    np.testing.assert_allclose(float(jnp.mean(jax.scipy.special.logit(t))), 0.5, atol=0.03)
    np.testing.assert_allclose(float(jnp.std(jax.scipy.special.logit(t))), 0.5, atol=0.03)
    with pytest.raises(ValueError, match="shift must be > 0"):
        flow.shift_timesteps(t, 0.0)


def test_resolution_shift_follows_token_count():
    assert flow.resolution_shift(1024) == 1.0
    np.testing.assert_allclose(flow.resolution_shift(21 * 30 * 52), math.sqrt(32760 / 1024))  # Wan 81x480x832
    assert flow.resolution_shift(4096, base_tokens=1024) == 2.0


def test_sampling_grid_runs_from_noise_to_data():
    ts = timesteps(4, shift=3.0)
    assert ts.shape == (5,) and float(ts[0]) == 1.0 and float(ts[-1]) == 0.0
    assert bool((jnp.diff(ts) < 0).all())
    np.testing.assert_allclose(ts, flow.shift_timesteps(jnp.array([1.0, 0.75, 0.5, 0.25, 0.0]), 3.0))


def test_loss_weights_are_per_example_and_finite_at_batch_size_one():
    for weighting in flow.LOSS_WEIGHTINGS:
        one = flow.loss_weights(jnp.array([0.3]), weighting)
        assert one.shape == (1,) and bool(jnp.isfinite(one).all())
        batch = flow.loss_weights(jnp.array([0.3, 0.9, 0.01]), weighting)
        assert float(batch[0]) == float(one[0])  # independent of the rest of the batch
    bell = flow.loss_weights(jnp.linspace(0.0, 1.0, 100001), "bell")
    np.testing.assert_allclose(float(bell.mean()), 1.0, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(bell)[[0, -1]], 0.0, atol=1e-6)
    assert float(bell.max()) == pytest.approx(float(flow.loss_weights(jnp.array([0.5]), "bell")[0]))
    with pytest.raises(ValueError, match="unknown loss weighting"):
        flow.loss_weights(jnp.array([0.5]), "snr")


def test_interpolation_target_and_loss():
    x0, noise = normal((3, 2, 4, 4, 2), seed=0), normal((3, 2, 4, 4, 2), seed=1)
    t = jnp.array([0.0, 1.0, 0.25])
    xt = flow.interpolate(x0, noise, t)
    np.testing.assert_array_equal(xt[0], x0[0])
    np.testing.assert_array_equal(xt[1], noise[1])
    np.testing.assert_allclose(xt[2], 0.75 * x0[2] + 0.25 * noise[2], rtol=1e-6)
    target = flow.velocity_target(x0, noise)
    np.testing.assert_array_equal(flow.flow_loss(target, x0, noise, t), 0.0)
    np.testing.assert_allclose(flow.flow_loss(target + 2.0, x0, noise, t), 4.0)  # mean squared error per example


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_oracle_velocity_recovers_the_data(sampler):
    """Along a straight path v = ε − x0 is constant, so any grid integrates it exactly."""
    x0, noise = normal((2, 3, 4, 4, 2), seed=2), normal((2, 3, 4, 4, 2), seed=3)
    oracle = lambda x, t: noise - x0
    out = jax.jit(lambda n: sample(oracle, n, steps=7, sampler=sampler, shift=3.0))(noise)
    np.testing.assert_allclose(out, x0, atol=1e-5)


def test_heun_with_few_steps_matches_euler_with_many_on_a_nonlinear_field():
    """dx/dt = x² from x(1) = x1 has x(0) = x1 / (1 + x1)."""
    x1 = jnp.linspace(0.1, 0.9, 8)
    exact = x1 / (1.0 + x1)
    field = lambda x, t: x * x
    solve = jax.jit(lambda steps, sampler: sample(field, x1, steps=steps, sampler=sampler, shift=2.0),
                    static_argnums=(0, 1))
    heun, euler, euler_many = solve(16, "heun"), solve(16, "euler"), solve(2000, "euler")
    heun_err, euler_err = float(jnp.abs(heun - exact).max()), float(jnp.abs(euler - exact).max())
    assert heun_err < 1e-3 and euler_err > 10 * heun_err  # second vs first order
    np.testing.assert_allclose(euler_many, heun, atol=5e-4)  # many Euler steps approach few Heun steps
    assert float(jnp.abs(euler_many - exact).max()) < euler_err / 50


def test_guidance_one_is_conditional_zero_is_unconditional(model):
    x, t, context, mask = inputs()
    both = model.guidance_context(context, mask)
    cond = forward(model, x, t, context, mask)
    uncond = forward(model, x, t, *model.drop_context(context, mask, jnp.ones(4, bool)))
    assert float(jnp.abs(cond - uncond).max()) > 1e-3  # the text matters, so the checks below can fail
    velocity_fn = lambda x2, t2: forward(model, x2, t2, *both)  # one batched [2B] call
    np.testing.assert_allclose(guided(velocity_fn, 1.0)(x, t), cond, atol=1e-5)
    np.testing.assert_allclose(guided(velocity_fn, 0.0)(x, t), uncond, atol=1e-5)
    np.testing.assert_allclose(guided(velocity_fn, 4.0)(x, t), uncond + 4.0 * (cond - uncond), atol=1e-4)


def _sample_with_model(graphdef, params, noise, context, mask):
    model = nnx.merge(graphdef, params)
    both = model.guidance_context(context, mask)
    return sample(lambda x, t: model(x, t, *both), noise, steps=2, sampler="heun", shift=3.0, guidance=3.0)


def test_sharded_guided_sampling_equals_one_device(model):
    x, _, context, mask = inputs()
    noise = normal(x.shape, seed=7)
    graphdef, params = nnx.split(model, nnx.Param)
    run = jax.jit(_sample_with_model, static_argnums=0)
    reference = run(graphdef, params, noise, context, mask)
    # Fixed noise → fixed sample.
    np.testing.assert_array_equal(run(graphdef, params, noise, context, mask), reference)
    assert bool(jnp.isfinite(reference).all()) and float(jnp.abs(reference - noise).max()) > 1e-2
    mesh = mesh_2x2x2()
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        graphdef, sharded = place(model, mesh)
        batch = jax.device_put((noise, context, mask), sharding.batch_sharding(mesh))
        out = run(graphdef, sharded, *batch)
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)


def test_bad_sampler_arguments_raise():
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(lambda x, t: x, jnp.zeros((1, 2)), steps=2, sampler="dpm")
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        sample(lambda x, t: x, jnp.zeros((1, 2)), steps=0)
    with pytest.raises(ValueError, match="shift must be > 0"):
        sample(lambda x, t: x, jnp.zeros((1, 2)), steps=2, shift=-1.0)
