"""Chunked (in time) and tiled (in space) passes of `VideoVAE`, with bounded memory for any clip.

Time: frame 0 (latent 0) goes first on its own, then the rest in chunks of `chunk` latent
frames (`chunk * 4` pixel frames), each carrying the causal cache of every causal conv (its
last input frames) to the next. The chunks after the first run under one `jax.lax.scan`, so
the traced program does not grow with the clip's length; peak activation memory is that of
one chunk. A clip whose number of later latent frames is not a multiple of `chunk` is padded
at the end (last frame repeated) and the extra output dropped: by causality, padding after
the clip changes nothing before it. Results equal the one-shot pass (up to float rounding).

Space: overlapping tiles, each encoded/decoded on its own (each tile optionally chunked in
time), blended with weights that are 0 in a margin along every inner tile edge (where zero
padding makes a tile's output differ from the full frame's) and ramp linearly to 1 across
the middle of the overlap. Tiles and overlaps are given in LATENT pixels; decode blends in
pixel space, encode in latent space. With a margin at least the model's spatial receptive
radius, tiling is exact; with a smaller one the seams are smooth approximations. Models with
mid attention (frame-global) are never exactly tileable.

Shapes: video [B, 1 + 4k, H, W, 3] (uint8 or float in [-1, 1]) ↔ latents [B, 1 + k, H/8, W/8, z].
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from vlm.models.video_vae import Posterior, VideoVAE, normalize_video


def _check_chunk(chunk: int) -> int:
    if int(chunk) < 1:
        raise ValueError(f"chunk must be ≥ 1 latent frame, got {chunk}")
    return int(chunk)


def _scan_chunks(step, cache, rest: jax.Array, per_chunk: int) -> jax.Array:
    """Runs `step(cache, x) -> (cache, y)` over `rest` [B, N, ...] in chunks of `per_chunk` frames under
    lax.scan (the end padded to whole chunks); returns the y's concatenated over chunks [B, N', ...],
    the padded part's outputs still attached (the caller trims)."""
    b, n = rest.shape[0], rest.shape[1]
    num_chunks = math.ceil(n / per_chunk)
    pad = num_chunks * per_chunk - n
    if pad:  # repeat the last frame: causal, so it never changes the real frames' outputs
        rest = jnp.concatenate([rest, jnp.repeat(rest[:, -1:], pad, axis=1)], axis=1)
    xs = rest.reshape(b, num_chunks, per_chunk, *rest.shape[2:]).swapaxes(0, 1)  # [n_chunks, B, per_chunk, ...]
    _, ys = jax.lax.scan(step, cache, xs)  # [n_chunks, B, out_per_chunk, ...]
    ys = ys.swapaxes(0, 1)
    return ys.reshape(b, ys.shape[1] * ys.shape[2], *ys.shape[3:])


def encode_moments_chunked(vae: VideoVAE, x: jax.Array, chunk: int = 1) -> jax.Array:
    """x float [B, 1 + 4k, H, W, 3] in [-1, 1] → moments [B, 1 + k, H/8, W/8, 2z], `chunk` latent frames at a time."""
    chunk, tc = _check_chunk(chunk), vae.temporal_compression
    k = (x.shape[1] - 1) // tc
    first, cache = vae.encode_step(x[:, :1], None, first=True)  # frame 0 → latent 0
    if k == 0:
        return first

    def step(cache, frames):  # frames [B, chunk * 4, H, W, 3] → latents [B, chunk, h, w, 2z]
        moments, cache = vae.encode_step(frames, cache, first=False)
        return cache, moments

    rest = _scan_chunks(step, cache, x[:, 1:], chunk * tc)[:, :k]
    return jnp.concatenate([first, rest.astype(first.dtype)], axis=1)


def decode_chunked_float(vae: VideoVAE, latents: jax.Array, chunk: int = 1) -> jax.Array:
    """latents [B, 1 + k, h, w, z] → video float32 [B, 1 + 4k, 8h, 8w, 3], `chunk` latent frames at a time."""
    chunk, tc = _check_chunk(chunk), vae.temporal_compression
    k = latents.shape[1] - 1
    first, cache = vae.decode_step(latents[:, :1], None, first=True)  # latent 0 → frame 0
    if k == 0:
        return first

    def step(cache, z):  # z [B, chunk, h, w, z] → frames [B, chunk * 4, H, W, 3]
        frames, cache = vae.decode_step(z, cache, first=False)
        return cache, frames

    rest = _scan_chunks(step, cache, latents[:, 1:], chunk)[:, : k * tc]
    return jnp.concatenate([first, rest], axis=1)


def encode_chunked(vae: VideoVAE, video: jax.Array, chunk: int = 1) -> Posterior:
    """Like `vae.encode(video)`, `chunk` latent frames (4 * chunk pixel frames) at a time."""
    vae._check_video_shape(video.shape)
    return Posterior.from_moments(encode_moments_chunked(vae, normalize_video(video, vae.dtype), chunk))


def decode_chunked(vae: VideoVAE, latents: jax.Array, chunk: int = 1) -> jax.Array:
    """Like `vae.decode(latents)`, `chunk` latent frames at a time."""
    vae._check_latent_shape(latents.shape)
    return decode_chunked_float(vae, latents, chunk)


# ---- spatial tiling ------------------------------------------------------------------------------

