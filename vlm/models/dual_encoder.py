"""Video-text dual encoder: two towers, each pooled (`VideoEncoder.pooled`, `TextEncoder.pooled`),
projected into one normalised space.

Projections: "linear" (default, no bias), "linear_bias" (SigLIP's text head) or "none" (SigLIP's
image tower, whose pooled vector is the embedding; then the tower's width must be embed_dim).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from vlm.models.text_encoder import TextEncoder, masked_mean  # noqa: F401  (masked_mean: re-exported)
from vlm.models.video_encoder import VideoEncoder
from vlm.nn.linear import Dense

PROJECTIONS = ("linear", "linear_bias", "none")


def l2_normalize(x: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), -1, keepdims=True), 1e-12))


def _projection(kind: str, width: int, embed_dim: int, tower: str, *, dtype, rngs: nnx.Rngs) -> Dense | None:
    if kind not in PROJECTIONS:
        raise ValueError(f"unknown {tower} projection {kind!r}; choose one of {', '.join(PROJECTIONS)}")
    if kind == "none":
        if width != embed_dim:
            raise ValueError(f"{tower} projection 'none' needs the {tower} width ({width}) to equal embed_dim ({embed_dim})")
        return None
    return Dense(width, embed_dim, ("embed", "mlp"), dtype=dtype, use_bias=kind == "linear_bias", rngs=rngs)


class DualEncoder(nnx.Module):
    def __init__(self, video: VideoEncoder, text: TextEncoder, embed_dim: int, *, loss: str, dtype,
                 video_projection: str = "linear", text_projection: str = "linear", rngs: nnx.Rngs):
        self.video = video
        self.text = text
        self.video_proj = _projection(video_projection, video.width, embed_dim, "video", dtype=dtype, rngs=rngs)
        self.text_proj = _projection(text_projection, text.width, embed_dim, "text", dtype=dtype, rngs=rngs)
        # Logit scale and bias, as in CLIP (log(1/0.07)) and SigLIP (log 10, -10).
        scale0, bias0 = (math.log(10.0), -10.0) if loss == "sigmoid" else (math.log(1 / 0.07), 0.0)
        self.logit_scale = nnx.Param(jnp.asarray(scale0, jnp.float32))
        self.logit_bias = nnx.Param(jnp.asarray(bias0, jnp.float32))

    def video_features(self, video: jax.Array) -> jax.Array:
        """uint8 [B, T, H, W, 3] → float32 [B, E], before normalisation (HF's get_image_features)."""
        pooled = self.video.pooled(video)  # [B, D]
        return pooled if self.video_proj is None else self.video_proj(pooled).astype(jnp.float32)

    def text_features(self, tokens: jax.Array) -> jax.Array:
        """int32 [B, L] → float32 [B, E], before normalisation (HF's get_text_features)."""
        pooled = self.text.pooled(tokens)  # [B, D]
        return pooled if self.text_proj is None else self.text_proj(pooled).astype(jnp.float32)

    def embed_video(self, video: jax.Array) -> jax.Array:
        """uint8 [B, T, H, W, 3] → unit-norm float32 [B, E]."""
        return l2_normalize(self.video_features(video))

    def embed_text(self, tokens: jax.Array) -> jax.Array:
        """int32 [B, L] → unit-norm float32 [B, E]."""
        return l2_normalize(self.text_features(tokens))

    def __call__(self, video: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.embed_video(video), self.embed_text(tokens)
