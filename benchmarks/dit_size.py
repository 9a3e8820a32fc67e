"""DiT variants: parameter counts and forward FLOPs, from abstract shapes only (nothing is allocated).

    python benchmarks/dit_size.py                                  # every variant, FLOPs of 1.3B at 81x480x832
    python benchmarks/dit_size.py --flops=tiny,1.3B --latents=21,60,104,16 --text_len=512 --context_width=4096

Parameters are counted on `nnx.eval_shape`. FLOPs are XLA's count of one forward pass (batch 1,
float32, attention written in XLA) lowered for one CPU device: `jax.jit(f).lower(abstract
inputs).cost_analysis()`, as `vlm.train.model_flops_per_step` counts them. The analytic column is
2·(matmul parameters used per token)·N plus the attention score and value products, 4·N²·D
per self-attention layer and 4·N·L·D per cross-attention layer, for comparison. Prints a Markdown table.
"""

from __future__ import annotations

import math
import os
import sys

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from vlm import sharding  # noqa: E402
from vlm.models.dit import VARIANTS, DiT  # noqa: E402

FLAGS = flags.DEFINE_string("flops", "1.3B", "comma-separated variants whose forward FLOPs to count ('' = none)")
LATENTS = flags.DEFINE_list("latents", ["21", "60", "104", "16"], "latent shape t,h,w,c (default: Wan 81x480x832)")
TEXT_LEN = flags.DEFINE_integer("text_len", 512, "text tokens L (umT5: 512)")
CONTEXT_WIDTH = flags.DEFINE_integer("context_width", 4096, "text state width Dc (umT5-XXL: 4096)")


def build(variant: str, channels: int, context_width: int) -> DiT:
    return DiT(in_channels=channels, context_width=context_width, **VARIANTS[variant], rngs=nnx.Rngs(0))


def count_params(model: DiT) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def analytic_flops(variant: str, tokens: int, text_len: int, context_width: int, patch_features: int) -> float:
    v = VARIANTS[variant]
    d, f, depth = v["width"], v["mlp_dim"], v["depth"]
    per_token = 4 * d * d + 2 * d * d + 2 * d * f  # self q,k,v,o; cross q,o; MLP
    text = text_len * (context_width * d + d * d + depth * 2 * d * d)  # text MLP; cross k,v per block
    matmuls = tokens * (depth * per_token + 2 * patch_features * d) + text
    attention = depth * (4 * tokens * tokens * d + 4 * tokens * text_len * d)
    return 2.0 * matmuls + attention


def xla_flops(model: DiT, latents: tuple[int, ...], text_len: int, context_width: int) -> float:
    graphdef, params = nnx.split(model, nnx.Param)
    cpu_mesh = sharding.create_mesh({a: 1 for a in sharding.MESH_AXES}, jax.devices("cpu")[:1])
    spec = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.replicated(cpu_mesh))
    abstract_params = jax.tree.map(lambda x: spec(x.shape, x.dtype), nnx.to_pure_dict(params))
    inputs = (spec((1, *latents)), spec((1,)), spec((1, text_len, context_width)), spec((1, text_len), jnp.bool_))
    forward = lambda p, x, t, c, m: nnx.merge(graphdef, p)(x, t, c, m)
    with sharding.use_mesh(cpu_mesh, sharding.DEFAULT_RULES):
        cost = jax.jit(forward).lower(abstract_params, *inputs).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def main(argv):
    del argv
    latents = tuple(int(n) for n in LATENTS.value)
    flops_for = [v for v in FLAGS.value.split(",") if v]
    rows = ["| variant | width | depth | heads | mlp | parameters | tokens | forward TFLOP (XLA) | forward TFLOP (analytic) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, v in VARIANTS.items():
        model = nnx.eval_shape(lambda: build(name, latents[-1], CONTEXT_WIDTH.value))
        params = count_params(model)
        tokens, xla, analytic = "", "", ""
        if name in flops_for:
            n = model.num_tokens(latents)
            patch_features = math.prod(model.patch) * latents[-1]
            tokens = str(n)
            xla = f"{xla_flops(model, latents, TEXT_LEN.value, CONTEXT_WIDTH.value) / 1e12:.1f}"
            analytic = f"{analytic_flops(name, n, TEXT_LEN.value, CONTEXT_WIDTH.value, patch_features) / 1e12:.1f}"
        rows.append(f"| {name} | {v['width']} | {v['depth']} | {v['num_heads']} | {v['mlp_dim']} | "
                    f"{params / 1e6:,.1f}M | {tokens} | {xla} | {analytic} |")
    print(f"latents (t, h, w, c) = {latents}, text {TEXT_LEN.value} x {CONTEXT_WIDTH.value}, batch 1\n")
    print("\n".join(rows))


if __name__ == "__main__":
    app.run(main)
