"""Context parallelism: the `context` mesh axis, all-to-all (Ulysses) and ring attention over a split
sequence, equal to one device (values and gradients), in the DiT and the video encoder; the
per-device activation memory falls with the context axis size."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from tests.diffusion_helpers import CHANNELS, CONTEXT_WIDTH, inputs, normal, place
from vlm import sharding
from vlm.models.dit import DiT
from vlm.models.video_encoder import VideoEncoder
from vlm.nn.attention import attend

B, N, H, DH = 2, 32, 8, 8  # N = 32 splits over context 4 or 8


def context_mesh(context: int, tensor: int = 1, fsdp: int = 1, devices=None):
    return sharding.create_mesh(dict(data=-1, fsdp=fsdp, context=context, tensor=tensor), devices)


def test_context_axis_defaults_to_one_and_sits_between_fsdp_and_tensor():
    assert sharding.MESH_AXES == ("data", "fsdp", "context", "tensor")
    old = {"data": 2, "fsdp": 2, "tensor": 2, "dcn": {"data": 1, "fsdp": 1, "tensor": 1}}  # a pre-context config.json
    assert sharding.axis_sizes(old, 8) == {"data": 2, "fsdp": 2, "context": 1, "tensor": 2}
    mesh = context_mesh(2, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "context": 2, "tensor": 2}
    # Neighbours along `tensor` are adjacent devices, then `context`: the fastest links carry the most traffic.
    assert [d.id for d in mesh.devices[0, 0, :, :].flat] == [0, 1, 2, 3]
    with pytest.raises(sharding.MeshError, match="config.mesh data=3"):  # names only the axes the config has
        sharding.mesh_shape({"data": 3, "fsdp": 1, "tensor": 1}, 8)


def test_activations_split_over_context_parameters_never():
    mesh = context_mesh(4)
    encoder = nnx.eval_shape(lambda: VideoEncoder(num_frames=4, resolution=16, tubelet=(2, 8, 8), width=32, depth=1,
                                                   num_heads=4, mlp_dim=64, attention="joint", rngs=nnx.Rngs(0)))
    params = nnx.state(encoder, nnx.Param)
    shardings = sharding.state_shardings(params, mesh, sharding.DEFAULT_RULES)
    # The [tokens, embed] and [frames, embed] position tables stay whole along their position axis
    # (3 frames' worth of rows would not even split over 4).
    assert shardings["spatial_pos"]["table"].spec == P(None, "fsdp")
    assert shardings["temporal_pos"]["table"].spec == P(None, "fsdp")
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        assert sharding.logical_to_mesh_spec(("batch", "tokens", "embed")) == P(("data", "fsdp"), "context", None)


def qkv(heads: int = H, seed: int = 0):
    q, k, v, w = (normal((B, N, heads, DH), seed=seed + i) for i in range(4))
    mask = jnp.asarray(np.arange(N)[None] < np.array([N, 19])[:, None])  # [B, N]: row 1 pads its last 13 keys
    return q, k, v, w, mask


@functools.cache
def reference(causal: bool, heads: int = H):
    """One device (no mesh): value and gradients of sum(attention(q, k, v) * w)."""
    return value_and_grads("none", causal, *qkv(heads))[0]


def value_and_grads(kind: str, causal: bool, q, k, v, w, mask):
    def loss(q, k, v):
        return jnp.sum(attend(q, k, v, mask, "xla", is_causal=causal, context_parallel=kind) * w)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    return fn(q, k, v), fn.lower(q, k, v).as_text()


@pytest.mark.parametrize("kind,context,tensor,causal", [
    ("ulysses", 8, 1, False), ("ulysses", 4, 2, True), ("ring", 8, 1, True), ("ring", 4, 2, False)])
def test_context_parallel_attention_equals_one_device(kind, context, tensor, causal):
    q, k, v, w, mask = qkv()
    with sharding.use_mesh(context_mesh(context, tensor), sharding.DEFAULT_RULES):
        got, hlo = value_and_grads(kind, causal, q, k, v, w, mask)
    # The exchange really happened (otherwise equality would prove nothing).
    assert ("all_to_all" if kind == "ulysses" else "collective_permute") in hlo
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(reference(causal))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5)


def test_ring_works_where_heads_do_not_split_and_ulysses_says_why_not():
    q, k, v, w, mask = qkv(heads=3)
    with sharding.use_mesh(context_mesh(4), sharding.DEFAULT_RULES):
        got, _ = value_and_grads("ring", False, q, k, v, w, mask)
        with pytest.raises(ValueError, match=r"heads per device \(3 = 3 heads / tensor\) divisible by the context"):
            attend(q, k, v, mask, "xla", context_parallel="ulysses")
        with pytest.raises(ValueError, match="sequence of 30 tokens does not split over the context axis"):
            attend(q[:, :30], k[:, :30], v[:, :30], None, "xla", context_parallel="ring")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(reference(False, heads=3))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5)


def randomize(model: nnx.Module, seed: int = 0) -> nnx.Module:
    """Every parameter ~ N(0, 0.1²) (norm scales around 1), drawn with numpy: zero-initialised gates would
    hide the computation, and no initialiser has to be compiled."""
    state = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(seed)
    values = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(float(str(path[-1]) == "['scale']") + 0.1 * rng.standard_normal(x.shape, np.float32)),
        nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, values)
    nnx.update(model, state)
    return model


def dit_loss(graphdef):
    def loss(params, x, t, context, mask, target):
        v = nnx.merge(graphdef, params)(x, t, context, mask)
        return jnp.mean(jnp.square(v - target))

    return jax.jit(jax.value_and_grad(loss))


# (kind, mesh) of each DiT run; the first is one device. Pure context meshes also measure memory by context size.
DIT_RUNS = (("none", dict(context=1)), ("ring", dict(context=2)), ("ring", dict(context=4)),
            ("ulysses", dict(fsdp=2, context=2)))


@pytest.fixture(scope="module")
def dit_runs():
    """A random DiT (full attention, depth 2, 2 heads) on latents of 4x4x4 = 64 tokens, batch 2: for each of
    DIT_RUNS, (loss, gradient, compiled per-device temporary bytes of the forward + backward)."""
    x, t, context, mask = inputs(batch=2)
    x = normal((2, 4, 8, 8, CHANNELS), seed=5)
    batch = (x, t, context, mask, normal(x.shape, seed=7))  # ..., target
    results = {}
    for kind, axes in DIT_RUNS:
        mesh = sharding.create_mesh({"data": 1, "fsdp": 1, "tensor": 1, **axes}, jax.devices()[:math.prod(axes.values())])
        model = randomize(nnx.eval_shape(lambda: DiT(in_channels=CHANNELS, context_width=CONTEXT_WIDTH, width=32,
                                                     depth=2, num_heads=2, mlp_dim=64, context_parallel=kind,
                                                     rngs=nnx.Rngs(0))))
        with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
            graphdef, params = place(model, mesh)
            placed = jax.device_put(batch, sharding.batch_sharding(mesh))
            compiled = dit_loss(graphdef).lower(params, *placed).compile()
            loss, grads = compiled(params, *placed)
        results[kind, axes["context"]] = (loss, jax.device_get(grads), compiled.memory_analysis().temp_size_in_bytes)
    return results


@pytest.mark.parametrize("kind,context", [("ring", 2), ("ring", 4), ("ulysses", 2)])
def test_dit_train_step_with_context_parallelism_equals_one_device(kind, context, dit_runs):
    ref_loss, ref_grads, _ = dit_runs["none", 1]
    loss, grads, _ = dit_runs[kind, context]
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    assert float(ref_loss) > 0.1
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_activation_memory_per_device_falls_with_the_context_axis(dit_runs):
    temp = {c: dit_runs["ring" if c > 1 else "none", c][2] for c in (1, 2, 4)}
    print("DiT forward+backward temp bytes per device (64 tokens, ring attention) by context size:", temp)
    assert temp[2] < 0.75 * temp[1] and temp[4] < 0.75 * temp[2], temp


@pytest.fixture(scope="module")
def video_reference():
    """A random joint-attention video encoder (2 blocks, 4 heads), a clip (2 x 4 = 8 tokens) and its output on
    one device."""
    model = randomize(nnx.eval_shape(lambda: video_encoder("none")))
    video = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 4, 16, 16, 3), dtype=np.uint8))
    return nnx.state(model, nnx.Param), video, nnx.jit(lambda model, video: model(video))(model, video)


def video_encoder(kind: str, attention: str = "joint") -> VideoEncoder:
    return VideoEncoder(num_frames=4, resolution=16, tubelet=(2, 8, 8), width=32, depth=2, num_heads=4, mlp_dim=64,
                        attention=attention, context_parallel=kind, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kind", ["ulysses", "ring"])
def test_video_encoder_joint_attention_with_context_parallelism_equals_one_device(kind, video_reference):
    params, video, expected = video_reference
    model = nnx.eval_shape(lambda: video_encoder(kind))
    nnx.update(model, params)
    mesh = context_mesh(4)
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        graphdef, sharded = place(model, mesh)
        got = jax.jit(lambda p, video: nnx.merge(graphdef, p)(video))(sharded, video)
    assert got.sharding.spec[1] == "context"  # the output tokens stay split over the context axis
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs attention='joint'"):
        video_encoder(kind, attention="divided")
