"""Transformer feed-forward block, with the GELU variant chosen by name."""

from __future__ import annotations

import jax
from flax import nnx

from vlm.nn.linear import Dense, Dtype

# The GELUs public checkpoints use: tanh approximation (vlm's default; SigLIP's "gelu_pytorch_tanh"),
# exact erf GELU, and OpenAI CLIP's x * sigmoid(1.702 x).
ACTIVATIONS = {
    "gelu_tanh": jax.nn.gelu,
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def check_activation(name: str) -> None:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")


class Mlp(nnx.Module):
    def __init__(self, width: int, hidden: int, *, dtype: Dtype, activation: str = "gelu_tanh", rngs: nnx.Rngs):
        check_activation(activation)
        self.up = Dense(width, hidden, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.down = Dense(hidden, width, ("mlp", "embed"), dtype=dtype, rngs=rngs)
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(ACTIVATIONS[self.activation](self.up(x)))  # [..., D] → [..., F] → [..., D]
