"""Dense layers and norms whose parameters carry logical axis names."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vlm.nn.rng import params_key

Dtype = jnp.dtype | str

default_kernel_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


class Dense(nnx.Module):
    """y = x @ W + b over the last axis. W is [in, *out_shape] with logical axes `axes`.

    Parameters stay float32; inputs and weights are cast to `dtype` for the matmul.
    """

    def __init__(
        self,
        in_features: int,
        out_shape: int | Sequence[int],
        axes: Sequence[str | None],
        *,
        dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        kernel_init=default_kernel_init,
        rngs: nnx.Rngs,
    ):
        out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
        assert len(axes) == 1 + len(out_shape), (axes, out_shape)
        self.dtype = dtype
        self.kernel = nnx.Param(
            nnx.with_partitioning(kernel_init, tuple(axes))(params_key(rngs), (in_features, *out_shape), jnp.float32)
        )
        self.bias = (
            nnx.Param(nnx.with_partitioning(nnx.initializers.zeros, tuple(axes[1:]))(params_key(rngs), out_shape, jnp.float32))
            if use_bias
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        y = jax.lax.dot_general(x.astype(self.dtype), kernel, (((x.ndim - 1,), (0,)), ((), ())))  # [..., *out]
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class DenseOut(nnx.Module):
    """Contracts several trailing axes, e.g. attention output [B, N, H, Dh] @ [H, Dh, D] → [B, N, D]."""

    def __init__(self, in_shape: Sequence[int], out_features: int, axes: Sequence[str | None], *, dtype: Dtype, rngs: nnx.Rngs):
        in_shape = tuple(in_shape)
        self.dtype = dtype
        fan_in_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=tuple(range(len(in_shape))), out_axis=-1)
        self.kernel = nnx.Param(nnx.with_partitioning(fan_in_init, tuple(axes))(params_key(rngs), (*in_shape, out_features), jnp.float32))
        self.bias = nnx.Param(nnx.with_partitioning(nnx.initializers.zeros, (axes[-1],))(params_key(rngs), (out_features,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        k = len(self.kernel[...].shape) - 1
        contract = tuple(range(x.ndim - k, x.ndim))
        y = jax.lax.dot_general(x.astype(self.dtype), self.kernel[...].astype(self.dtype), ((contract, tuple(range(k))), ((), ())))
        return y + self.bias[...].astype(self.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm computed in float32 (stable under bfloat16), output in `dtype`."""

    def __init__(self, features: int, *, dtype: Dtype = jnp.float32, eps: float = 1e-6, rngs: nnx.Rngs):
        self.dtype = dtype
        self.eps = eps
        self.scale = nnx.Param(nnx.with_partitioning(nnx.initializers.ones, ("embed",))(params_key(rngs), (features,), jnp.float32))
        self.bias = nnx.Param(nnx.with_partitioning(nnx.initializers.zeros, ("embed",))(params_key(rngs), (features,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
        return y.astype(self.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis (float32 statistics), with a learned scale whose axis is `axis_name`."""

    def __init__(self, features: int, axis_name: str = "embed", *, dtype: Dtype = jnp.float32, eps: float = 1e-6,
                 rngs: nnx.Rngs):
        self.dtype = dtype
        self.eps = eps
        self.scale = nnx.Param(nnx.with_partitioning(nnx.initializers.ones, (axis_name,))(params_key(rngs), (features,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps) * self.scale[...]
        return y.astype(self.dtype)
