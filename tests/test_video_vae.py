"""Causal video VAE: shapes, images as one-frame videos, causality, chunked and tiled passes equal the
one-shot pass, a program that does not grow with the clip, sharded equals one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vlm import sharding
from vlm.models import video_vae_tiling as tiling
from vlm.models.video_vae import VARIANTS, Posterior, VideoVAE, to_uint8
from vlm.nn.conv import CausalConv3d

# Wan 2.1's structure (8x space, 4x time at the last two of 3 stages, mid attention) plus the resampling
# shortcuts, as narrow and shallow as possible so it compiles fast.
SMALL = dict(base_channels=8, channel_multipliers=(1, 2, 2, 2), num_res_blocks=0, latent_channels=4,
             temporal_downsample=(False, True, True), mid_attention=True)


def jitted(vae, fn):
    """fn(vae, x) jitted with the parameters as an argument (not baked-in constants)."""
    graphdef, state = nnx.split(vae)
    f = jax.jit(lambda state, x: fn(nnx.merge(graphdef, state), x))
    return lambda x: f(state, x)


def build(seed=0, **kw) -> VideoVAE:
    """VideoVAE(**kw) with its parameters made by one jitted init (faster than op-by-op here)."""
    graphdef = nnx.split(nnx.eval_shape(lambda: VideoVAE(**kw, rngs=nnx.Rngs(seed))))[0]
    init = jax.jit(lambda: nnx.split(VideoVAE(**kw, rngs=nnx.Rngs(seed)))[1])
    return nnx.merge(graphdef, init())


def random_video(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))


@pytest.fixture(scope="module")
def vae():
    return build(**SMALL)


@pytest.fixture(scope="module")
def encode(vae):
    return jitted(vae, lambda m, v: m.encode(v).mean)


@pytest.fixture(scope="module")
def decode(vae):
    return jitted(vae, lambda m, z: m.decode(z))


@pytest.fixture(scope="module")
def clip(encode, decode):
    """One clip for every one-shot comparison (one compile): [B, 1 + 4k, H, W, 3] with k = 6, its latents
    and its decoded frames. k = 6 later latent frames: chunks of 4 and 8 need padding."""
    video = random_video((2, 25, 16, 16, 3), seed=1)
    latents = encode(video)
    return video, latents, decode(latents)


def test_shapes_and_an_image_is_the_first_frame(vae, encode, clip):
    video, latents, frames = clip
    assert latents.shape == (2, 7, 2, 2, 4) == vae.latent_shape(video.shape)  # [B, 1 + k, H/8, W/8, z]
    assert frames.shape == video.shape
    image = encode(video[:, :1])  # an image is a one-frame video → one latent frame
    assert image.shape == (2, 1, 2, 2, 4)
    # Same numbers as the video's first latent (a different conv length may round differently).
    np.testing.assert_allclose(image, latents[:, :1], rtol=0, atol=1e-6)
    assert float(jnp.abs(latents[:, 1] - latents[:, 0]).max()) > 1e-2  # ... and the others are not that
    with pytest.raises(ValueError, match="1 \\+ 4k frames"):
        vae.encode(video[:, :8])
    with pytest.raises(ValueError, match="not divisible by the spatial compression 8"):
        vae.encode(video[:, :, :12])
    with pytest.raises(ValueError, match="latents must be"):
        vae.decode(latents[..., :3])


def test_encoder_and_decoder_are_causal(encode, decode, clip):
    video, latents, frames = clip  # latents: frame 0 | 1..4 | 5..8 | 9..12 | ...
    for first_changed, group in ((1, 1), (5, 2), (9, 3)):
        changed = video.at[:, first_changed:].set(255 - video[:, first_changed:])
        other = encode(changed)
        np.testing.assert_array_equal(other[:, :group], latents[:, :group])  # bit-identical before the group
        assert float(jnp.abs(other[:, group] - latents[:, group]).max()) > 1e-3
    for group in (1, 2, 3):  # latent j ≥ 1 decodes to frames 4j - 3 .. 4j
        changed = latents.at[:, group:].add(1.0)
        other = decode(changed)
        first_frame = 4 * group - 3
        np.testing.assert_array_equal(other[:, :first_frame], frames[:, :first_frame])
        assert float(jnp.abs(other[:, first_frame] - frames[:, first_frame]).max()) > 1e-3


@pytest.mark.parametrize("chunk", [1, 4, 8])
def test_chunked_passes_equal_one_shot(vae, clip, chunk):
    video, latents, frames = clip
    chunked_latents = jitted(vae, lambda m, v: tiling.encode_chunked(m, v, chunk).mean)(video)
    np.testing.assert_allclose(chunked_latents, latents, rtol=0, atol=1e-5)
    chunked_frames = jitted(vae, lambda m, z: tiling.decode_chunked(m, z, chunk))(latents)
    assert chunked_frames.shape == frames.shape == (2, 25, 16, 16, 3)
    np.testing.assert_allclose(chunked_frames, frames, rtol=0, atol=1e-5)


def _count(jaxpr, predicate) -> int:
    """Equations satisfying `predicate`, counted through nested jaxprs (scan bodies, pjit calls)."""
    total = 0
    for eqn in jaxpr.eqns:
        total += bool(predicate(eqn))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += _count(inner, predicate)
    return total


def test_chunked_program_does_not_grow_with_the_clip(vae, monkeypatch):
    """9 frames (2 later chunks) and 33 frames (8 chunks) trace the chunk body once: the same program."""
    traces = []
    encode_step, decode_step = VideoVAE.encode_step, VideoVAE.decode_step
    monkeypatch.setattr(VideoVAE, "encode_step", lambda self, x, c=None, first=True: (
        traces.append(("enc", first)), encode_step(self, x, c, first))[1])
    monkeypatch.setattr(VideoVAE, "decode_step", lambda self, z, c=None, first=True: (
        traces.append(("dec", first)), decode_step(self, z, c, first))[1])
    sizes = {}
    for frames in (9, 33):
        traces.clear()
        video = jax.ShapeDtypeStruct((1, frames, 16, 16, 3), jnp.uint8)
        latents = jax.ShapeDtypeStruct((1, 1 + (frames - 1) // 4, 2, 2, 4), jnp.float32)
        enc = jax.make_jaxpr(lambda v: tiling.encode_chunked(vae, v, 1).mean)(video).jaxpr
        dec = jax.make_jaxpr(lambda z: tiling.decode_chunked(vae, z, 1))(latents).jaxpr
        # Frame 0 once on its own, then the scanned chunk body traced once (not once per chunk).
        assert traces == [("enc", True), ("enc", False), ("dec", True), ("dec", False)]
        convs = lambda e: e.primitive.name == "conv_general_dilated"
        sizes[frames] = (len(enc.eqns), len(dec.eqns), _count(enc, convs), _count(dec, convs),
                         _count(enc, lambda e: e.primitive.name == "scan"))
    assert sizes[9] == sizes[33]
    assert sizes[9][4] == 1  # one scan


@pytest.fixture(scope="module")
def small_2x():
    """2x space, 2x time, two levels: the same blocks with a receptive field small enough to tile exactly."""
    return build(seed=1, base_channels=8, channel_multipliers=(1, 2), temporal_downsample=(True,),
                 num_res_blocks=0, latent_channels=4)


def _receptive_radius(before: jax.Array, after: jax.Array, centre: int, scale: int) -> int:
    """Latent pixels from the perturbed latent pixel `centre` (rows of 8x8 = `scale` output pixels) to the
    farthest output row that changed."""
    rows = np.nonzero(np.asarray(jnp.abs(after - before).max(axis=(0, 1, 3, 4))) > 0)[0]
    lo, hi = centre * scale, (centre + 1) * scale - 1
    return int(np.ceil(max(lo - rows.min(), rows.max() - hi) / scale))


def test_tiled_decode_and_encode_equal_one_shot_when_the_margin_covers_the_receptive_field(small_2x):
    vae, s, n = small_2x, small_2x.spatial_compression, 40
    decode = jitted(vae, lambda m, z: m.decode(z))
    latents = jnp.asarray(np.random.default_rng(0).normal(size=(1, 2, n, n, 4)).astype(np.float32))
    frames = decode(latents)  # [1, 3, 80, 80, 3]
    # The decoder's spatial receptive radius, measured: how far a change to one latent pixel reaches.
    radius = _receptive_radius(frames, decode(latents.at[:, :, n // 2, n // 2].add(1.0)), n // 2, s)
    assert 4 <= radius <= 12  # 3x3 convs: a finite, architecture-sized reach (9 here)
    # Tiles see zero padding where the full frame has neighbours; outputs within `radius` of an inner tile
    # edge differ. With margin ≥ radius those get weight 0, so the blend is exact everywhere, seams included.
    margin, tile = radius, 3 * radius
    overlap = 2 * margin + 2
    assert len(tiling.tile_starts(n, tile, overlap)) >= 3  # seams in both directions
    tiled = jitted(vae, lambda m, z: tiling.decode_tiled(m, z, tile=tile, overlap=overlap, margin=margin))(latents)
    error = np.asarray(jnp.abs(tiled - frames).max(axis=(0, 1, 4)))  # [H, W]
    seam = np.zeros((n * s,), bool)
    for start in tiling.tile_starts(n, tile, overlap)[1:]:  # the overlap bands, where tiles are blended
        seam[start * s:(start + overlap) * s] = True
    near_seams = max(error[seam].max(), error[:, seam].max())
    interior = error[~seam][:, ~seam].max()
    assert near_seams <= 1e-5 and interior <= 1e-5, (near_seams, interior)
    # The same tiles blended with a plain linear ramp (margin 0) use outputs spoiled by the tile edge:
    plain = jitted(vae, lambda m, z: tiling.decode_tiled(m, z, tile=tile, overlap=overlap, margin=0))(latents)
    assert float(jnp.abs(plain - frames).max()) > 1e-3
    # Chunked in time inside each tile: the same result.
    both = jitted(vae, lambda m, z: tiling.decode_tiled(m, z, tile=tile, overlap=overlap, margin=margin,
                                                        chunk=1))(latents)
    np.testing.assert_allclose(both, frames, rtol=0, atol=1e-5)

    # Encode: tiles of `tile` latent pixels (8 * tile... here 2 * tile video pixels), blended in latent space.
    video = to_uint8(frames)
    latents = jitted(vae, lambda m, v: m.encode(v).mean)(video)
    tiled = jitted(vae, lambda m, v: tiling.encode_tiled(m, v, tile=tile, overlap=overlap, margin=margin).mean)(video)
    np.testing.assert_allclose(tiled, latents, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="2 \\* margin < overlap"):
        tiling.decode_tiled(vae, latents, tile=8, overlap=4, margin=2)


def test_sharded_forward_equals_one_device(vae):
    """Batch over (data, fsdp) = 4, conv output channels over tensor = 2 via the rules."""
    rules = tuple((name, "tensor") if name == "conv_out" else (name, axes) for name, axes in sharding.DEFAULT_RULES)
    mesh = sharding.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    graphdef, state = nnx.split(vae)
    params = nnx.to_pure_dict(state)
    video = random_video((4, 5, 16, 16, 3), seed=2)

    @jax.jit
    def forward(params, video):
        model = nnx.merge(graphdef, params)
        latents = model.encode(video).mean  # one-shot encode; chunked decode (a scan carrying sharded caches)
        return latents, tiling.decode_chunked(model, latents, 1)

    expected = forward(params, video)  # one device
    with sharding.use_mesh(mesh, rules):
        sharded = jax.device_put(params, sharding.state_shardings(state, mesh, rules))
        conv = sharded["decoder"]["layers"][1]["conv"]["kernel"]  # [kt, kh, kw, conv_in, conv_out]
        assert conv.sharding.spec == jax.sharding.PartitionSpec(None, None, None, None, "tensor")
        assert conv.addressable_shards[0].data.shape[-1] * 2 == conv.shape[-1]
        got = forward(sharded, jax.device_put(video, sharding.batch_sharding(mesh, video.ndim)))
    assert got[0].sharding.spec[0] == ("data", "fsdp")  # the batch stayed split
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_posterior_sample_and_kl():
    mean = jnp.zeros((2, 1, 2, 2, 3))
    assert np.allclose(Posterior(mean, jnp.zeros_like(mean)).kl(), 0.0)  # N(0, 1) against N(0, 1)
    post = Posterior(jnp.ones((2, 1, 2, 2, 3)), jnp.full((2, 1, 2, 2, 3), np.log(4.0)))
    # KL = 0.5 * (mu^2 + var - 1 - log var) per dimension, summed over the 12 latent dimensions.
    np.testing.assert_allclose(post.kl(), 12 * 0.5 * (1 + 4 - 1 - np.log(4.0)), rtol=1e-6)
    draws = Posterior(jnp.full((20000,), 3.0), jnp.full((20000,), np.log(0.25))).sample(jax.random.key(0))
    assert abs(float(draws.mean()) - 3.0) < 0.02 and abs(float(draws.std()) - 0.5) < 0.02
    np.testing.assert_array_equal(to_uint8(jnp.array([-2.0, -1.0, 0.0, 1.0, 3.0])), [0, 0, 128, 255, 255])
    pixels = random_video((3, 7))
    np.testing.assert_array_equal(to_uint8(pixels.astype(jnp.float32) / 127.5 - 1.0), pixels)


def test_conv_impls_and_chunked_conv_agree():
    conv = CausalConv3d(4, 6, (3, 3, 3), impl="native", rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7, 5, 5, 4)).astype(np.float32))
    native, _ = conv(x)
    conv.impl = "fold_time"
    folded, _ = conv(x)
    np.testing.assert_allclose(folded, native, rtol=0, atol=1e-5)
    head, cache = conv(x[:, :3])  # the first 3 frames, then the other 4 with the cache
    tail, _ = conv(x[:, 3:], cache)
    np.testing.assert_allclose(jnp.concatenate([head, tail], 1), native, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant, max_params", [("tiny", 3e6), ("wan", 1.5e8)])
def test_variants_compress_8x_in_space_4x_in_time(variant, max_params):
    model = nnx.eval_shape(lambda: VideoVAE(**VARIANTS[variant], rngs=nnx.Rngs(0)))  # shapes only
    assert model.latent_shape((2, 17, 64, 64, 3)) == (2, 5, 8, 8, 16)
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert max_params / 2 < params < max_params  # tiny ~1.9M; wan ~133M (Wan 2.1's VAE: ~127M)
