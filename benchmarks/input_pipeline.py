"""Input pipeline speed: clips per second per training process, against a naive decode-everything loader.

    python benchmarks/input_pipeline.py                       # 200 clips of 10 s, 640x360, H.264
    python benchmarks/input_pipeline.py --clips=48 --workers=0,1,2 --variants=as_is,keyframes_1s,256p

1. Writes `--clips` H.264 mp4s of `--seconds` s at `--size` and `--fps` with PyAV (a panning,
   textured scene at a web-video bitrate, x264 defaults: a keyframe every 250 frames plus scene
   cuts), once, under --workdir.
2. Builds datasets from them with `vlm data build`'s builder: `as_is` stores the files as they
   are; `keyframes_1s` re-encodes them (same size and rate) with a keyframe every second
   (`--reencode`); `256p` also scales the shorter side to 256 (`--max_short_side=256`).
3. For each dataset: the naive baseline, in this process — decode every frame of the clip to
   RGB (torchvision.io.read_video-style), then take one frame per segment and resize/crop them
   — and the real training pipeline (`create_train_iterator`: tfds ArrayRecord source, shuffle,
   decode only the needed frames, resize + crop, tokenize, batch) with 0, 1, 2 Grain workers,
   sampling `--frames` frames at `--resolution` px ("segments" sampling, random crop).
   Clips/s = clips delivered / wall time after a warm-up batch. Ratio = clips/s / naive clips/s.
4. Prints a Markdown table and the arithmetic: host cores per accelerator at the dual-encoder
   configs' measured step rates (benchmarks/README.md, H200), written to --out (default
   $OUT/input_pipeline.md when OUT is set) with the raw numbers in input_pipeline.json.

Numbers depend on the host: run it where training runs. On a shared machine, other processes
take CPU time from every row alike.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import av  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

# Training step rates of one accelerator (H200, bf16), from benchmarks/README.md (throughput.py).
STEP_RATES = (
    ("B/16, batch 32, remat full", 188.7),
    ("B/16, batch 64, no remat", 248.1),
)


def write_clip(path: str, width: int, height: int, fps: int, seconds: float, seed: int) -> None:
    """A textured scene panning diagonally with a moving bar: ~1 Mbit/s at 640x360 with x264 defaults."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 256, (height * 2, width * 2, 3), dtype=np.uint8) // 4
    ramp = np.linspace(0, 170, width, dtype=np.uint16)[None, :, None]
    with av.open(path, "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23"}
        for i in range(int(fps * seconds)):
            x, y = (i * 3) % width, (i * 2) % height
            frame = (texture[y : y + height, x : x + width] + ramp).astype(np.uint8)
            frame[:, (i * 4) % width : (i * 4) % width + 12] = (240, 220, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_clip_args(args):
    write_clip(*args)


def make_corpus(folder: str, clips: int, width: int, height: int, fps: int, seconds: float) -> str:
    """folder/manifest.jsonl and its clips (kept between runs); returns the manifest's path."""
    os.makedirs(os.path.join(folder, "clips"), exist_ok=True)
    jobs = []
    for i in range(clips):
        path = os.path.join(folder, "clips", f"clip_{i:04d}_{width}x{height}_{fps}fps_{seconds:g}s.mp4")
        if not os.path.exists(path):
            jobs.append((path, width, height, fps, seconds, i))
    if jobs:
        started = time.perf_counter()
        with multiprocessing.get_context("spawn").Pool(os.cpu_count()) as pool:
            pool.map(_write_clip_args, jobs)
        print(f"wrote {len(jobs)} clips in {time.perf_counter() - started:.0f}s", flush=True)
    manifest = os.path.join(folder, f"manifest_{clips}_{width}x{height}_{fps}fps_{seconds:g}s.jsonl")
    with open(manifest, "w") as f:
        for i in range(clips):
            name = f"clips/clip_{i:04d}_{width}x{height}_{fps}fps_{seconds:g}s.mp4"
            f.write(json.dumps({"video": name, "caption": f"benchmark clip number {i}"}) + "\n")
    return manifest


def build(manifest: str, data_dir: str, name: str, variant: str):
    from input_pipeline import datasets
    from input_pipeline.builders import media, video_captions

    try:
        datasets.dataset_path(name, data_dir)
        print(f"reusing dataset {name}", flush=True)
        return
    except datasets.DatasetError:
        pass
    options = {
        "as_is": media.EncodeOptions(),
        # Re-encoded at the same size and rate, a keyframe every second (vlm data build --reencode).
        "keyframes_1s": media.EncodeOptions(keyframe_interval=1.0, reencode_all=True),
        # Shorter side 256, a keyframe every second (vlm data build --max_short_side=256).
        "256p": media.EncodeOptions(max_short_side=256, keyframe_interval=1.0),
    }[variant]
    started = time.perf_counter()
    summary = video_captions.build(manifest, data_dir, name, options)
    print(f"{summary.lines()[0]} ({time.perf_counter() - started:.0f}s)", flush=True)


def naive_clip(data: bytes, num_frames: int, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """Decode every frame to RGB, then pick one per segment, resize the shorter side and centre-crop."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1  # as in the pipeline: processes are the parallelism
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    n = len(frames)
    picks = ((np.arange(num_frames) + rng.uniform(size=num_frames)) * n / num_frames).astype(int)
    height, width = frames[0].shape[:2]
    scale = resolution / min(height, width)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    x0, y0 = (new_w - resolution) // 2, (new_h - resolution) // 2
    out = []
    for i in picks:
        small = av.VideoFrame.from_ndarray(frames[min(i, n - 1)], format="rgb24").reformat(width=new_w, height=new_h)
        out.append(small.to_ndarray()[y0 : y0 + resolution, x0 : x0 + resolution])
    return np.stack(out)


def measure_naive(name: str, data_dir: str, clips: int, num_frames: int, resolution: int) -> dict:
    from input_pipeline import datasets

    source = datasets.records(name, "train", data_dir)
    order = np.random.default_rng(0).permutation(len(source))[:clips]
    rng = np.random.default_rng(0)
    naive_clip(source[int(order[0])]["video"], num_frames, resolution, rng)  # warm-up
    started, cpu = time.perf_counter(), time.process_time()
    for index in order:
        naive_clip(source[int(index)]["video"], num_frames, resolution, rng)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {"clips": len(order), "wall_s": wall, "clips_per_s": len(order) / wall, "cpu_s_per_clip": cpu / len(order)}


def measure_pipeline(name: str, data_dir: str, workers: int, batch_size: int, batches: int, num_frames: int,
                     resolution: int) -> dict:
    from input_pipeline import pipeline

    config = ml_collections.ConfigDict(dict(
        name=name, data_dir=data_dir, train_split="train", eval_split="train[:8]", sources=(),
        num_frames=num_frames, resolution=resolution, sampling="segments", sample_fps=0.0, short_clips="repeat",
        train_crop="random", train_flip=False, decode_threads=1, train_size=0, eval_size=8, max_objects=1,
        max_text_len=16, vocab_size=64, tokenizer="", worker_count=workers, prefetch=2,
    ))
    iterator = pipeline.create_train_iterator(config, global_batch_size=batch_size, seed=0, process_index=0,
                                              process_count=1)
    next(iterator)  # warm-up: worker start, first batch
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        batch = next(iterator)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    assert batch["video"].shape == (batch_size, num_frames, resolution, resolution, 3)
    iterator.close()
    clips = batches * batch_size
    return {"clips": clips, "wall_s": wall, "clips_per_s": clips / wall,
            "cpu_s_per_clip": cpu / clips if workers == 0 else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=200, help="clips in the corpus")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--size", default="640x360", help="WIDTHxHEIGHT of the clips")
    p.add_argument("--fps", type=int, default=30)
    p.add_argument("--frames", type=int, default=8, help="frames sampled per clip")
    p.add_argument("--resolution", type=int, default=224, help="output frames are resolution x resolution")
    p.add_argument("--workers", default="0,1,2", help="Grain worker counts to measure")
    p.add_argument("--variants", default="as_is,keyframes_1s,256p", help="datasets: as_is, keyframes_1s, 256p")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--batches", type=int, default=0, help="timed batches per row (default: one pass over the clips)")
    p.add_argument("--naive_clips", type=int, default=0, help="clips the baseline decodes (default: --clips / 2)")
    p.add_argument("--workdir", default="/tmp/vlm_input_pipeline_benchmark")
    p.add_argument("--out", default=None, help="Markdown output (default $OUT/input_pipeline.md if OUT is set)")
    args = p.parse_args(argv)

    width, height = map(int, args.size.split("x"))
    workers = [int(w) for w in args.workers.split(",")]
    batches = args.batches or max(args.clips // args.batch_size, 1)
    naive_clips = args.naive_clips or max(args.clips // 2, 1)
    manifest = make_corpus(os.path.join(args.workdir, "media"), args.clips, width, height, args.fps, args.seconds)
    data_dir = os.path.join(args.workdir, "tfds")
    rows = []
    for variant in args.variants.split(","):
        name = f"bench_{variant}_{args.clips}_{width}x{height}_{args.fps}fps_{args.seconds:g}s".replace(".", "_")
        build(manifest, data_dir, name, variant)
        naive = measure_naive(name, data_dir, naive_clips, args.frames, args.resolution)
        rows.append({"variant": variant, "loader": "naive: decode all, then subsample", "workers": 0, **naive,
                     "ratio": 1.0})
        print(f"{variant} naive: {naive['clips_per_s']:.2f} clips/s", flush=True)
        for w in workers:
            result = measure_pipeline(name, data_dir, w, args.batch_size, batches, args.frames, args.resolution)
            rows.append({"variant": variant, "loader": "vlm pipeline", "workers": w, **result,
                         "ratio": result["clips_per_s"] / naive["clips_per_s"]})
            print(f"{variant} pipeline workers={w}: {result['clips_per_s']:.2f} clips/s"
                  f" ({rows[-1]['ratio']:.2f}x naive)", flush=True)

    lines = [
        f"Corpus: {args.clips} H.264 mp4 clips, {args.seconds:g} s, {width}x{height}, {args.fps} fps;"
        f" {args.frames} frames per clip at {args.resolution}x{args.resolution}; host: {os.cpu_count()} CPUs.",
        "",
        "| dataset | loader | workers | clips | wall s | clips/s per process | CPU ms/clip | vs naive |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cpu = f"{1000 * r['cpu_s_per_clip']:.0f}" if r.get("cpu_s_per_clip") else "-"
        lines.append(f"| {r['variant']} | {r['loader']} | {r['workers']} | {r['clips']} | {r['wall_s']:.1f} |"
                     f" {r['clips_per_s']:.2f} | {cpu} | {r['ratio']:.2f}x |")
    lines += ["", "Host cores to feed one accelerator (examples/s ÷ clips/s of one core, workers=0 rows):", "",
              "| dataset | accelerator step rate | examples/s | cores (vlm pipeline) | cores (naive) |",
              "|---|---|---|---|---|"]
    for variant in args.variants.split(","):
        ours = next(r for r in rows if r["variant"] == variant and r["loader"] == "vlm pipeline" and r["workers"] == 0)
        naive = next(r for r in rows if r["variant"] == variant and r["workers"] == 0 and r["loader"].startswith("naive"))
        per_core_ours = 1 / ours["cpu_s_per_clip"]
        per_core_naive = 1 / naive["cpu_s_per_clip"]
        for label, rate in STEP_RATES:
            lines.append(f"| {variant} | {label} (H200) | {rate:.0f} | {rate / per_core_ours:.0f} |"
                         f" {rate / per_core_naive:.0f} |")
    table = "\n".join(lines)
    print("\n" + table, flush=True)
    out = args.out or (os.path.join(os.environ["OUT"], "input_pipeline.md") if os.environ.get("OUT") else None)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(table + "\n")
        with open(os.path.splitext(out)[0] + ".json", "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
