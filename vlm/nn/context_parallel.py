"""Context parallelism: self-attention over a sequence split across the mesh's `context` axis.

Activations [B, N, D] of long videos are split along N (the rules map `tokens → context`). Every
op but attention is local to a token; attention needs all N keys. Two exchanges, chosen by
`model.context_parallel` (a plain XLA partition of the attention is the default, "none"):

  ulysses  (DeepSpeed-Ulysses): an all-to-all turns q, k, v [B, N/c, H, Dh] into [B, N, H/c, Dh]
           (whole sequence, a slice of the heads), attention runs locally with the configured
           kernel, and a second all-to-all turns the output back. Needs heads divisible by
           context × tensor. Two all-to-alls of the activations per layer; the [N, N] scores of H/c
           heads live on each device.
  ring     (Ring Attention, Liu et al. 2023): queries stay; key/value chunks (and their padding mask)
           travel around the context ring with `ppermute`, c steps. Each step attends the local
           queries to one chunk and folds the result into a running softmax (max and sum in
           float32), so each device only ever holds [N/c, N/c] scores. Works for any head count;
           its local attention is the XLA einsum (the configured kernel is not used).

Both run inside `jax.shard_map` over the whole mesh: batch over the rules' `batch` axes, sequence over
the `tokens` axes (`context`), heads over the `heads` axes (`tensor`). Outside a mesh, or when the
sequence is not split (context = 1), they are plain attention.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from vlm import sharding
from vlm.nn.attention import CONTEXT_PARALLEL_KINDS, attend

QKV_AXES = ("batch", "tokens", "heads", "head_dim")  # logical axes of q, k, v [B, N, H, Dh]


def _axes(entry) -> tuple[str, ...]:
    """A PartitionSpec entry (None, a mesh axis, or a tuple of them) as a tuple of mesh axes."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _fit(axes: tuple[str, ...], size: int, mesh) -> tuple[str, ...] | None:
    """The mesh axes of one dimension, or None (replicated) when they do not split its size evenly."""
    ways = math.prod(mesh.shape[a] for a in axes)
    return axes if axes and size % ways == 0 else None


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, impl: str, *, kind: str,
              is_causal: bool = False) -> jax.Array:
    """Self-attention with `attend`'s contract, exchanging keys/values over the context axis.

    q, k, v [B, N, H, Dh] (N split over the mesh axes the rules give `tokens`), mask bool [B, N] of
    valid keys (None = all) → [B, N, H, Dh].
    """
    if kind not in CONTEXT_PARALLEL_KINDS:
        raise ValueError(f"unknown context_parallel {kind!r}; choose one of {', '.join(CONTEXT_PARALLEL_KINDS)}")
    if kind == "none" or not sharding.active():
        return attend(q, k, v, mask, impl, is_causal=is_causal)
    if q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"context-parallel attention is self-attention: q, k, v must have one shape, got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    mesh = jax.sharding.get_abstract_mesh()
    spec = sharding.logical_to_mesh_spec(QKV_AXES)
    seq = _axes(spec[1])
    c = math.prod(mesh.shape[a] for a in seq)
    if c == 1:
        return attend(q, k, v, mask, impl, is_causal=is_causal)
    b, n, h, _ = q.shape
    if n % c:
        raise ValueError(f"context_parallel={kind!r}: the sequence of {n} tokens does not split over the context "
                         f"axis ({'x'.join(seq)}={c}); choose a clip size whose token count divides by {c} "
                         f"or set config.mesh.context=1")
    batch, heads = _fit(_axes(spec[0]), b, mesh), _fit(_axes(spec[2]), h, mesh)
    if kind == "ulysses":
        local_heads = h // math.prod(mesh.shape[a] for a in heads or ())
        if local_heads % c:
            raise ValueError(f"context_parallel='ulysses' needs the heads per device ({local_heads} = {h} heads / "
                             f"tensor) divisible by the context axis ({c}); use context_parallel='ring' or change "
                             f"num_heads / config.mesh")
    qkv_spec = P(batch, seq, heads, None)
    axis = seq if len(seq) > 1 else seq[0]
    if kind == "ulysses":
        body = lambda q, k, v, mask: _ulysses(q, k, v, mask, axis=axis, impl=impl, is_causal=is_causal)
        mask_spec = P(batch, None)  # every device attends over the whole sequence
    else:
        body = lambda q, k, v, mask: _ring(q, k, v, mask, axis=axis, size=c, is_causal=is_causal)
        mask_spec = P(batch, seq)  # each key chunk travels with its mask
    run = jax.shard_map(body, in_specs=(qkv_spec, qkv_spec, qkv_spec, None if mask is None else mask_spec),
                        out_specs=qkv_spec)
    return run(q, k, v, mask)


