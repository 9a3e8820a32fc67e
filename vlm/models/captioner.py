"""Video captioner: the dual encoder's video tower + an autoregressive text decoder (CapPa, GIT, CoCa).

    video uint8 [B, T, H, W, 3] ─ video (VideoEncoder) ─→ [B, M, Dv] ─ caption_pool? ─→ context [B, M', Dc]
    tokens ─ shift right (BOS) ─ embed + positions ─ [unimodal blocks] ─ blocks (causal + cross) ─ norm ─ head → logits

Token conventions: padding id 0 (never generated); `bos_id` (the tokenizer's) starts every decoder
input. The data pipeline's `tokens` [B, L] are the *targets*: caption pieces, then EOS, then 0s;
`caption_logits(video, tokens)[:, i]` predicts `tokens[:, i]` (teacher forcing).

The video tower is held as `video`, built by the same `VideoEncoder` code as the dual encoder's, so
parameter paths `video/...` are identical and a dual-encoder run's video tower maps onto it.

CoCa (`coca=True`): the first `unimodal_depth` decoder layers have no cross-attention, so the text
states they produce never see the video. The text embedding is their state at the caption's last
non-pad token *after* appending it to the decoder input, i.e. the EOS token of `[BOS] + tokens`
(CLIP's EOT pooling; causal attention means it has read the whole caption, and the positions
before it are exactly the teacher-forced decoder inputs, so one unimodal pass serves both losses).
A caption cut without EOS is pooled at its last piece. The video embedding is a one-query
attention pool over the video tokens. Both are projected to `embed_dim` and L2-normalised.

Decoding (vlm/decoding.py) uses two methods and a cache that is a pure pytree:
    cache = init_cache(video, max_len)        # video encoded once; cross-attention keys/values projected once
    logits, cache = extend(cache, tokens)     # tokens [B, N] at positions cache["index"] ..
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from vlm import sharding
from vlm.models.dual_encoder import l2_normalize
from vlm.models.video_encoder import VideoEncoder
from vlm.nn.decoder import KV_AXES, DecoderBlock, empty_cache, run_blocks
from vlm.nn.embeddings import LearnedPositions, TokenEmbed
from vlm.nn.linear import Dense, LayerNorm
from vlm.nn.pooling import AttentionPool
from vlm.nn.transformer import check_remat

# Text-decoder sizes (width, depth, heads, mlp). "B" and "L" follow CapPa: a 6-layer decoder as wide as
# its ViT-B/16 or ViT-L/14 encoder. For CoCa, set unimodal_depth too (CoCa makes half of its text layers
# unimodal, e.g. unimodal_depth=6 with depth=6).
VARIANTS: Mapping[str, dict] = {
    "tiny": dict(width=128, depth=2, num_heads=4, mlp_dim=512),
    "B": dict(width=768, depth=6, num_heads=12, mlp_dim=3072),
    "L": dict(width=1024, depth=6, num_heads=16, mlp_dim=4096),
}

CONTRASTIVE_LOSSES = ("softmax", "sigmoid")


def shift_right(tokens: jax.Array, bos_id: int) -> jax.Array:
    """Targets [B, L] → decoder inputs [B, L]: BOS, then the targets without their last position."""
    return jnp.concatenate([jnp.full_like(tokens[:, :1], bos_id), tokens[:, :-1]], axis=1)


class Captioner(nnx.Module):
    def __init__(
        self,
        video: VideoEncoder,
        *,
        vocab_size: int,
        max_len: int,
        width: int,
        depth: int,
        num_heads: int,
        mlp_dim: int,
        bos_id: int,
        num_queries: int = 0,
        tie_embeddings: bool = False,
        coca: bool = False,
        unimodal_depth: int = 0,
        embed_dim: int = 0,
        contrastive_loss: str = "softmax",
        remat: str = "none",
        dtype=jnp.float32,
        attention_impl: str = "xla",
        rngs: nnx.Rngs,
    ):
        """video: the video tower; max_len: the longest target sequence (and decoding length);
        num_queries: 0 = the decoder cross-attends to all video tokens, Q > 0 = to Q attention-pooled ones;
        coca: add `unimodal_depth` text-only layers and contrastive embeddings of size `embed_dim`
        (logit scale/bias initialised for `contrastive_loss`, as in DualEncoder)."""
        check_remat(remat)
        if not 0 < bos_id < vocab_size:
            raise ValueError(f"bos_id={bos_id} must be a token id in 1..{vocab_size - 1} (0 is padding)")
        if num_queries < 0:
            raise ValueError(f"num_queries={num_queries} must be ≥ 0 (0 = attend to all video tokens)")
        if coca and (unimodal_depth < 1 or embed_dim < 1):
            raise ValueError(f"coca=True needs unimodal_depth ≥ 1 and embed_dim ≥ 1, got {unimodal_depth} and {embed_dim}")
        if not coca and unimodal_depth:
            raise ValueError(f"unimodal_depth={unimodal_depth} is only used with coca=True; set it to 0 or enable coca")
        if coca and contrastive_loss not in CONTRASTIVE_LOSSES:
            raise ValueError(f"contrastive_loss={contrastive_loss!r} is unknown; choose one of {', '.join(CONTRASTIVE_LOSSES)}")
        self.video = video
        self.vocab_size, self.max_len, self.bos_id = vocab_size, max_len, bos_id
        self.coca, self.remat, self.dtype = coca, remat, dtype
        self.embed = TokenEmbed(vocab_size, width, dtype=dtype, rngs=rngs)
        # CoCa reads one position past the targets (the pooled EOS of [BOS] + tokens).
        self.pos = LearnedPositions(max_len + int(coca), width, "tokens", rngs=rngs)
        if num_queries:
            self.caption_pool = AttentionPool(num_queries, width, video.width, num_heads, dtype=dtype,
                                              attention_impl=attention_impl, rngs=rngs)
            context_width = width
        else:
            self.caption_pool = None
            context_width = video.width
        block = lambda context_width: DecoderBlock(width, num_heads, mlp_dim, context_width=context_width, dtype=dtype,
                                                   attention_impl=attention_impl, rngs=rngs)
        self.unimodal = nnx.List([block(None) for _ in range(unimodal_depth)])
        self.blocks = nnx.List([block(context_width) for _ in range(depth)])
        self.norm = LayerNorm(width, dtype=dtype, rngs=rngs)
        self.head = None if tie_embeddings else Dense(width, vocab_size, ("embed", "vocab"), dtype=dtype, rngs=rngs)
        if coca:
            self.contrastive_pool = AttentionPool(1, width, video.width, num_heads, dtype=dtype,
                                                  attention_impl=attention_impl, rngs=rngs)
            self.text_norm = LayerNorm(width, dtype=dtype, rngs=rngs)
            self.video_proj = Dense(width, embed_dim, ("embed", "mlp"), dtype=dtype, use_bias=False, rngs=rngs)
            self.text_proj = Dense(width, embed_dim, ("embed", "mlp"), dtype=dtype, use_bias=False, rngs=rngs)
            scale0, bias0 = (math.log(10.0), -10.0) if contrastive_loss == "sigmoid" else (math.log(1 / 0.07), 0.0)
            self.logit_scale = nnx.Param(jnp.asarray(scale0, jnp.float32))
            self.logit_bias = nnx.Param(jnp.asarray(bias0, jnp.float32))

    # ----- pieces -----

    def encode_video(self, video: jax.Array) -> jax.Array:
        """uint8 [B, T, H, W, 3] → video tokens [B, M, Dv]."""
        return self.video(video)

    def context(self, video_tokens: jax.Array) -> jax.Array:
        """What the decoder cross-attends to: [B, M, Dv] → [B, Q, D] (pooled) or [B, M, Dv] (all tokens)."""
        return video_tokens if self.caption_pool is None else self.caption_pool(video_tokens)

    def _embed(self, tokens: jax.Array, start: jax.Array | int = 0) -> jax.Array:
        """tokens [B, N] at positions start..start+N-1 → [B, N, D]."""
        positions = jax.lax.dynamic_slice_in_dim(self.pos.table[...], start, tokens.shape[1], axis=0)  # [N, D]
        return self.embed(tokens) + positions.astype(self.dtype)[None]

    def _logits(self, x: jax.Array) -> jax.Array:
        """Decoder states [B, N, D] → float32 logits [B, N, V]."""
        x = self.norm(x)
        if self.head is None:
            table = self.embed.embedding[...].astype(self.dtype)  # [V, D]
            logits = jnp.einsum("bnd,vd->bnv", x, table)
        else:
            logits = self.head(x)
        return sharding.constrain(logits.astype(jnp.float32), ("batch", "tokens", "vocab"))

    def _unimodal(self, tokens: jax.Array) -> jax.Array:
        """Decoder inputs [B, N] → states of the text-only layers [B, N, D] (no video anywhere)."""
        if tokens.shape[1] > self.pos.table[...].shape[0]:
            raise ValueError(f"{tokens.shape[1]} text positions exceed the captioner's max_len={self.max_len}")
        return run_blocks(self.unimodal, self._embed(tokens), None, self.remat)

    def _text_embedding(self, states: jax.Array, tokens: jax.Array) -> jax.Array:
        """states [B, L+1, D] of [BOS] + tokens → unit-norm [B, E] at the last non-pad token (EOS)."""
        last = (tokens != 0).sum(-1)  # [B]: index of the last non-pad token in [BOS] + tokens
        pooled = jnp.take_along_axis(states, last[:, None, None], axis=1)[:, 0]  # [B, D]
        return l2_normalize(self.text_proj(self.text_norm(pooled)).astype(jnp.float32))

    def _video_embedding(self, video_tokens: jax.Array) -> jax.Array:
        return l2_normalize(self.video_proj(self.contrastive_pool(video_tokens)[:, 0]).astype(jnp.float32))

    # ----- teacher forcing -----

    def decode(self, context: jax.Array, inputs: jax.Array) -> jax.Array:
        """context [B, M', Dc]; decoder inputs [B, N] (BOS first) → float32 logits [B, N, V] (full recomputation)."""
        x = run_blocks(self.blocks, self._unimodal(inputs), context, self.remat)
        return self._logits(x)

    def __call__(self, video: jax.Array, tokens: jax.Array) -> dict[str, jax.Array]:
        """video uint8 [B, T, H, W, 3], target tokens int32 [B, L] → {"logits": float32 [B, L, V]}, and with
        CoCa also {"video_emb", "text_emb"}: unit-norm float32 [B, E]. One video pass, one unimodal pass."""
        video_tokens = self.encode_video(video)
        inputs = shift_right(tokens, self.bos_id)  # [B, L]
        if not self.coca:
            return {"logits": self.decode(self.context(video_tokens), inputs)}
        full = jnp.concatenate([inputs, tokens[:, -1:]], axis=1)  # [B, L+1] = [BOS] + tokens
        states = self._unimodal(full)
        x = run_blocks(self.blocks, states[:, :-1], self.context(video_tokens), self.remat)
        return {
            "logits": self._logits(x),
            "video_emb": self._video_embedding(video_tokens),
            "text_emb": self._text_embedding(states, tokens),
        }

    def caption_logits(self, video: jax.Array, tokens: jax.Array) -> jax.Array:
        """Teacher forcing: logits float32 [B, L, V]; [:, i] predicts tokens[:, i]."""
        return self.decode(self.context(self.encode_video(video)), shift_right(tokens, self.bos_id))

    def contrastive_embeddings(self, video: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """CoCa only: (video_emb, text_emb), unit-norm float32 [B, E]; skips the multimodal layers."""
        if not self.coca:
            raise ValueError("contrastive_embeddings needs a captioner built with coca=True")
        full = jnp.concatenate([jnp.full_like(tokens[:, :1], self.bos_id), tokens], axis=1)  # [B, L+1]
        return self._video_embedding(self.encode_video(video)), self._text_embedding(self._unimodal(full), tokens)

    # ----- cached decoding -----

    def init_cache(self, video: jax.Array, max_len: int) -> dict:
        """Encodes the video once → cache {"index": int32 0, "self": [(k, v) [B, max_len, H, Dh]] per layer
        (unimodal first), "cross": [(k, v) [B, M', H, Dh]] per multimodal layer}. A pure pytree."""
        if not 0 < max_len <= self.max_len:
            raise ValueError(f"decoding max_len={max_len} must be in 1..{self.max_len} (the captioner's max_len)")
        context = self.context(self.encode_video(video))
        blocks = [*self.unimodal, *self.blocks]
        return {
            "index": jnp.zeros((), jnp.int32),
            "self": empty_cache(blocks, video.shape[0], max_len, self.dtype),
            "cross": [tuple(sharding.constrain(c, KV_AXES) for c in blk.cross.project_context(context))
                      for blk in self.blocks],
        }

    def extend(self, cache: dict, tokens: jax.Array) -> tuple[jax.Array, dict]:
        """tokens int32 [B, N] at positions cache["index"].. → (float32 logits [B, N, V], cache advanced by N)."""
        index = cache["index"]
        x = self._embed(tokens, index)
        self_kv = []
        for i, blk in enumerate([*self.unimodal, *self.blocks]):
            cross = cache["cross"][i - len(self.unimodal)] if i >= len(self.unimodal) else None
            x, kv = blk.extend(x, cache["self"][i], index, cross)
            self_kv.append(kv)
        return self._logits(x), {"index": index + tokens.shape[1], "self": self_kv, "cross": cache["cross"]}
