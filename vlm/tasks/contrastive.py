"""Video-text contrastive learning: symmetric InfoNCE (CLIP) or pairwise sigmoid (SigLIP).

Both losses are computed over the *global* batch: embeddings [B, E] arrive sharded over
the batch axes and the [B, B] similarity matrix is built by XLA's collectives.
"""

from __future__ import annotations

import functools
import math

import jax
from etils import epath
import jax.numpy as jnp
import optax
from flax import nnx

from vlm import config_checks, sharding
from vlm.errors import ConfigError
from vlm.eval import loop as eval_loop
from vlm.eval import retrieval
from vlm.models import text_encoder, video_encoder
from vlm.models.dual_encoder import PROJECTIONS, DualEncoder
from vlm.models.text_encoder import TextEncoder
from vlm.nn.mlp import ACTIVATIONS

LOSSES = ("softmax", "sigmoid")

# Tower options passed from config.model.video / config.model.text when present (a config.json
# written before they existed builds the model with the constructors' defaults: vlm's own model).
TEXT_OPTIONS = ("pool", "causal", "norm_eps", "activation", "scan_layers")


def build_text_tower(model_config, max_len: int, rngs: nnx.Rngs) -> TextEncoder:
    """The text tower of `config.model.text` (shared with tasks that condition on it, e.g. diffusion)."""
    m = model_config
    return TextEncoder(
        vocab_size=m.text.vocab_size,
        max_len=max_len,
        width=m.text.width,
        depth=m.text.depth,
        num_heads=m.text.num_heads,
        mlp_dim=m.text.mlp_dim,
        remat=m.remat,
        dtype=jnp.dtype(m.dtype),
        attention_impl=m.attention_impl,
        **video_encoder.tower_options(m.text, TEXT_OPTIONS),
        rngs=rngs,
    )


def softmax_loss(video_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array) -> jax.Array:
    """Symmetric InfoNCE. video_emb, text_emb: unit-norm [B, E]; pair i matches pair i."""
    logits = logit_scale * text_emb @ video_emb.T  # [B(text), B(video)]
    labels = jnp.arange(logits.shape[0])
    t2v = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    v2t = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
    return 0.5 * (t2v + v2t)


def sigmoid_loss(video_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array, logit_bias: jax.Array) -> jax.Array:
    """SigLIP: every (text, video) pair is an independent binary label, +1 on the diagonal."""
    logits = logit_scale * text_emb @ video_emb.T + logit_bias  # [B, B]
    labels = 2.0 * jnp.eye(logits.shape[0]) - 1.0
    return -jax.nn.log_sigmoid(labels * logits).sum() / logits.shape[0]


@functools.partial(jax.jit, static_argnames="graphdef")
def embed_pair(graphdef, state, batch) -> dict[str, jax.Array]:
    """Video and text embeddings [B, E] of a batch. At module level, so every eval of a run reuses one compiled
    program (the graphdef is static and equal from eval to eval; the weights are arguments, not constants)."""
    video_emb, text_emb = nnx.merge(graphdef, state)(batch["video"], batch["tokens"])
    return {"video": video_emb, "text": text_emb}


