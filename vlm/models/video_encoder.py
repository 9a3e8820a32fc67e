"""Video transformer: tubelet embedding, space/time positions, joint or divided attention.

Separate temporal [T', D] and spatial [S, D] position tables (Frozen in Time), so an
image (T=1, one temporal position) and a clip share one set of weights.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from vlm.errors import ConfigError
from vlm.nn.embeddings import LearnedPositions, TubeletEmbed
from vlm.nn.transformer import Encoder

# ViT sizes (width, depth, heads, mlp): "B" with patch 16 is ViT-B/16.
VARIANTS: Mapping[str, dict] = {
    "Ti": dict(width=192, depth=12, num_heads=3, mlp_dim=768),
    "S": dict(width=384, depth=12, num_heads=6, mlp_dim=1536),
    "B": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
    "L": dict(width=1024, depth=24, num_heads=16, mlp_dim=4096),
    "H": dict(width=1280, depth=32, num_heads=16, mlp_dim=5120),
}


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
        rngs: nnx.Rngs,
    ):
        if attention not in ("joint", "divided"):
            raise ValueError(f"unknown video attention {attention!r}; choose 'joint' or 'divided'")
        t, p, q = tubelet
        self.attention = attention
        self.embed = TubeletEmbed(tubelet, width, dtype=dtype, rngs=rngs)
        self.temporal_pos = LearnedPositions(-(-num_frames // t), width, "frames", rngs=rngs)
        self.spatial_pos = LearnedPositions((resolution // p) * (resolution // q), width, "tokens", rngs=rngs)
        self.encoder = Encoder(width, depth, num_heads, mlp_dim, block=attention, remat=remat, dtype=dtype, attention_impl=attention_impl, rngs=rngs)
        self.width = width

    def __call__(self, video: jax.Array) -> jax.Array:
        """video uint8 [B, T, H, W, 3] → tokens [B, T'*S, D]."""
        x = self.embed(video)  # [B, T', S, D]
        b, t, s, d = x.shape
        x = x + self.temporal_pos(t)[None, :, None, :].astype(x.dtype) + self.spatial_pos(s)[None, None].astype(x.dtype)
        if self.attention == "divided":
            x = self.encoder(x, logical_axes=("batch", "frames", "tokens", "embed"))
        else:
            x = self.encoder(x.reshape(b, t * s, d))
        return x.reshape(b, t * s, d)


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
        rngs=rngs,
    )
