"""Video-text dual encoder (contrastive), Frozen-in-Time / CLIP4Clip style.

    vlm train --config=configs/dual_encoder.py:tiny --workdir=/tmp/de
    vlm train --config=configs/dual_encoder.py:B/16 --workdir=gs://.../de_b16 --config.data.name=...

Variants:
  tiny  CPU-sized: 8 frames of 32x32, two small towers; learns the synthetic set in minutes.
  B/16  ViT-B/16 video tower (16 frames, 224 px, tubelet 2x16x16) + CLIP-B text tower.
  L/14  ViT-L/14 video tower (16 frames, 224 px, tubelet 2x14x14) + CLIP-L text tower.
"""

import ml_collections

from vlm.models import text_encoder, video_encoder

VARIANTS = ("tiny", "B/16", "L/14")


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    arg = arg or "tiny"
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r} of configs/dual_encoder.py; choose one of: {', '.join(VARIANTS)}")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 400  # tiny: ~5 minutes on 2 CPU cores
    c.batch_size = 128  # global
    c.eval_batch_size = 256  # global
    c.microbatches = 1  # gradient accumulation: the batch is processed in this many slices
    c.log_every = 25
    c.eval_every = 100
    c.checkpoint_every = 200
    c.checkpoint = dict(keep=3, keep_period=0, async_save=True)  # keep_period: also keep every P-th step (0 = off)

    # Axis sizes within a slice (-1 fills the remaining devices), and `dcn`: how many slices
    # (TPU multislice) or nodes (GPU clusters) each axis spans; usually dcn.data = #slices.
    c.mesh = dict(data=-1, fsdp=1, tensor=1, dcn=dict(data=1, fsdp=1, tensor=1))
    c.sharding_rules = []  # [[logical, mesh axis or [axes] or None], ...]; [] = defaults in vlm/sharding.py

    c.optim = dict(
        name="adamw", lr=1e-3, warmup_steps=50, schedule="cosine", end_lr_ratio=0.01,
        b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.05, grad_clip_norm=1.0,
    )

    c.model = ml_collections.ConfigDict()
    c.model.name = "dual_encoder"
    c.model.dtype = "float32"  # compute dtype; parameters and optimizer state stay float32
    c.model.remat = "none"  # none | full | dots | dots_no_batch (vlm/nn/transformer.py)
    c.model.attention_impl = "xla"  # xla | cudnn (fused flash attention; NVIDIA GPUs, bfloat16)
    c.model.embed_dim = 128
    c.model.video = dict(attention="divided", tubelet=(2, 8, 8), width=128, depth=4, num_heads=4, mlp_dim=512)
    c.model.text = dict(vocab_size=128, width=128, depth=2, num_heads=4, mlp_dim=512)

    c.data = dict(
        name="synthetic",
        num_frames=8,
        resolution=32,
        train_size=1_000_000,
        eval_size=256,
        max_objects=1,
        max_text_len=16,
        vocab_size=128,  # BPE: one piece per word of the synthetic captions (64 splits words)
        tokenizer="",  # a SentencePiece .model; "" = train one on the train captions, cached in data_dir
        data_dir="",  # "" = $VLM_DATA_DIR or ~/.cache/vlm/data
        worker_count=0,
        prefetch=2,
    )

    c.task = dict(name="contrastive", loss="softmax", max_logit_scale=100.0)

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
        c.optim.lr = 5e-4 if size == "B" else 3e-4
        c.optim.warmup_steps = 2000
        c.optim.weight_decay = 0.2
        c.model.dtype = "bfloat16"
        c.model.remat = "full"
        c.model.embed_dim = 512 if size == "B" else 768
        c.model.video = dict(attention="divided", tubelet=(2, patch, patch), **video_encoder.VARIANTS[size])
        c.model.text = dict(vocab_size=32_000, **text_encoder.VARIANTS[size])
        c.data.num_frames = 16
        c.data.resolution = 224
        c.data.eval_size = 1000
        c.data.max_text_len = 32
        c.data.vocab_size = 32_000
        c.data.max_objects = 3
        c.data.worker_count = 8
    c.lock()  # a misspelt key is an error, from Python as from the command line
    return c
