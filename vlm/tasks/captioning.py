"""Video captioning: teacher-forced cross-entropy of a captioner (CapPa), optionally CoCa.

Targets are the data pipeline's `tokens` [B, L]: the caption's SentencePiece pieces, its EOS, then
padding 0. The decoder reads BOS (the tokenizer's id) followed by the targets shifted right
(`Captioner.__call__`), so logits[:, i] predicts tokens[:, i] and EOS is learned as the last target.

Loss (per caption, then averaged): the label-smoothed cross-entropy of every non-padding target
token, averaged over that caption's tokens; the batch loss is the mean over captions. Every caption
weighs the same whatever its length (rather than every token: long captions would dominate), and
the loss is a mean of per-example terms, so gradient accumulation is plain accumulation
(`per_example_loss`). With CoCa and `task.contrastive_weight > 0` a contrastive loss over the
*global* batch is added (`contrastive.softmax_loss` / `sigmoid_loss` on the pooled embeddings);
that term couples the batch, so `per_example_loss` is then False and microbatches use exact
GradCache accumulation (the features it caches are [B]-sized: per-caption losses and embeddings).

Evaluators (`config.evals` entries of these types):
  loss      held-out teacher-forced loss (no smoothing), perplexity per token, token accuracy. Cheap.
  captions  decodes the held-out split (greedy, beam or sampling; `vlm.decoding`), scores BLEU-4,
            ROUGE-L and CIDEr-D (`vlm.eval.caption_metrics`), on the synthetic set also the share of
            captions with every attribute right, and writes W/samples/<step>/captions.json.
References: each held-out clip's caption, one per clip (the eval split yields one caption per
clip: the synthetic set has one, a built dataset's eval split gives its records' first caption).
The synthetic held-out captions are all different (`synthetic._heldout_plan` draws them without
replacement), so no two clips share a reference and none needs merging.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from input_pipeline.tokenizer import BOS_ID, EOS_ID, PAD_ID
from vlm import decoding, sharding
from vlm.errors import ConfigError
from vlm.eval import caption_metrics
from vlm.eval import loop as eval_loop
from vlm.models import video_encoder
from vlm.models.captioner import Captioner
from vlm.tasks.contrastive import LOSSES as CONTRASTIVE_LOSSES
from vlm.tasks.contrastive import sigmoid_loss, softmax_loss

DECODE_METHODS = ("greedy", "beam", "sample")
# Options of the "captions" evaluator (config.evals.<name>.<option>) and of `vlm caption`, with defaults.
CAPTION_OPTIONS = dict(decode="greedy", beam_size=4, alpha=0.6, max_len=0, temperature=1.0, top_k=0, top_p=1.0,
                       seed=0, num_examples=0)
LOSS_OPTIONS = dict(max_batches=0)
ATTRIBUTES = ("colour", "shape", "size", "direction", "speed")  # synthetic.ObjectSpec fields
NUM_PRINTED = 4  # example captions printed at each evaluation


def caption_losses(logits: jax.Array, tokens: jax.Array, label_smoothing: float = 0.0) -> dict[str, jax.Array]:
    """logits float32 [B, L, V] and targets int32 [B, L] (0 = padding) → per caption, each [B]:
    "loss" (mean over its tokens of the cross-entropy against labels smoothed as optax.smooth_labels:
    (1 - s)·onehot + s/V), "nll" (sum of -log p of its tokens), "tokens" (their number), "correct"
    (tokens that are the argmax over the non-padding ids)."""
    mask = (tokens != PAD_ID).astype(jnp.float32)  # [B, L]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, L, V]
    nll = -jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]  # [B, L]
    ce = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(-1) if label_smoothing else nll
    count = mask.sum(-1)
    predicted = jnp.argmax(logits.at[..., PAD_ID].set(-jnp.inf), axis=-1)  # [B, L]
    return {
        "loss": (ce * mask).sum(-1) / jnp.maximum(count, 1.0),
        "nll": (nll * mask).sum(-1),
        "tokens": count,
        "correct": ((predicted == tokens) * mask).sum(-1),
    }


def caption_options(options: Mapping, max_text_len: int, where: str = "config.evals.captions.") -> dict:
    """The captions evaluator's options with defaults filled in; a one-line ConfigError for a bad one,
    naming it as `where` + option ("config.evals.captions.beam_size", "--beam_size")."""
    unknown = sorted(set(options) - set(CAPTION_OPTIONS))
    if unknown:
        raise ConfigError(f"{where.rstrip('.')} has unknown option(s) {', '.join(unknown)}; "
                          f"its options: {', '.join(CAPTION_OPTIONS)}")
    o = {**CAPTION_OPTIONS, **options}
    checks = (
        (o["decode"] in DECODE_METHODS, f"decode={o['decode']!r} is unknown; choose one of {', '.join(DECODE_METHODS)}"),
        (int(o["beam_size"]) >= 1, f"beam_size={o['beam_size']} must be ≥ 1"),
        (0 <= int(o["max_len"]) <= max_text_len,
         f"max_len={o['max_len']} must be in 0..config.data.max_text_len={max_text_len} (0 = max_text_len; the "
         f"decoder has positions for max_text_len tokens)"),
        (float(o["alpha"]) >= 0, f"alpha={o['alpha']} must be ≥ 0 (0 = no length penalty)"),
        (float(o["temperature"]) > 0, f"temperature={o['temperature']} must be > 0"),
        (int(o["top_k"]) >= 0, f"top_k={o['top_k']} must be ≥ 0 (0 = off)"),
        (0 < float(o["top_p"]) <= 1, f"top_p={o['top_p']} must be in (0, 1] (1 = off)"),
        (int(o["num_examples"]) >= 0, f"num_examples={o['num_examples']} must be ≥ 0 (0 = the whole split)"),
    )
    for ok, message in checks:
        if not ok:
            raise ConfigError(where + message)
    o["max_len"] = int(o["max_len"]) or max_text_len
    return o


def generate(model, video: jax.Array, options: Mapping, rng: jax.Array | None = None) -> jax.Array:
    """Captions of video uint8 [B, T, H, W, 3] → int32 tokens [B, max_len] (pieces, EOS, 0s), decoded as
    `options` say (`caption_options`). `model` is a Captioner or its (graphdef, state)."""
    o = options
    if o["decode"] == "greedy":
        return decoding.greedy(model, video, max_len=o["max_len"], eos_id=EOS_ID)
    if o["decode"] == "beam":
        return decoding.beam_search(model, video, beam_size=int(o["beam_size"]), max_len=o["max_len"], eos_id=EOS_ID,
                                    alpha=float(o["alpha"]))[0]
    rng = jax.random.key(int(o["seed"])) if rng is None else rng
    return decoding.sample(model, video, rng, max_len=o["max_len"], eos_id=EOS_ID, temperature=float(o["temperature"]),
                           top_k=int(o["top_k"]), top_p=float(o["top_p"]))


def attribute_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Synthetic captions: "attributes_all_right", the share of predictions that describe exactly the
    reference's objects (count, and each object's colour, shape, size, direction and speed); "count_right";
    and per attribute ("colour", ...) the share of reference objects whose attribute the prediction gets
    right, objects paired in caption order (a prediction that does not parse or has another count gets
    none right)."""
    from input_pipeline import synthetic

    all_right = count_right = 0
    hits, total = dict.fromkeys(ATTRIBUTES, 0), 0
    for prediction, reference in zip(predictions, references, strict=True):
        truth = synthetic.parse_caption(reference)
        total += len(truth)
        try:
            guess = synthetic.parse_caption(prediction)
        except ValueError:
            continue
        if len(guess) != len(truth):
            continue
        count_right += 1
        all_right += sorted(guess) == sorted(truth)
        for g, t in zip(guess, truth):
            for name in ATTRIBUTES:
                hits[name] += getattr(g, name) == getattr(t, name)
    n = max(len(references), 1)
    return {"attributes_all_right": all_right / n, "count_right": count_right / n,
            **{name: hits[name] / max(total, 1) for name in ATTRIBUTES}}


