"""Tiny DiTs, random inputs and mesh placement shared by test_dit.py and test_sampling.py."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlm import sharding
from vlm.models.dit import DiT

CHANNELS, CONTEXT_WIDTH, TEXT_LEN = 4, 24, 5
LATENT_SHAPE = (4, 4, 6)  # (t, h, w) → 4 x 2 x 3 tokens with the default 1x2x2 patch


def tiny_dit(*, attention: str = "full", depth: int = 1, remat: str = "none", random: bool = False,
             dtype=jnp.float32) -> DiT:
    """width 32, 2 heads of 16 (rotary split 8/4/4).

    random=True: every parameter drawn from N(0, 0.1²) (norm scales around 1) with numpy instead of the
    real initialisation, so zero-initialised gates and projections no longer hide the computation
    (and no per-shape initialiser has to be compiled: this keeps the tests fast).
    """
    build = lambda: DiT(in_channels=CHANNELS, context_width=CONTEXT_WIDTH, width=32, depth=depth, num_heads=2,
                        mlp_dim=64, attention=attention, remat=remat, dtype=dtype, rngs=nnx.Rngs(0))
    if not random:
        return build()
    model = nnx.eval_shape(build)
    state = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(depth)
    values = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(float(str(path[-1]) == "['scale']") + 0.1 * rng.standard_normal(x.shape, np.float32)),
        nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, values)
    nnx.update(model, state)
    return model


# model, x [B, t, h, w, c], t [B], context [B, L, Dc], mask [B, L] | None → v [B, t, h, w, c]; one compile per model structure.
forward = nnx.jit(lambda model, x, t, context, mask: model(x, t, context, mask))


def normal(shape, seed: int = 0) -> jax.Array:
    """Standard normal float32 samples drawn with numpy (no kernel to compile)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def inputs(batch: int = 4, seed: int = 0):
    """Latents [B, t, h, w, c], times [B], text [B, L, Dc] and a mask with a different length per row.

    Drawn with numpy: eager jax.random calls would each compile a kernel.
    """
    x = normal((batch, *LATENT_SHAPE, CHANNELS), seed)
    t = jnp.asarray(np.random.default_rng(seed + 1).uniform(size=batch).astype(np.float32))
    context = normal((batch, TEXT_LEN, CONTEXT_WIDTH), seed + 2)
    mask = jnp.asarray(np.arange(TEXT_LEN)[None, :] < (np.arange(batch) % TEXT_LEN + 1)[:, None])  # [B, L]
    return x, t, context, mask


def mesh_2x2x2():
    return sharding.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})


def place(model: DiT, mesh, rules=sharding.DEFAULT_RULES):
    """(graphdef, params) with every parameter sharded by its logical axes, as train.build places them."""
    graphdef, params = nnx.split(model, nnx.Param)
    shardings = sharding.state_shardings(params, mesh, rules)
    pure = nnx.to_pure_dict(params)
    sharding.check_divisible(pure, shardings)
    return graphdef, jax.device_put(pure, shardings)
