"""DiT on video latents: patches, 3D rotary positions, adaLN-Zero init, text conditioning, factorised
attention, remat and sharding equivalences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.diffusion_helpers import CHANNELS, LATENT_SHAPE, forward, inputs, mesh_2x2x2, normal, place, tiny_dit
from vlm import sharding
from vlm.models.dit import DiT
from vlm.nn.patches import patch_grid, patchify, unpatchify
from vlm.nn.rope import apply_rope, grid_positions, rope_angles, wan_axis_dims


@pytest.fixture(scope="module")
def random_model():
    return tiny_dit(random=True)


@pytest.mark.parametrize("patch", [(1, 2, 2), (2, 2, 3), (1, 1, 1)])
def test_unpatchify_inverts_patchify(patch):
    x = normal((2, 4, 4, 6, 3))
    tokens = patchify(x, patch)
    grid = patch_grid(x.shape[1:4], patch)
    assert tokens.shape == (2, np.prod(grid), np.prod(patch) * 3)
    np.testing.assert_array_equal(unpatchify(tokens, grid, patch), x)


def test_patch_token_order_is_row_major_t_h_w():
    x = jnp.arange(1 * 2 * 4 * 4 * 1, dtype=jnp.float32).reshape(1, 2, 4, 4, 1)
    tokens = patchify(x, (1, 2, 2))  # grid (2, 2, 2)
    # Token 3 is (t'=0, h'=1, w'=1): rows 2-3, columns 2-3 of frame 0, features in (ph, pw) order.
    np.testing.assert_array_equal(tokens[0, 3], x[0, 0, 2:4, 2:4, 0].reshape(-1))
    np.testing.assert_array_equal(tokens[0, 4], x[0, 1, 0:2, 0:2, 0].reshape(-1))  # (1, 0, 0): next frame
    with pytest.raises(ValueError, match="not divisible by the patch"):
        patchify(jnp.zeros((1, 2, 5, 4, 1)), (1, 2, 2))


def test_wan_head_dim_split():
    assert wan_axis_dims(128) == (44, 42, 42)  # Wan 1.3B / 14B: d - 4*floor(d/6), 2*floor(d/6), 2*floor(d/6)
    assert wan_axis_dims(64) == (24, 20, 20)
    assert wan_axis_dims(16) == (8, 4, 4)
    with pytest.raises(ValueError, match="even head dimension"):
        wan_axis_dims(15)
    # Layout: moving only along t rotates only the first 44/2 pairs, only along w only the last 42/2.
    base = rope_angles(jnp.zeros((1, 3)), (44, 42, 42))
    along_t = rope_angles(jnp.array([[3.0, 0, 0]]), (44, 42, 42))
    along_w = rope_angles(jnp.array([[0, 0, 3.0]]), (44, 42, 42))
    assert base.shape == (1, 64)
    changed_t = np.flatnonzero(np.asarray(along_t != base)[0])
    changed_w = np.flatnonzero(np.asarray(along_w != base)[0])
    assert changed_t.min() == 0 and changed_t.max() == 21
    assert changed_w.min() == 43 and changed_w.max() == 63


def test_3d_rope_scores_depend_only_on_relative_positions():
    q = normal((1, 24, 2, 24), seed=0)  # [B, N, H, Dh], N = 2*3*4
    k = normal((1, 24, 2, 24), seed=1)
    dims = wan_axis_dims(24)
    positions = grid_positions((2, 3, 4))  # [N, 3]
    scores = lambda pos: jnp.einsum("bnhd,bmhd->bhnm", apply_rope(q, rope_angles(pos, dims)),
                                    apply_rope(k, rope_angles(pos, dims)))
    reference = scores(positions)
    np.testing.assert_allclose(scores(positions + jnp.array([7.0, -3.0, 11.0])), reference, atol=2e-4, rtol=1e-4)
    # Not vacuous: rotations do change scores, and stretching the grid (not a shift) changes them too.
    unrotated = jnp.einsum("bnhd,bmhd->bhnm", q, k)
    assert float(jnp.abs(reference - unrotated).max()) > 1.0
    assert float(jnp.abs(scores(positions * 2.0) - reference).max()) > 1.0


def test_fresh_blocks_are_the_identity_and_the_output_is_zero():
    model = tiny_dit(depth=2)
    x, t, context, mask = inputs()
    h = normal((4, 4 * 2 * 3, 32), seed=3)  # [B, N, D]
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)

    def loss(head_kernel):  # as a function of the (zero) output layer only
        p = {**params, "head": {**params["head"], "kernel": head_kernel}}
        v = nnx.merge(graphdef, p)(x, t, context, mask)
        return jnp.mean(jnp.square(v - x)), v

    @jax.jit  # one compile for all the checks
    def fresh(params):
        model = nnx.merge(graphdef, params)
        modulation = model.time_modulation(jax.nn.silu(model.time_embed(t)))  # [B, 6, D]
        text = model.text_out(jax.nn.gelu(model.text_hidden(context)))
        blocks = [block(h, modulation, text, mask, (4, 2, 3)) for block in model.blocks]
        (_, v), grad = jax.value_and_grad(loss, has_aux=True)(params["head"]["kernel"])
        return modulation, blocks, v, grad

    modulation, blocks, v, grad = fresh(params)
    np.testing.assert_array_equal(modulation, 0.0)  # adaLN-Zero: the shared projection is zero-initialised
    for out in blocks:
        np.testing.assert_array_equal(out, h)
    assert v.shape == x.shape and v.dtype == jnp.float32
    np.testing.assert_array_equal(v, 0.0)
    # Training can start: the zero output layer gets a gradient (the rest only after it moves, as in DiT).
    assert float(jnp.abs(grad).max()) > 1e-3


def test_text_conditioning_respects_the_mask_and_null_context(random_model):
    x, t, context, mask = inputs()
    v = forward(random_model, x, t, context, mask)
    # Changing masked-out text positions changes nothing; changing a valid one does.
    padded = jnp.where(mask[:, :, None], context, 100.0)
    np.testing.assert_allclose(forward(random_model, x, t, padded, mask), v, atol=1e-5)
    changed = context.at[:, 0].add(1.0)
    assert float(jnp.abs(forward(random_model, x, t, changed, mask) - v).max()) > 1e-3
    # Dropping text: only dropped rows change, to the prediction with the null context.
    drop = jnp.array([True, False, True, False])
    dropped = forward(random_model, x, t, *random_model.drop_context(context, mask, drop))
    np.testing.assert_array_equal(dropped[1::2], v[1::2])
    null = jnp.broadcast_to(random_model.null_context[...], (4, 1, context.shape[-1]))
    null_only = forward(random_model, x, t, null, jnp.ones((4, 1), bool))
    np.testing.assert_allclose(dropped[0::2], null_only[0::2], atol=1e-5)
    assert float(jnp.abs(dropped[0::2] - v[0::2]).max()) > 1e-3
    both, both_mask = random_model.guidance_context(context, mask)
    assert both.shape == (8, *context.shape[1:]) and both_mask.shape == (8, mask.shape[1])
    np.testing.assert_array_equal(both[:4], context)
    assert bool(both_mask[4:].all())


def test_time_matters(random_model):
    x, _, context, mask = inputs()
    v = forward(random_model, x, jnp.full((4,), 0.5), context, mask)
    assert float(jnp.abs(forward(random_model, x, jnp.full((4,), 0.6), context, mask) - v).max()) > 1e-4


def test_factorised_blocks_mix_frames_only_through_temporal_attention(random_model):
    x, t, context, mask = inputs()
    other = x.at[:, 3].multiply(-1.0)  # change the last frame only
    spatial_only = tiny_dit(attention="factorised", depth=1, random=True)  # block 0 is spatial
    spatial_temporal = tiny_dit(attention="factorised", depth=2, random=True)  # spatial, then temporal
    assert [b.attention for b in spatial_temporal.blocks] == ["spatial", "temporal"]
    a, b = forward(spatial_only, x, t, context, mask), forward(spatial_only, other, t, context, mask)
    assert a.shape == x.shape
    np.testing.assert_array_equal(a[:, 0], b[:, 0])  # frame 0 never sees frame 3
    a, b = forward(spatial_temporal, x, t, context, mask), forward(spatial_temporal, other, t, context, mask)
    assert a.shape == x.shape
    assert float(jnp.abs(a[:, 0] - b[:, 0]).max()) > 1e-3  # temporal attention carried frame 3 to frame 0
    # Full attention mixes frames in every block.
    a, b = forward(random_model, x, t, context, mask), forward(random_model, other, t, context, mask)
    assert float(jnp.abs(a[:, 0] - b[:, 0]).max()) > 1e-3


def test_remat_changes_memory_not_numbers(random_model):
    x, t, context, mask = inputs()
    rematted = tiny_dit(remat="full", random=True)  # same parameters as random_model
    graphdef, params = nnx.split(random_model, nnx.Param)
    r_graphdef, r_params = nnx.split(rematted, nnx.Param)
    loss = lambda g: lambda p: jnp.mean(jnp.square(nnx.merge(g, p)(x, t, context, mask)))
    both = jax.jit(lambda p, rp: (jax.value_and_grad(loss(graphdef))(p), jax.value_and_grad(loss(r_graphdef))(rp)))
    (l0, g0), (l1, g1) = both(params, r_params)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_sharded_forward_equals_one_device(random_model):
    x, t, context, mask = inputs()
    apply = lambda g: jax.jit(lambda p, *args: nnx.merge(g, p)(*args))
    reference = forward(random_model, x, t, context, mask)  # one device, no mesh
    mesh = mesh_2x2x2()
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        graphdef, sharded = place(random_model, mesh)
        kernel = sharded["blocks"][0]["mlp"]["up"]["kernel"]
        assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")  # [embed, mlp]
        batch = jax.device_put((x, t, context, mask), sharding.batch_sharding(mesh))
        out = apply(graphdef)(sharded, *batch)
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_agrees_with_float32(random_model):
    x, t, context, mask = inputs()
    bf16 = tiny_dit(random=True, dtype=jnp.bfloat16)  # same parameters as random_model
    v16, v32 = forward(bf16, x, t, context, mask), forward(random_model, x, t, context, mask)
    assert v16.dtype == jnp.float32 and all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16)))
    scale = float(jnp.abs(v32).max())
    assert 0 < float(jnp.abs(v16 - v32).max()) < 0.05 * scale


def test_bad_inputs_raise_one_line_errors(random_model):
    x, t, context, mask = inputs()
    with pytest.raises(ValueError, match="latents must be"):
        forward(random_model, x[..., :2], t, context, mask)
    with pytest.raises(ValueError, match="not divisible by the patch"):
        forward(random_model, x[:, :, :3], t, context, mask)
    with pytest.raises(ValueError, match="unknown DiT attention"):
        DiT(in_channels=CHANNELS, context_width=8, width=32, depth=1, num_heads=2, mlp_dim=8, attention="axial",
            rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="even head dimension"):
        DiT(in_channels=CHANNELS, context_width=8, width=30, depth=1, num_heads=2, mlp_dim=8, rngs=nnx.Rngs(0))
    assert random_model.num_tokens((*LATENT_SHAPE, CHANNELS)) == 4 * 2 * 3
