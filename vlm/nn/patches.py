"""Latent patchify / unpatchify: channels-last latents [B, t, h, w, c] ↔ tokens [B, N, pt*ph*pw*c].

Tokens are in row-major (t', h', w') order (t' = t/pt, ...); each token's features are
ordered (pt, ph, pw, c). `unpatchify(patchify(x)) == x` exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax


def patch_grid(latent_shape: Sequence[int], patch: Sequence[int]) -> tuple[int, int, int]:
    """(t, h, w) latent size and (pt, ph, pw) patch → (t', h', w') token grid; raises if it does not divide."""
    t, h, w = (int(n) for n in latent_shape)
    pt, ph, pw = (int(p) for p in patch)
    if t % pt or h % ph or w % pw:
        raise ValueError(f"latents of size (t, h, w)=({t}, {h}, {w}) are not divisible by the patch "
                         f"({pt}, {ph}, {pw}); change the clip length / resolution or the patch size")
    return t // pt, h // ph, w // pw


def patchify(x: jax.Array, patch: Sequence[int]) -> jax.Array:
    """x [B, t, h, w, c] → tokens [B, t'*h'*w', pt*ph*pw*c]."""
    b, t, h, w, c = x.shape
    pt, ph, pw = patch
    gt, gh, gw = patch_grid((t, h, w), patch)
    x = x.reshape(b, gt, pt, gh, ph, gw, pw, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)  # [B, t', h', w', pt, ph, pw, c]
    return x.reshape(b, gt * gh * gw, pt * ph * pw * c)


def unpatchify(tokens: jax.Array, grid: Sequence[int], patch: Sequence[int]) -> jax.Array:
    """tokens [B, t'*h'*w', pt*ph*pw*c] on grid (t', h', w') → x [B, t'*pt, h'*ph, w'*pw, c]."""
    b, n, f = tokens.shape
    gt, gh, gw = grid
    pt, ph, pw = patch
    c = f // (pt * ph * pw)
    if n != gt * gh * gw or f != pt * ph * pw * c:
        raise ValueError(f"tokens of shape {tokens.shape} do not match grid {tuple(grid)} and patch {tuple(patch)}")
    x = tokens.reshape(b, gt, gh, gw, pt, ph, pw, c).transpose(0, 1, 4, 2, 5, 3, 6, 7)  # [B, t', pt, h', ph, w', pw, c]
    return x.reshape(b, gt * pt, gh * ph, gw * pw, c)
