"""Video VAE encode/decode speed and memory: one-shot vs chunked in time vs tiled in space.

For one clip [B, T, H, W, 3] (default: the tiny VAE, 33 frames at 64x64), each row compiles one
pass with jax.jit, runs it `--repeats` times and reports frames/s (B*T / mean wall time), the
compiled program's XLA temporaries (`memory_analysis().temp_size_in_bytes`: the activations a
pass keeps live; this is what chunking bounds) and the process's peak RSS so far (a high-water
mark over all rows above, so only the first row's and rises are informative).

    python benchmarks/video_vae_speed.py                               # tiny, 33 x 64x64
    python benchmarks/video_vae_speed.py --resolution=128 --chunks=1,2,8 --tile=8 --overlap=4
"""

from __future__ import annotations

import argparse
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlm.models import video_vae_tiling as tiling
from vlm.models.video_vae import VARIANTS, VideoVAE


def measure(name: str, fn, params, x, frames: int, repeats: int) -> dict:
    jitted = jax.jit(fn)
    start = time.perf_counter()
    compiled = jitted.lower(params, x).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(params, x))  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        out = compiled(params, x)
    jax.block_until_ready(out)
    seconds = (time.perf_counter() - start) / repeats
    memory = compiled.memory_analysis()
    temp = getattr(memory, "temp_size_in_bytes", None) if memory is not None else None
    return dict(
        row=name, ms=1e3 * seconds, fps=frames / seconds, compile_s=compile_s,
        temp_mib=None if temp is None else temp / 2**20,
        rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        out=out,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="tiny", choices=sorted(VARIANTS))
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--chunks", default="1,8", help="comma-separated chunk sizes in latent frames")
    parser.add_argument("--tile", type=int, default=0, help="also a tiled decode/encode with this latent tile")
    parser.add_argument("--overlap", type=int, default=4)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    vae = VideoVAE(**VARIANTS[args.variant], dtype=jnp.dtype(args.dtype), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(vae)
    shape = (args.batch, args.frames, args.resolution, args.resolution, 3)
    video = jnp.asarray(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8))
    latents = jax.jit(lambda p, v: nnx.merge(graphdef, p).encode(v).mean)(params, video)
    frames = args.batch * args.frames
    chunks = [int(c) for c in args.chunks.split(",") if c]

    def enc(fn):
        return lambda p, v: fn(nnx.merge(graphdef, p), v).mean

    def dec(fn):
        return lambda p, z: fn(nnx.merge(graphdef, p), z)

    rows = [("encode one-shot", enc(lambda m, v: m.encode(v)), video)]
    rows += [(f"encode chunk={c}", enc(lambda m, v, c=c: tiling.encode_chunked(m, v, c)), video) for c in chunks]
    if args.tile:
        rows.append((f"encode tiled {args.tile}/{args.overlap} chunk={chunks[0]}",
                     enc(lambda m, v: tiling.encode_tiled(m, v, tile=args.tile, overlap=args.overlap,
                                                          chunk=chunks[0])), video))
    rows.append(("decode one-shot", dec(lambda m, z: m.decode(z)), latents))
    rows += [(f"decode chunk={c}", dec(lambda m, z, c=c: tiling.decode_chunked(m, z, c)), latents) for c in chunks]
    if args.tile:
        rows.append((f"decode tiled {args.tile}/{args.overlap} chunk={chunks[0]}",
                     dec(lambda m, z: tiling.decode_tiled(m, z, tile=args.tile, overlap=args.overlap,
                                                          chunk=chunks[0])), latents))

    params_mib = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)) / 2**20
    print(f"{args.variant} VAE ({params_mib:.1f} MiB params), clip {list(shape)} → latents {list(latents.shape)}, "
          f"{args.dtype}, {jax.devices()[0].device_kind} x1, {args.repeats} timed runs")
    print()
    print("| pass | ms | frames/s | compile s | XLA temp MiB | peak RSS MiB (so far) | max abs diff vs one-shot |")
    print("|---|---|---|---|---|---|---|")
    reference = {}
    for name, fn, x in rows:
        r = measure(name, fn, params, x, frames, args.repeats)
        kind = name.split()[0]
        reference.setdefault(kind, r["out"])
        diff = float(jnp.abs(r["out"] - reference[kind]).max())
        temp = "n/a" if r["temp_mib"] is None else f"{r['temp_mib']:.1f}"
        print(f"| {name} | {r['ms']:.0f} | {r['fps']:.1f} | {r['compile_s']:.1f} | {temp} | {r['rss_mib']:.0f} | "
              f"{diff:.2e} |", flush=True)


if __name__ == "__main__":
    main()
