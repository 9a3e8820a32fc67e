"""Transformer feed-forward block."""

from __future__ import annotations

import jax
from flax import nnx

from vlm.nn.linear import Dense, Dtype


class Mlp(nnx.Module):
    def __init__(self, width: int, hidden: int, *, dtype: Dtype, rngs: nnx.Rngs):
        self.up = Dense(width, hidden, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.down = Dense(hidden, width, ("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.gelu(self.up(x)))  # [..., D] → [..., F] → [..., D]
