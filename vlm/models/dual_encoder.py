"""Video-text dual encoder: two towers, mean pooling, projections into one normalised space."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from vlm.models.text_encoder import TextEncoder
from vlm.models.video_encoder import VideoEncoder
from vlm.nn.linear import Dense


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """x [B, N, D], mask bool [B, N] → [B, D] (float32)."""
    m = mask[..., None].astype(jnp.float32)
    return (x.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)


def l2_normalize(x: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), -1, keepdims=True), 1e-12))


class DualEncoder(nnx.Module):
    def __init__(self, video: VideoEncoder, text: TextEncoder, embed_dim: int, *, loss: str, dtype, rngs: nnx.Rngs):
        self.video = video
        self.text = text
        self.video_proj = Dense(video.width, embed_dim, ("embed", "mlp"), dtype=dtype, use_bias=False, rngs=rngs)
        self.text_proj = Dense(text.width, embed_dim, ("embed", "mlp"), dtype=dtype, use_bias=False, rngs=rngs)
        # Logit scale and bias, as in CLIP (log(1/0.07)) and SigLIP (log 10, -10).
        scale0, bias0 = (math.log(10.0), -10.0) if loss == "sigmoid" else (math.log(1 / 0.07), 0.0)
        self.logit_scale = nnx.Param(jnp.asarray(scale0, jnp.float32))
        self.logit_bias = nnx.Param(jnp.asarray(bias0, jnp.float32))

    def embed_video(self, video: jax.Array) -> jax.Array:
        """uint8 [B, T, H, W, 3] → unit-norm float32 [B, E]."""
        x = self.video(video)  # [B, T'*S, D]
        pooled = x.astype(jnp.float32).mean(1)
        return l2_normalize(self.video_proj(pooled).astype(jnp.float32))

    def embed_text(self, tokens: jax.Array) -> jax.Array:
        """int32 [B, L] → unit-norm float32 [B, E]."""
        x, mask = self.text(tokens)
        return l2_normalize(self.text_proj(masked_mean(x, mask)).astype(jnp.float32))

    def __call__(self, video: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.embed_video(video), self.embed_text(tokens)
