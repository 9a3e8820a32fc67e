"""Patch (tubelet) embeddings, token embeddings and learned position tables."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlm import sharding
from vlm.nn.linear import Dense, Dtype
from vlm.nn.rng import params_key

# Video arrives as uint8 and the model normalises (DESIGN.md): (x/255 - mean) / std per channel.
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the default; CLIP: (0.4815, 0.4578, 0.4082), SigLIP: (0.5, 0.5, 0.5)
IMAGENET_STD = (0.229, 0.224, 0.225)  # CLIP: (0.2686, 0.2613, 0.2758), SigLIP: (0.5, 0.5, 0.5)


class TubeletEmbed(nnx.Module):
    """A 3D patch embedding (a strided Conv3D written as reshape + matmul).

    video uint8 [B, T, H, W, 3] → tokens [B, T/t, (H/p)*(W/p), D]. A clip whose T is
    not a multiple of t (e.g. an image, T=1) is padded by repeating its last frame.
    Each token's input features are ordered (t, p, q, channel).
    """

    def __init__(self, tubelet: Sequence[int], width: int, *, dtype: Dtype, rgb_mean: Sequence[float] = IMAGENET_MEAN,
                 rgb_std: Sequence[float] = IMAGENET_STD, rngs: nnx.Rngs):
        self.tubelet = tuple(int(x) for x in tubelet)
        t, p, q = self.tubelet
        if len(rgb_mean) != 3 or len(rgb_std) != 3 or min(rgb_std) <= 0:
            raise ValueError(f"rgb_mean={tuple(rgb_mean)} and rgb_std={tuple(rgb_std)} need 3 values each "
                             f"(in [0, 1] units), std > 0")
        self.proj = Dense(t * p * q * 3, width, ("conv_in", "embed"), dtype=dtype, rngs=rngs)
        self.dtype = dtype
        self.rgb_mean = tuple(float(m) for m in rgb_mean)  # plain floats: static, not model state
        self.rgb_std = tuple(float(s) for s in rgb_std)

    def __call__(self, video: jax.Array) -> jax.Array:
        t, p, q = self.tubelet
        b, T, H, W, C = video.shape
        if H % p or W % q:
            raise ValueError(f"frame size {H}x{W} is not divisible by the patch size {p}x{q}")
        if T % t:
            video = jnp.concatenate([video, jnp.repeat(video[:, -1:], t - T % t, axis=1)], axis=1)
            T = video.shape[1]
        # numpy constants (as before: importing must not start the JAX backend), in uint8 units
        mean, std = np.array(self.rgb_mean, np.float32) * 255.0, np.array(self.rgb_std, np.float32) * 255.0
        x = (video.astype(jnp.float32) - mean) / std
        x = x.reshape(b, T // t, t, H // p, p, W // q, q, C)
        x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, T // t, (H // p) * (W // q), t * p * q * C)
        return self.proj(x.astype(self.dtype))  # [B, T', S, D]


class LearnedPositions(nnx.Module):
    """A learned [max_len, D] table; the first `n` rows are used for a length-n input."""

    def __init__(self, max_len: int, width: int, axis_name: str, *, rngs: nnx.Rngs):
        init = nnx.with_partitioning(nnx.initializers.normal(0.02), (axis_name, "embed"))
        self.table = nnx.Param(init(params_key(rngs), (max_len, width), jnp.float32))

    def __call__(self, n: int) -> jax.Array:
        if n > self.table[...].shape[0]:
            raise ValueError(f"sequence of length {n} is longer than the position table ({self.table[...].shape[0]})")
        return self.table[...][:n]  # [n, D]


class TokenEmbed(nnx.Module):
    """ids int32 [B, L] → [B, L, D]."""

    def __init__(self, vocab_size: int, width: int, *, dtype: Dtype, rngs: nnx.Rngs):
        init = nnx.with_partitioning(nnx.initializers.normal(0.02), ("vocab", "embed"))
        self.embedding = nnx.Param(init(params_key(rngs), (vocab_size, width), jnp.float32))
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        # FSDP: gather the table's embed dim first, so the lookup's output comes out sharded
        # over the batch like `ids` (otherwise XLA reshards it by full rematerialisation).
        table = sharding.constrain(self.embedding[...], ("vocab", None))  # [V, D]
        out = jnp.take(table, ids, axis=0).astype(self.dtype)  # [B, L, D]
        return sharding.constrain(out, ("batch", "tokens", "embed"))