def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `tile` covering [0, size) with ≥ `overlap` overlap; the last is flush with the end."""
    if tile >= size:
        return [0]
    stride = tile - overlap
    count = math.ceil((size - overlap) / stride)
    return sorted({min(i * stride, size - tile) for i in range(count)})


def blend_ramp(length: int, start: int, size: int, margin: int, ramp: int) -> jax.Array:
    """1D weights [length] of a tile at `start` in [0, size): 0 within `margin` of an inner edge, then a
    linear ramp over `ramp` to 1 (edges on the frame border keep weight 1)."""
    i = jnp.arange(length, dtype=jnp.float32) + 0.5
    up = jnp.clip((i - margin) / max(ramp, 1), 0.0, 1.0)  # leading edge
    down = jnp.clip((length - i - margin) / max(ramp, 1), 0.0, 1.0)  # trailing edge
    return jnp.where(start > 0, up, 1.0) * jnp.where(start + length < size, down, 1.0)


def _check_tiling(tile: int, overlap: int, margin: int) -> None:
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"tiling needs tile ≥ 1 and 0 ≤ overlap < tile (latent pixels), got tile={tile}, "
                         f"overlap={overlap}")
    if margin < 0 or (overlap and 2 * margin >= overlap) or (not overlap and margin):
        raise ValueError(f"margin={margin} must be ≥ 0 and leave a ramp inside the overlap: 2 * margin < overlap "
                         f"(={overlap})")


def tiled(fn, x: jax.Array, *, in_scale: int, out_scale: int, out_size: tuple[int, int], tile: int, overlap: int,
          margin: int) -> jax.Array:
    """Applies `fn` (a spatially local map [B, T, h*in, w*in, C] → [B, T', h*out, w*out, C']) tile by tile.

    Tiles are squares of `tile` latent pixels (clipped to the frame), `overlap` latent pixels apart;
    blending happens at the output's resolution with `margin` and the ramp scaled by `out_scale`.
    Tiles run under one lax.scan (one tile's activations at a time); the output is accumulated in place.
    """
    _check_tiling(tile, overlap, margin)
    h, w = out_size  # in latent pixels
    th, tw = min(tile, h), min(tile, w)
    starts = [(sh, sw) for sh in tile_starts(h, th, overlap) for sw in tile_starts(w, tw, overlap)]
    ramp = (overlap - 2 * margin) * out_scale

    def tile_in(start):
        sh, sw = start[0] * in_scale, start[1] * in_scale
        return jax.lax.dynamic_slice(x, (0, 0, sh, sw, 0), (x.shape[0], x.shape[1], th * in_scale, tw * in_scale,
                                                            x.shape[4]))

    out_shape = jax.eval_shape(fn, jax.ShapeDtypeStruct((*x.shape[:2], th * in_scale, tw * in_scale, x.shape[4]),
                                                          x.dtype))
    b, t, _, _, c = out_shape.shape
    acc = jnp.zeros((b, t, h * out_scale, w * out_scale, c), jnp.float32)
    weight = jnp.zeros((h * out_scale, w * out_scale), jnp.float32)

    def step(carry, start):
        acc, weight = carry
        y = fn(tile_in(start)).astype(jnp.float32)  # [B, T', th*out, tw*out, C']
        oh, ow = start[0] * out_scale, start[1] * out_scale
        wh = blend_ramp(th * out_scale, oh, h * out_scale, margin * out_scale, ramp)
        ww = blend_ramp(tw * out_scale, ow, w * out_scale, margin * out_scale, ramp)
        wt = wh[:, None] * ww[None, :]  # [th*out, tw*out]
        old = jax.lax.dynamic_slice(acc, (0, 0, oh, ow, 0), y.shape)
        acc = jax.lax.dynamic_update_slice(acc, old + y * wt[None, None, :, :, None], (0, 0, oh, ow, 0))
        old_w = jax.lax.dynamic_slice(weight, (oh, ow), wt.shape)
        weight = jax.lax.dynamic_update_slice(weight, old_w + wt, (oh, ow))
        return (acc, weight), None

    (acc, weight), _ = jax.lax.scan(step, (acc, weight), jnp.asarray(starts, jnp.int32))
    return acc / weight[None, None, :, :, None]


def decode_tiled(vae: VideoVAE, latents: jax.Array, *, tile: int = 16, overlap: int = 8, margin: int | None = None,
                 chunk: int | None = None) -> jax.Array:
    """latents [B, 1 + k, h, w, z] → video float32 [B, 1 + 4k, 8h, 8w, 3], decoded in overlapping latent tiles.

    tile / overlap / margin in latent pixels (margin default overlap // 4); blending in pixel space.
    With `chunk`, each tile is also decoded `chunk` latent frames at a time (memory bounded in both).
    """
    vae._check_latent_shape(latents.shape)
    margin = overlap // 4 if margin is None else margin
    fn = (lambda z: decode_chunked_float(vae, z, chunk)) if chunk else (lambda z: vae.decode_step(z)[0])
    s = vae.spatial_compression
    return tiled(fn, latents, in_scale=1, out_scale=s, out_size=latents.shape[2:4], tile=tile, overlap=overlap,
                 margin=margin)


def encode_tiled(vae: VideoVAE, video: jax.Array, *, tile: int = 16, overlap: int = 8, margin: int | None = None,
                 chunk: int | None = None) -> Posterior:
    """video [B, 1 + 4k, H, W, 3] → Posterior, encoded in overlapping tiles blended in latent space.

    tile / overlap / margin in latent pixels (a tile is 8 * tile video pixels); margin default overlap // 4.
    """
    vae._check_video_shape(video.shape)
    margin = overlap // 4 if margin is None else margin
    x = normalize_video(video, vae.dtype)
    fn = (lambda v: encode_moments_chunked(vae, v, chunk)) if chunk else (lambda v: vae.encode_step(v)[0])
    s = vae.spatial_compression
    moments = tiled(fn, x, in_scale=s, out_scale=1, out_size=(x.shape[2] // s, x.shape[3] // s), tile=tile,
                    overlap=overlap, margin=margin)
    return Posterior.from_moments(moments)
