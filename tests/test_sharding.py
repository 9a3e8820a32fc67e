"""Sharded equals unsharded; gradient accumulation equals the full batch."""

import jax
import numpy as np
import pytest

from tests.helpers import random_batch, small_config
from vlm import accumulation, sharding, train


def one_step(config, devices, *, return_init=False):
    """Init + one train step on a mesh over `devices`; returns (metrics, params) on host."""
    mesh = sharding.create_mesh(config.mesh, devices)
    setup = train.build(config, mesh)
    with sharding.use_mesh(mesh, setup.rules):
        state = setup.init()
        init_params = jax.device_get(state["params"])
        batch = sharding.global_batch(random_batch(config), mesh)
        state, metrics = setup.train_step(state, batch)
    out = jax.device_get(metrics), jax.device_get(state["params"])
    return (*out, init_params) if return_init else out


def assert_trees_close(a, b, rtol, atol):
    flat_a, tree_a = jax.tree.flatten(a)
    flat_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(flat_a, flat_b):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def single_device_step():
    return one_step(small_config(data=1, fsdp=1, tensor=1), jax.devices()[:1], return_init=True)


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_step_equals_single_device(mesh, single_device_step):
    data, fsdp, tensor = mesh
    metrics, params = one_step(small_config(data=data, fsdp=fsdp, tensor=tensor), jax.devices())
    ref_metrics, ref_params, init_params = single_device_step
    np.testing.assert_allclose(metrics["train/loss"], ref_metrics["train/loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics["train/grad_norm"], ref_metrics["train/grad_norm"], rtol=1e-5)
    # Adam's first update is ~lr*sign(g): a float-rounding difference in a near-zero gradient
    # can move a weight by up to ~1e-2*lr, hence atol = 1e-5 with lr = 1e-3.
    assert_trees_close(params, ref_params, rtol=1e-5, atol=1e-5)
    # The step really moved the parameters (otherwise equality would prove nothing).
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), params, init_params)
    assert max(jax.tree.leaves(moved)) > 1e-4


def test_parameters_are_sharded_as_the_rules_say():
    config = small_config(data=2, fsdp=2, tensor=2)
    config.model.video.attention = "divided"  # B/16's blocks (attn_t, attn_s, mlp); tiny's joint blocks have one attn
    mesh = sharding.create_mesh(config.mesh)
    setup = train.build(config, mesh)
    with sharding.use_mesh(mesh, setup.rules):
        state = setup.init()
    mlp = state["params"]["video"]["encoder"]["blocks"][0]["mlp"]
    assert mlp["up"]["kernel"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")  # [embed, mlp]
    assert mlp["down"]["kernel"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")  # [mlp, embed]
    q = state["params"]["video"]["encoder"]["blocks"][0]["attn_t"]["query"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)  # [embed, heads, head_dim]
    # Adam moments follow their parameters.
    mu = state["opt_state"][1][0].mu["video"]["encoder"]["blocks"][0]["mlp"]["up"]["kernel"]
    assert mu.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    # Each device holds a quarter of an [embed, mlp] kernel (fsdp=2 x tensor=2).
    shard = mlp["up"]["kernel"].addressable_shards[0].data
    assert shard.size * 4 == mlp["up"]["kernel"].size


@pytest.mark.parametrize("microbatches", [2, 4])
def test_gradient_accumulation_matches_full_batch(microbatches):
    full = small_config(data=2, fsdp=4, tensor=1)
    accum = small_config(data=2, fsdp=4, tensor=1)
    accum.batch_size = full.batch_size = 32
    accum.microbatches = microbatches
    m_full, p_full = one_step(full, jax.devices())
    m_acc, p_acc = one_step(accum, jax.devices())
    # The contrastive loss couples the whole batch; GradCache keeps the gradient exact.
    np.testing.assert_allclose(m_acc["train/loss"], m_full["train/loss"], rtol=1e-6)
    np.testing.assert_allclose(m_acc["train/grad_norm"], m_full["train/grad_norm"], rtol=1e-4)
    assert_trees_close(p_acc, p_full, rtol=1e-4, atol=1e-5)


def test_microbatch_split_roundtrip_and_striding():
    x = np.arange(12).reshape(12, 1)
    split = accumulation.microbatch_split(x, 3)
    assert split.shape == (3, 4, 1)
    assert split[1, :, 0].tolist() == [1, 4, 7, 10]  # strided: every shard holds part of each microbatch
    np.testing.assert_array_equal(accumulation.microbatch_merge(split), x)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_changes_memory_not_numbers(remat):
    base = small_config(data=1, fsdp=1, tensor=1)
    rematted = small_config(data=1, fsdp=1, tensor=1)
    rematted.model.remat = remat
    m_base, p_base = one_step(base, jax.devices()[:1])
    m_remat, p_remat = one_step(rematted, jax.devices()[:1])
    np.testing.assert_allclose(m_remat["train/loss"], m_base["train/loss"], rtol=1e-6)
    assert_trees_close(p_remat, p_base, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_state():
    config = small_config(data=2, fsdp=2, tensor=2)
    config.model.dtype = "bfloat16"
    f32_metrics, _ = one_step(small_config(data=2, fsdp=2, tensor=2), jax.devices())
    metrics, params = one_step(config, jax.devices())
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))
    assert metrics["train/loss"].dtype == np.float32
    # Same model, lower precision: the loss agrees to bfloat16 accuracy.
    np.testing.assert_allclose(metrics["train/loss"], f32_metrics["train/loss"], rtol=2e-2)
