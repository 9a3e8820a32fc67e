"""Timestep embeddings and adaptive LayerNorm (adaLN) modulation for diffusion transformers.

The timestep embedding and every modulation are computed in float32 whatever the compute
dtype (as in Wan2.1): they scale the whole residual stream, so their rounding matters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vlm.nn.linear import Dense

# Flow-matching time t ∈ [0, 1] is scaled to [0, 1000] before the sinusoids: the frequencies
# 10000^(-i/half) were designed for integer diffusion steps (DDPM, Wan's 1000 training steps).
TIME_SCALE = 1000.0


def timestep_embedding(t: jax.Array, dim: int, *, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal features of t float [B] (in [0, 1]) → float32 [B, dim]: [cos | sin] (Wan2.1's order)."""
    if dim % 2:
        raise ValueError(f"the timestep embedding dimension must be even, got {dim}")
    half = dim // 2
    freqs = max_period ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [half]
    args = (t.astype(jnp.float32) * TIME_SCALE)[:, None] * freqs  # [B, half]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbed(nnx.Module):
    """t float [B] → e float32 [B, D]: sinusoids (freq_dim) → Dense → SiLU → Dense."""

    def __init__(self, freq_dim: int, width: int, *, rngs: nnx.Rngs):
        self.freq_dim = freq_dim
        init = nnx.initializers.normal(0.02)  # Wan2.1's init of its time MLP
        self.hidden = Dense(freq_dim, width, (None, "mlp"), kernel_init=init, rngs=rngs)
        self.out = Dense(width, width, ("mlp", "embed"), kernel_init=init, rngs=rngs)

    def __call__(self, t: jax.Array) -> jax.Array:
        return self.out(jax.nn.silu(self.hidden(timestep_embedding(t, self.freq_dim))))


def normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Parameter-free LayerNorm over the last axis, in float32 (the modulation supplies scale and shift)."""
    return jax.nn.standardize(x.astype(jnp.float32), axis=-1, epsilon=eps)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN: x [B, N, D] · (1 + scale) + shift, with shift/scale [B, 1, D] from the timestep."""
    return x * (1.0 + scale) + shift
