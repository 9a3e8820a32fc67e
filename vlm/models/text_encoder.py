"""Text transformer over SentencePiece ids (padding id 0), bidirectional with a padding mask."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from vlm.nn.embeddings import LearnedPositions, TokenEmbed
from vlm.nn.transformer import Encoder

# CLIP-style text towers (width, depth, heads, mlp).
VARIANTS: Mapping[str, dict] = {
    "S": dict(width=384, depth=12, num_heads=6, mlp_dim=1536),
    "B": dict(width=512, depth=12, num_heads=8, mlp_dim=2048),
    "L": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
}


class TextEncoder(nnx.Module):
    def __init__(
        self,
        *,
        vocab_size: int,
        max_len: int,
        width: int,
        depth: int,
        num_heads: int,
        mlp_dim: int,
        remat: str = "none",
        dtype=jnp.float32,
        attention_impl: str = "xla",
        rngs: nnx.Rngs,
    ):
        self.embed = TokenEmbed(vocab_size, width, dtype=dtype, rngs=rngs)
        self.pos = LearnedPositions(max_len, width, "tokens", rngs=rngs)
        self.encoder = Encoder(width, depth, num_heads, mlp_dim, remat=remat, dtype=dtype, attention_impl=attention_impl, rngs=rngs)
        self.width = width

    def __call__(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """tokens int32 [B, L] → (features [B, L, D], mask bool [B, L])."""
        mask = tokens != 0
        x = self.embed(tokens) + self.pos(tokens.shape[1]).astype(self.embed.dtype)[None]
        return self.encoder(x, mask), mask
