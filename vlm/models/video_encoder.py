"""Video transformer: tubelet embedding, space/time positions, joint or divided attention.

Separate temporal [T', D] and spatial [S, D] position tables (Frozen in Time), so an
image (T=1, one temporal position) and a clip share one set of weights.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from vlm import sharding
from vlm.nn.attention import CONTEXT_PARALLEL_KINDS, SelfAttention
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
        context_parallel: str = "none",
        rngs: nnx.Rngs,
    ):
        if attention not in ("joint", "divided"):
            raise ValueError(f"unknown video attention {attention!r}; choose 'joint' or 'divided'")
        if context_parallel not in CONTEXT_PARALLEL_KINDS:
            raise ValueError(f"unknown context_parallel {context_parallel!r}; choose one of {', '.join(CONTEXT_PARALLEL_KINDS)}")
        if context_parallel != "none" and attention != "joint":
            raise ValueError(f"context_parallel={context_parallel!r} needs attention='joint'; divided attention's "
                             f"short sequences are partitioned by XLA (use context_parallel='none')")
        t, p, q = tubelet
        self.attention = attention
        self.embed = TubeletEmbed(tubelet, width, dtype=dtype, rngs=rngs)
        self.temporal_pos = LearnedPositions(-(-num_frames // t), width, "frames", rngs=rngs)
        self.spatial_pos = LearnedPositions((resolution // p) * (resolution // q), width, "tokens", rngs=rngs)
        self.encoder = Encoder(width, depth, num_heads, mlp_dim, block=attention, remat=remat, dtype=dtype, attention_impl=attention_impl, rngs=rngs)
        # Joint attention over all T'*S tokens, split over the context axis. (Set on the encoder's attention
        # layers here until Encoder takes the option itself.)
        if context_parallel != "none":
            for _, module in nnx.iter_modules(self.encoder):
                if isinstance(module, SelfAttention):
                    module.context_parallel = context_parallel
        self.width = width

    def __call__(self, video: jax.Array) -> jax.Array:
        """video uint8 [B, T, H, W, 3] → tokens [B, T'*S, D]."""
        x = self.embed(video)  # [B, T', S, D]
        b, t, s, d = x.shape
        x = x + self.temporal_pos(t)[None, :, None, :].astype(x.dtype) + self.spatial_pos(s)[None, None].astype(x.dtype)
        if self.attention == "divided":
            x = self.encoder(x, logical_axes=("batch", "frames", "tokens", "embed"))
        else:
            # [B, T'*S, D], split over the context axis from the first block on
            x = self.encoder(sharding.constrain(x.reshape(b, t * s, d), ("batch", "tokens", "embed")))
        return x.reshape(b, t * s, d)