class Task:
    per_example_loss = False  # the loss couples the whole global batch

    def __init__(self, config):
        self.config = config
        self.task_config = config.task
        self.validate()

    def validate(self) -> None:
        """Checks of this task's keys; one line each, before anything compiles."""
        c = self.config
        for tower in ("video", "text"):  # sizes ≥ 1, width divisible by num_heads
            config_checks.transformer(c, f"model.{tower}")
        config_checks.integer(c, "model.embed_dim", low=1)
        config_checks.integer(c, "model.text.vocab_size", low=1)
        config_checks.integers(c, "model.video.tubelet", 3)
        config_checks.number(c, "task.max_logit_scale", low=0.0, low_open=True)
        if c.task.loss not in LOSSES:
            raise ConfigError(f"config.task.loss={c.task.loss!r} is unknown; choose one of {', '.join(LOSSES)}")
        if c.data.vocab_size != c.model.text.vocab_size:
            raise ConfigError(
                f"config.data.vocab_size={c.data.vocab_size} differs from config.model.text.vocab_size="
                f"{c.model.text.vocab_size}; set both to the tokenizer's vocabulary size"
            )
        video_encoder.check_config(c)
        choices = {"pool": {"video": video_encoder.POOLS, "text": text_encoder.POOLS},
                   "activation": {"video": tuple(ACTIVATIONS), "text": tuple(ACTIVATIONS)},
                   "projection": {"video": PROJECTIONS, "text": PROJECTIONS}}
        for tower in ("video", "text"):
            tc = c.model[tower]
            for key, allowed in choices.items():
                if key in tc and tc[key] not in allowed[tower]:
                    raise ConfigError(f"config.model.{tower}.{key}={tc[key]!r} is unknown; choose one of "
                                      f"{', '.join(allowed[tower])}")
            if tc.get("projection") == "none" and tc.width != c.model.embed_dim:
                raise ConfigError(f"config.model.{tower}.projection='none' needs config.model.{tower}.width={tc.width} "
                                  f"to equal config.model.embed_dim={c.model.embed_dim}")
        for key in ("rgb_mean", "rgb_std"):
            values = tuple(c.model.video.get(key, (0.5,) * 3))
            if len(values) != 3 or (key == "rgb_std" and min(values) <= 0):
                raise ConfigError(f"config.model.video.{key}={values} needs 3 per-channel values in [0, 1] units"
                                  + (", all > 0" if key == "rgb_std" else ""))
        if c.model.text.get("causal", False) and c.model.text.get("pool", "mean") == "mean":
            raise ConfigError("config.model.text.causal=True needs config.model.text.pool='eot' or 'last' "
                              "(a mean over causal features weights early tokens more)")

    def build_model(self, rngs: nnx.Rngs) -> DualEncoder:
        m, d = self.config.model, self.config.data
        dtype = jnp.dtype(m.dtype)
        video = video_encoder.from_config(self.config, rngs)
        text = build_text_tower(m, d.max_text_len, rngs)
        projections = {f"{tower}_projection": m[tower].projection for tower in ("video", "text")
                       if "projection" in m[tower]}
        return DualEncoder(video, text, m.embed_dim, loss=self.task_config.loss, dtype=dtype, **projections, rngs=rngs)

    def features(self, model: DualEncoder, batch, rng) -> dict[str, jax.Array]:
        del rng  # deterministic model
        video_emb, text_emb = model(batch["video"], batch["tokens"])
        return {"video": video_emb, "text": text_emb}  # each [B, E] float32

    def loss(self, model: DualEncoder, features, batch):
        del batch
        # Clamped learnable temperature: scale ≤ max_logit_scale (CLIP clamps at 100).
        log_scale = jnp.minimum(model.logit_scale[...], math.log(self.task_config.max_logit_scale))
        scale = jnp.exp(log_scale)
        v = sharding.constrain(features["video"], ("batch", None))
        t = sharding.constrain(features["text"], ("batch", None))
        if self.task_config.loss == "softmax":
            loss = softmax_loss(v, t, scale)
        else:
            loss = sigmoid_loss(v, t, scale, model.logit_bias[...])
        return loss, {"train/logit_scale": scale}

    # ----- evaluation: text↔video retrieval on the held-out split -----

    def evaluators(self):
        return {"retrieval": self.retrieval}

    def retrieval(self, model: DualEncoder, *, mesh, step: int, workdir: str | None) -> dict[str, float]:
        """Text↔video recall@1/5/10, median and mean rank over the held-out pairs; a table in W/samples/<step>/."""
        graphdef, state = nnx.split(model)
        out, host = eval_loop.eval_outputs(functools.partial(embed_pair, graphdef, state), self.config.data,
                                           global_batch_size=self.config.eval_batch_size, mesh=mesh)
        captions = host["caption"]
        sim = out["text"] @ out["video"].T  # [N(text), N(video)], pair i ↔ i
        metrics = retrieval.retrieval_metrics(sim)
        if jax.process_index() == 0:
            table = retrieval.format_table(metrics, num_pairs=len(captions))
            print(f"step {step}: " + table, end="", flush=True)
            if workdir:
                out_dir = epath.Path(workdir) / "samples" / str(step)
                out_dir.mkdir(parents=True, exist_ok=True)
                (out_dir / "retrieval.txt").write_text(table + "\n" + retrieval.format_examples(sim, captions, num=8))
        return metrics
