"""Compile time of the DiT train step, unrolled vs scanned layers, by depth. Nothing is allocated.

    python benchmarks/compile_time.py                                   # tiny width, depths 4, 8, 16
    python benchmarks/compile_time.py --variant=1.3B --depths=30 --latents=4,16,16,16 --text_len=64
    python benchmarks/compile_time.py --depths=2 --layouts=unrolled --latents=8,16,16,4 --context=1,2,4 \
        --context_parallel=ring                         # per-device memory by context-axis size

The step is `jax.value_and_grad` of a mean-squared velocity loss over the parameters (forward +
backward, the optimizer left out), jitted for one CPU device and compiled from abstract inputs:
`jax.jit(step).lower(abstract params, abstract batch).compile()`. With `--context=c,...` each row is
compiled for a mesh of c CPU devices whose `context` axis splits the tokens (`--context_parallel`
chooses the attention exchange). Columns: the time to trace and lower to StableHLO, the time XLA
takes to compile it, the StableHLO text size, and the compiled program's per-device temporary bytes
(`memory_analysis()`). Prints a Markdown table (also to `$OUT/compile_time.md` when OUT is set).
"""

from __future__ import annotations

import os
import sys
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):  # CPU devices for --context
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from vlm import sharding  # noqa: E402
from vlm.models.dit import VARIANTS, DiT  # noqa: E402

VARIANT = flags.DEFINE_string("variant", "tiny", f"DiT size ({', '.join(VARIANTS)}); its depth is replaced by --depths")
DEPTHS = flags.DEFINE_list("depths", ["4", "8", "16"], "depths to compile")
LAYOUTS = flags.DEFINE_list("layouts", ["unrolled", "scanned"], "unrolled and/or scanned")
ATTENTION = flags.DEFINE_string("attention", "full", "full | factorised")
REMAT = flags.DEFINE_string("remat", "none", "remat policy (vlm/nn/transformer.py)")
LATENTS = flags.DEFINE_list("latents", ["4", "8", "8", "4"], "latent shape t,h,w,c")
TEXT_LEN = flags.DEFINE_integer("text_len", 8, "text tokens L")
CONTEXT_WIDTH = flags.DEFINE_integer("context_width", 64, "text state width Dc")
CONTEXT = flags.DEFINE_list("context", ["1"], "context-axis sizes (devices per row)")
CONTEXT_PARALLEL = flags.DEFINE_string("context_parallel", "none", "none | ulysses | ring")
COMPILE = flags.DEFINE_bool("compile", True, "also compile (False: trace and lower only)")


def train_step_compile(depth: int, scanned: bool, context: int) -> dict[str, float]:
    latents = tuple(int(x) for x in LATENTS.value)
    shape = dict(VARIANTS[VARIANT.value], depth=depth)
    model = nnx.eval_shape(lambda: DiT(in_channels=latents[-1], context_width=CONTEXT_WIDTH.value, **shape,
                                       attention=ATTENTION.value, remat=REMAT.value, scan_layers=scanned,
                                       context_parallel=CONTEXT_PARALLEL.value, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model, nnx.Param)
    mesh = sharding.create_mesh({"data": 1, "fsdp": 1, "context": context, "tensor": 1}, jax.devices("cpu")[:context])
    spec = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.replicated(mesh))
    shardings = sharding.state_shardings(params, mesh, sharding.DEFAULT_RULES)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nnx.to_pure_dict(params),
                          shardings)
    x = spec((1, *latents))
    batch = (x, spec((1,)), spec((1, TEXT_LEN.value, CONTEXT_WIDTH.value)), spec((1, TEXT_LEN.value), jnp.bool_), x)

    def loss(params, x, t, context, mask, target):
        v = nnx.merge(graphdef, params)(x, t, context, mask)
        return jnp.mean(jnp.square(v - target))

    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        start = time.perf_counter()
        lowered = jax.jit(jax.value_and_grad(loss)).lower(params, *batch)
        row = {"lower s": time.perf_counter() - start, "HLO MB": len(lowered.as_text()) / 1e6}
        if COMPILE.value:
            start = time.perf_counter()
            compiled = lowered.compile()
            row["compile s"] = time.perf_counter() - start
            row["temp MB"] = compiled.memory_analysis().temp_size_in_bytes / 1e6
    return row


def main(argv) -> None:
    del argv
    columns = ["lower s", "compile s", "HLO MB", "temp MB"]
    lines = [f"DiT {VARIANT.value} ({ATTENTION.value} attention, remat {REMAT.value}, context-parallel "
             f"attention {CONTEXT_PARALLEL.value}), latents "
             f"{'x'.join(LATENTS.value)}, text {TEXT_LEN.value}x{CONTEXT_WIDTH.value}, batch 1, float32, "
             f"{jax.devices('cpu')[0].device_kind} devices (one per context shard), jax {jax.__version__}",
             "", "| depth | layers | context | " + " | ".join(columns) + " |", "|---" * (3 + len(columns)) + "|"]
    print("\n".join(lines), flush=True)
    for depth in (int(d) for d in DEPTHS.value):
        for layout in LAYOUTS.value:
            for context in (int(c) for c in CONTEXT.value):
                row = train_step_compile(depth, layout == "scanned", context)
                cells = [f"{row[c]:.2f}" if c in row else "n/a" for c in columns]
                lines.append(f"| {depth} | {layout} | {context} | " + " | ".join(cells) + " |")
                print(lines[-1], flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "compile_time.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    app.run(main)
