"""Text-to-video diffusion: a DiT on cached VAE latents (rectified flow), conditioned on the text tower of
a dual-encoder run.

The chain (each a `vlm` run on the built-in synthetic set; see README "Text-to-video diffusion"):

    vlm train --config=configs/dual_encoder.py:tiny --workdir=/tmp/de          # text tower + scorer
    vlm train --config=configs/video_vae.py:tiny --workdir=/tmp/vae             # the autoencoder
    vlm data encode --vae_workdir=/tmp/vae --out_name=synthetic_latents --max_examples=16384   # the latent cache
    vlm train --config=configs/dit_video.py:tiny --workdir=/tmp/dit \\
        --config.init_from.workdir=/tmp/de --config.model.vae_workdir=/tmp/vae \\
        --config.evals.generation.scorer_workdir=/tmp/de
    vlm sample --workdir=/tmp/dit --prompt="a large red circle moves left quickly" --out=/tmp/red.mp4

By default the text tower is restored from `init_from` (a dual-encoder run: `text/...` maps onto
`text/...`, the rest of the source is left out) and frozen; `--config.optim.frozen='()'` trains it
jointly. Without `init_from.workdir` the tower starts from its random init.

Variants:
  tiny  CPU-sized DiT (width 128, 4 blocks) on the tiny VAE's latents; minutes on 2 cores.
  B     DiT-B (768, 12 blocks), bfloat16, FSDP.
  1.3B  Wan2.1-T2V-1.3B shapes (1536, 30 blocks, 12 heads, mlp 8960), bfloat16, FSDP, full remat,
        EMA 0.9999, cuDNN attention.
"""

import ml_collections

from vlm import xla_flags
from vlm.models import dit, text_encoder

VARIANTS = ("tiny", "B", "1.3B")


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    arg = arg or "tiny"
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r} of configs/dit_video.py; choose one of: {', '.join(VARIANTS)}")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 3000
    c.batch_size = 64
    c.eval_batch_size = 64
    c.microbatches = 1
    c.log_every = 50
    c.eval_every = 500
    c.checkpoint_every = 1000
    c.checkpoint = dict(keep=3, keep_period=0, async_save=True)
    c.mesh = dict(data=-1, fsdp=1, context=1, tensor=1, dcn=dict(data=1, fsdp=1, context=1, tensor=1))
    c.sharding_rules = []
    # XLA flags per platform, set before JAX's backend starts (vlm/xla_flags.py); XLA_FLAGS in the environment win.
    c.xla_flags = dict(cpu=(), gpu=(), tpu=())

    c.optim = dict(
        name="adamw", lr=1e-3, warmup_steps=100, schedule="cosine", end_lr_ratio=0.05,
        b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0,
        frozen=("text/.*",),  # the text tower conditions, it does not train (LiT-style)
        lr_multipliers=(),
    )
    c.ema = dict(decay=0.999, start_step=0)  # evaluation and `vlm sample` use the EMA
    c.max_skipped_steps = 10
    # Trace train steps after_step+1 … after_step+steps into W/profile (0 = off): `vlm profile --workdir=W`
    # prints where their time went; XProf shows the trace (vlm/profiling.py).
    c.profile = dict(steps=0, after_step=2)
    # The text tower of a dual-encoder run: its text/... tensors load, everything else of it is left out.
    c.init_from = dict(workdir="", step=-1, mapping=((r"text/(.*)", r"text/\1"), (r".*", "")), strict=True,
                       use_ema=True)

    c.model = ml_collections.ConfigDict()
    c.model.name = "text_to_video"
    c.model.dtype = "float32"
    c.model.remat = "none"
    c.model.attention_impl = "xla"
    # With mesh.context > 1: the DiT's full attention over the context-split token sequence: none (XLA
    # gathers keys/values) | ulysses (all-to-all over heads) | ring (keys/values rotate; any head count).
    c.model.context_parallel = "none"
    c.model.vae_workdir = ""  # the VAE run that made the latent cache: decodes samples in evaluation and `vlm sample`
    # in_channels 0 = the latent cache's channel count.
    c.model.dit = dict(in_channels=0, patch=(1, 2, 2), attention="full", freq_dim=256, rope_theta=10000.0,
                       qk_norm=True, scan_layers=False, **dit.VARIANTS["tiny"])
    # scan_layers: one compiled block scanned over depth (compile time flat in depth; benchmarks/compile_time.py)
    # The text tower: the same keys and values as the dual-encoder run it comes from (configs/dual_encoder.py).
    c.model.text = dict(vocab_size=128, width=128, depth=2, num_heads=4, mlp_dim=512, pool="mean", causal=False,
                        norm_eps=1e-6, activation="gelu_tanh", projection="linear", scan_layers=False)

    c.data = dict(
        name="synthetic_latents",  # a latent cache written by `vlm data encode --out_name=...`
        data_dir="",
        train_split="train",
        eval_split="",
        sources=(),
        latent_sample=True,  # train on z = mean + std·ε drawn per example (False: the posterior mean)
        num_frames=9,  # the clips the cache was encoded from (for the tokenizer and eval bookkeeping)
        resolution=32,
        train_size=1_000_000,
        eval_size=256,
        max_objects=1,
        max_text_len=16,
        vocab_size=128,
        tokenizer="",
        worker_count=0,
        prefetch=2,
    )

    c.task = dict(
        name="diffusion",
        p_uncond=0.1,  # text dropped (→ the learned null text) for classifier-free guidance
        t_mean=0.0, t_std=1.0,  # logit-normal training times
        shift=1.0,  # timestep shift; 0 = sqrt(tokens / base_tokens)
        base_tokens=1024,
        weighting="uniform",  # uniform | bell (Wan's), per example
        sampler="euler", sample_steps=20, guidance=3.0,
        vae_hash="",  # if set, the latent cache must come from a VAE with this parameter hash
    )
    c.evals = dict(
        fm_loss=dict(type="fm_loss", every=0, num_batches=2),
        generation=dict(type="generation", every=1000, scorer_workdir="", num_prompts=64, seed=0),
    )

    if arg in ("B", "1.3B"):
        c.total_steps = 200_000
        c.batch_size = 256
        c.eval_batch_size = 64
        c.log_every = 100
        c.eval_every = 2000
        c.checkpoint_every = 2000
        c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
        c.xla_flags.gpu = xla_flags.GPU_FLAGS  # the latency-hiding scheduler: collectives overlap compute
        c.optim.update(dict(lr=1e-4, warmup_steps=1000, weight_decay=0.0))
        c.ema.decay = 0.9999
        c.model.dtype = "bfloat16"
        c.model.remat = "full"
        c.model.dit.scan_layers = True
        c.model.dit.update(dit.VARIANTS[arg])
        c.model.text.update(dict(vocab_size=32_000, **text_encoder.VARIANTS["B"]))
        c.data.update(dict(vocab_size=32_000, max_text_len=32, num_frames=33, resolution=256, worker_count=8))
        c.task.shift = 0.0
        c.evals.generation.every = 10_000
    if arg == "1.3B":
        c.model.attention_impl = "cudnn"
    c.lock()
    return c
