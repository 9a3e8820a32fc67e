"""Video-text dual encoder (contrastive), Frozen-in-Time / CLIP4Clip style.

    vlm train --config=configs/dual_encoder.py:tiny --workdir=/tmp/de
    vlm train --config=configs/dual_encoder.py:B/16 --workdir=gs://.../de_b16 --config.data.name=...

Variants:
  tiny  CPU-sized: 8 frames of 32x32, two small towers; learns the synthetic set in minutes.
  B/16  ViT-B/16 video tower (16 frames, 224 px, tubelet 2x16x16) + CLIP-B text tower.
  L/14  ViT-L/14 video tower (16 frames, 224 px, tubelet 2x14x14) + CLIP-L text tower.
"""

import ml_collections

from vlm import xla_flags
from vlm.models import text_encoder, video_encoder

VARIANTS = ("tiny", "B/16", "L/14")


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    arg = arg or "tiny"
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r} of configs/dual_encoder.py; choose one of: {', '.join(VARIANTS)}")
    c = ml_collections.ConfigDict()
    c.seed = 0
    # tiny: 4-6 minutes on 2 CPU cores. The cosine over 300 steps rather than 400 anneals sooner (stop 22, clipped at
    # lr 7e-4): held-out t2v R@1 at step 200 0.828 / 0.773 / 0.844 (seeds 0 / 1 / 2) vs 0.738 / 0.773 over 400.
    c.total_steps = 300
    c.batch_size = 128  # global
    c.eval_batch_size = 256  # global
    c.microbatches = 1  # gradient accumulation: the batch is processed in this many slices
    # Rerunning the same command on the same --workdir resumes. On resume these may change: total_steps, the
    # cadences, mesh, microbatches, evals, checkpoint (batch_size, seed, optim values: with a warning); the
    # model, task, data shapes and vocabulary may not (one line naming the keys, exit 2; vlm/workdir.py).
    c.log_every = 25
    c.eval_every = 25  # tiny: held-out R@1 crosses 0.8 at step 175 (seed 0), between evals every 50
    c.checkpoint_every = 200
    # keep ≥ 1 newest checkpoints (a damaged newest one is moved aside to checkpoints/<step>.damaged and the
    # run resumes from the one before); keep_period: also keep every P-th step (0 = off).
    c.checkpoint = dict(keep=3, keep_period=0, async_save=True)

    # Axis sizes within a slice (-1 fills the remaining devices), and `dcn`: how many slices
    # (TPU multislice) or nodes (GPU clusters) each axis spans; usually dcn.data = #slices.
    # context: splits long token sequences (activations) over devices: see model.context_parallel.
    c.mesh = dict(data=-1, fsdp=1, context=1, tensor=1, dcn=dict(data=1, fsdp=1, context=1, tensor=1))
    c.sharding_rules = []  # [[logical, mesh axis or [axes] or None], ...]; [] = defaults in vlm/sharding.py
    # XLA flags per platform, set before JAX's backend starts (vlm/xla_flags.py); XLA_FLAGS in the environment win.
    c.xla_flags = dict(cpu=(), gpu=(), tpu=())

    c.optim = dict(
        name="adamw", lr=8.5e-4, warmup_steps=50, schedule="cosine", end_lr_ratio=0.01,
        b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.05, grad_clip_norm=0.0,  # 0 = no clipping
        # Regexes over "/"-joined parameter paths ("video/encoder/blocks/0/mlp/up/kernel"), matched whole:
        frozen=(),  # e.g. ("video/.*",): no gradient, no optimizer moments, bit-identical
        lr_multipliers=(),  # e.g. (("video/.*", 0.1),): the first matching entry scales that parameter's lr
    )
    # tiny: the learnable temperature's lr at 1e-2 (11.8x the base lr). At an lr of 1e-3 the logit scale moves from
    # 14.3 to 17.3 in 400 steps and the embeddings stay bunched (held-out cosines 0.86-0.98); at 1e-2 it reaches
    # 43 at step 200 and 62 at 400. No gradient clipping (OpenCLIP's default): tiny's global gradient norm is 2-54,
    # so clipping at 1.0 bound every step and weighted each step's gradient by 1/norm in Adam's moments. Unclipped,
    # at lr 8.5e-4, held-out t2v R@1 crosses 0.8 at step 175 / 175 / 150 (seeds 0 / 1 / 2), against 200 / 250 / 200
    # clipped at 7e-4 (seeds 1, 2 evaluated every 50 steps; benchmarks/README.md, "Stop 27").
    # B/16 and L/14 clip at 1.0, as big_vision and CLIP4Clip do.
    c.optim.lr_multipliers = (("logit_scale", 11.8),)
    c.ema = dict(decay=0.0, start_step=0)  # decay > 0 keeps an EMA of the weights; eval and loading use it
    c.max_skipped_steps = 10  # a non-finite step changes nothing; this many in a row stop the run (exit 1)
    # Trace train steps after_step+1 … after_step+steps into W/profile (0 = off): `vlm profile --workdir=W`
    # prints where their time went; XProf shows the trace (vlm/profiling.py).
    c.profile = dict(steps=0, after_step=2)
    # Start from another run's weights (never on resume): see vlm/init_from.py for `mapping` and `strict`.
    c.init_from = dict(workdir="", step=-1, mapping=(), strict=True, use_ema=True)

    c.model = ml_collections.ConfigDict()
    c.model.name = "dual_encoder"
    c.model.dtype = "float32"  # compute dtype; parameters and optimizer state stay float32
    c.model.remat = "none"  # none | full | dots | dots_no_batch (vlm/nn/transformer.py)
    c.model.attention_impl = "xla"  # xla | cudnn (fused flash attention; NVIDIA GPUs, bfloat16)
    # With mesh.context > 1, joint video attention over the context-split sequence: none (XLA's partitioner
    # gathers keys/values) | ulysses (all-to-all over heads) | ring (keys/values rotate; any head count).
    c.model.context_parallel = "none"
    c.model.embed_dim = 128
    # tiny: joint attention over the clip's 4x4x4 = 64 tokens. Divided space-time attention (B/16, L/14: 8 x 196
    # tokens) pays for a second attention layer per block and the layout changes between them; at 64 tokens
    # joint is 23% faster per step (566 vs 738 ms), compiles in 20 s instead of 33, and learns about as fast per step
    # (held-out t2v R@1 at step 250: 0.844 / 0.848 for seeds 0 / 1, divided 0.852 / 0.875; benchmarks/README.md).
    c.model.video = dict(attention="joint", tubelet=(2, 8, 8), width=128, depth=4, num_heads=4, mlp_dim=512)
    c.model.text = dict(vocab_size=128, width=128, depth=2, num_heads=4, mlp_dim=512)
    # Options public image-text checkpoints need (`vlm convert` sets them; the defaults are vlm's own model):
    c.model.video.update(dict(
        pool="mean",  # mean | cls (a class token per frame, CLIP) | map (attention-pooling head, SigLIP)
        pre_norm=False,  # a LayerNorm before the blocks (CLIP's pre_layrnorm)
        norm_eps=1e-6,  # LayerNorm epsilon (CLIP: 1e-5)
        activation="gelu_tanh",  # gelu_tanh | gelu_exact | quick_gelu (OpenAI CLIP)
        rgb_mean=(0.485, 0.456, 0.406),  # the model normalises uint8 video: (x/255 - mean) / std
        rgb_std=(0.229, 0.224, 0.225),  # CLIP: (0.4815, 0.4578, 0.4082) / (0.2686, 0.2613, 0.2758); SigLIP: 0.5 / 0.5
        projection="linear",  # linear (no bias) | linear_bias | none (then width must equal embed_dim)
        # The blocks stacked ([depth, ...] parameters) and applied by one scan: compile time flat in depth
        # (vlm/nn/scan.py). A run of the other layout loads with config.init_from, which stacks or slices the
        # blocks (vlm/init_from.py); slower per step on CPU (benchmarks/README.md, "Scanned towers").
        scan_layers=False,
    ))
    c.model.text.update(dict(
        pool="mean",  # mean (of non-padding tokens) | eot (the highest token id, CLIP) | last (SigLIP)
        causal=False,  # causal self-attention (CLIP); eot/last pooling attends without a padding mask
        norm_eps=1e-6,
        activation="gelu_tanh",
        projection="linear",
        scan_layers=False,
    ))

    c.data = dict(
        # "synthetic" (built in) or a dataset built by `vlm data build --name=NAME` (NAME[/CONFIG][:VERSION]).
        # It is also the eval dataset and the tokenizer's caption source.
        name="synthetic",
        data_dir="",  # "" = $VLM_DATA_DIR or ~/.cache/vlm/data; where built datasets and cached tokenizers live
        train_split="train",  # tfds split syntax: "train", "train[:95%]", "train+extra"
        eval_split="",  # "" = synthetic: heldout; built: validation, else test
        # Training mixture instead of `name` alone: dicts with name, weight (1), split (train_split),
        # data_dir (data_dir), start_step (0), end_step (None: to the end), e.g. an image-then-video
        # curriculum: (dict(name="images", end_step=5000), dict(name="images", weight=0.2, start_step=5000),
        # dict(name="videos", weight=0.8, start_step=5000)).
        sources=(),
        num_frames=8,
        resolution=32,  # frames are resized (shorter side) and cropped to resolution x resolution
        sampling="segments",  # segments: a random frame per segment in training, the middle one in eval; uniform; fps
        sample_fps=0.0,  # frames per second, for sampling="fps" (a random window of num_frames / sample_fps s)
        short_clips="repeat",  # clips with fewer frames than num_frames: repeat frames, or "pad" (frame_mask False)
        train_crop="random",  # or "center"; eval always crops the centre
        train_flip=False,  # random horizontal flips (off: captions say "left" and "right")
        decode_threads=1,  # FFmpeg threads per clip; worker processes are the main parallelism
        train_size=1_000_000,  # synthetic only
        eval_size=256,  # synthetic: held-out examples; built: at most this many of eval_split
        max_objects=1,  # synthetic only
        max_text_len=16,
        vocab_size=128,  # BPE: one piece per word of the synthetic captions (64 splits words)
        tokenizer="",  # a SentencePiece .model; "" = train one on the train captions, cached in data_dir
        worker_count=0,  # Grain worker processes that read, decode and batch (0 = in the training process)
        prefetch=2,
    )

    c.task = dict(name="contrastive", loss="softmax", max_logit_scale=100.0)
    # Named evaluators (vlm/eval/evaluators.py): type, every (steps; 0 = eval_every), prefix, options.
    c.evals = dict(retrieval=dict(type="retrieval", every=0))
    # Metric sinks besides the console and W/metrics.jsonl: "tensorboard" (W/tensorboard/), "wandb",
    # "mlflow" (pip install 'vlm[tracking]'; set WANDB_PROJECT / MLFLOW_TRACKING_URI; the tracker's run
    # id is kept in W/, so a resumed run continues the same tracker run). See vlm/tracking.py.
    c.metrics = dict(writers=("tensorboard",))

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
        c.optim.weight_decay = 0.2
        c.optim.grad_clip_norm = 1.0
        c.optim.lr_multipliers = ()  # long runs: the temperature at the base lr, as CLIP
        c.model.dtype = "bfloat16"
        c.model.remat = "full"
        c.model.embed_dim = 512 if size == "B" else 768
        c.model.video.update(dict(attention="divided", tubelet=(2, patch, patch), **video_encoder.VARIANTS[size]))
        c.model.text.update(dict(vocab_size=32_000, **text_encoder.VARIANTS[size]))
        c.data.num_frames = 16
        c.data.resolution = 224
        c.data.eval_size = 1000
        c.data.max_text_len = 32
        c.data.vocab_size = 32_000
        c.data.max_objects = 3
        c.data.worker_count = 8
    c.lock()  # a misspelt key is an error, from Python as from the command line
    return c
