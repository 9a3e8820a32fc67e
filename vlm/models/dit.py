"""Diffusion transformer (DiT) on video latents, Wan2.1-style, predicting the rectified-flow velocity.

latents x_t float [B, t, h, w, c] (channels last), time t float [B] ∈ [0, 1] (1 = pure noise) and
text states context [B, L, Dc] with context_mask bool [B, L] → velocity v = ε − x0, float32
[B, t, h, w, c].

  patchify (pt×ph×pw, default 1×2×2) → Dense → tokens [B, N, D], N = t'·h'·w'
  timestep → sinusoids → MLP → e [B, D];  one shared Dense(silu(e)) → [B, 6, D] for all blocks
  text → Dense → GELU → Dense → [B, L, D]
  each block (per-block learned offsets [6, D] added to the shared modulation):
      x += gate1 · SelfAttn(LN(x)·(1+scale1)+shift1)   3D RoPE over (t, h, w), QK-norm
      x += CrossAttn(LN(x), text)                      QK-norm
      x += gate2 · MLP(LN(x)·(1+scale2)+shift2)
  final: LN(x)·(1+scale)+shift with (shift, scale) = e + learned offsets [2, D] → Dense → unpatchify

Self-attention is over all N tokens (`attention="full"`) or factorised (`"factorised"`): blocks
alternate spatial attention (h'·w' tokens of one frame; even blocks) and temporal attention (t'
tokens at one spatial position; odd blocks), Open-Sora STDiT-style.

Long sequences: the tokens are split over the `context` mesh axis (rule `tokens → context`); full
self-attention then exchanges keys/values as `context_parallel` says ("ulysses" | "ring", see
vlm/nn/context_parallel.py; "none" = XLA's partitioner). The text (short) stays whole on every device
of the context axis, so cross-attention of the split queries to it is local.

`scan_layers=True` stores the blocks stacked ([depth, ...] leaves; factorised: [depth/2, ...] spatial /
temporal pairs) and applies them with one `nnx.scan`: compile time stops growing with depth. The
two layouts convert with `vlm.nn.scan.stack_layers(params, "blocks", group)` / `unstack_layers`,
group = `DiT.layer_group` (1 full, 2 factorised).

Initialisation (adaLN-Zero, DiT): the shared modulation Dense and all offsets are zero, so every
gate is 0; the cross-attention output projection is zero as well (it has no gate, as in Wan), so
every block is exactly the identity at init. The final Dense is zero, so a fresh model outputs
exactly zeros. Gradients still reach the gates, the final Dense and the cross-attention output.

The residual stream is float32 (as in Wan); matmuls run in `dtype`.

Classifier-free guidance: `null_context` [1, Dc] is a learned text state; dropping the text of an
example replaces its whole context by that one state (broadcast to [L, Dc], all positions valid,
which attends exactly like a single null token). See `drop_context` and `guidance_context`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vlm import sharding
from vlm.nn.attention import CrossAttention, SelfAttention
from vlm.nn.linear import Dense, Dtype, LayerNorm
from vlm.nn.mlp import Mlp
from vlm.nn.modulation import TimestepEmbed, modulate, normalize
from vlm.nn.patches import patch_grid, patchify, unpatchify
from vlm.nn.rng import params_key
from vlm.nn import scan
from vlm.nn.rope import grid_positions, rope_angles, rotary, wan_axis_dims
from vlm.nn.transformer import REMAT_POLICIES, check_remat

# (width, depth, heads, mlp). "1.3B" and "14B" are Wan2.1's T2V-1.3B and T2V-14B shapes.
VARIANTS: Mapping[str, dict] = {
    "tiny": dict(width=128, depth=4, num_heads=4, mlp_dim=512),  # CPU-sized
    "S": dict(width=384, depth=12, num_heads=6, mlp_dim=1536),
    "B": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
    "1.3B": dict(width=1536, depth=30, num_heads=12, mlp_dim=8960),
    "14B": dict(width=5120, depth=40, num_heads=40, mlp_dim=13824),
}

ATTENTION_KINDS = ("full", "factorised")
TOKENS = ("batch", "tokens", "embed")  # the video tokens: split over `context` when it is > 1
TEXT = ("batch", None, "embed")  # the text states: whole on every device of the context axis


def zeros_param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None]) -> nnx.Param:
    init = nnx.with_partitioning(nnx.initializers.zeros, tuple(axes))
    return nnx.Param(init(params_key(rngs), tuple(shape), jnp.float32))


class DiTBlock(nnx.Module):
    """One adaLN-Zero block; `attention` ∈ {full, spatial, temporal} picks which tokens attend to each other."""

    def __init__(self, width: int, num_heads: int, mlp_dim: int, *, attention: str, rope_theta: float,
                 qk_norm: bool, dtype: Dtype, attention_impl: str, context_parallel: str = "none", rngs: nnx.Rngs):
        self.attention, self.rope_theta, self.dtype = attention, rope_theta, dtype
        self.rope_dims = wan_axis_dims(width // num_heads)
        self.modulation = zeros_param(rngs, (6, width), (None, "embed"))  # per-block offsets of the shared modulation
        self.self_attn = SelfAttention(width, num_heads, dtype=dtype, impl=attention_impl, qk_norm=qk_norm,
                                       context_parallel=context_parallel, rngs=rngs)
        self.cross_norm = LayerNorm(width, dtype=dtype, rngs=rngs)
        self.cross_attn = CrossAttention(width, width, num_heads, dtype=dtype, impl=attention_impl, qk_norm=qk_norm,
                                         rngs=rngs)
        out = self.cross_attn.out.kernel
        out[...] = jnp.zeros_like(out[...])  # ungated branch: a zero output projection makes it the identity at init
        self.mlp = Mlp(width, mlp_dim, dtype=dtype, rngs=rngs)

    def _self_attention(self, y: jax.Array, grid: tuple[int, int, int]) -> jax.Array:
        """y [B, N, D] on grid (t, h, w) → [B, N, D]; attention within the sequences this block's kind defines."""
        b, n, d = y.shape
        t, h, w = grid
        if self.attention == "full":
            seqs, seq_grid = y, grid  # [B, t*h*w, D]
        elif self.attention == "spatial":
            seqs, seq_grid = y.reshape(b * t, h * w, d), (1, h, w)  # [B*t, h*w, D]
        else:  # temporal
            seqs, seq_grid = y.reshape(b, t, h * w, d).transpose(0, 2, 1, 3).reshape(b * h * w, t, d), (t, 1, 1)
        angles = rope_angles(grid_positions(seq_grid), self.rope_dims, self.rope_theta)  # [seq, Dh/2]
        out = self.self_attn(seqs, rotate=rotary(angles))
        if self.attention == "temporal":
            return out.reshape(b, h * w, t, d).transpose(0, 2, 1, 3).reshape(b, n, d)
        return out.reshape(b, n, d)

    def __call__(self, x: jax.Array, modulation: jax.Array, context: jax.Array, context_mask: jax.Array | None,
                 grid: tuple[int, int, int]) -> jax.Array:
        """x float32 [B, N, D]; modulation float32 [B, 6, D]; context [B, L, D]; context_mask bool [B, L]."""
        mod = (modulation + self.modulation[...])[:, :, None, :]  # [B, 6, 1, D]
        shift1, scale1, gate1, shift2, scale2, gate2 = (mod[:, i] for i in range(6))
        y = modulate(normalize(x), shift1, scale1).astype(self.dtype)
        x = x + gate1 * self._self_attention(y, grid)
        x = x + self.cross_attn(self.cross_norm(x), context, context_mask)
        y = modulate(normalize(x), shift2, scale2).astype(self.dtype)
        return x + gate2 * self.mlp(y)


