"""Caption decoding speed: captions per second of vlm.decoding (greedy, beam search, sampling).

    python benchmarks/decoding.py                                  # tiny captioner, batch 64, max_len 16
    python benchmarks/decoding.py --decoder=B --video=B --patch=16 --resolution=224 --frames=16 --batch=256

Builds a randomly initialised captioner (video tower from configs/dual_encoder.py:tiny unless --video
names a ViT size; decoder from vlm.models.captioner.VARIANTS), then for each mode decodes one random
uint8 video batch: the first call compiles (timed separately), then --repeats timed calls; captions/s =
batch / median time (and / best time: on a shared machine the best is the better estimate). CPU s /
batch is this process's CPU time (all threads) per call: less sensitive to other processes than wall time. An untrained model rarely says EOS, so every caption runs to --max_len: the loop's
early exit never helps, which makes these worst-case numbers for that length. Prints a Markdown table
(also written to --out, default $OUT/decoding.md when OUT is set).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from configs import dual_encoder  # noqa: E402
from vlm import decoding  # noqa: E402
from vlm.models import captioner, video_encoder  # noqa: E402

BOS, EOS = 2, 3  # input_pipeline/tokenizer.py


def build(args) -> captioner.Captioner:
    tiny = dual_encoder.get_config("tiny")
    if args.video == "tiny":
        video_size = dict(tiny.model.video)
    else:
        video_size = dict(video_encoder.VARIANTS[args.video], attention="joint", tubelet=(2, args.patch, args.patch))
    dtype = jnp.dtype(args.dtype)
    rngs = nnx.Rngs(0)
    video = video_encoder.VideoEncoder(num_frames=args.frames, resolution=args.resolution, dtype=dtype, rngs=rngs,
                                       **video_size)
    return captioner.Captioner(video, vocab_size=args.vocab, max_len=args.max_len, bos_id=BOS, dtype=dtype,
                               rngs=rngs, **captioner.VARIANTS[args.decoder])


def run_mode(model, video, mode: str, args):
    if mode == "greedy":
        return lambda: decoding.greedy(model, video, max_len=args.max_len, eos_id=EOS)
    if mode.startswith("beam"):
        beam = int(mode[4:])
        return lambda: decoding.beam_search(model, video, beam_size=beam, max_len=args.max_len, eos_id=EOS)[0]
    if mode == "sample":
        return lambda: decoding.sample(model, video, jax.random.key(0), max_len=args.max_len, eos_id=EOS, top_p=0.9)
    raise ValueError(f"unknown mode {mode!r}; use greedy, beamN (e.g. beam4) or sample")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="greedy,beam4,sample")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--max_len", type=int, default=16)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--decoder", default="tiny", choices=sorted(captioner.VARIANTS))
    p.add_argument("--video", default="tiny", help="tiny (configs/dual_encoder.py:tiny) or a ViT size: " + ", ".join(video_encoder.VARIANTS))
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=os.path.join(os.environ["OUT"], "decoding.md") if os.environ.get("OUT") else "")
    args = p.parse_args(argv)

    model = build(args)
    rng = np.random.default_rng(0)
    video = jnp.asarray(rng.integers(0, 256, (args.batch, args.frames, args.resolution, args.resolution, 3), np.uint8))
    rows = [f"decoding: video {args.video}, decoder {args.decoder}, batch {args.batch}, max_len {args.max_len}, "
            f"vocab {args.vocab}, {args.dtype}, {jax.devices()[0].platform} x{jax.local_device_count()}", "",
            "| mode | compile s | median s / batch | captions/s (median) | captions/s (best) | tokens/s (median) | CPU s / batch "
            "| ended with EOS |", "|---|---|---|---|---|---|---|---|"]
    for mode in args.modes.split(","):
        call = run_mode(model, video, mode, args)
        t0 = time.perf_counter()
        tokens = np.asarray(jax.block_until_ready(call()))
        compile_s = time.perf_counter() - t0
        times = []
        cpu0 = time.process_time()
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(call())
            times.append(time.perf_counter() - t0)
        cpu = (time.process_time() - cpu0) / args.repeats
        median = statistics.median(times)
        ended = float((tokens == EOS).any(-1).mean())
        rows.append(f"| {mode} | {compile_s:.1f} | {median:.3f} | {args.batch / median:.0f} | {args.batch / min(times):.0f} | "
                    f"{args.batch * args.max_len / median:.0f} | {cpu:.3f} | {ended:.0%} |")
    table = "\n".join(rows)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
