"""Video captioner: the dual encoder's video tower + an autoregressive text decoder (CapPa / CoCa).

    vlm train --config=configs/captioner.py:tiny --workdir=/tmp/cap
    vlm caption --workdir=/tmp/cap a.mp4 b.mp4 [--decode=beam --beam_size=4]

Variants:
  tiny  CPU-sized: the video tower of configs/dual_encoder.py:tiny (8 frames of 32x32) and a small
        decoder; learns the synthetic set in minutes (benchmarks/learning_captioner.py).
  B/16  ViT-B/16 video tower (16 frames, 224 px, tubelet 2x16x16) + a 6-layer, 768-wide decoder (CapPa).
  L/14  ViT-L/14 video tower (16 frames, 224 px, tubelet 2x14x14) + a 6-layer, 1024-wide decoder.

Recipes:
  From scratch: the command above.
  From a dual-encoder run W0 (the same model.video sizes and data frames/resolution), the video
  tower loaded and frozen (only `video/...` is kept from W0; its text tower and projections are left out):
    vlm train --config=configs/captioner.py:tiny --workdir=/tmp/cap_de --config.init_from.workdir=W0 \\
      --config.init_from.mapping='(("video/(.*)", "video/\\\\1"), (".*", ""))' \\
      --config.optim.frozen='("video/.*",)'
  ... or fine-tuned at a tenth of the learning rate instead of frozen:
      --config.optim.lr_multipliers='(("video/.*", 0.1),)'
  CoCa (captioning + contrastive loss on pooled embeddings; the contrastive term couples the global
  batch, so microbatches then use exact GradCache accumulation instead of plain accumulation):
    --config.model.coca=True --config.model.decoder.unimodal_depth=1 --config.task.contrastive_weight=1.0

Loss: label-smoothed cross-entropy of every caption token (pieces and EOS; padding masked), averaged
within each caption, then over captions (every caption weighs the same, whatever its length), so
microbatching is plain accumulation (`task.per_example_loss`).
"""

import ml_collections

from vlm import xla_flags
from vlm.models import captioner, video_encoder

