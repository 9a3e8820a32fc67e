"""Text transformer over token ids (padding id 0).

Pooling to one vector (`pooled`): the mean of the non-padding tokens (default; bidirectional
attention with a padding mask); "eot", the token with the highest id, CLIP's end-of-text
token (with `causal` attention, as CLIP: the padding after it cannot reach it); or "last",
the last position (SigLIP: text padded to the full length, attending to its padding). The
"eot" and "last" towers use no padding mask, as their checkpoints were trained.
"""

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

POOLS = ("mean", "eot", "last")


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """x [B, N, D], mask bool [B, N] → [B, D] (float32)."""
    m = mask[..., None].astype(jnp.float32)
    return (x.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)


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
        pool: str = "mean",
        causal: bool = False,
        norm_eps: float = 1e-6,
        activation: str = "gelu_tanh",
        scan_layers: bool = False,
        rngs: nnx.Rngs,
    ):
        if pool not in POOLS:
            raise ValueError(f"unknown text pooling {pool!r}; choose one of {', '.join(POOLS)}")
        self.embed = TokenEmbed(vocab_size, width, dtype=dtype, rngs=rngs)
        self.pos = LearnedPositions(max_len, width, "tokens", rngs=rngs)
        self.encoder = Encoder(width, depth, num_heads, mlp_dim, remat=remat, dtype=dtype, attention_impl=attention_impl,
                               norm_eps=norm_eps, activation=activation, causal=causal, scan_layers=scan_layers,
                               rngs=rngs)
        self.width = width
        self.pool = pool

    def __call__(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """tokens int32 [B, L] → (features [B, L, D], mask bool [B, L] of the tokens attended to)."""
        mask = tokens != 0 if self.pool == "mean" else jnp.ones(tokens.shape, bool)
        x = self.embed(tokens) + self.pos(tokens.shape[1]).astype(self.embed.dtype)[None]
        return self.encoder(x, mask if self.pool == "mean" else None), mask

    def pooled(self, tokens: jax.Array) -> jax.Array:
        """tokens int32 [B, L] → one float32 vector per text [B, D]."""
        x, mask = self(tokens)
        if self.pool == "eot":
            eot = jnp.argmax(tokens, axis=1)  # [B]: the first position of the highest id
            return jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0].astype(jnp.float32)
        if self.pool == "last":
            return x[:, -1].astype(jnp.float32)
        return masked_mean(x, mask)
