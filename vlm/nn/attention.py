"""Multi-head self-attention with [embed, heads, head_dim] projections (tensor-parallel over heads)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vlm.nn.linear import Dense, DenseOut, Dtype


class SelfAttention(nnx.Module):
    def __init__(self, width: int, num_heads: int, *, dtype: Dtype, rngs: nnx.Rngs):
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        head_dim = width // num_heads
        proj = lambda: Dense(width, (num_heads, head_dim), ("embed", "heads", "head_dim"), dtype=dtype, rngs=rngs)
        self.query, self.key, self.value = proj(), proj(), proj()
        self.out = DenseOut((num_heads, head_dim), width, ("heads", "head_dim", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """x: [B, N, D]; mask: bool [B, N] of valid keys (None = all). Returns [B, N, D]."""
        q, k, v = self.query(x), self.key(x), self.value(x)  # [B, N, H, Dh]
        attn_mask = None if mask is None else mask[:, None, None, :]  # [B, 1, 1(q), N(k)]
        # jax.nn.dot_product_attention picks cuDNN flash attention on GPU when it can.
        y = jax.nn.dot_product_attention(q, k, v, mask=attn_mask)  # [B, N, H, Dh]
        return self.out(y)
