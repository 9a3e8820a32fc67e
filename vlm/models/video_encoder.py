"""Video transformer: tubelet embedding, space/time positions, joint or divided attention.

Separate temporal [T', D] and spatial [S, D] position tables (Frozen in Time), so an
image (T=1, one temporal position) and a clip share one set of weights.

Pooling to one vector (`pooled`): the mean of all tokens (default); "cls", a learned class
token in every frame (CLIP; with joint attention a static clip is T' copies of its image's
sequence, so it pools to the image's vector); or "map", SigLIP's multihead attention-pooling
head. `pre_norm` adds CLIP's LayerNorm between the embeddings and the blocks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vlm import sharding
from vlm.errors import ConfigError
from vlm.nn.attention import CONTEXT_PARALLEL_KINDS, CrossAttention, SelfAttention
from vlm.nn.embeddings import IMAGENET_MEAN, IMAGENET_STD, LearnedPositions, TubeletEmbed
from vlm.nn.linear import LayerNorm
from vlm.nn.mlp import Mlp
from vlm.nn.rng import params_key
from vlm.nn.transformer import Encoder

POOLS = ("mean", "cls", "map")
# Optional `config.model.video` keys passed through to VideoEncoder (absent: its defaults).
VIDEO_OPTIONS = ("pool", "pre_norm", "norm_eps", "activation", "rgb_mean", "rgb_std", "scan_layers")

# ViT sizes (width, depth, heads, mlp): "B" with patch 16 is ViT-B/16.
VARIANTS: Mapping[str, dict] = {
    "Ti": dict(width=192, depth=12, num_heads=3, mlp_dim=768),
    "S": dict(width=384, depth=12, num_heads=6, mlp_dim=1536),
    "B": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
    "L": dict(width=1024, depth=24, num_heads=16, mlp_dim=4096),
    "H": dict(width=1280, depth=32, num_heads=16, mlp_dim=5120),
}


class MapHead(nnx.Module):
    """Multihead attention pooling (big_vision / SigLIP "MAP"): a learned probe attends to the tokens,
    then probe + MLP(LN(probe)). tokens [B, N, D] → [B, D]."""

    def __init__(self, width: int, num_heads: int, mlp_dim: int, *, dtype, attention_impl: str = "xla",
                 norm_eps: float = 1e-6, activation: str = "gelu_tanh", rngs: nnx.Rngs):
        init = nnx.with_partitioning(nnx.initializers.normal(0.02), ("tokens", "embed"))
        self.probe = nnx.Param(init(params_key(rngs), (1, width), jnp.float32))
        self.attn = CrossAttention(width, width, num_heads, dtype=dtype, impl=attention_impl, rngs=rngs)
        self.norm = LayerNorm(width, dtype=dtype, eps=norm_eps, rngs=rngs)
        self.mlp = Mlp(width, mlp_dim, dtype=dtype, activation=activation, rngs=rngs)
        self.dtype = dtype

    def __call__(self, tokens: jax.Array) -> jax.Array:
        probe = jnp.broadcast_to(self.probe[...].astype(self.dtype), (tokens.shape[0], *self.probe[...].shape))
        x = self.attn(probe, tokens)  # [B, 1, D]
        x = x + self.mlp(self.norm(x))
        return x[:, 0]


class VideoEncoder(nnx.Module):
    def __init__(
        self,
        *,
        num_frames: int,
        resolution: int,
        tubelet: tuple[int, int, int],
        width: int,
        depth: int,
        num_heads: int,
        mlp_dim: int,
        attention: str = "joint",
        remat: str = "none",
        dtype=jnp.float32,
        attention_impl: str = "xla",
        pool: str = "mean",
        pre_norm: bool = False,
        norm_eps: float = 1e-6,
        activation: str = "gelu_tanh",
        rgb_mean: Sequence[float] = IMAGENET_MEAN,
        rgb_std: Sequence[float] = IMAGENET_STD,
        context_parallel: str = "none",
        scan_layers: bool = False,
        rngs: nnx.Rngs,
    ):
        if attention not in ("joint", "divided"):
            raise ValueError(f"unknown video attention {attention!r}; choose 'joint' or 'divided'")
        if pool not in POOLS:
            raise ValueError(f"unknown video pooling {pool!r}; choose one of {', '.join(POOLS)}")
        if context_parallel not in CONTEXT_PARALLEL_KINDS:
            raise ValueError(f"unknown context_parallel {context_parallel!r}; choose one of {', '.join(CONTEXT_PARALLEL_KINDS)}")
        if context_parallel != "none" and attention != "joint":
            raise ValueError(f"context_parallel={context_parallel!r} needs attention='joint'; divided attention's "
                             f"short sequences are partitioned by XLA (use context_parallel='none')")
        t, p, q = tubelet
        self.attention = attention
        self.pool = pool
        self.embed = TubeletEmbed(tubelet, width, dtype=dtype, rgb_mean=rgb_mean, rgb_std=rgb_std, rngs=rngs)
        # One learned token per frame; its spatial position is folded in (CLIP's class_embedding + position 0).
        cls_init = nnx.with_partitioning(nnx.initializers.normal(0.02), ("embed",))
        self.cls_token = nnx.Param(cls_init(params_key(rngs), (width,), jnp.float32)) if pool == "cls" else None
        self.temporal_pos = LearnedPositions(-(-num_frames // t), width, "frames", rngs=rngs)
        self.spatial_pos = LearnedPositions((resolution // p) * (resolution // q), width, "tokens", rngs=rngs)
        self.pre_norm = LayerNorm(width, dtype=dtype, eps=norm_eps, rngs=rngs) if pre_norm else None
        self.encoder = Encoder(width, depth, num_heads, mlp_dim, block=attention, remat=remat, dtype=dtype,
                               attention_impl=attention_impl, norm_eps=norm_eps, activation=activation,
                               scan_layers=scan_layers, rngs=rngs)
        self.head = MapHead(width, num_heads, mlp_dim, dtype=dtype, attention_impl=attention_impl, norm_eps=norm_eps,
                            activation=activation, rngs=rngs) if pool == "map" else None
        # Joint attention over all T'*S tokens, split over the context axis. (Set on the encoder's attention
        # layers here until Encoder takes the option itself.)
        if context_parallel != "none":
            for _, module in nnx.iter_modules(self.encoder):
                if isinstance(module, SelfAttention):
                    module.context_parallel = context_parallel
        self.width = width

    def frames(self, video: jax.Array) -> jax.Array:
        """video uint8 [B, T, H, W, 3] → tokens per tubelet [B, T', S, D] (S+1 with a class token first)."""
        x = self.embed(video)  # [B, T', S, D]
        b, t, s, d = x.shape
        temporal = self.temporal_pos(t)[None, :, None, :].astype(x.dtype)  # [1, T', 1, D]
        x = x + temporal + self.spatial_pos(s)[None, None].astype(x.dtype)
        if self.cls_token is not None:
            cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, t, 1, d)) + temporal
            x = jnp.concatenate([cls, x], axis=2)  # [B, T', 1+S, D]
            s += 1
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        if self.attention == "divided":
            return self.encoder(x, logical_axes=("batch", "frames", "tokens", "embed"))
        # [B, T'*S, D], split over the context axis from the first block on
        x = sharding.constrain(x.reshape(b, t * s, d), ("batch", "tokens", "embed"))
        return self.encoder(x).reshape(b, t, s, d)

    def __call__(self, video: jax.Array) -> jax.Array:
        """video uint8 [B, T, H, W, 3] → tokens [B, T'*S, D] (T'*(S+1) with class tokens)."""
        x = self.frames(video)
        b, t, s, d = x.shape
        return x.reshape(b, t * s, d)

    def pooled(self, video: jax.Array) -> jax.Array:
        """video uint8 [B, T, H, W, 3] → one float32 vector per clip [B, D]."""
        if self.pool == "cls":
            return self.frames(video)[:, :, 0].astype(jnp.float32).mean(1)  # mean of the frames' class tokens
        x = self(video)  # [B, N, D]
        if self.pool == "map":
            return self.head(x).astype(jnp.float32)
        return x.astype(jnp.float32).mean(1)


