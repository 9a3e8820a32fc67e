"""Batched, jitted, KV-cached caption decoding: greedy, beam search, temperature / top-k / top-p sampling.

A model decodes if it has (vlm.models.captioner.Captioner does):
    init_cache(video, max_len) -> cache      a pure pytree; cache["self"]: per-layer (k, v) [B, max_len, H, Dh]
    extend(cache, tokens [B, 1]) -> (float32 logits [B, 1, V], cache)
    bos_id, vocab_size                       the first decoder input; V
The cache is filled by `init_cache` (video encoded and cross-attention keys/values projected once)
and then extended one token at a time inside `lax.while_loop`, BOS first.

Common to every function here:
  model   an nnx.Module, or the (graphdef, state) of `nnx.split(model)`.
  video   uint8 [B, T, H, W, 3]. Under `vlm.sharding.use_mesh` put it on `batch_sharding(mesh, 5)` and
          the parameters on their logical-axis shardings; decoding then runs sharded like training.
  returns int32 tokens [B, max_len]: the caption's pieces, its EOS, then padding 0 (the data pipeline's
          `tokens` format; `Tokenizer.decode_batch` reads it). A caption that has not ended by max_len
          has no EOS.
  Padding (id 0) is never generated: its logit is set to -inf, so log-probs are a softmax over the
  other ids. The loop stops early once every caption has ended. jax.jit compiles once per
  (model structure, batch, beam, max_len, static option) and reuses the executable afterwards.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

PAD_ID = 0


def _split(model) -> tuple[nnx.GraphDef, nnx.State]:
    return tuple(model) if isinstance(model, tuple) else nnx.split(model)


def _check(max_len: int, eos_id: int) -> None:
    if max_len < 1:
        raise ValueError(f"max_len={max_len} must be ≥ 1")
    if eos_id == PAD_ID:
        raise ValueError(f"eos_id={eos_id} is the padding id; pass the tokenizer's eos_id")


def log_probs(logits: jax.Array) -> jax.Array:
    """float32 logits [..., V] → log-probabilities over the non-pad ids (pad: -inf)."""
    return jax.nn.log_softmax(jnp.asarray(logits).at[..., PAD_ID].set(-jnp.inf), axis=-1)


def length_penalty(length: jax.Array | int, alpha: float) -> jax.Array:
    """GNMT's ((5 + length) / 6) ** alpha; a finished caption's score is log-prob / penalty."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


# ----- greedy and sampling: one token per caption per step -----


def _autoregressive(graphdef, state, video, choose, max_len: int, eos_id: int, return_logits: bool):
    """choose(logits [B, V], step) → tokens [B]. Returns tokens [B, L] (and raw logits [B, L, V])."""
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(video, max_len)
    b = video.shape[0]
    logits_out = jnp.zeros((b, max_len, model.vocab_size) if return_logits else (0,), jnp.float32)

    def body(carry):
        step, prev, tokens, ended, cache, logits_out = carry
        logits, cache = model.extend(cache, prev[:, None])  # [B, 1, V]
        token = jnp.where(ended, PAD_ID, choose(logits[:, 0], step))  # [B]
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], step, axis=1)
        if return_logits:
            logits_out = jax.lax.dynamic_update_slice_in_dim(logits_out, logits, step, axis=1)
        return step + 1, token, tokens, ended | (token == eos_id), cache, logits_out

    def cond(carry):
        step, _, _, ended, _, _ = carry
        return (step < max_len) & ~jnp.all(ended)

    carry = (jnp.zeros((), jnp.int32), jnp.full((b,), model.bos_id, jnp.int32), jnp.zeros((b, max_len), jnp.int32),
             jnp.zeros((b,), bool), cache, logits_out)
    _, _, tokens, _, _, logits_out = jax.lax.while_loop(cond, body, carry)
    return (tokens, logits_out) if return_logits else tokens


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len", "eos_id", "return_logits"))
def _greedy(graphdef, state, video, *, max_len, eos_id, return_logits):
    choose = lambda logits, step: jnp.argmax(log_probs(logits), axis=-1).astype(jnp.int32)
    return _autoregressive(graphdef, state, video, choose, max_len, eos_id, return_logits)


def greedy(model, video: jax.Array, *, max_len: int, eos_id: int, return_logits: bool = False):
    """The most likely next token at every step → int32 tokens [B, max_len].

    return_logits=True also returns the float32 logits [B, max_len, V] each step was chosen from
    (rows past a caption's EOS are those of padding inputs; rows after the loop stopped are 0).
    """
    _check(max_len, eos_id)
    graphdef, state = _split(model)
    return _greedy(graphdef, state, video, max_len=max_len, eos_id=eos_id, return_logits=return_logits)


