"""Video autoencoder: a causal 3D VAE (8x space, 4x time, z = 16 channels) trained to reconstruct clips.

    vlm train --config=configs/video_vae.py:tiny --workdir=/tmp/vae
    vlm reconstruct --workdir=/tmp/vae in.mp4 --out=out.mp4
    vlm data encode --vae_workdir=/tmp/vae --out_name=synthetic_latents --max_examples=4096   # the latent cache

Variants:
  tiny  CPU-sized (see vlm/models/video_vae.py VARIANTS["tiny"]): 9 frames of 32x32 synthetic clips.
  wan   Wan 2.1 VAE-like (base 96 channels, z 16, mid attention; ~133M parameters): 17 frames of 256 px,
        bfloat16, for accelerators and real video (--config.data.name=...).
"""

import ml_collections

from vlm.models.video_vae import VARIANTS as VAE_VARIANTS

VARIANTS = ("tiny", "wan")


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    arg = arg or "tiny"
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r} of configs/video_vae.py; choose one of: {', '.join(VARIANTS)}")
    c = ml_collections.ConfigDict()
    c.seed = 0
    # tiny: 1800 steps of batch 8 reach held-out PSNR 28.8 dB in 683-840 s on a 2-core CPU (2.2-2.7 steps/s,
    # ~55 s of startup and compiles, two evals of ~17 s; benchmarks/learning_video_vae.py). Most of the gain comes
    # as the cosine schedule anneals: 800 steps end at 25.5 dB, 1600 at 28.1.
    c.total_steps = 1800
    c.batch_size = 8  # global
    c.eval_batch_size = 32  # global
    c.microbatches = 1
    c.log_every = 50
    c.eval_every = 900
    c.checkpoint_every = 900
    c.checkpoint = dict(keep=2, keep_period=0, async_save=True)

    c.mesh = dict(data=-1, fsdp=1, tensor=1, dcn=dict(data=1, fsdp=1, tensor=1))
    # The default rules replicate conv kernels (conv_in / conv_out → None): data parallel. The wan
    # variant shards kernels' output channels over `tensor` when that axis is > 1.
    c.sharding_rules = []
    # XLA flags per platform, set before JAX's backend starts (vlm/xla_flags.py); XLA_FLAGS in the environment win.
    c.xla_flags = dict(cpu=(), gpu=(), tpu=())

    c.optim = dict(
        name="adamw", lr=3e-3, warmup_steps=50, schedule="cosine", end_lr_ratio=0.02,
        b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0,
        frozen=(), lr_multipliers=(),
    )
    c.ema = dict(decay=0.0, start_step=0)  # e.g. 0.999: eval, `vlm reconstruct` and `vlm data encode` use it
    c.max_skipped_steps = 10
    # Trace train steps after_step+1 … after_step+steps into W/profile (0 = off): `vlm profile --workdir=W`
    # prints where their time went; XProf shows the trace (vlm/profiling.py).
    c.profile = dict(steps=0, after_step=2)
    c.init_from = dict(workdir="", step=-1, mapping=(), strict=True, use_ema=True)

    c.model = ml_collections.ConfigDict()
    c.model.name = "video_vae"
    c.model.dtype = "float32"  # compute dtype; parameters and optimizer state stay float32
    c.model.remat = "none"  # none | full | dots | dots_no_batch, per ResBlock
    c.model.attention_impl = "xla"  # (the trainer's key; the VAE's mid attention is plain XLA)
    # VideoVAE's constructor arguments (vlm/models/video_vae.py).
    c.model.vae = dict(VAE_VARIANTS["tiny"])

    c.data = dict(
        name="synthetic",  # or a dataset built by `vlm data build` (clips are decoded like the dual encoder's)
        data_dir="",
        train_split="train",
        eval_split="",
        sources=(),
        num_frames=9,  # 1 + 4k: the first frame is encoded alone (causal VAE)
        resolution=32,
        sampling="uniform",  # consecutive-looking frames: equal segments' middles
        sample_fps=0.0,
        short_clips="repeat",
        train_crop="random",
        train_flip=True,  # no caption is involved, so flips are free augmentation
        decode_threads=1,
        train_size=1_000_000,
        eval_size=64,
        max_objects=1,
        max_text_len=16,  # batches carry tokens (unused here); the tokenizer is the dataset's usual one
        vocab_size=128,
        tokenizer="",
        worker_count=0,
        prefetch=2,
    )

    c.task = dict(
        name="autoencoding",
        l1_weight=0.0,  # the wan variant uses L1 alone
        l2_weight=1.0,  # MSE: what PSNR measures
        kl_weight=1e-6,  # per latent value relative to the per-pixel terms (LDM / Wan scale)
        sample_posterior=True,  # decode z ~ q(z | x) in training (False: the posterior mean)
        perceptual_weight=0.0,  # not implemented: must stay 0
        adversarial_weight=0.0,  # not implemented: must stay 0
    )
    # Named evaluators (vlm/eval/evaluators.py): the cheap held-out loss often, PSNR/SSIM and samples less.
    c.evals = dict(
        loss=dict(type="loss", every=0, num_batches=1),
        reconstruction=dict(type="reconstruction", every=0, num_samples=4, chunk=1),
    )
    c.metrics = dict(writers=("tensorboard",))

    if arg == "wan":
        c.total_steps = 200_000
        c.batch_size = 64
        c.eval_batch_size = 64
        c.log_every = 100
        c.eval_every = 5000
        c.checkpoint_every = 2000
        c.checkpoint.keep_period = 20_000
        c.optim.update(dict(lr=1e-4, warmup_steps=1000, end_lr_ratio=0.1, b2=0.95, weight_decay=0.0))
        c.ema.decay = 0.999
        c.sharding_rules = [["batch", ["data", "fsdp"]], ["frames", None], ["conv_in", None], ["conv_out", "tensor"]]
        c.model.dtype = "bfloat16"
        c.model.remat = "full"
        c.model.vae = dict(VAE_VARIANTS["wan"])
        c.data.update(dict(num_frames=17, resolution=256, eval_size=512, worker_count=8, sampling="fps",
                           sample_fps=16.0, train_flip=True, max_objects=3))
        c.task.update(dict(l1_weight=1.0, l2_weight=0.0, kl_weight=1e-6))
    c.lock()
    return c
