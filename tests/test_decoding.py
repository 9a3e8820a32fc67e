"""Decoding: cached equals recomputed, beam search against exhaustive search, batch and sharding invariance."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vlm import decoding, sharding
from vlm.models.captioner import Captioner, shift_right
from vlm.models.video_encoder import VideoEncoder

BOS, EOS = 2, 3  # the tokenizer's ids (input_pipeline/tokenizer.py); padding is 0
MAX_LEN = 8
BATCH = 8


def tiny_captioner(vocab_size: int, max_len: int, seed: int = 0, eos_bias: float = 0.0) -> Captioner:
    rngs = nnx.Rngs(seed)
    video = VideoEncoder(num_frames=2, resolution=16, tubelet=(1, 8, 8), width=32, depth=1, num_heads=2, mlp_dim=64,
                         rngs=rngs)
    model = Captioner(video, vocab_size=vocab_size, max_len=max_len, width=32, depth=2, num_heads=2, mlp_dim=64,
                      bos_id=BOS, rngs=rngs)
    # An untrained model rarely says EOS; raise its logit so captions end at different lengths.
    model.head.bias[...] = model.head.bias[...].at[EOS].add(eos_bias)
    return model


def random_video(batch: int, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (batch, 2, 16, 16, 3), dtype=np.uint8))


@nnx.jit
def full_logits(model: Captioner, video: jax.Array, tokens: jax.Array) -> jax.Array:
    """Teacher-forced logits (no cache) of every next token [B, L, V] for the decoded tokens [B, L]."""
    return model.decode(model.context(model.encode_video(video)), shift_right(tokens, BOS))


def full_log_probs(model, video, tokens) -> np.ndarray:
    return np.asarray(decoding.log_probs(full_logits(model, video, tokens)))  # as decoding normalises them


def caption_lengths(tokens: np.ndarray) -> np.ndarray:
    """Number of tokens up to and including EOS (or all of them if there is none)."""
    tokens = np.asarray(tokens)
    has_eos = (tokens == EOS).any(-1)
    return np.where(has_eos, (tokens == EOS).argmax(-1) + 1, tokens.shape[-1])


def sequence_scores(model, video, tokens, alpha) -> np.ndarray:
    """sum of log-probs up to the caption's end / length penalty, by full recomputation."""
    logp = full_log_probs(model, video, tokens)
    picked = np.take_along_axis(logp, np.asarray(tokens)[..., None], -1)[..., 0]  # [B, L]
    n = caption_lengths(tokens)
    total = np.where(np.arange(tokens.shape[1]) < n[:, None], picked, 0.0).sum(-1)
    return total / ((5.0 + n) / 6.0) ** alpha


@pytest.fixture(scope="module")
def model():
    return tiny_captioner(vocab_size=24, max_len=MAX_LEN, eos_bias=1.0)


@pytest.fixture(scope="module")
def video():
    return random_video(BATCH)


@pytest.fixture(scope="module")
def decoded(model, video):
    """Single-device reference results, reused by the invariance tests."""
    greedy, greedy_logits = decoding.greedy(model, video, max_len=MAX_LEN, eos_id=EOS, return_logits=True)
    beam1 = decoding.beam_search(model, video, beam_size=1, max_len=MAX_LEN, eos_id=EOS, alpha=0.0)
    beam3 = decoding.beam_search(model, video, beam_size=3, max_len=MAX_LEN, eos_id=EOS, alpha=0.6)
    return jax.device_get(dict(greedy=greedy, greedy_logits=greedy_logits, beam1=beam1, beam3=beam3))


def test_greedy_output_format(decoded):
    tokens = decoded["greedy"]
    assert tokens.dtype == np.int32 and tokens.shape == (BATCH, MAX_LEN)
    n = caption_lengths(tokens)
    ended = (tokens == EOS).any(-1)
    assert 0 < ended.sum() < BATCH and len(set(n[ended])) > 1  # some end, at different lengths; some don't
    after = np.arange(MAX_LEN)[None] >= n[:, None]
    assert (tokens[after] == 0).all()  # padding after EOS
    assert (tokens[~after] != 0).all()  # padding is never generated