def filter_logits(logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """[B, V] → log-probs / temperature, with ids outside the top-k (top_k > 0) and outside the top-p
    nucleus (top_p < 1) at -inf. The settings may be traced: one compile serves them all. Ids tied
    with the k-th or the last nucleus id are kept too."""
    logits = log_probs(logits) / temperature
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
    rank = jnp.arange(logits.shape[-1])
    ordered = jnp.where((top_k <= 0) | (rank < top_k), ordered, -jnp.inf)  # top-k
    probs = jax.nn.softmax(ordered, axis=-1)
    # The nucleus: the smallest prefix whose mass reaches top_p (an id stays if the mass before it is < top_p).
    keep = ((jnp.cumsum(probs, axis=-1) - probs) < top_p) | (top_p >= 1.0)
    threshold = jnp.min(jnp.where(keep & (ordered > -jnp.inf), ordered, jnp.inf), axis=-1, keepdims=True)  # [B, 1]
    return jnp.where(logits < threshold, -jnp.inf, logits)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len", "eos_id"))
def _sample(graphdef, state, video, rng, temperature, top_k, top_p, *, max_len, eos_id):
    def choose(logits, step):
        filtered = filter_logits(logits, temperature, top_k, top_p)
        return jax.random.categorical(jax.random.fold_in(rng, step), filtered, axis=-1).astype(jnp.int32)
    return _autoregressive(graphdef, state, video, choose, max_len, eos_id, False)


def sample(model, video: jax.Array, rng: jax.Array, *, max_len: int, eos_id: int, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Ancestral sampling → int32 tokens [B, max_len]; reproducible for a given `rng` (a jax.random key).

    temperature > 0 divides the log-probs; top_k > 0 keeps the k most likely ids (top_k=1 is greedy);
    top_p < 1 keeps the smallest set of most likely ids whose probability reaches top_p (nucleus
    sampling), after top-k. Step t draws with `fold_in(rng, t)`. Changing the settings does not recompile.
    """
    _check(max_len, eos_id)
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 (use greedy() or top_k=1 for argmax decoding)")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be ≥ 0 (0 = no top-k filtering)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (1 = no nucleus filtering)")
    graphdef, state = _split(model)
    return _sample(graphdef, state, video, rng, jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p),
                   max_len=max_len, eos_id=eos_id)


# ----- beam search -----


def _gather_beams(x: jax.Array, index: jax.Array) -> jax.Array:
    """x [B, K, ...], index int [B, N] → [B, N, ...]."""
    return jnp.take_along_axis(x, index.reshape(*index.shape, *([1] * (x.ndim - 2))), axis=1)


@functools.partial(jax.jit, static_argnames=("graphdef", "beam_size", "max_len", "eos_id", "alpha"))
def _beam_search(graphdef, state, video, *, beam_size, max_len, eos_id, alpha):
    model = nnx.merge(graphdef, state)
    b, k, n = video.shape[0], beam_size, max_len
    # Encode each video once, then give every beam its copy of the cache: [B*K, ...], beams of an example adjacent.
    cache = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0) if x.ndim else x, model.init_cache(video, max_len))
    neg_inf = jnp.float32(-jnp.inf)
    positions = jnp.arange(n)

    def body(carry):
        step, live_tokens, live_logp, fin_tokens, fin_score, done, cache = carry
        prev = jnp.where(step == 0, model.bos_id, jnp.take(live_tokens, jnp.maximum(step - 1, 0), axis=2))  # [B, K]
        logits, cache = model.extend(cache, prev.reshape(b * k, 1))
        v = logits.shape[-1]
        scores = live_logp[..., None] + log_probs(logits[:, 0]).reshape(b, k, v)  # [B, K, V]
        top_logp, top_index = jax.lax.top_k(scores.reshape(b, k * v), min(2 * k, k * v))  # [B, C], sorted
        parent, token = top_index // v, (top_index % v).astype(jnp.int32)
        seqs = jnp.where(positions == step, token[..., None], _gather_beams(live_tokens, parent))  # [B, C, L]
        is_eos = token == eos_id
        # Finished: EOS candidates ranked within the step's top K (so K=1 with alpha=0 is greedy).
        rank = jnp.arange(top_logp.shape[1])
        new_fin = jnp.where(is_eos & (rank < k), top_logp / length_penalty(step + 1, alpha), neg_inf)
        fin_score_all = jnp.concatenate([fin_score, new_fin], axis=1)  # [B, K + C]
        fin_score_new, keep = jax.lax.top_k(fin_score_all, k)
        fin_tokens_new = _gather_beams(jnp.concatenate([fin_tokens, seqs], axis=1), keep)
        # Live: the K best candidates that did not end.
        live_logp_new, keep = jax.lax.top_k(jnp.where(is_eos, neg_inf, top_logp), k)
        live_tokens_new = _gather_beams(seqs, keep)
        # Each live beam takes its parent's self-attention cache (a gather within each example: the
        # batch axis, sharded over the data axes, is not touched). Cross-attention keys are the same for all beams.
        parent = _gather_beams(parent, keep)  # [B, K]
        reorder = lambda x: _gather_beams(x.reshape(b, k, *x.shape[1:]), parent).reshape(x.shape)
        cache = {**cache, "self": jax.tree.map(reorder, cache["self"])}
        # An example whose search is over keeps its state (so it decodes the same alone or in any batch).
        hold = lambda old, new: jnp.where(done.reshape(b, *([1] * (new.ndim - 1))), old, new)
        live_tokens, live_logp = hold(live_tokens, live_tokens_new), hold(live_logp, live_logp_new)
        fin_tokens, fin_score = hold(fin_tokens, fin_tokens_new), hold(fin_score, fin_score_new)
        # Over when no live beam can beat the K-th finished score: log-probs only fall, and the penalty of
        # any later length is at most max(lp(step + 2), lp(max_len)) (it is monotonic in the length).
        best_possible = live_logp[:, 0] / jnp.maximum(length_penalty(step + 2, alpha), length_penalty(n, alpha))
        done = done | (fin_score[:, -1] >= best_possible)
        return step + 1, live_tokens, live_logp, fin_tokens, fin_score, done, cache

    def cond(carry):
        step, *_, done, _ = carry
        return (step < n) & ~jnp.all(done)

    live_logp = jnp.full((b, k), neg_inf).at[:, 0].set(0.0)  # all beams start equal: expand only the first
    carry = (jnp.zeros((), jnp.int32), jnp.zeros((b, k, n), jnp.int32), live_logp, jnp.zeros((b, k, n), jnp.int32),
             jnp.full((b, k), neg_inf), jnp.zeros((b,), bool), cache)
    _, live_tokens, live_logp, fin_tokens, fin_score, _, _ = jax.lax.while_loop(cond, body, carry)
    # No finished caption (none ended within max_len): fall back to the live beams, all of length max_len.
    none_finished = (fin_score[:, 0] == neg_inf)[:, None]  # [B, 1]
    tokens = jnp.where(none_finished[..., None], live_tokens, fin_tokens)
    scores = jnp.where(none_finished, live_logp / length_penalty(n, alpha), fin_score)
    return tokens, scores


def beam_search(model, video: jax.Array, *, beam_size: int, max_len: int, eos_id: int, alpha: float = 0.6,
                return_all: bool = False) -> tuple[jax.Array, jax.Array]:
    """Beam search → (int32 tokens [B, max_len], float32 scores [B]); with return_all, the K beams best
    first: ([B, K, max_len], [B, K]), where slots that hold no caption score -inf.

    Score of a finished caption t_1..t_k (t_k = EOS; k counts the EOS):
        sum_i log p(t_i | t_<i, video) / ((5 + k) / 6) ** alpha          (GNMT; alpha=0: plain log-prob)
    Each step extends the K live beams to K*V candidates and ranks them by log-prob. Candidates ending in
    EOS that rank within the top K join the finished pool (its K best are kept); the K best that did not
    end stay live. Hence beam_size=1 with alpha=0 is greedy decoding, and beam_size ≥ (V-1)**max_len is
    exhaustive: the result is the best-scoring finished caption of all. A caption only counts as finished
    with its EOS; when no beam finished within max_len the live beams are returned, scored
    log-prob / ((5 + max_len) / 6) ** alpha. The batch × beam axis is flattened for the model calls.
    """
    _check(max_len, eos_id)
    if beam_size < 1:
        raise ValueError(f"beam_size={beam_size} must be ≥ 1")
    graphdef, state = _split(model)
    tokens, scores = _beam_search(graphdef, state, video, beam_size=int(beam_size), max_len=max_len, eos_id=eos_id,
                                  alpha=float(alpha))
    return (tokens, scores) if return_all else (tokens[:, 0], scores[:, 0])