def check_config(config) -> None:
    """One-line ConfigErrors for the video tower's keys of a run config (before anything compiles)."""
    t, p, q = config.model.video.tubelet
    if config.data.resolution % p or config.data.resolution % q:
        raise ConfigError(
            f"config.data.resolution={config.data.resolution} is not divisible by the patch size {p}x{q} "
            f"(config.model.video.tubelet); pick a multiple of {p}"
        )
    if config.model.video.attention not in ("joint", "divided"):
        raise ConfigError(f"config.model.video.attention={config.model.video.attention!r} is unknown; use joint or divided")


def tower_options(tower_config, names) -> dict:
    """The optional keys `names` present in a tower's config (rgb_* as tuples); absent ones keep the
    constructor's defaults, so a config.json written before an option existed still builds."""
    return {k: tuple(tower_config[k]) if k.startswith("rgb_") else tower_config[k] for k in names if k in tower_config}


def from_config(config, rngs: nnx.Rngs) -> VideoEncoder:
    """The video tower of a run config: `model.video` sizes, `data` frames and resolution, and the
    model's dtype, remat and attention kernel. Every task with a video tower builds it here, so its
    parameters (`video/...`) are the same in every family and one run's tower loads into another."""
    m, d = config.model, config.data
    return VideoEncoder(
        num_frames=d.num_frames,
        resolution=d.resolution,
        tubelet=tuple(m.video.tubelet),
        width=m.video.width,
        depth=m.video.depth,
        num_heads=m.video.num_heads,
        mlp_dim=m.video.mlp_dim,
        attention=m.video.attention,
        remat=m.remat,
        dtype=jnp.dtype(m.dtype),
        attention_impl=m.attention_impl,
        context_parallel=m.get("context_parallel", "none"),
        **tower_options(m.video, VIDEO_OPTIONS),
        rngs=rngs,
    )
