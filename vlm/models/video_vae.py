"""Causal 3D convolutional VAE for video (Wan 2.1 / MaxDiffusion structure), channels-last, flax NNX.

Time is causal everywhere: frame 0 is encoded on its own (an image is a one-frame video) and
later frames in groups of `temporal_compression` (4 by default):

    video [B, 1 + 4k, H, W, 3]  ──encode──▶  latents [B, 1 + k, H/8, W/8, z]
    frame 0 → latent 0;  frames 1..4 → latent 1;  frames 5..8 → latent 2; ...
    decode mirrors it: latent 0 → frame 0, latent j ≥ 1 → 4 frames.

Input video is uint8 (normalised inside to [-1, 1]) or float already in [-1, 1]; `decode`
returns float in (about) [-1, 1], unclipped so a reconstruction loss sees the raw output;
`to_uint8` turns it into pixels.

Every layer with temporal extent is called as `layer(x, cache, first) -> (y, cache)`: `cache`
is what the next chunk needs from this one (a pytree of arrays; None = the start of the clip,
i.e. zero padding) and `first` (static) says that x starts at frame 0, which passes through the
temporal down/up-samplers on its own. `encode`/`decode` are the one-shot passes;
`vlm.models.video_vae_tiling` runs the same layers chunk by chunk (lax.scan) and tile by tile.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct

from vlm import sharding
from vlm.nn.conv import CausalConv3d
from vlm.nn.linear import Dense, Dtype, RMSNorm
from vlm.nn.transformer import REMAT_POLICIES, check_remat

# Activations [B, T, H, W, C] at block boundaries: split over the batch; XLA propagates the rest.
ACTIVATION_AXES = ("batch", "frames", None, None, None)

VARIANTS: Mapping[str, dict] = {
    # CPU-sized (1.9M parameters, ~0.6-1 s per batch-8 train step of 9x32x32 clips on 2 shared cores): narrow at
    # full resolution, wide at 4x4; time halved at the first two stages (cheaper than Wan's late ones); z=16.
    # No per-position norm (RMSNorm on 8-16 channels slowed learning ~4 dB at 300 steps) and the posterior's
    # std starting at e^-3 (not 1): both make a 15-minute CPU run learn far more (benchmarks/README.md).
    "tiny": dict(base_channels=8, channel_multipliers=(1, 2, 4, 8), num_res_blocks=1, latent_channels=16,
                 temporal_downsample=(True, True, False), mid_attention=False, resample_shortcut=True, patch_size=1,
                 norm="none", init_logvar=-6.0),
    # Wan 2.1 VAE-like (base 96, z 16, multipliers (1, 2, 4, 4), 2 res blocks, time halved at the last two
    # stages, mid attention, no resampling shortcuts).
    "wan": dict(base_channels=96, channel_multipliers=(1, 2, 4, 4), num_res_blocks=2, latent_channels=16,
                temporal_downsample=(False, True, True), mid_attention=True, resample_shortcut=False, patch_size=1),
}


NORMS = ("rms", "none")


class _NoNorm(nnx.Module):
    """norm="none": the identity (a cast to the compute dtype)."""

    def __init__(self, dtype: Dtype):
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return x.astype(self.dtype)


def channel_norm(kind: str, channels: int, *, dtype: Dtype, rngs: nnx.Rngs) -> nnx.Module:
    """The per-position norm over channels before each conv: "rms" (Wan's RMS_norm) or "none".

    Per-position RMSNorm erases each pixel's feature magnitude (only its direction survives); on
    narrow layers (8-16 channels) that slows learning a lot: the tiny variant on 32-px clips reached
    19.5 dB held-out PSNR in 300 steps with it, 23.1 dB without (benchmarks/README.md).
    """
    if kind == "rms":
        return RMSNorm(channels, "conv_in", dtype=dtype, rngs=rngs)
    if kind == "none":
        return _NoNorm(dtype)
    raise ValueError(f"norm={kind!r}; choose one of {', '.join(NORMS)}")


class ResBlock(nnx.Module):
    """x → shortcut(x) + conv(silu(norm(conv(silu(norm(x)))))), causal 3x3x3 convs; norm per position, over channels.

    RMSNorm (per position, over channels) rather than GroupNorm keeps the block causal and
    tileable: no statistic spans frames or pixels.
    """

    def __init__(self, in_channels: int, out_channels: int, *, norm: str = "rms", dtype: Dtype, rngs: nnx.Rngs):
        self.norm1 = channel_norm(norm, in_channels, dtype=dtype, rngs=rngs)
        self.conv1 = CausalConv3d(in_channels, out_channels, (3, 3, 3), dtype=dtype, rngs=rngs)
        self.norm2 = channel_norm(norm, out_channels, dtype=dtype, rngs=rngs)
        self.conv2 = CausalConv3d(out_channels, out_channels, (3, 3, 3), dtype=dtype, rngs=rngs)
        self.shortcut = (CausalConv3d(in_channels, out_channels, (1, 1, 1), dtype=dtype, rngs=rngs)
                         if in_channels != out_channels else None)

    def __call__(self, x: jax.Array, cache=None, first: bool = True):
        """x [B, T, H, W, Ci] → [B, T, H, W, Co]; cache [conv1's, conv2's]."""
        c1, c2 = cache if cache is not None else (None, None)
        h, c1 = self.conv1(jax.nn.silu(self.norm1(x)), c1)
        h, c2 = self.conv2(jax.nn.silu(self.norm2(h)), c2)
        skip = x if self.shortcut is None else self.shortcut(x)[0]
        return sharding.constrain(skip.astype(h.dtype) + h, ACTIVATION_AXES), [c1, c2]


class FrameAttention(nnx.Module):
    """Single-head self-attention among the H*W positions of each frame (Wan's mid attention); no cache.

    Frame-local, so it stays causal; but it sees the whole frame, so spatial tiling is exact
    only for models without it.
    """

    def __init__(self, channels: int, *, norm: str = "rms", dtype: Dtype, rngs: nnx.Rngs):
        self.norm = channel_norm(norm, channels, dtype=dtype, rngs=rngs)
        dense = lambda **kw: Dense(channels, channels, ("conv_in", "conv_out"), dtype=dtype, rngs=rngs, **kw)
        self.query, self.key, self.value = dense(), dense(), dense()
        self.out = dense(kernel_init=nnx.initializers.zeros)  # starts as the identity block

    def __call__(self, x: jax.Array, cache=None, first: bool = True):
        b, t, h, w, c = x.shape
        y = self.norm(x).reshape(b * t, h * w, 1, c)  # [B*T, H*W, heads=1, C]
        y = jax.nn.dot_product_attention(self.query(y), self.key(y), self.value(y))
        return x + self.out(y).reshape(b, t, h, w, c), None


def _check_shortcut(in_channels: int, out_channels: int, factor: int, what: str) -> None:
    if (in_channels * factor) % out_channels and (out_channels * factor) % in_channels:
        raise ValueError(f"{what} {in_channels} → {out_channels} channels with a x{factor} resampling shortcut needs "
                         f"one channel count times {factor} to be a multiple of the other; change channel_multipliers "
                         f"or set resample_shortcut=False")


class Downsample(nnx.Module):
    """2x in space (stride-2 3x3 conv, padding (0, 1) as in Wan); with `temporal`, also 2x in time. Ci → Co channels.

    Time: frame 0 passes through; then windows of 3 frames with stride 2 over the whole clip,
    [x0 x1 x2], [x2 x3 x4], ..., so 1 + 2m frames → 1 + m. A later chunk of 2m frames takes its
    first window's leading frame from the cache (the previous chunk's last frame).

    `shortcut` adds a parameter-free path (DC-AE's residual autoencoding, Wan 2.2's AvgDown3D):
    each 2x2 (x2 in time: frame 0 with itself, then pairs [x1 x2], [x3 x4], ...) block moved into
    channels and averaged in groups down to Co. It makes deep compression train much faster.
    """

    def __init__(self, in_channels: int, out_channels: int, temporal: bool, shortcut: bool, *, dtype: Dtype,
                 rngs: nnx.Rngs):
        self.factor_t = 2 if temporal else 1
        if shortcut:
            _check_shortcut(in_channels, out_channels, 4 * self.factor_t, "downsampling")
        self.spatial = CausalConv3d(in_channels, out_channels, (1, 3, 3), spatial_stride=2,
                                    spatial_padding=((0, 1), (0, 1)), dtype=dtype, rngs=rngs)
        self.time_conv = (CausalConv3d(out_channels, out_channels, (3, 1, 1), time_stride=2, dtype=dtype, rngs=rngs)
                          if temporal else None)
        self.shortcut = shortcut
        self.out_channels = out_channels

    def _average(self, x: jax.Array, first: bool) -> jax.Array:
        """[B, T, H, W, Ci] → [B, T', H/2, W/2, Co]: space(-time)-to-channels, then group means."""
        ft = self.factor_t
        if ft > 1 and first:
            x = jnp.concatenate([x[:, :1], x], axis=1)  # frame 0 pairs with itself
        b, t, h, w, c = x.shape
        x = x.reshape(b, t // ft, ft, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 7, 2, 4, 6)
        x = x.reshape(b, t // ft, h // 2, w // 2, c * ft * 4)
        if x.shape[-1] < self.out_channels:  # fewer values than channels: repeat instead of averaging
            return jnp.repeat(x, self.out_channels // x.shape[-1], axis=-1)
        return x.reshape(*x.shape[:4], self.out_channels, -1).mean(-1)

    def __call__(self, x: jax.Array, cache=None, first: bool = True):
        y = self.spatial(x)[0]  # [B, T, H/2, W/2, Co]
        if self.time_conv is not None:
            if first:
                if y.shape[1] % 2 != 1:
                    raise ValueError(f"a clip starting at frame 0 needs 1 + 2m frames here, got {y.shape[1]}")
                head = y[:, :1]
                frames = y
            else:
                if y.shape[1] % 2:
                    raise ValueError(f"a later chunk needs an even number of frames here, got {y.shape[1]}")
                frames = jnp.concatenate([cache.astype(y.dtype), y], axis=1)
            cache = y[:, -1:]  # the last frame, for the next chunk's first window
            if frames.shape[1] == 1:
                y = head
            else:
                y = self.time_conv.conv_valid_time(frames)  # [B, m, H/2, W/2, Co]
                y = jnp.concatenate([head, y], axis=1) if first else y
        if self.shortcut:
            y = y + self._average(x, first).astype(y.dtype)
        return y, cache  # [B, 1 + m (first) or m, H/2, W/2, Co]


class Upsample(nnx.Module):
    """With `temporal`, 2x in time first (a causal 3x1x1 conv to 2C channels, each frame → 2 frames;
    frame 0 passes through alone), then 2x in space (nearest, then a 3x3 conv to Co channels).

    `shortcut`: the parameter-free inverse of Downsample's (Wan 2.2's DupUp3D): channels repeated,
    then moved back into 2x2 (x2 in time) blocks; frame 0 again yields one frame.
    """

    def __init__(self, in_channels: int, out_channels: int, temporal: bool, shortcut: bool, *, dtype: Dtype,
                 rngs: nnx.Rngs):
        self.factor_t = 2 if temporal else 1
        if shortcut:
            _check_shortcut(in_channels, out_channels, 4 * self.factor_t, "upsampling")
        self.time_conv = (CausalConv3d(in_channels, 2 * in_channels, (3, 1, 1), dtype=dtype, rngs=rngs)
                          if temporal else None)
        self.spatial = CausalConv3d(in_channels, out_channels, (1, 3, 3), dtype=dtype, rngs=rngs)
        self.shortcut = shortcut
        self.out_channels = out_channels

    def _duplicate(self, x: jax.Array, first: bool) -> jax.Array:
        """[B, T, H, W, Ci] → [B, T', 2H, 2W, Co]: channels repeated (or group-averaged), then depth-to-space(-time)."""
        ft, co = self.factor_t, self.out_channels
        b, t, h, w, c = x.shape
        values = co * ft * 4
        x = jnp.repeat(x, values // c, axis=-1) if values >= c else x.reshape(b, t, h, w, values, -1).mean(-1)
        x = x.reshape(b, t, h, w, co, ft, 2, 2).transpose(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, t * ft, 2 * h, 2 * w, co)
        return x[:, 1:] if ft > 1 and first else x  # frame 0 → one frame

    def __call__(self, x: jax.Array, cache=None, first: bool = True):
        shortcut = self._duplicate(x, first) if self.shortcut else None
        if self.time_conv is not None:
            b, t, h, w, c = x.shape
            y, cache = self.time_conv(x, cache)  # [B, T, H, W, 2C]
            y = y.reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c)
            x = jnp.concatenate([x[:, :1].astype(y.dtype), y[:, 2:]], axis=1) if first else y  # [B, 2T(-1), H, W, C]
        x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # nearest-neighbour 2x
        y = self.spatial(x)[0]
        return (y if shortcut is None else y + shortcut.astype(y.dtype)), cache


class Head(nnx.Module):
    """norm → SiLU → causal 3x3x3 conv: the last layer of the encoder (to 2z moments) and decoder (to RGB)."""

    def __init__(self, in_channels: int, out_channels: int, out_axis: str | None, *, norm: str = "rms", dtype: Dtype,
                 rngs: nnx.Rngs):
        self.norm = channel_norm(norm, in_channels, dtype=dtype, rngs=rngs)
        self.conv = CausalConv3d(in_channels, out_channels, (3, 3, 3), axes=("conv_in", out_axis), dtype=dtype,
                                 rngs=rngs)

    def __call__(self, x: jax.Array, cache=None, first: bool = True):
        return self.conv(jax.nn.silu(self.norm(x)), cache)


class SpaceToDepth(nnx.Module):
    """Patchify stem (DC-AE, Wan 2.2): each p x p block of pixels into channels, [B, T, H, W, C] → [B, T, H/p, W/p, p²C].

    Parameter-free and frame-local, so the convolutions after it run at 1/p² of the pixels: the cheap
    way to spend compute where the content is (on CPU, wide convs at low resolution are also faster
    per FLOP than narrow ones at full resolution).
    """

    def __init__(self, patch: int):
        self.patch = patch

    def __call__(self, x: jax.Array, cache=None, first: bool = True):
        b, t, h, w, c = x.shape
        p = self.patch
        x = x.reshape(b, t, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(b, t, h // p, w // p, p * p * c), None


class DepthToSpace(nnx.Module):
    """The inverse of SpaceToDepth: [B, T, h, w, p²C] → [B, T, hp, wp, C] (the decoder's unpatchify)."""

    def __init__(self, patch: int):
        self.patch = patch

    def __call__(self, x: jax.Array, cache=None, first: bool = True):
        b, t, h, w, pc = x.shape
        p = self.patch
        x = x.reshape(b, t, h, w, p, p, pc // (p * p)).transpose(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(b, t, h * p, w * p, pc // (p * p)), None


class _CachedConv(nnx.Module):
    """A CausalConv3d with the (x, cache, first) calling convention of the other layers."""

    def __init__(self, conv: CausalConv3d):
        self.conv = conv

    def __call__(self, x: jax.Array, cache=None, first: bool = True):
        return self.conv(x, cache)


class _LayerStack(nnx.Module):
    """Layers called in order with the (x, cache, first) convention; the cache is a list, one entry per layer."""

    layers: nnx.List
    remat: str

    def __call__(self, x: jax.Array, cache=None, first: bool = True):
        caches = []
        for i, layer in enumerate(self.layers):
            c = None if cache is None else cache[i]
            if self.remat != "none" and isinstance(layer, ResBlock):
                # Static `first` is closed over; the backward pass recomputes the block from its input.
                x, c = nnx.remat(lambda blk, x, c: blk(x, c, first), policy=REMAT_POLICIES[self.remat])(layer, x, c)
            else:
                x, c = layer(x, c, first)
            caches.append(c)
        return x, caches


class VideoEncoder3d(_LayerStack):
    """[B, 1 + 4k, H, W, 3] in [-1, 1] → moments [B, 1 + k, H/8, W/8, 2z] (mean ‖ logvar)."""

    def __init__(self, *, base_channels: int, channel_multipliers: Sequence[int], num_res_blocks: int,
                 latent_channels: int, temporal_downsample: Sequence[bool], mid_attention: bool,
                 resample_shortcut: bool, patch_size: int, remat: str, dtype: Dtype, rngs: nnx.Rngs,
                 norm: str = "rms", init_logvar: float = 0.0):
        dims = [base_channels * m for m in channel_multipliers]
        layers = [SpaceToDepth(patch_size)] if patch_size > 1 else []
        layers.append(_CachedConv(CausalConv3d(3 * patch_size**2, dims[0], (3, 3, 3), axes=(None, "conv_out"),
                                               dtype=dtype, rngs=rngs)))
        for level, dim in enumerate(dims):
            layers += [ResBlock(dim, dim, norm=norm, dtype=dtype, rngs=rngs) for _ in range(num_res_blocks)]
            if level < len(dims) - 1:
                layers.append(Downsample(dim, dims[level + 1], temporal_downsample[level], resample_shortcut,
                                         dtype=dtype, rngs=rngs))
        prev = dims[-1]
        layers.append(ResBlock(prev, prev, norm=norm, dtype=dtype, rngs=rngs))
        if mid_attention:
            layers.append(FrameAttention(prev, norm=norm, dtype=dtype, rngs=rngs))
        layers.append(ResBlock(prev, prev, norm=norm, dtype=dtype, rngs=rngs))
        layers.append(Head(prev, 2 * latent_channels, "conv_out", norm=norm, dtype=dtype, rngs=rngs))
        # 1x1x1 conv on the moments (Wan's conv1 / SD's quant_conv). Its logvar half's bias starts at
        # `init_logvar`: at 0 the posterior's noise (std 1) swamps the mean at init, and with a tiny KL
        # weight Adam needs ~|init_logvar| / lr steps to shrink it; a short run never gets there.
        moments = CausalConv3d(2 * latent_channels, 2 * latent_channels, (1, 1, 1), dtype=dtype, rngs=rngs)
        moments.bias[...] = moments.bias[...].at[latent_channels:].set(init_logvar)
        layers.append(_CachedConv(moments))
        self.layers = nnx.List(layers)
        self.remat = remat


class VideoDecoder3d(_LayerStack):
    """latents [B, 1 + k, h, w, z] → video [B, 1 + 4k, 8h, 8w, 3] (float, about [-1, 1])."""

    def __init__(self, *, base_channels: int, channel_multipliers: Sequence[int], num_res_blocks: int,
                 latent_channels: int, temporal_downsample: Sequence[bool], mid_attention: bool,
                 resample_shortcut: bool, patch_size: int, remat: str, dtype: Dtype, rngs: nnx.Rngs,
                 norm: str = "rms"):
        dims = [base_channels * m for m in channel_multipliers]
        top = dims[-1]
        # 1x1x1 conv on the latents (Wan's conv2 / SD's post_quant_conv), then into the top width.
        layers = [_CachedConv(CausalConv3d(latent_channels, latent_channels, (1, 1, 1), dtype=dtype, rngs=rngs)),
                  _CachedConv(CausalConv3d(latent_channels, top, (3, 3, 3), dtype=dtype, rngs=rngs)),
                  ResBlock(top, top, norm=norm, dtype=dtype, rngs=rngs)]
        if mid_attention:
            layers.append(FrameAttention(top, norm=norm, dtype=dtype, rngs=rngs))
        layers.append(ResBlock(top, top, norm=norm, dtype=dtype, rngs=rngs))
        for level in reversed(range(len(dims))):
            layers += [ResBlock(dims[level], dims[level], norm=norm, dtype=dtype, rngs=rngs)
                       for _ in range(num_res_blocks + 1)]
            if level > 0:  # mirrors the encoder's downsampling after level - 1
                layers.append(Upsample(dims[level], dims[level - 1], temporal_downsample[level - 1], resample_shortcut,
                                       dtype=dtype, rngs=rngs))
        layers.append(Head(dims[0], 3 * patch_size**2, None, norm=norm, dtype=dtype, rngs=rngs))
        if patch_size > 1:
            layers.append(DepthToSpace(patch_size))
        self.layers = nnx.List(layers)
        self.remat = remat


@struct.dataclass
class Posterior:
    """Diagonal Gaussian q(z | video): mean and logvar [B, t, h, w, z], float32."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> Posterior:
        """moments [..., 2z] (mean ‖ logvar) → Posterior; logvar clipped to [-30, 20] (as Wan/LDM)."""
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def sample(self, rng: jax.Array) -> jax.Array:
        """mean + std * eps, eps ~ N(0, 1): [B, t, h, w, z]."""
        return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        """KL(q || N(0, I)) per example, summed over t, h, w, z: [B] float32."""
        kl = 0.5 * (jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar)
        return kl.sum(axis=tuple(range(1, kl.ndim)))


def normalize_video(video: jax.Array, dtype: Dtype = jnp.float32) -> jax.Array:
    """uint8 [0, 255] → [-1, 1]; a float input is taken to be in [-1, 1] already."""
    if jnp.issubdtype(video.dtype, jnp.integer):
        return (video.astype(jnp.float32) / 127.5 - 1.0).astype(dtype)
    return video.astype(dtype)


def to_uint8(video: jax.Array) -> jax.Array:
    """Decoded float video in [-1, 1] → uint8 [0, 255] (clipped, rounded)."""
    return jnp.round((jnp.clip(video.astype(jnp.float32), -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)


class VideoVAE(nnx.Module):
    """Causal 3D conv VAE: `encode(video) -> Posterior`, `decode(latents) -> video`, `__call__` for training.

    Compression: `spatial_compression` = 2 ** (len(channel_multipliers) - 1) (8 for 4 levels),
    `temporal_compression` = 2 ** sum(temporal_downsample) (4 for two True stages). The defaults are
    the "tiny" variant. `norm` is the per-position channel norm before each conv ("rms" as Wan, or
    "none"). `init_logvar` is the posterior's initial log-variance (the bias of the
    encoder's last 1x1x1 conv, logvar half; 0 as in Wan / LDM). `remat` names a policy of vlm.nn.transformer.REMAT_POLICIES, applied per ResBlock.
    """

    def __init__(
        self,
        *,
        base_channels: int = 8,
        channel_multipliers: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int = 1,
        latent_channels: int = 16,
        temporal_downsample: Sequence[bool] = (True, True, False),
        mid_attention: bool = False,
        resample_shortcut: bool = True,
        patch_size: int = 1,
        norm: str = "rms",
        init_logvar: float = 0.0,
        remat: str = "none",
        dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_remat(remat)
        temporal_downsample = tuple(bool(t) for t in temporal_downsample)
        if len(temporal_downsample) != len(channel_multipliers) - 1:
            raise ValueError(
                f"temporal_downsample has {len(temporal_downsample)} entries but there are "
                f"{len(channel_multipliers) - 1} downsampling stages (len(channel_multipliers) - 1); give one per stage"
            )
        if norm not in NORMS:
            raise ValueError(f"norm={norm!r}; choose one of {', '.join(NORMS)}")
        if patch_size < 1:
            raise ValueError(f"patch_size={patch_size} must be ≥ 1 (1 = no patchify stem)")
        if latent_channels < 1 or base_channels < 1 or num_res_blocks < 0:
            raise ValueError(f"latent_channels={latent_channels}, base_channels={base_channels} must be ≥ 1 and "
                             f"num_res_blocks={num_res_blocks} ≥ 0")
        kw = dict(base_channels=base_channels, channel_multipliers=tuple(channel_multipliers),
                  num_res_blocks=num_res_blocks, latent_channels=latent_channels,
                  temporal_downsample=temporal_downsample, mid_attention=mid_attention,
                  resample_shortcut=resample_shortcut, patch_size=patch_size, remat=remat, dtype=dtype,
                  rngs=rngs, norm=norm)
        self.encoder = VideoEncoder3d(**kw, init_logvar=float(init_logvar))
        self.decoder = VideoDecoder3d(**kw)
        self.latent_channels = latent_channels
        self.spatial_compression = patch_size * 2 ** (len(channel_multipliers) - 1)
        self.temporal_compression = 2 ** sum(temporal_downsample)
        self.dtype = dtype

    # ---- shapes -------------------------------------------------------------------------------
    def latent_shape(self, video_shape: Sequence[int]) -> tuple[int, ...]:
        """[B, 1 + 4k, H, W, 3] → [B, 1 + k, H/8, W/8, z]; a one-line ValueError for other shapes."""
        b, t, h, w, c = self._check_video_shape(video_shape)
        s, tc = self.spatial_compression, self.temporal_compression
        return (b, 1 + (t - 1) // tc, h // s, w // s, self.latent_channels)

    def _check_video_shape(self, shape):
        if len(shape) != 5 or shape[-1] != 3:
            raise ValueError(f"video must be [B, T, H, W, 3], got shape {tuple(shape)}")
        b, t, h, w, c = shape
        s, tc = self.spatial_compression, self.temporal_compression
        if t < 1 or (t - 1) % tc:
            raise ValueError(f"video has {t} frames; the VAE needs 1 + {tc}k frames (1, {1 + tc}, {1 + 2 * tc}, ...)")
        if h % s or w % s:
            raise ValueError(f"frame size {h}x{w} is not divisible by the spatial compression {s}; crop or resize")
        return shape

    def _check_latent_shape(self, shape):
        if len(shape) != 5 or shape[-1] != self.latent_channels:
            raise ValueError(f"latents must be [B, t, h, w, {self.latent_channels}], got shape {tuple(shape)}")
        return shape

    # ---- cached steps (used by the one-shot passes and by video_vae_tiling) ---------------------
    def encode_step(self, x: jax.Array, cache=None, first: bool = True):
        """x float [B, T, H, W, 3] in [-1, 1] → (moments [B, T', H/8, W/8, 2z], cache).

        first=True: x starts at frame 0 (T = 1 + 4k → T' = 1 + k); else x continues after `cache`
        (T = 4k → T' = k).
        """
        return self.encoder(sharding.constrain(x.astype(self.dtype), ACTIVATION_AXES), cache, first)

    def decode_step(self, z: jax.Array, cache=None, first: bool = True):
        """latents [B, t, h, w, z] → (video [B, T, 8h, 8w, 3], cache); T = 1 + 4(t - 1) if first else 4t."""
        y, cache = self.decoder(sharding.constrain(z.astype(self.dtype), ACTIVATION_AXES), cache, first)
        return y.astype(jnp.float32), cache

    # ---- one-shot passes --------------------------------------------------------------------------
    def encode(self, video: jax.Array) -> Posterior:
        """video uint8 (or float in [-1, 1]) [B, 1 + 4k, H, W, 3] → Posterior over [B, 1 + k, H/8, W/8, z]."""
        self._check_video_shape(video.shape)
        moments, _ = self.encode_step(normalize_video(video, self.dtype))
        return Posterior.from_moments(moments)

    def decode(self, latents: jax.Array) -> jax.Array:
        """latents [B, 1 + k, h, w, z] → video float32 [B, 1 + 4k, 8h, 8w, 3], about [-1, 1] (unclipped)."""
        self._check_latent_shape(latents.shape)
        return self.decode_step(latents)[0]

    def __call__(self, video: jax.Array, rng: jax.Array | None = None) -> tuple[jax.Array, Posterior]:
        """Reconstruction (float32, [-1, 1]-scale) and the posterior; samples z with `rng`, else uses the mean."""
        posterior = self.encode(video)
        z = posterior.mode() if rng is None else posterior.sample(rng)
        return self.decode(z), posterior