def test_cached_greedy_equals_full_recomputation(model, video, decoded):
    tokens, cached = decoded["greedy"], decoded["greedy_logits"]
    full = np.asarray(full_logits(model, video, jnp.asarray(tokens)))
    valid = np.arange(MAX_LEN)[None] < caption_lengths(tokens)[:, None]  # [B, L]: steps up to each EOS
    np.testing.assert_allclose(cached[valid], full[valid], atol=1e-5, rtol=0)
    # Greedy by full recomputation picks the same token at every step.
    np.testing.assert_array_equal(np.argmax(np.asarray(decoding.log_probs(full)), -1)[valid], tokens[valid])


def test_beam_size_one_is_greedy(model, video, decoded):
    tokens, scores = decoded["beam1"]
    np.testing.assert_array_equal(tokens, decoded["greedy"])
    np.testing.assert_allclose(scores, sequence_scores(model, video, jnp.asarray(tokens), 0.0), atol=1e-5)


def test_beam_scores_are_length_penalised_log_probs(model, video, decoded):
    tokens, scores = decoded["beam3"]
    # Finished captions and (where none finished) live ones, scored log-prob / ((5 + length) / 6) ** 0.6.
    ended = (tokens == EOS).any(-1)
    assert 0 < ended.sum() < BATCH
    np.testing.assert_allclose(scores, sequence_scores(model, video, jnp.asarray(tokens), 0.6), atol=1e-5)


def test_beam_search_is_exact_when_the_beam_covers_every_sequence():
    """Vocab 5 (ids 1..4 generated), max_len 4, beam 4**4: the finished pool must be all 40 captions
    that end with EOS, ranked by log-prob / ((5 + length) / 6) ** alpha, as enumeration ranks them."""
    vocab, length, alpha = 5, 4, 1.0
    model = tiny_captioner(vocab_size=vocab, max_len=length, seed=1)
    video = random_video(2, seed=1)
    tokens, scores = jax.device_get(decoding.beam_search(model, video, beam_size=4**length, max_len=length,
                                                         eos_id=EOS, alpha=alpha, return_all=True))
    words = [t for t in range(1, vocab) if t != EOS]
    finished = np.array([list(p) + [EOS] + [0] * (length - k - 1)
                         for k in range(length) for p in itertools.product(words, repeat=k)], np.int32)  # [40, 4]
    assert len(finished) == 40
    for b in range(2):
        true = sequence_scores(model, jnp.repeat(video[b:b + 1], len(finished), 0), jnp.asarray(finished), alpha)
        order = np.argsort(-true)
        assert true[order[0]] - true[order[1]] > 1e-4  # a unique best, so the comparison is meaningful
        found = np.isfinite(scores[b])
        assert found.sum() == len(finished)
        np.testing.assert_array_equal(tokens[b, 0], finished[order[0]])
        np.testing.assert_allclose(scores[b, found], true[order], atol=1e-5)
        assert {tuple(t) for t in tokens[b, found]} == {tuple(t) for t in finished}


def test_an_example_decodes_the_same_in_any_batch(model, video, decoded):
    """Rolling the batch puts every example among other neighbours (same shape: no new compile);
    each still decodes to the same caption (no leak between examples through beams or early exit)."""
    shift = 3
    rolled = jnp.roll(video, shift, axis=0)
    greedy = decoding.greedy(model, rolled, max_len=MAX_LEN, eos_id=EOS, return_logits=True)[0]
    np.testing.assert_array_equal(greedy, np.roll(decoded["greedy"], shift, axis=0))
    tokens, scores = decoding.beam_search(model, rolled, beam_size=3, max_len=MAX_LEN, eos_id=EOS, alpha=0.6)
    np.testing.assert_array_equal(tokens, np.roll(decoded["beam3"][0], shift, axis=0))
    np.testing.assert_allclose(scores, np.roll(decoded["beam3"][1], shift, axis=0), atol=1e-5)