class DiT(nnx.Module):
    def __init__(
        self,
        *,
        in_channels: int,
        context_width: int,
        width: int,
        depth: int,
        num_heads: int,
        mlp_dim: int,
        patch: Sequence[int] = (1, 2, 2),
        attention: str = "full",
        freq_dim: int = 256,
        rope_theta: float = 10000.0,
        qk_norm: bool = True,
        remat: str = "none",
        dtype: Dtype = jnp.float32,
        attention_impl: str = "xla",
        context_parallel: str = "none",
        scan_layers: bool = False,
        rngs: nnx.Rngs,
    ):
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"unknown DiT attention {attention!r}; choose one of {', '.join(ATTENTION_KINDS)}")
        if len(patch) != 3 or any(int(p) < 1 for p in patch):
            raise ValueError(f"patch must be three positive sizes (pt, ph, pw), got {tuple(patch)}")
        if num_heads <= 0 or width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        check_remat(remat)
        if attention == "factorised" and context_parallel != "none":
            raise ValueError(f"context_parallel={context_parallel!r} needs attention='full'; factorised attention's "
                             f"short sequences are partitioned by XLA (use context_parallel='none')")
        if attention == "factorised" and scan_layers and depth % 2:
            raise ValueError(f"scan_layers with factorised attention scans (spatial, temporal) pairs: depth {depth} "
                             f"must be even")
        wan_axis_dims(width // num_heads)  # the head dim must split over (t, h, w)
        self.patch = tuple(int(p) for p in patch)
        self.in_channels, self.width, self.remat, self.dtype = in_channels, width, remat, dtype
        self.scan_layers = scan_layers
        self.layer_group = 1 if attention == "full" else 2  # blocks per scan step
        patch_features = self.patch[0] * self.patch[1] * self.patch[2] * in_channels
        self.patch_embed = Dense(patch_features, width, ("conv_in", "embed"), dtype=dtype, rngs=rngs)
        self.time_embed = TimestepEmbed(freq_dim, width, rngs=rngs)
        # One projection of the timestep embedding to the 6 block modulations, shared by all blocks (Wan);
        # zero-initialised (adaLN-Zero).
        self.time_modulation = Dense(width, (6, width), ("embed", None, "mlp"), kernel_init=nnx.initializers.zeros,
                                     rngs=rngs)
        text_init = nnx.initializers.normal(0.02)
        self.text_hidden = Dense(context_width, width, ("embed", "mlp"), dtype=dtype, kernel_init=text_init, rngs=rngs)
        self.text_out = Dense(width, width, ("mlp", "embed"), dtype=dtype, kernel_init=text_init, rngs=rngs)
        self.null_context = nnx.Param(
            nnx.with_partitioning(nnx.initializers.normal(0.02), (None, "embed"))(params_key(rngs), (1, context_width),
                                                                                  jnp.float32))
        kinds = ["full"] if attention == "full" else ["spatial", "temporal"]
        block = lambda kind, rngs: DiTBlock(width, num_heads, mlp_dim, attention=kind, rope_theta=rope_theta,
                                            qk_norm=qk_norm, dtype=dtype, attention_impl=attention_impl,
                                            context_parallel=context_parallel, rngs=rngs)
        if not scan_layers:
            self.blocks = nnx.List([block(kinds[i % len(kinds)], rngs) for i in range(depth)])
        elif attention == "full":
            self.blocks = scan.create(lambda rngs: block("full", rngs), depth, rngs)  # leaves [depth, ...]
        else:
            self.blocks = scan.create(lambda rngs: nnx.List([block(kind, rngs) for kind in kinds]), depth // 2, rngs)
        self.head_modulation = zeros_param(rngs, (2, width), (None, "embed"))
        self.head = Dense(width, patch_features, ("embed", "conv_out"), dtype=dtype,
                          kernel_init=nnx.initializers.zeros, rngs=rngs)  # zero: the output is 0 at init

    def num_tokens(self, latent_shape: Sequence[int]) -> int:
        """Tokens of one example with latents (t, h, w[, c]) (e.g. for the resolution-dependent shift)."""
        gt, gh, gw = patch_grid(latent_shape[:3], self.patch)
        return gt * gh * gw

    def drop_context(self, context: jax.Array, context_mask: jax.Array | None,
                     drop: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Replaces the text of examples with drop=True by the learned null text state.

        context [B, L, Dc], context_mask bool [B, L] (None = all valid), drop bool [B] → (context, context_mask).
        """
        if context_mask is None:
            context_mask = jnp.ones(context.shape[:2], bool)
        null = jnp.broadcast_to(self.null_context[...].astype(context.dtype), context.shape[1:])  # [L, Dc]
        context = jnp.where(drop[:, None, None], null[None], context)
        context_mask = jnp.where(drop[:, None], True, context_mask)
        return context, context_mask

    def guidance_context(self, context: jax.Array, context_mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """The text for one batched classifier-free-guidance call: conditional first, null second.

        context [B, L, Dc], context_mask [B, L] → [2B, L, Dc], [2B, L] (see `vlm.sampling.guided`).
        """
        b = context.shape[0]
        if context_mask is None:
            context_mask = jnp.ones(context.shape[:2], bool)
        both = jnp.concatenate([context, context]), jnp.concatenate([context_mask, context_mask])
        return self.drop_context(*both, jnp.arange(2 * b) >= b)

    def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array,
                 context_mask: jax.Array | None = None) -> jax.Array:
        """x [B, t, h, w, c], t [B] (or a scalar), context [B, L, Dc], context_mask bool [B, L] (None = all valid)
        → velocity float32 [B, t, h, w, c]."""
        b, *latent_shape, c = x.shape
        if len(latent_shape) != 3 or c != self.in_channels:
            raise ValueError(f"latents must be [B, t, h, w, {self.in_channels}], got shape {x.shape}")
        grid = patch_grid(latent_shape, self.patch)
        h = self.patch_embed(patchify(x, self.patch)).astype(jnp.float32)  # [B, N, D]
        h = sharding.constrain(h, TOKENS)
        e = self.time_embed(jnp.broadcast_to(t, (b,)))  # [B, D] float32
        modulation = self.time_modulation(jax.nn.silu(e))  # [B, 6, D] float32
        text = self.text_out(jax.nn.gelu(self.text_hidden(context)))  # [B, L, D]
        text = sharding.constrain(text, TEXT)

        if self.scan_layers:
            def step(group, h):  # one block, or one (spatial, temporal) pair
                for blk in group if isinstance(group, nnx.List) else (group,):
                    h = sharding.constrain(blk(h, modulation, text, context_mask, grid), TOKENS)
                return h

            h = scan.apply(self.blocks, step, h, remat=self.remat)
        else:
            apply = lambda blk, h, modulation, text, mask: blk(h, modulation, text, mask, grid)
            if self.remat != "none":
                apply = nnx.remat(apply, policy=REMAT_POLICIES[self.remat])
            for blk in self.blocks:
                h = sharding.constrain(apply(blk, h, modulation, text, context_mask), TOKENS)

        mod = (self.head_modulation[...][None] + e[:, None])[:, :, None, :]  # [B, 2, 1, D]
        shift, scale = mod[:, 0], mod[:, 1]
        out = self.head(modulate(normalize(h), shift, scale).astype(self.dtype))  # [B, N, pt*ph*pw*c]
        return unpatchify(out.astype(jnp.float32), grid, self.patch)