def _ulysses(q, k, v, mask, *, axis, impl: str, is_causal: bool) -> jax.Array:
    """Per device: q, k, v [b, n/c, h, Dh], mask [b, n] → [b, n/c, h, Dh]."""
    # Scatter heads, gather sequence: chunk i of the heads goes to device i; the received sequence
    # chunks are concatenated in device order, i.e. in token order.
    to_heads = lambda x: lax.all_to_all(x, axis, split_axis=2, concat_axis=1, tiled=True)  # [b, n, h/c, Dh]
    out = attend(to_heads(q), to_heads(k), to_heads(v), mask, impl, is_causal=is_causal)  # [b, n, h/c, Dh]
    return lax.all_to_all(out, axis, split_axis=1, concat_axis=2, tiled=True)  # [b, n/c, h, Dh]


def _ring(q, k, v, mask, *, axis, size: int, is_causal: bool) -> jax.Array:
    """Per device: q, k, v [b, n, h, Dh] (n = N/c), mask [b, n] of this key chunk → [b, n, h, Dh].

    Online softmax over the c key chunks, in float32: running max m and sum l [b, n, h], unnormalised
    output o [b, n, h, Dh]. Each step is rematerialised in the backward pass (only the carries are kept:
    no [n, n] scores outlive their step).
    """
    n, dh = q.shape[1], q.shape[-1]
    me = lax.axis_index(axis)
    scale = jnp.float32(dh ** -0.5)
    low = jnp.finfo(jnp.float32).min  # finite: a fully masked chunk must not give inf - inf
    precision = lax.DotAlgorithmPreset.BF16_BF16_F32 if q.dtype == jnp.bfloat16 else None
    ring = [(i, (i + 1) % size) for i in range(size)]  # device i sends its chunk to i + 1

    def block(step, k, v, mask):
        """Scores of the local queries against the chunk that started on device (me − step)."""
        s = jnp.einsum("bnhd,bmhd->bnhm", q, k, precision=precision, preferred_element_type=jnp.float32) * scale
        if mask is not None:
            s = jnp.where(mask[:, None, None, :], s, low)
        if is_causal:
            source = (me - step) % size
            q_pos = me * n + jnp.arange(n)
            k_pos = source * n + jnp.arange(n)
            s = jnp.where((k_pos[None, :] <= q_pos[:, None])[None, :, None, :], s, low)
        return s  # [b, n, h, m] float32

    def fold(carry, s, v):
        o, m, l = carry
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None])  # [b, n, h, m]
        correction = jnp.exp(m - m_new)
        pv = jnp.einsum("bnhm,bmhd->bnhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return o * correction[..., None] + pv, m_new, l * correction + p.sum(-1)

    @jax.checkpoint
    def first(k, v, mask):  # the local chunk: starts the running max and sum
        s = block(0, k, v, mask)
        m = s.max(-1)
        p = jnp.exp(s - m[..., None])
        return jnp.einsum("bnhm,bmhd->bnhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32), m, p.sum(-1)

    carry = first(k, v, mask)

    @jax.checkpoint
    def step_fn(state, step):
        carry, k, v, mask = state
        k, v = lax.ppermute(k, axis, ring), lax.ppermute(v, axis, ring)
        mask = None if mask is None else lax.ppermute(mask, axis, ring)
        return (fold(carry, block(step, k, v, mask), v), k, v, mask), None

    (carry, *_), _ = lax.scan(step_fn, (carry, k, v, mask), jnp.arange(1, size))
    o, _, l = carry
    return (o / l[..., None]).astype(q.dtype)
