"""Rotary position embeddings (RoPE) over one or more position axes, e.g. 3D (t, h, w) for video latents.

Each position axis owns a contiguous slice of the head dimension and rotates its channel pairs
by `position * theta^(-2i/axis_dim)` (i = pair index within the slice). Pairs are adjacent
channels (2i, 2i+1), as in Wan2.1's complex-number formulation. Because q and k are rotated by
their own positions, q·k depends only on position differences: attention is translation invariant.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from vlm.nn.attention import Rotate


def wan_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Wan2.1's split of a head dimension d between (t, h, w): d − 4⌊d/6⌋, 2⌊d/6⌋, 2⌊d/6⌋ channels."""
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"3D rotary positions need an even head dimension, got {head_dim}; change width / num_heads")
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def grid_positions(grid: Sequence[int]) -> jax.Array:
    """Integer coordinates of a row-major grid, e.g. (t, h, w) → float32 [t*h*w, 3]."""
    axes = jnp.meshgrid(*(jnp.arange(n, dtype=jnp.float32) for n in grid), indexing="ij")
    return jnp.stack([a.reshape(-1) for a in axes], axis=-1)


def rope_angles(positions: jax.Array, axis_dims: Sequence[int], theta: float = 10000.0) -> jax.Array:
    """positions float [N, A] (A axes) and A even channel counts → rotation angles float32 [N, sum(axis_dims)/2]."""
    if positions.shape[-1] != len(axis_dims):
        raise ValueError(f"positions have {positions.shape[-1]} axes but axis_dims has {len(axis_dims)} entries")
    if any(d % 2 for d in axis_dims):
        raise ValueError(f"every rotary axis needs an even number of channels, got {tuple(axis_dims)}")
    angles = []
    for axis, dim in enumerate(axis_dims):
        inv_freq = theta ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)  # [dim/2]
        angles.append(positions[:, axis:axis + 1].astype(jnp.float32) * inv_freq)  # [N, dim/2]
    return jnp.concatenate(angles, axis=-1)


def apply_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
    """x [B, N, H, Dh] rotated pairwise by angles [N, Dh/2] (computed in float32, returned in x's dtype)."""
    b, n, h, d = x.shape
    if angles.shape != (n, d // 2):
        raise ValueError(f"rotary angles of shape {angles.shape} do not fit queries/keys of shape {x.shape}")
    pairs = x.astype(jnp.float32).reshape(b, n, h, d // 2, 2)
    cos, sin = jnp.cos(angles)[None, :, None], jnp.sin(angles)[None, :, None]  # [1, N, 1, Dh/2]
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return rotated.reshape(b, n, h, d).astype(x.dtype)


def rotary(angles: jax.Array) -> Rotate:
    """The `rotate(q, k)` hook of `SelfAttention` for angles [N, Dh/2]."""
    return lambda q, k: (apply_rope(q, angles), apply_rope(k, angles))
