"""Pre-LN autoregressive text-decoder blocks: causal self-attention, optional cross-attention, MLP.

Two ways through a block, equal row for row:
  `__call__`: a whole (teacher-forced) sequence at once, causal mask;
  `extend`:   new tokens against a key/value cache (decoding), see SelfAttention.extend.
A block without cross-attention (`context_width=None`) is a CoCa "unimodal" text layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vlm import sharding
from vlm.nn.attention import CrossAttention, SelfAttention
from vlm.nn.linear import Dtype, LayerNorm
from vlm.nn.mlp import Mlp
from vlm.nn.transformer import REMAT_POLICIES, check_remat

# Keys/values of one attention layer: ([B, S, H, Dh], [B, S, H, Dh]).
KV = tuple[jax.Array, jax.Array]
KV_AXES = ("batch", "tokens", "heads", "head_dim")
X_AXES = ("batch", "tokens", "embed")


class DecoderBlock(nnx.Module):
    """x + SelfAttn(LN(x)) [causal], then x + CrossAttn(LN(x), context) [if any], then x + MLP(LN(x))."""

    def __init__(self, width: int, num_heads: int, mlp_dim: int, *, context_width: int | None, dtype: Dtype,
                 attention_impl: str = "xla", rngs: nnx.Rngs):
        self.norm1 = LayerNorm(width, dtype=dtype, rngs=rngs)
        self.attn = SelfAttention(width, num_heads, dtype=dtype, impl=attention_impl, rngs=rngs)
        if context_width is None:
            self.norm_cross = self.cross = None
        else:
            self.norm_cross = LayerNorm(width, dtype=dtype, rngs=rngs)
            self.cross = CrossAttention(width, context_width, num_heads, dtype=dtype, impl=attention_impl, rngs=rngs)
        self.norm2 = LayerNorm(width, dtype=dtype, rngs=rngs)
        self.mlp = Mlp(width, mlp_dim, dtype=dtype, rngs=rngs)
        self.num_heads, self.head_dim = num_heads, width // num_heads

    def _cross_and_mlp(self, x: jax.Array, context: jax.Array | KV | None, impl: str | None = None) -> jax.Array:
        if self.cross is not None:
            x = x + self.cross(self.norm_cross(x), context, impl=impl)
        return x + self.mlp(self.norm2(x))

    def __call__(self, x: jax.Array, context: jax.Array | KV | None = None) -> jax.Array:
        """x [B, N, D]; context [B, M, Dc] or its projected (keys, values). Returns [B, N, D]."""
        x = x + self.attn(self.norm1(x), is_causal=True)
        return self._cross_and_mlp(x, context)

    def extend(self, x: jax.Array, cache: KV, index: jax.Array, context: KV | None) -> tuple[jax.Array, KV]:
        """x [B, N, D] at positions index..index+N-1; cache [B, S, H, Dh] ×2; context: projected (k, v)."""
        y, cache = self.attn.extend(self.norm1(x), cache, index)
        cache = tuple(sharding.constrain(c, KV_AXES) for c in cache)
        return self._cross_and_mlp(x + y, context, impl="xla"), cache  # a few queries: no fused kernel


def run_blocks(blocks: Sequence[DecoderBlock], x: jax.Array, context, remat: str) -> jax.Array:
    """Teacher forcing through a stack: x [B, N, D] → [B, N, D], activations constrained between blocks."""
    check_remat(remat)
    apply = lambda blk, x, context: blk(x, context)
    if remat != "none":
        apply = nnx.remat(apply, policy=REMAT_POLICIES[remat])
    for blk in blocks:
        x = sharding.constrain(apply(blk, x, context), X_AXES)
    return x


def empty_cache(blocks: Sequence[DecoderBlock], batch: int, max_len: int, dtype) -> list[KV]:
    """Zeroed self-attention keys/values [B, max_len, H, Dh] for each block."""
    def zeros(blk):
        return sharding.constrain(jnp.zeros((batch, max_len, blk.num_heads, blk.head_dim), dtype), KV_AXES)
    return [(zeros(blk), zeros(blk)) for blk in blocks]
