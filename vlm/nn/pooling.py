"""Attentional pooling (CoCa's attentional pooler, big_vision's MAP head without the MLP).

A fixed number of learned queries cross-attend to a variable number of tokens:
[B, M, Dc] → [B, Q, D]. Q = 1 gives one pooled vector (a contrastive embedding);
Q = 256 gives a fixed-size summary of many video tokens for a text decoder to attend to.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vlm import sharding
from vlm.nn.attention import CrossAttention
from vlm.nn.linear import Dtype, LayerNorm
from vlm.nn.rng import params_key


class AttentionPool(nnx.Module):
    def __init__(self, num_queries: int, width: int, context_width: int, num_heads: int, *, dtype: Dtype,
                 attention_impl: str = "xla", rngs: nnx.Rngs):
        if num_queries <= 0:
            raise ValueError(f"AttentionPool needs num_queries ≥ 1, got {num_queries}")
        init = nnx.with_partitioning(nnx.initializers.normal(0.02), ("tokens", "embed"))
        self.queries = nnx.Param(init(params_key(rngs), (num_queries, width), jnp.float32))
        self.attn = CrossAttention(width, context_width, num_heads, dtype=dtype, impl=attention_impl, rngs=rngs)
        self.norm = LayerNorm(width, dtype=dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(self, context: jax.Array, context_mask: jax.Array | None = None) -> jax.Array:
        """context [B, M, Dc] (mask bool [B, M], None = all valid) → [B, Q, D]."""
        q = jnp.broadcast_to(self.queries[...].astype(self.dtype), (context.shape[0], *self.queries[...].shape))
        out = self.norm(self.attn(q, context, context_mask))  # [B, Q, D]
        return sharding.constrain(out, ("batch", "tokens", "embed"))
