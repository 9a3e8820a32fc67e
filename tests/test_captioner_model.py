"""Captioner model: the dual encoder's video tower, causal teacher forcing, cache = recomputation, CoCa."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vlm import decoding
from vlm.models import captioner as captioner_lib
from vlm.models import video_encoder
from vlm.models.captioner import Captioner, shift_right
from vlm.models.dual_encoder import DualEncoder
from vlm.models.text_encoder import TextEncoder
from vlm.models.video_encoder import VideoEncoder

BOS, EOS = 2, 3
VOCAB, MAX_LEN, BATCH = 20, 6, 4
VIDEO = dict(num_frames=2, resolution=16, tubelet=(1, 8, 8), width=32, depth=1, num_heads=2, mlp_dim=64,
             attention="divided")
DECODER = dict(vocab_size=VOCAB, max_len=MAX_LEN, width=32, depth=2, num_heads=2, mlp_dim=64, bos_id=BOS)


def build(seed: int = 0, **overrides) -> Captioner:
    rngs = nnx.Rngs(seed)
    return Captioner(VideoEncoder(**VIDEO, rngs=rngs), **{**DECODER, **overrides}, rngs=rngs)


def random_inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    video = rng.integers(0, 256, (BATCH, 2, 16, 16, 3), dtype=np.uint8)
    tokens = rng.integers(4, VOCAB, (BATCH, MAX_LEN)).astype(np.int32)
    lengths = np.array([2, 3, 5, 6])  # captions of 1..5 pieces + EOS; the last is cut without EOS
    tokens[np.arange(BATCH), np.minimum(lengths - 1, MAX_LEN - 1)] = np.where(lengths < MAX_LEN, EOS, tokens[:, -1])
    tokens[np.arange(MAX_LEN)[None] >= lengths[:, None]] = 0
    return jnp.asarray(video), jnp.asarray(tokens)


def param_tree(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@nnx.jit
def forward(model, video, tokens):
    """Everything a test reads, in one compile per model: __call__ and the single-purpose methods."""
    out = dict(model(video, tokens), caption_logits=model.caption_logits(video, tokens))
    if model.coca:
        out["contrastive"] = model.contrastive_embeddings(video, tokens)
    return out


@pytest.fixture(scope="module")
def plain():
    return build()


@pytest.fixture(scope="module")
def coca():
    return build(coca=True, unimodal_depth=1, embed_dim=16, num_queries=3)


def test_video_tower_is_the_dual_encoders():
    """Same parameter paths and shapes under video/: a dual-encoder run's tower maps on directly."""
    def dual_encoder():
        rngs = nnx.Rngs(0)
        text = TextEncoder(vocab_size=VOCAB, max_len=MAX_LEN, width=32, depth=1, num_heads=2, mlp_dim=64, rngs=rngs)
        return DualEncoder(VideoEncoder(**VIDEO, rngs=rngs), text, 16, loss="softmax", dtype=jnp.float32, rngs=rngs)

    shapes = lambda make: {path: leaf.shape for path, leaf in
                           jax.tree_util.tree_leaves_with_path(param_tree(nnx.eval_shape(make))["video"])}
    ours = shapes(lambda: build(coca=True, unimodal_depth=1, embed_dim=16, num_queries=3))
    assert ours == shapes(dual_encoder) and len(ours) > 10


def test_every_parameter_has_logical_axes(coca):
    count = 0
    for path, var in nnx.to_flat_state(nnx.state(coca, nnx.Param)):
        axes = var.get_metadata().get("out_sharding")
        if var[...].ndim:
            assert axes is not None and len(axes) == var[...].ndim, path
            count += 1
    assert count > 50
    assert param_tree(coca)["head"]["kernel"].shape == (32, VOCAB)  # [embed, vocab]


def test_teacher_forcing_is_causal(plain):
    model = plain
    video, tokens = random_inputs()
    out = forward(model, video, tokens)
    logits = out["logits"]
    assert logits.shape == (BATCH, MAX_LEN, VOCAB) and logits.dtype == jnp.float32
    np.testing.assert_allclose(out["caption_logits"], logits, atol=1e-5)
    # logits[:, i] predicts tokens[:, i] from tokens[:, :i]: changing token j changes only positions > j.
    j = 2
    changed = forward(model, video, tokens.at[:, j].set(7))["logits"]
    np.testing.assert_allclose(changed[:, : j + 1], logits[:, : j + 1], atol=1e-6)
    assert float(jnp.abs(changed[:, j + 1] - logits[:, j + 1]).max(-1).min()) > 1e-4
    # The video matters.
    assert float(jnp.abs(forward(model, video[::-1], tokens)["logits"] - logits).max()) > 1e-3