VARIANTS = ("tiny", "B/16", "L/14")


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    arg = arg or "tiny"
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r} of configs/captioner.py; choose one of: {', '.join(VARIANTS)}")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 400  # tiny: ~3 minutes on 2 idle CPU cores (benchmarks/learning_captioner.py)
    c.batch_size = 64  # global
    c.eval_batch_size = 128  # global
    c.microbatches = 1  # gradient accumulation: the batch is processed in this many slices
    c.log_every = 25
    c.eval_every = 100  # both evaluators: ~5 s each for the tiny model
    c.checkpoint_every = 200
    c.checkpoint = dict(keep=3, keep_period=0, async_save=True)

    c.mesh = dict(data=-1, fsdp=1, context=1, tensor=1, dcn=dict(data=1, fsdp=1, context=1, tensor=1))
    c.sharding_rules = []
    # XLA flags per platform, set before JAX's backend starts (vlm/xla_flags.py); XLA_FLAGS in the environment win.
    c.xla_flags = dict(cpu=(), gpu=(), tpu=())

    c.optim = dict(
        name="adamw", lr=1e-3, warmup_steps=50, schedule="cosine", end_lr_ratio=0.01,
        b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.05, grad_clip_norm=1.0,
        frozen=(),  # e.g. ("video/.*",) with init_from a dual-encoder run
        lr_multipliers=(),  # e.g. (("video/.*", 0.1),)
    )
    c.ema = dict(decay=0.0, start_step=0)
    c.max_skipped_steps = 10
    # Trace train steps after_step+1 … after_step+steps into W/profile (0 = off): `vlm profile --workdir=W`
    # prints where their time went; XProf shows the trace (vlm/profiling.py).
    c.profile = dict(steps=0, after_step=2)
    c.init_from = dict(workdir="", step=-1, mapping=(), strict=True, use_ema=True)

    c.model = ml_collections.ConfigDict()
    c.model.name = "captioner"
    c.model.dtype = "float32"
    c.model.remat = "none"
    c.model.attention_impl = "xla"
    # The dual encoder's video tower (configs/dual_encoder.py:tiny sizes): parameter paths video/... match.
    c.model.video = dict(attention="joint", tubelet=(2, 8, 8), width=128, depth=4, num_heads=4, mlp_dim=512)
    # The tower options of configs/dual_encoder.py (set them as the run you start from has them).
    c.model.video.update(dict(pool="mean", pre_norm=False, norm_eps=1e-6, activation="gelu_tanh",
                              rgb_mean=(0.485, 0.456, 0.406), rgb_std=(0.229, 0.224, 0.225), scan_layers=False))
    # With mesh.context > 1: none | ulysses | ring (joint video attention only; see configs/dual_encoder.py).
    c.model.context_parallel = "none"
    # num_queries: 0 = cross-attend to every video token, Q > 0 = to Q attention-pooled ones.
    # unimodal_depth: CoCa's text-only layers below the cross-attending ones (0 without CoCa).
    c.model.decoder = dict(vocab_size=128, **captioner.VARIANTS["tiny"], unimodal_depth=0, num_queries=0,
                           tie_embeddings=False)
    c.model.coca = False  # contrastive embeddings (needs decoder.unimodal_depth ≥ 1)
    c.model.embed_dim = 128  # CoCa only: size of the contrastive embeddings

    c.data = dict(
        name="synthetic",
        data_dir="",
        train_split="train",
        eval_split="",
        sources=(),
        num_frames=8,
        resolution=32,
        sampling="segments",
        sample_fps=0.0,
        short_clips="repeat",
        train_crop="random",
        train_flip=False,  # captions say "left" and "right"
        decode_threads=1,
        train_size=1_000_000,
        eval_size=256,  # synthetic: 256 held-out clips with 256 different captions
        max_objects=1,
        max_text_len=16,  # target tokens (pieces + EOS) and the longest decoded caption
        vocab_size=128,
        tokenizer="",
        worker_count=0,
        prefetch=2,
    )

    c.task = dict(
        name="captioning",
        label_smoothing=0.1,
        caption_weight=1.0,
        contrastive_weight=0.0,  # CoCa: > 0 adds the contrastive loss (needs model.coca)
        contrastive_loss="softmax",  # or sigmoid
        max_logit_scale=100.0,
    )
    # Evaluators (vlm/tasks/captioning.py): "loss" (held-out teacher-forced loss and perplexity; cheap) and
    # "captions" (decode the held-out split: BLEU-4, ROUGE-L, CIDEr-D, and on the synthetic set the share of
    # captions with every attribute right; W/samples/<step>/captions.json). captions options: decode
    # (greedy | beam | sample), beam_size, alpha (beam length penalty), max_len (0 = data.max_text_len),
    # temperature, top_k, top_p, seed (sampling), num_examples (0 = the whole split).
    c.evals = dict(
        loss=dict(type="loss", every=0),
        captions=dict(type="captions", every=0, decode="greedy", beam_size=4),
    )

    if arg in ("B/16", "L/14"):
        size, patch = arg.split("/")
        patch = int(patch)
        c.total_steps = 100_000
        c.batch_size = 1024
        c.eval_batch_size = 1024
        c.log_every = 100
        c.eval_every = 5000
        c.checkpoint_every = 2000
        c.checkpoint.keep_period = 20_000
        c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
        c.xla_flags.gpu = xla_flags.GPU_FLAGS  # the latency-hiding scheduler: collectives overlap compute
        c.optim.lr = 5e-4 if size == "B" else 3e-4
        c.optim.warmup_steps = 2000
        c.optim.weight_decay = 0.1
        c.model.dtype = "bfloat16"
        c.model.remat = "full"
        c.model.embed_dim = 512 if size == "B" else 768
        c.model.video.update(dict(attention="divided", tubelet=(2, patch, patch), **video_encoder.VARIANTS[size]))
        c.model.decoder.update(dict(vocab_size=32_000, **captioner.VARIANTS[size]))
        c.data.num_frames = 16
        c.data.resolution = 224
        c.data.eval_size = 1000
        c.data.max_text_len = 32
        c.data.vocab_size = 32_000
        c.data.max_objects = 3
        c.data.worker_count = 8
        c.evals.captions.every = 10_000  # decoding 1000 clips; the loss evaluator runs every eval_every
    c.lock()
    return c
