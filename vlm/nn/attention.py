"""Multi-head attention with [embed, heads, head_dim] projections (tensor-parallel over heads).

`SelfAttention` (optionally with QK-normalisation and a rotary position hook) and
`CrossAttention` (queries from x, keys and values from a context such as video or text tokens).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from vlm.nn.linear import Dense, DenseOut, Dtype, RMSNorm


# jax.nn.dot_product_attention backends: "xla" (any device; materialises the [N, M] scores) or the fused
# cuDNN flash-attention kernel, "cudnn" (NVIDIA GPUs, bfloat16/float16 only).
ATTENTION_IMPLS = ("xla", "cudnn")

# Self-attention over a sequence split across the `context` mesh axis (vlm/nn/context_parallel.py):
# "none" leaves it to XLA's partitioner; "ulysses" (all-to-all over heads) or "ring" (rotating keys/values).
CONTEXT_PARALLEL_KINDS = ("none", "ulysses", "ring")

# q, k: [B, N, H, Dh] → rotated q, k (e.g. rotary positions); applied after QK-normalisation.
Rotate = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, impl: str, *,
           is_causal: bool = False, context_parallel: str = "none") -> jax.Array:
    """q [B, N, H, Dh], k/v [B, M, H, Dh], mask bool [B, M] of valid keys (None = all) → [B, N, H, Dh].

    context_parallel ("ulysses" | "ring"): self-attention (M = N) whose sequence is split over the
    `context` mesh axis exchanges keys/values explicitly (vlm/nn/context_parallel.py).
    """
    if context_parallel != "none":
        from vlm.nn import context_parallel as cp  # imported here: it calls back into attend

        return cp.attention(q, k, v, mask, impl, kind=context_parallel, is_causal=is_causal)
    if mask is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation=impl)
    if impl == "cudnn":
        # cuDNN's padding mode takes key lengths; our padding is on the right (token id 0).
        lengths = mask.sum(-1).astype(jnp.int32)  # [B]
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, is_causal=is_causal,
                                            implementation="cudnn")
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :], is_causal=is_causal,
                                        implementation=impl)


def _check(width: int, num_heads: int, impl: str, context_parallel: str = "none") -> int:
    if context_parallel not in CONTEXT_PARALLEL_KINDS:
        raise ValueError(f"unknown context_parallel {context_parallel!r}; choose one of "
                         f"{', '.join(CONTEXT_PARALLEL_KINDS)}")
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose one of {', '.join(ATTENTION_IMPLS)}")
    if num_heads <= 0 or width % num_heads:
        raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
    return width // num_heads


class SelfAttention(nnx.Module):
    """context_parallel: how `__call__` attends over a sequence split across the `context` mesh axis
    ("none": XLA's partitioner; "ulysses" or "ring", see vlm/nn/context_parallel.py). `extend`
    (decoding) always attends locally."""

    def __init__(self, width: int, num_heads: int, *, dtype: Dtype, impl: str = "xla", qk_norm: bool = False,
                 context_parallel: str = "none", rngs: nnx.Rngs):
        head_dim = _check(width, num_heads, impl, context_parallel)
        self.impl = impl
        self.context_parallel = context_parallel
        proj = lambda: Dense(width, (num_heads, head_dim), ("embed", "heads", "head_dim"), dtype=dtype, rngs=rngs)
        self.query, self.key, self.value = proj(), proj(), proj()
        self.out = DenseOut((num_heads, head_dim), width, ("heads", "head_dim", "embed"), dtype=dtype, rngs=rngs)
        # QK-normalisation (ViT-22B, SD3, Wan): RMSNorm of each head's queries and keys bounds the logits.
        self.query_norm = RMSNorm(head_dim, "head_dim", dtype=dtype, rngs=rngs) if qk_norm else None
        self.key_norm = RMSNorm(head_dim, "head_dim", dtype=dtype, rngs=rngs) if qk_norm else None

    def _project(self, x: jax.Array, rotate: Rotate | None) -> tuple[jax.Array, jax.Array, jax.Array]:
        q, k, v = self.query(x), self.key(x), self.value(x)  # [B, N, H, Dh]
        if self.query_norm is not None:
            q, k = self.query_norm(q), self.key_norm(k)
        if rotate is not None:
            q, k = rotate(q, k)
        return q, k, v

    def __call__(self, x: jax.Array, mask: jax.Array | None = None, *, rotate: Rotate | None = None,
                 is_causal: bool = False) -> jax.Array:
        """x: [B, N, D]; mask: bool [B, N] of valid keys (None = all). Returns [B, N, D]."""
        q, k, v = self._project(x, rotate)
        return self.out(attend(q, k, v, mask, self.impl, is_causal=is_causal,
                               context_parallel=self.context_parallel))

    def extend(self, x: jax.Array, cache: tuple[jax.Array, jax.Array], index: jax.Array, *,
               rotate: Rotate | None = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Causal attention of new tokens against a key/value cache (autoregressive decoding).

        x [B, N, D]: the tokens at positions index .. index+N-1; cache: (keys, values) [B, S, H, Dh]
        holding positions < index (later slots are ignored); index: int32 scalar. `rotate`, if given,
        must rotate for positions index .. index+N-1. Returns ([B, N, D], the cache with the new
        positions written). Equals `__call__(..., is_causal=True)` on the whole prefix, row for row.
        """
        q, k, v = self._project(x, rotate)
        keys = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), index, axis=1)
        values = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), index, axis=1)
        n, s = x.shape[1], keys.shape[1]
        visible = jnp.arange(s)[None, :] <= index + jnp.arange(n)[:, None]  # [N, S]: key position ≤ query position
        # One query per step: the XLA path (a fused flash kernel gains nothing at N=1 and wants no mask).
        out = jax.nn.dot_product_attention(q, keys.astype(q.dtype), values.astype(q.dtype),
                                           mask=visible[None, None], implementation="xla")
        return self.out(out), (keys, values)


