"""vlm's train step against a PyTorch eager twin of the same model, timed interleaved in one process.

    pip install -e '.[bench]'     # torch (CPU), for this benchmark only
    python benchmarks/torch_twin.py --config=configs/dual_encoder.py:tiny --rounds=6 --steps=3

The twin is the dual encoder a PyTorch user would write for `configs/dual_encoder.py:tiny`: the same
shapes and parameter count (asserted), timm-style blocks (one fused qkv Linear, F.scaled_dot_product_attention),
the config's video attention (joint over all T'*S tokens, or divided: temporal, spatial, MLP), a 2-block text
tower with a padding mask, mean pooling, bias-free projections, symmetric InfoNCE with a clamped learned
temperature, and AdamW (decay on matmul weights only, as vlm's mask) after global-norm clipping where the
config clips (else the global norm alone, which vlm's non-finite guard and metric compute), with warmup + cosine.

Both run on the same random uint8 video / int32 token batch, on all the CPU threads (torch's intra-op
pool, XLA's). After compiling vlm's step and warming both up, each round times `--steps` vlm steps and
`--steps` twin steps back to back (the order alternating per round, so drift in machine load hits
both); the table gives the median and spread per step and the ratio vlm / twin.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "benchmarks")):
    if p not in sys.path:
        sys.path.insert(0, p)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from throughput import apply_override, load_config, parse_pairs, random_batch  # noqa: E402
from vlm import host_memory, optim, sharding, train  # noqa: E402

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError:
    sys.exit("benchmarks/torch_twin.py needs PyTorch: pip install -e '.[bench]'")


# ----------------------------------------------------------------------------- the twin


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x, mask=None):  # x [B, N, D], mask bool [B, 1, 1, N] of valid keys
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, N, Dh]
        return self.out(o.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.up, self.down = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x):
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, width, heads, hidden, eps):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(width, eps=eps), Attention(width, heads)
        self.norm2, self.mlp = nn.LayerNorm(width, eps=eps), Mlp(width, hidden)

    def forward(self, x, mask=None):
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class DividedBlock(nn.Module):
    def __init__(self, width, heads, hidden, eps):
        super().__init__()
        self.norm_t, self.attn_t = nn.LayerNorm(width, eps=eps), Attention(width, heads)
        self.norm_s, self.attn_s = nn.LayerNorm(width, eps=eps), Attention(width, heads)
        self.norm2, self.mlp = nn.LayerNorm(width, eps=eps), Mlp(width, hidden)

    def forward(self, x):  # [B, T, S, D]
        b, t, s, d = x.shape
        xt = x.transpose(1, 2).reshape(b * s, t, d)
        xt = xt + self.attn_t(self.norm_t(xt))
        x = xt.view(b, s, t, d).transpose(1, 2)
        xs = x.reshape(b * t, s, d)
        xs = xs + self.attn_s(self.norm_s(xs))
        x = xs.view(b, t, s, d)
        return x + self.mlp(self.norm2(x))


class VideoTower(nn.Module):
    def __init__(self, v, num_frames, resolution, rgb_mean, rgb_std):
        super().__init__()
        t, p, q = v.tubelet
        self.tubelet = (t, p, q)
        self.register_buffer("mean", torch.tensor(rgb_mean) * 255.0)
        self.register_buffer("std", torch.tensor(rgb_std) * 255.0)
        self.embed = nn.Linear(t * p * q * 3, v.width)
        self.temporal_pos = nn.Parameter(0.02 * torch.randn(num_frames // t, v.width))
        self.spatial_pos = nn.Parameter(0.02 * torch.randn((resolution // p) * (resolution // q), v.width))
        self.joint = v.attention == "joint"
        block = Block if self.joint else DividedBlock
        self.blocks = nn.ModuleList(block(v.width, v.num_heads, v.mlp_dim, v.norm_eps) for _ in range(v.depth))
        self.norm = nn.LayerNorm(v.width, eps=v.norm_eps)

    def forward(self, video):  # uint8 [B, T, H, W, 3] → [B, D]
        t, p, q = self.tubelet
        b, T, H, W, C = video.shape
        x = (video.float() - self.mean) / self.std
        x = x.view(b, T // t, t, H // p, p, W // q, q, C).permute(0, 1, 3, 5, 2, 4, 6, 7)
        x = self.embed(x.reshape(b, T // t, (H // p) * (W // q), t * p * q * C))  # [B, T', S, D]
        x = x + self.temporal_pos[None, :, None] + self.spatial_pos[None, None]
        if self.joint:  # one sequence of T'*S tokens per clip
            x = x.reshape(b, -1, x.shape[-1])
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x).mean(tuple(range(1, x.ndim - 1)))


class TextTower(nn.Module):
    def __init__(self, c, max_len):
        super().__init__()
        self.embed = nn.Embedding(c.vocab_size, c.width)
        self.pos = nn.Parameter(0.02 * torch.randn(max_len, c.width))
        self.blocks = nn.ModuleList(Block(c.width, c.num_heads, c.mlp_dim, c.norm_eps) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.width, eps=c.norm_eps)

    def forward(self, tokens):  # int [B, L] (0 = padding) → [B, D], the mean of the non-padding tokens
        valid = tokens != 0
        x = self.embed(tokens) + self.pos[None, : tokens.shape[1]]
        for blk in self.blocks:
            x = blk(x, valid[:, None, None, :])
        m = valid[..., None].float()
        return (self.norm(x) * m).sum(1) / m.sum(1).clamp(min=1.0)


class TwinDualEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        m, d = config.model, config.data
        self.video = VideoTower(m.video, d.num_frames, d.resolution, m.video.rgb_mean, m.video.rgb_std)
        self.text = TextTower(m.text, d.max_text_len)
        self.video_proj = nn.Linear(m.video.width, m.embed_dim, bias=False)
        self.text_proj = nn.Linear(m.text.width, m.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.logit_bias = nn.Parameter(torch.tensor(0.0))  # as vlm's (SigLIP's); unused by the softmax loss
        self.max_log_scale = math.log(config.task.max_logit_scale)

    def loss(self, video, tokens):
        v = F.normalize(self.video_proj(self.video(video)), dim=-1)
        t = F.normalize(self.text_proj(self.text(tokens)), dim=-1)
        logits = self.logit_scale.clamp(max=self.max_log_scale).exp() * t @ v.T
        labels = torch.arange(logits.shape[0])
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def twin_step_fn(config):
    """A model, and one eager train step (forward, backward, clip, AdamW, schedule) → loss."""
    torch.manual_seed(config.seed)
    model = TwinDualEncoder(config)
    o = config.optim
    decay = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]  # vlm: every "kernel"
    decay_ids = {id(p) for p in decay}
    scale = [model.logit_scale]
    rest = [p for p in model.parameters() if id(p) not in decay_ids and p is not model.logit_scale]
    # vlm's optim.lr_multipliers (tiny: the temperature at 11.8x), matched by vlm's own rules; the twin mirrors only
    # the temperature's entry (an entry naming other parameters matches nothing here: a ConfigError).
    labels, factors = optim.param_groups(o, {"logit_scale": 0.0})
    scale_lr = factors[labels["logit_scale"]] * o.lr
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0.0},
                             {"params": scale, "weight_decay": 0.0, "lr": scale_lr}],
                            lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
    warmup, total = o.warmup_steps, config.total_steps

    def lr_factor(step):
        if step < warmup:
            return step / max(warmup, 1)
        frac = min((step - warmup) / max(total - warmup, 1), 1.0)
        return o.end_lr_ratio + (1 - o.end_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)

    def step(video, tokens):
        opt.zero_grad(set_to_none=True)
        loss = model.loss(video, tokens)
        loss.backward()
        if o.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip_norm)
        else:  # vlm computes the global norm for its train/grad_norm metric either way
            torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        opt.step()
        sched.step()
        return loss.item()

    return model, step


# ----------------------------------------------------------------------------- timing


def time_steps(fn, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/dual_encoder.py:tiny")
    ap.add_argument("--set", action="append", default=[], help="key=value config override (repeatable)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=3, help="steps of each per round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.environ["OUT"], "torch_twin.md") if os.environ.get("OUT") else "")
    args = ap.parse_args(argv)
    malloc = "vlm (vlm/host_memory.py)" if host_memory.configure() else "system"  # as `vlm train`; both use it

    config = load_config(args.config)
    for key, value in parse_pairs(args.set):
        apply_override(config, key, value)
    if config.model.video.attention not in ("joint", "divided") or config.model.dtype != "float32":
        sys.exit("the twin models joint or divided space-time attention in float32 (configs/dual_encoder.py:tiny)")
    mesh = sharding.create_mesh(config.mesh)
    setup = train.build(config, mesh)
    local = random_batch(config, config.batch_size)
    with sharding.use_mesh(mesh, setup.rules):
        state = setup.init()
        batch = sharding.global_batch(local, mesh)
        t = time.perf_counter()
        compiled = setup.train_step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t
    vlm_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))

    model, twin_step = twin_step_fn(config)
    twin_params = sum(p.numel() for p in model.parameters())
    if twin_params != vlm_params:
        sys.exit(f"the twin has {twin_params} parameters, vlm {vlm_params}: the twin no longer matches the config")
    video, tokens = torch.from_numpy(local["video"]), torch.from_numpy(local["tokens"]).long()

    holder = {"state": state}

    def vlm_step():
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready(metrics)

    losses = {"twin": [twin_step(video, tokens) for _ in range(args.warmup)]}
    for _ in range(args.warmup):
        vlm_step()
    times = {"vlm": [], "twin": []}
    for r in range(args.rounds):
        order = (("vlm", vlm_step), ("twin", lambda: twin_step(video, tokens)))
        for name, fn in order if r % 2 == 0 else order[::-1]:
            times[name].append(time_steps(fn, args.steps))
    ratios = [a / b for a, b in zip(times["vlm"], times["twin"])]
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [
        "| | median ms/step | min | max |",
        "|---|---:|---:|---:|",
        *(f"| {k} | {1e3 * med[k]:.1f} | {1e3 * min(v):.1f} | {1e3 * max(v):.1f} |" for k, v in times.items()),
        f"| vlm / twin | {med['vlm'] / med['twin']:.3f} | {min(ratios):.3f} | {max(ratios):.3f} |",
    ]
    env = (f"{args.config}, {config.model.video.attention} video attention, batch {config.batch_size}, "
           f"{config.model.dtype}, {vlm_params:,} parameters; "
           f"{args.rounds} rounds × {args.steps} steps each, interleaved; vlm compile {compile_s:.1f} s; "
           f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
           f"({torch.get_num_threads()} threads), {os.cpu_count()} CPUs; host malloc: {malloc}")
    text = env + "\n\n" + "\n".join(rows) + "\n"
    print(text, end="")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump({"times_s": times, "ratio_median": med["vlm"] / med["twin"], "compile_s": compile_s,
                       "twin_warmup_losses": losses["twin"]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
