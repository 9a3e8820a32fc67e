"""Pre-LayerNorm transformer blocks, with rematerialisation chosen by policy name.

Options public checkpoints need (defaults are vlm's own): LayerNorm epsilon, the MLP's GELU
variant (`vlm.nn.mlp.ACTIVATIONS`) and a causal mask (CLIP's text tower).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vlm import sharding
from vlm.nn import scan
from vlm.nn.attention import SelfAttention
from vlm.nn.linear import Dtype, LayerNorm
from vlm.nn.mlp import Mlp

# Remat policies by name (MaxText style): what the backward pass may keep instead of recomputing.
REMAT_POLICIES = {
    "none": None,  # no remat: keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only block inputs
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def check_remat(name: str) -> None:
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; choose one of {', '.join(REMAT_POLICIES)}")


class Block(nnx.Module):
    """x + Attn(LN(x)), then x + MLP(LN(x)). x: [B, N, D]. `causal`: token i attends to tokens ≤ i (CLIP text)."""

    def __init__(self, width: int, num_heads: int, mlp_dim: int, *, dtype: Dtype, attention_impl: str = "xla",
                 norm_eps: float = 1e-6, activation: str = "gelu_tanh", causal: bool = False, rngs: nnx.Rngs):
        self.norm1 = LayerNorm(width, dtype=dtype, eps=norm_eps, rngs=rngs)
        self.attn = SelfAttention(width, num_heads, dtype=dtype, impl=attention_impl, rngs=rngs)
        self.norm2 = LayerNorm(width, dtype=dtype, eps=norm_eps, rngs=rngs)
        self.mlp = Mlp(width, mlp_dim, dtype=dtype, activation=activation, rngs=rngs)
        self.causal = causal

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        x = x + self.attn(self.norm1(x), mask, is_causal=self.causal)
        x = x + self.mlp(self.norm2(x))
        return x


class DividedBlock(nnx.Module):
    """Divided space-time attention (TimeSformer / Frozen in Time): temporal, then spatial, then MLP.

    x: [B, T, S, D] (T frames of S spatial tokens).
    """

    def __init__(self, width: int, num_heads: int, mlp_dim: int, *, dtype: Dtype, attention_impl: str = "xla",
                 norm_eps: float = 1e-6, activation: str = "gelu_tanh", causal: bool = False, rngs: nnx.Rngs):
        if causal:
            raise ValueError("divided space-time attention has no causal mode; use block='joint'")
        self.norm_t = LayerNorm(width, dtype=dtype, eps=norm_eps, rngs=rngs)
        self.attn_t = SelfAttention(width, num_heads, dtype=dtype, impl=attention_impl, rngs=rngs)
        self.norm_s = LayerNorm(width, dtype=dtype, eps=norm_eps, rngs=rngs)
        self.attn_s = SelfAttention(width, num_heads, dtype=dtype, impl=attention_impl, rngs=rngs)
        self.norm2 = LayerNorm(width, dtype=dtype, eps=norm_eps, rngs=rngs)
        self.mlp = Mlp(width, mlp_dim, dtype=dtype, activation=activation, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        b, t, s, d = x.shape
        xt = x.transpose(0, 2, 1, 3).reshape(b * s, t, d)  # [B*S, T, D]: attend across time
        xt = xt + self.attn_t(self.norm_t(xt))
        x = xt.reshape(b, s, t, d).transpose(0, 2, 1, 3)
        xs = x.reshape(b * t, s, d)  # [B*T, S, D]: attend across space
        xs = xs + self.attn_s(self.norm_s(xs))
        x = xs.reshape(b, t, s, d)
        return x + self.mlp(self.norm2(x))


class Encoder(nnx.Module):
    """A stack of blocks with a final LayerNorm; activations constrained at block boundaries."""

    def __init__(
        self,
        width: int,
        depth: int,
        num_heads: int,
        mlp_dim: int,
        *,
        block: str = "joint",
        remat: str = "none",
        dtype: Dtype = jnp.float32,
        attention_impl: str = "xla",
        norm_eps: float = 1e-6,
        activation: str = "gelu_tanh",
        causal: bool = False,
        scan_layers: bool = False,
        rngs: nnx.Rngs,
    ):
        check_remat(remat)
        block_cls = {"joint": Block, "divided": DividedBlock}[block]
        make = lambda rngs: block_cls(width, num_heads, mlp_dim, dtype=dtype, attention_impl=attention_impl,
                                      norm_eps=norm_eps, activation=activation, causal=causal, rngs=rngs)
        # scan_layers: the blocks' parameters stacked ([depth, ...] leaves) and applied by one scan, so the
        # program holds one block, not `depth` (vlm/nn/scan.py; convert layouts with scan.stack_layers).
        self.blocks = scan.create(make, depth, rngs) if scan_layers else nnx.List([make(rngs) for _ in range(depth)])
        self.norm = LayerNorm(width, dtype=dtype, eps=norm_eps, rngs=rngs)
        self.remat = remat
        self.scan_layers = scan_layers

    def __call__(self, x: jax.Array, mask: jax.Array | None = None, *, logical_axes=("batch", "tokens", "embed")) -> jax.Array:
        if self.scan_layers:
            step = lambda blk, x: sharding.constrain(blk(x, mask), logical_axes)
            return self.norm(scan.apply(self.blocks, step, x, remat=self.remat))
        apply = lambda blk, x, mask: blk(x, mask)
        if self.remat != "none":
            apply = nnx.remat(apply, policy=REMAT_POLICIES[self.remat])
        for blk in self.blocks:
            x = sharding.constrain(apply(blk, x, mask), logical_axes)
        return self.norm(x)