class CrossAttention(nnx.Module):
    """Queries from x [B, N, D]; keys and values from a context [B, M, Dc] (video or text tokens)."""

    def __init__(self, width: int, context_width: int, num_heads: int, *, dtype: Dtype, impl: str = "xla",
                 qk_norm: bool = False, rngs: nnx.Rngs):
        head_dim = _check(width, num_heads, impl)
        self.impl = impl
        self.query = Dense(width, (num_heads, head_dim), ("embed", "heads", "head_dim"), dtype=dtype, rngs=rngs)
        kv = lambda: Dense(context_width, (num_heads, head_dim), ("embed", "heads", "head_dim"), dtype=dtype, rngs=rngs)
        self.key, self.value = kv(), kv()
        self.out = DenseOut((num_heads, head_dim), width, ("heads", "head_dim", "embed"), dtype=dtype, rngs=rngs)
        self.query_norm = RMSNorm(head_dim, "head_dim", dtype=dtype, rngs=rngs) if qk_norm else None
        self.key_norm = RMSNorm(head_dim, "head_dim", dtype=dtype, rngs=rngs) if qk_norm else None

    def project_context(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
        """context [B, M, Dc] → keys, values [B, M, H, Dh]; computed once and reused (e.g. while decoding)."""
        k, v = self.key(context), self.value(context)
        if self.key_norm is not None:
            k = self.key_norm(k)
        return k, v

    def __call__(self, x: jax.Array, context: jax.Array | tuple[jax.Array, jax.Array],
                 context_mask: jax.Array | None = None, *, impl: str | None = None) -> jax.Array:
        """x [B, N, D]; context [B, M, Dc] or its projected (keys, values); context_mask bool [B, M]. → [B, N, D].

        impl overrides the module's attention implementation (decoding uses "xla": one query per step).
        """
        k, v = context if isinstance(context, tuple) else self.project_context(context)
        q = self.query(x)  # [B, N, H, Dh]
        if self.query_norm is not None:
            q = self.query_norm(q)
        return self.out(attend(q, k, v, context_mask, impl or self.impl))
