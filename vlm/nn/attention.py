"""Multi-head self-attention with [embed, heads, head_dim] projections (tensor-parallel over heads)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vlm.nn.linear import Dense, DenseOut, Dtype


# jax.nn.dot_product_attention backends: "xla" (any device; materialises the [N, N] scores) or the fused
# cuDNN flash-attention kernel, "cudnn" (NVIDIA GPUs, bfloat16/float16 only).
ATTENTION_IMPLS = ("xla", "cudnn")


class SelfAttention(nnx.Module):
    def __init__(self, width: int, num_heads: int, *, dtype: Dtype, impl: str = "xla", rngs: nnx.Rngs):
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention implementation {impl!r}; choose one of {', '.join(ATTENTION_IMPLS)}")
        self.impl = impl
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        head_dim = width // num_heads
        proj = lambda: Dense(width, (num_heads, head_dim), ("embed", "heads", "head_dim"), dtype=dtype, rngs=rngs)
        self.query, self.key, self.value = proj(), proj(), proj()
        self.out = DenseOut((num_heads, head_dim), width, ("heads", "head_dim", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """x: [B, N, D]; mask: bool [B, N] of valid keys (None = all). Returns [B, N, D]."""
        q, k, v = self.query(x), self.key(x), self.value(x)  # [B, N, H, Dh]
        if mask is None:
            y = jax.nn.dot_product_attention(q, k, v, implementation=self.impl)  # [B, N, H, Dh]
        elif self.impl == "cudnn":
            # cuDNN's padding mode takes key lengths; our padding is on the right (token id 0).
            lengths = mask.sum(-1).astype(jnp.int32)  # [B]
            y = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="cudnn")
        else:
            y = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :], implementation=self.impl)
        return self.out(y)
