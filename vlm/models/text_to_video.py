"""Text-to-video model: the dual encoder's text tower (token states) conditioning a DiT on latents.

    text  TextEncoder: tokens int32 [B, L] → states [B, L, Dt], mask bool [B, L]
    dit   DiT: (x_t [B, t, h, w, c], t [B], states, mask) → velocity [B, t, h, w, c]

The text tower has the dual encoder's code and parameter names (`text/...`), so a dual-encoder run
maps onto it with `config.init_from` (and `optim.frozen=("text/.*",)` keeps it fixed, the default).
"""

from __future__ import annotations

import jax
from flax import nnx

from vlm.models.dit import DiT
from vlm.models.text_encoder import TextEncoder


class TextToVideo(nnx.Module):
    def __init__(self, text: TextEncoder, dit: DiT):
        self.text = text
        self.dit = dit

    def text_states(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """tokens int32 [B, L] → (states [B, L, Dt], mask bool [B, L]): the tower's per-token features."""
        return self.text(tokens)

    def __call__(self, x: jax.Array, t: jax.Array, tokens: jax.Array) -> jax.Array:
        """x_t [B, t, h, w, c], t [B], tokens [B, L] → velocity float32 [B, t, h, w, c]."""
        return self.dit(x, t, *self.text_states(tokens))