def test_multi_token_cache_fill_equals_recomputation_with_pooled_queries_and_tied_head():
    model = build(num_queries=3, tie_embeddings=True)
    assert model.head is None and "head" not in param_tree(model)
    video, tokens = random_inputs(1)
    inputs = shift_right(tokens, BOS)

    @nnx.jit
    def cached_and_full(model, video, inputs):
        cache = model.init_cache(video, MAX_LEN)
        first, cache = model.extend(cache, inputs[:, :4])
        second, cache = model.extend(cache, inputs[:, 4:])
        context = model.context(model.encode_video(video))
        return jnp.concatenate([first, second], 1), model.decode(context, inputs), context, cache["index"]

    cached, full, context, index = cached_and_full(model, video, inputs)
    assert context.shape == (BATCH, 3, 32)  # [B, Q, D]: the decoder attends to 3 pooled queries
    assert int(index) == MAX_LEN
    np.testing.assert_allclose(cached, full, atol=1e-5, rtol=0)


def test_coca_shapes_and_unit_norm(coca):
    video, tokens = random_inputs()
    out = forward(coca, video, tokens)
    assert out["logits"].shape == (BATCH, MAX_LEN, VOCAB)
    for key in ("video_emb", "text_emb"):
        assert out[key].shape == (BATCH, 16) and out[key].dtype == jnp.float32
        np.testing.assert_allclose(jnp.linalg.norm(out[key], axis=-1), 1.0, rtol=1e-5)
    v, t = out["contrastive"]
    np.testing.assert_allclose(v, out["video_emb"], atol=1e-6)
    np.testing.assert_allclose(t, out["text_emb"], atol=1e-6)
    np.testing.assert_allclose(out["caption_logits"], out["logits"], atol=1e-5)
    assert float(coca.logit_scale[...]) == pytest.approx(np.log(1 / 0.07))


def test_coca_unimodal_layers_never_see_the_video(coca):
    video, tokens = random_inputs()
    out = forward(coca, video, tokens)
    other = forward(coca, video[::-1], tokens)
    np.testing.assert_array_equal(other["text_emb"], out["text_emb"])  # text-only
    assert float(jnp.abs(other["logits"] - out["logits"]).max()) > 1e-3  # the multimodal layers do see it
    assert float(jnp.abs(other["video_emb"] - out["video_emb"]).max()) > 1e-3
    # The text embedding is read at each caption's EOS (its last non-pad token): a piece changes it.
    changed = forward(coca, video, tokens.at[:, 0].set(9))["text_emb"]
    assert float(jnp.abs(changed - out["text_emb"]).max(-1).min()) > 1e-4


def test_coca_cached_greedy_equals_full_recomputation(coca):
    video, _ = random_inputs(2)
    tokens, cached = decoding.greedy(coca, video, max_len=MAX_LEN, eos_id=EOS, return_logits=True)
    full = forward(coca, video, tokens)["caption_logits"]  # teacher forcing on the decoded tokens
    has_eos = (tokens == EOS).any(-1)
    n = jnp.where(has_eos, jnp.argmax(tokens == EOS, -1) + 1, MAX_LEN)
    valid = np.asarray(jnp.arange(MAX_LEN)[None] < n[:, None])
    np.testing.assert_allclose(np.asarray(cached)[valid], np.asarray(full)[valid], atol=1e-5, rtol=0)


def test_remat_policy_reaches_the_decoder_blocks():
    """The policy wraps every decoder block (checked on the traced gradient; numbers are remat's own business)."""
    video, tokens = random_inputs()

    def grad_jaxpr(model):
        graphdef, params = nnx.split(model)
        loss = lambda p: nnx.merge(graphdef, p)(video, tokens)["logits"].mean()
        return str(jax.make_jaxpr(jax.grad(loss))(params))

    models = nnx.eval_shape(lambda: (build(), build(remat="full")))
    plain, rematted = (grad_jaxpr(m) for m in models)
    assert plain.count("remat2[") == 0 and rematted.count("remat2[") == DECODER["depth"]  # one per block


def test_variants_are_valid_and_follow_cappa():
    for name, v in captioner_lib.VARIANTS.items():
        assert v["width"] % v["num_heads"] == 0, name
    for name in ("B", "L"):  # a 6-layer decoder as wide as its encoder
        assert captioner_lib.VARIANTS[name]["depth"] == 6
        assert captioner_lib.VARIANTS[name]["width"] == video_encoder.VARIANTS[name]["width"]


@pytest.mark.parametrize("overrides, message", [
    (dict(bos_id=0), "bos_id"),
    (dict(coca=True), "unimodal_depth"),
    (dict(unimodal_depth=2), "coca=True"),
    (dict(num_queries=-1), "num_queries"),
    (dict(remat="sometimes"), "remat"),
])
def test_bad_configuration_is_a_one_line_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        nnx.eval_shape(lambda: build(**overrides))