@functools.partial(jax.jit, static_argnames="graphdef")
def _heldout_losses(graphdef, state, batch):
    model = nnx.merge(graphdef, state)
    return caption_losses(model.caption_logits(batch["video"], batch["tokens"]), batch["tokens"])


class Task:
    def __init__(self, config):
        self.config = config
        self.task_config = config.task
        self.validate()

    @property
    def per_example_loss(self) -> bool:
        """True (plain accumulation) unless a contrastive term couples the batch."""
        return not self.task_config.contrastive_weight > 0

    def validate(self) -> None:
        """Checks of this task's keys; one line each, before anything compiles."""
        c, t, m = self.config, self.config.task, self.config.model
        d = m.decoder
        checks = (
            (c.data.vocab_size == d.vocab_size,
             f"config.data.vocab_size={c.data.vocab_size} differs from config.model.decoder.vocab_size={d.vocab_size}; "
             f"set both to the tokenizer's vocabulary size"),
            (d.vocab_size > max(BOS_ID, EOS_ID),
             f"config.model.decoder.vocab_size={d.vocab_size} must exceed the tokenizer's special ids (pad 0, bos "
             f"{BOS_ID}, eos {EOS_ID})"),
            (c.data.max_text_len >= 2, f"config.data.max_text_len={c.data.max_text_len} must be ≥ 2 (a piece and EOS)"),
            (0.0 <= t.label_smoothing < 1.0, f"config.task.label_smoothing={t.label_smoothing} must be in [0, 1)"),
            (t.caption_weight >= 0 and t.contrastive_weight >= 0,
             f"config.task.caption_weight={t.caption_weight} and contrastive_weight={t.contrastive_weight} must be ≥ 0"),
            (t.caption_weight > 0 or t.contrastive_weight > 0,
             "config.task.caption_weight and contrastive_weight are both 0: nothing to learn"),
            (t.contrastive_weight == 0 or m.coca,
             f"config.task.contrastive_weight={t.contrastive_weight} needs config.model.coca=True (and "
             f"config.model.decoder.unimodal_depth ≥ 1)"),
            (not m.coca or d.unimodal_depth >= 1,
             "config.model.coca=True needs config.model.decoder.unimodal_depth ≥ 1 (CoCa's text-only layers)"),
            (m.coca or d.unimodal_depth == 0,
             f"config.model.decoder.unimodal_depth={d.unimodal_depth} is only used with config.model.coca=True"),
            (not m.coca or m.embed_dim >= 1, f"config.model.embed_dim={m.embed_dim} must be ≥ 1 with CoCa"),
            (t.contrastive_loss in CONTRASTIVE_LOSSES,
             f"config.task.contrastive_loss={t.contrastive_loss!r} is unknown; choose one of {', '.join(CONTRASTIVE_LOSSES)}"),
            (d.num_queries >= 0, f"config.model.decoder.num_queries={d.num_queries} must be ≥ 0 (0 = all video tokens)"),
            (d.width % d.num_heads == 0,
             f"config.model.decoder.width={d.width} is not divisible by num_heads={d.num_heads}"),
        )
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        video_encoder.check_config(c)
        for name, entry in (c.get("evals") or {}).items():
            kind = entry.get("type", name)
            options = {k: v for k, v in entry.items() if k not in ("type", "every", "prefix")}
            if kind == "captions":
                caption_options(options, c.data.max_text_len, f"config.evals.{name}.")
            elif kind == "loss":
                unknown = sorted(set(options) - set(LOSS_OPTIONS))
                if unknown or int(options.get("max_batches", 0)) < 0:
                    raise ConfigError(f"config.evals.{name}: the loss evaluator's only option is max_batches (≥ 0; "
                                      f"0 = the whole split), got {options}")

    def build_model(self, rngs: nnx.Rngs) -> Captioner:
        m, d = self.config.model, self.config.model.decoder
        return Captioner(
            video_encoder.from_config(self.config, rngs),
            vocab_size=d.vocab_size,
            max_len=self.config.data.max_text_len,
            width=d.width,
            depth=d.depth,
            num_heads=d.num_heads,
            mlp_dim=d.mlp_dim,
            bos_id=BOS_ID,
            num_queries=d.num_queries,
            tie_embeddings=d.tie_embeddings,
            coca=m.coca,
            unimodal_depth=d.unimodal_depth,
            embed_dim=m.embed_dim if m.coca else 0,
            contrastive_loss=self.task_config.contrastive_loss,
            remat=m.remat,
            dtype=jnp.dtype(m.dtype),
            attention_impl=m.attention_impl,
            rngs=rngs,
        )

    def features(self, model: Captioner, batch, rng) -> dict[str, jax.Array]:
        """Per caption, each [B]: its loss and token accuracy; with CoCa also the unit-norm embeddings [B, E]."""
        del rng  # deterministic model
        out = model(batch["video"], batch["tokens"])
        losses = caption_losses(out["logits"], batch["tokens"], self.task_config.label_smoothing)
        feats = {"caption_loss": losses["loss"], "accuracy": losses["correct"] / jnp.maximum(losses["tokens"], 1.0)}
        if model.coca:
            feats.update(video=out["video_emb"], text=out["text_emb"])
        return feats

    def loss(self, model: Captioner, features, batch):
        del batch
        t = self.task_config
        caption = features["caption_loss"].mean()
        metrics = {"train/caption_loss": caption, "train/token_accuracy": features["accuracy"].mean()}
        loss = t.caption_weight * caption if t.caption_weight > 0 else jnp.zeros((), jnp.float32)
        if model.coca:
            # Over the global batch, as in the dual encoder (vlm/tasks/contrastive.py); logged also at weight 0.
            scale = jnp.exp(jnp.minimum(model.logit_scale[...], math.log(t.max_logit_scale)))
            v = sharding.constrain(features["video"], ("batch", None))
            x = sharding.constrain(features["text"], ("batch", None))
            contrastive = (softmax_loss(v, x, scale) if t.contrastive_loss == "softmax"
                           else sigmoid_loss(v, x, scale, model.logit_bias[...]))
            metrics.update({"train/contrastive_loss": contrastive, "train/logit_scale": scale})
            if t.contrastive_weight > 0:
                loss = loss + t.contrastive_weight * contrastive
        return loss, metrics

    # ----- evaluation on the held-out split -----

    def evaluators(self):
        return {"captions": self.captions, "loss": self.heldout_loss}

    def heldout_loss(self, model: Captioner, *, mesh, step: int, workdir: str | None, max_batches: int = 0):
        """Teacher-forced, no label smoothing: "loss" (mean over captions of their mean token cross-entropy,
        the train loss's definition), "perplexity" (exp of the mean over all tokens), "token_accuracy"."""
        del step, workdir
        graphdef, state = nnx.split(model)
        out, _ = eval_loop.eval_outputs(functools.partial(_heldout_losses, graphdef, state), self.config.data,
                                        global_batch_size=self.config.eval_batch_size, mesh=mesh, host_keys=(),
                                        max_batches=max_batches or None)
        tokens = max(float(out["tokens"].sum()), 1.0)
        return {"loss": float(out["loss"].mean()), "perplexity": math.exp(float(out["nll"].sum()) / tokens),
                "token_accuracy": float(out["correct"].sum()) / tokens}

    def captions(self, model: Captioner, *, mesh, step: int, workdir: str | None, **options) -> dict[str, float]:
        """Decodes the held-out split; BLEU-4, ROUGE-L, CIDEr-D (+ attribute scores on the synthetic set);
        W/samples/<step>/captions.json with every (id, prediction, references) and the metrics."""
        from input_pipeline.tokenizer import get_tokenizer

        o = caption_options(options, self.config.data.max_text_len)
        tokenizer = get_tokenizer(self.config.data)
        graphdef, state = nnx.split(model)
        batches = [0]

        def decode(batch):
            rng = jax.random.fold_in(jax.random.key(int(o["seed"])), batches[0])  # sampling: one key per batch
            batches[0] += 1
            return {"tokens": generate((graphdef, state), batch["video"], o, rng)}

        size = self.config.eval_batch_size
        num = int(o["num_examples"])
        out, host = eval_loop.eval_outputs(decode, self.config.data, global_batch_size=size, mesh=mesh,
                                           max_batches=-(-num // size) if num else None)
        predictions = tokenizer.decode_batch(out["tokens"])[: num or None]
        references = host["caption"][: num or None]
        metrics = caption_metrics.compute(dict(enumerate(predictions)), {i: [r] for i, r in enumerate(references)})
        if self.config.data.name == "synthetic":  # the eval split is data.name's, whatever the training mixture
            metrics.update(attribute_scores(predictions, references))
        if jax.process_index() == 0:
            described = f"{o['decode']}" + (f" beam {o['beam_size']}" if o["decode"] == "beam" else "")
            lines = [f"step {step}: {len(predictions)} held-out captions ({described}): "
                     + " ".join(f"{k}={v:.4g}" for k, v in metrics.items())]
            lines += [f"  {p!r} ← {r!r}" for p, r in zip(predictions[:NUM_PRINTED], references)]
            print("\n".join(lines), flush=True)
            if workdir:
                out_dir = epath.Path(workdir) / "samples" / str(step)
                out_dir.mkdir(parents=True, exist_ok=True)
                record = {"step": step, "options": o, "metrics": metrics,
                          "captions": [{"id": i, "prediction": p, "references": [r]}
                                       for i, (p, r) in enumerate(zip(predictions, references))]}
                (out_dir / "captions.json").write_text(json.dumps(record, indent=1) + "\n")
        return metrics


# ----- `vlm caption`: captions of video files with a trained run -----


def caption_files(workdir: str, paths: Sequence[str], *, decode: str | None = None, beam_size: int | None = None,
                  step: int | None = None, use_ema: bool | None = None, batch_size: int = 16) -> list[tuple[str, str]]:
    """[(path, caption)] for video files, with a captioner run's checkpoint (the EMA weights when the run
    kept them, unless use_ema=False) on one device.

    Each file is decoded as the run's eval split decodes a clip (`datasets.ClipDecoder` with the run's
    data config and no rng: its frame sampling, middle frames, centre crop), the whole file being the clip.
    Decoding follows the run's "captions" evaluator options, with `decode` ("greedy", "beam", "sample") and
    `beam_size` overriding them; `beam_size` alone means beam search.
    """
    from input_pipeline import datasets
    from input_pipeline.tokenizer import get_tokenizer
    from vlm import train

    if not paths:
        raise ValueError("no video files given; usage: vlm caption --workdir=W a.mp4 [b.mp4 ...]")
    missing = [p for p in paths if not epath.Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"video file not found: {', '.join(missing)}")
    config = train.load_config(workdir)
    if config.task.name != "captioning":
        raise ConfigError(f"{workdir} is a {config.task.name!r} run; vlm caption needs a captioner run "
                          f"(configs/captioner.py)")
    evaluator = next((dict(e) for e in (config.get("evals") or {}).values() if e.get("type") == "captions"), {})
    options = {k: v for k, v in evaluator.items() if k in CAPTION_OPTIONS}
    if beam_size is not None:
        options.update(beam_size=beam_size, decode="beam")
    if decode is not None:
        options["decode"] = decode
    options = caption_options(options, config.data.max_text_len, where="--")
    clip_decoder = datasets.ClipDecoder(config.data)
    videos = []
    for path in paths:
        record = {"video": epath.Path(path).read_bytes(), "start": 0.0, "end": 0.0, "captions": [""]}
        try:
            videos.append(clip_decoder(record, None)["video"])  # uint8 [T, R, R, 3]
        except Exception as e:  # noqa: BLE001 - PyAV raises many kinds; the user needs the file and the reason
            raise ValueError(f"{path}: cannot be decoded as a video ({type(e).__name__}: {e})") from None
    model, config, _ = train.load_model(workdir, step=step, use_ema=use_ema)
    tokenizer = get_tokenizer(config.data)
    split = nnx.split(model)
    size = min(batch_size, len(videos))
    captions = []
    for start in range(0, len(videos), size):
        chunk = np.stack(videos[start:start + size])
        padded = np.concatenate([chunk, np.zeros((size - len(chunk), *chunk.shape[1:]), np.uint8)])  # one compile
        rng = jax.random.fold_in(jax.random.key(int(options["seed"])), start)
        tokens = np.asarray(generate(split, jnp.asarray(padded), options, rng))[: len(chunk)]
        captions += tokenizer.decode_batch(tokens)
    return list(zip(paths, captions))
