"""Model and loss behaviour: shapes, images as one-frame videos, losses against references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import random_batch, small_config
from vlm import tasks
from vlm.models.video_encoder import VideoEncoder
from vlm.tasks import contrastive


def build(config):
    return tasks.get(config).build_model(nnx.Rngs(0))


@pytest.mark.parametrize("attention", ["joint", "divided"])
def test_video_encoder_accepts_clips_and_images(attention):
    enc = VideoEncoder(num_frames=8, resolution=16, tubelet=(2, 8, 8), width=32, depth=1, num_heads=2, mlp_dim=64,
                       attention=attention, rngs=nnx.Rngs(0))
    clip = jnp.zeros((2, 8, 16, 16, 3), jnp.uint8)
    image = jnp.zeros((2, 1, 16, 16, 3), jnp.uint8)
    assert enc(clip).shape == (2, 4 * 4, 32)  # [B, T'*S, D]: 4 tubelets in time x 2x2 patches
    assert enc(image).shape == (2, 1 * 4, 32)  # an image is one temporal position


def test_divided_attention_mixes_time_and_space():
    """Changing one frame changes the features of tokens at other times (temporal attention works)."""
    enc = VideoEncoder(num_frames=4, resolution=16, tubelet=(1, 8, 8), width=32, depth=1, num_heads=2, mlp_dim=64,
                       attention="divided", rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (1, 4, 16, 16, 3), dtype=np.uint8)
    b = a.copy()
    b[0, 3] = 255 - b[0, 3]
    fa, fb = enc(jnp.asarray(a)).reshape(4, 4, 32), enc(jnp.asarray(b)).reshape(4, 4, 32)
    assert float(jnp.abs(fa[0] - fb[0]).max()) > 1e-3  # frame 0 tokens see frame 3


def test_embeddings_are_unit_norm_and_text_ignores_padding():
    config = small_config()
    model = build(config)
    batch = random_batch(config)
    v, t = model(jnp.asarray(batch["video"]), jnp.asarray(batch["tokens"]))
    assert v.shape == t.shape == (config.batch_size, config.model.embed_dim)
    np.testing.assert_allclose(jnp.linalg.norm(v, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(t, axis=-1), 1.0, rtol=1e-5)
    # Extra padding does not change a caption's embedding.
    tokens = np.zeros((1, config.data.max_text_len), np.int32)
    tokens[0, :3] = [5, 6, 7]
    short = tokens.copy()
    longer_pad = model.embed_text(jnp.asarray(tokens))
    np.testing.assert_allclose(model.embed_text(jnp.asarray(short)), longer_pad, rtol=1e-6)
    tokens2 = tokens.copy()
    tokens2[0, 3] = 9
    assert float(jnp.abs(model.embed_text(jnp.asarray(tokens2)) - longer_pad).max()) > 1e-4


def reference_infonce(v, t, scale):
    logits = scale * t @ v.T
    def ce(l):
        l = l - l.max(1, keepdims=True)
        return -(np.diag(l) - np.log(np.exp(l).sum(1))).mean()
    return 0.5 * (ce(logits) + ce(logits.T))


def test_softmax_loss_matches_reference_and_chance():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(8, 4)); v /= np.linalg.norm(v, axis=1, keepdims=True)
    t = rng.normal(size=(8, 4)); t /= np.linalg.norm(t, axis=1, keepdims=True)
    got = contrastive.softmax_loss(jnp.asarray(v), jnp.asarray(t), 10.0)
    np.testing.assert_allclose(got, reference_infonce(v, t, 10.0), rtol=1e-5)
    # Identical embeddings with scale 0 → uniform → log(B).
    np.testing.assert_allclose(contrastive.softmax_loss(jnp.asarray(v), jnp.asarray(v), 0.0), math.log(8), rtol=1e-6)


def test_sigmoid_loss_matches_reference():
    rng = np.random.default_rng(1)
    v = rng.normal(size=(6, 4)); t = rng.normal(size=(6, 4))
    got = contrastive.sigmoid_loss(jnp.asarray(v), jnp.asarray(t), 2.0, -1.0)
    logits = 2.0 * t @ v.T - 1.0
    labels = 2 * np.eye(6) - 1
    ref = np.log1p(np.exp(-labels * logits)).sum() / 6
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_temperature_is_clamped():
    config = small_config()
    task = tasks.get(config)
    model = build(config)
    model.logit_scale[...] = jnp.asarray(10.0)  # exp(10) ≫ 100
    feats = {"video": jnp.eye(4, 8), "text": jnp.eye(4, 8)}
    _, metrics = task.loss(model, feats, None)
    np.testing.assert_allclose(metrics["train/logit_scale"], config.task.max_logit_scale, rtol=1e-6)
    # And the clamp stops the gradient from pushing it further.
    graphdef, params = nnx.split(model, nnx.Param)
    def loss_of_params(p):
        return task.loss(nnx.merge(graphdef, p), feats, None)[0]
    grads = jax.grad(loss_of_params)(params)
    assert float(grads["logit_scale"][...]) == 0.0