def test_sharded_decoding_equals_single_device(model, video, decoded):
    """data=2 x fsdp=2 x tensor=2: batch over data and fsdp, embed over fsdp, heads / mlp / vocab over
    tensor (the default rules); same captions and scores as on one device."""
    mesh = sharding.create_mesh(dict(data=2, fsdp=2, tensor=2))
    rules = sharding.DEFAULT_RULES
    graphdef, state = nnx.split(model)
    shardings = sharding.state_shardings(state, mesh, rules)
    nnx.replace_by_pure_dict(state, jax.device_put(nnx.to_pure_dict(state), shardings))
    head = state["head"]["kernel"][...]
    assert head.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor") and len(head.sharding.device_set) == 8
    with sharding.use_mesh(mesh, rules):
        sharded_video = jax.device_put(video, sharding.batch_sharding(mesh, video.ndim))
        greedy = decoding.greedy((graphdef, state), sharded_video, max_len=MAX_LEN, eos_id=EOS)
        tokens, scores = decoding.beam_search((graphdef, state), sharded_video, beam_size=3, max_len=MAX_LEN,
                                              eos_id=EOS, alpha=0.6)
    np.testing.assert_array_equal(jax.device_get(greedy), decoded["greedy"])
    np.testing.assert_array_equal(jax.device_get(tokens), decoded["beam3"][0])
    np.testing.assert_allclose(jax.device_get(scores), decoded["beam3"][1], atol=1e-5)


def test_sampling_is_reproducible_and_top_k_one_is_greedy(model, video, decoded):
    draw = lambda seed: np.asarray(decoding.sample(model, video, jax.random.key(seed), max_len=MAX_LEN, eos_id=EOS))
    first = draw(0)
    np.testing.assert_array_equal(draw(0), first)
    assert (draw(1) != first).any()
    assert (first != decoded["greedy"]).any()  # temperature 1 sampling is not argmax here
    top1 = decoding.sample(model, video, jax.random.key(3), max_len=MAX_LEN, eos_id=EOS, temperature=0.5, top_k=1)
    np.testing.assert_array_equal(top1, decoded["greedy"])


def test_filter_logits_keeps_top_k_and_the_nucleus():
    probs = np.array([[0.0, 0.5, 0.3, 0.15, 0.05]])  # id 0 is padding: never kept
    logits = jnp.log(jnp.asarray(probs) + 1e-30)
    filter_logits = jax.jit(decoding.filter_logits)  # settings are traced: one compile for all of them
    kept = lambda k=0, p=1.0: np.isfinite(np.asarray(filter_logits(logits, 1.0, k, p)))
    assert kept(k=2).tolist() == [[False, True, True, False, False]]
    assert kept(p=0.5).tolist() == [[False, True, False, False, False]]  # 0.5 already reaches 0.5
    assert kept(p=0.7).tolist() == [[False, True, True, False, False]]
    assert kept(p=0.9).tolist() == [[False, True, True, True, False]]
    assert kept().tolist() == [[False, True, True, True, True]]
    # top-p applies to the renormalised top-k: {1, 2} → 0.625, 0.375.
    assert kept(k=2, p=0.6).tolist() == [[False, True, False, False, False]]
    assert kept(k=2, p=0.9).tolist() == [[False, True, True, False, False]]
    # Temperature 2 halves the log-probs.
    half = filter_logits(logits, 2.0, 0, 1.0)
    np.testing.assert_allclose(half[0, 1:], np.log(probs[0, 1:]) / 2, rtol=1e-5)


def test_one_compile_per_shape(model, video, decoded):
    before = decoding._greedy._cache_size()
    decoding.greedy(model, random_video(BATCH, seed=7), max_len=MAX_LEN, eos_id=EOS, return_logits=True)
    assert decoding._greedy._cache_size() == before  # same shapes and options: the executable is reused


def test_bad_arguments_are_one_line_errors(model, video):
    with pytest.raises(ValueError, match="max_len"):
        decoding.greedy(model, video, max_len=MAX_LEN + 1, eos_id=EOS)
    with pytest.raises(ValueError, match="beam_size"):
        decoding.beam_search(model, video, beam_size=0, max_len=4, eos_id=EOS)
    with pytest.raises(ValueError, match="temperature"):
        decoding.sample(model, video, jax.random.key(0), max_len=4, eos_id=EOS, temperature=0.0)
    with pytest.raises(ValueError, match="padding"):
        decoding.greedy(model, video, max_len=4, eos_id=0)
