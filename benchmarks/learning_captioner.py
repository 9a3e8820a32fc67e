"""Learning benchmark: the tiny captioner through the README's command, from scratch and from a dual encoder.

    python benchmarks/learning_captioner.py [--root=/tmp/vlm_captioner_benchmark] [--runs=scratch,frozen,lower_lr]

Runs, each as a user would (one process, all of this machine's CPU cores as one device):
  scratch    vlm train --config=configs/captioner.py:tiny --workdir=ROOT/scratch
  frozen     vlm train --config=configs/dual_encoder.py:tiny --workdir=ROOT/dual_encoder   (once, for both)
             vlm train --config=configs/captioner.py:tiny --workdir=ROOT/frozen --config.init_from.workdir=ROOT/dual_encoder
               --config.init_from.mapping='(("video/(.*)", "video/\\\\1"), (".*", ""))' --config.optim.frozen='("video/.*",)'
  lower_lr   the same init, the video tower trained at 0.1x the learning rate (optim.lr_multipliers)
then prints, per run, the held-out metrics at every eval with the wall time since launch, checks the
bar (held-out CIDEr-D ≥ 2.0 within 15 minutes for the captioner command; the dual encoder's time is
listed apart), and measures decoding speed of the first run's final model on the held-out split
(greedy and beam 4: captions/s, after a compile call) with the metrics of each mode. The machine's
load average (1 min) is printed before and after each timed command: on a shared machine wall times
are pessimistic.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

BAR_CIDER, BAR_SECONDS = 2.0, 900.0
MAPPING = '(("video/(.*)", "video/\\\\1"), (".*", ""))'  # keep only the dual encoder's video tower
INIT = {
    "scratch": [],
    "frozen": ["--config.optim.frozen=(\"video/.*\",)"],
    "lower_lr": ["--config.optim.lr_multipliers=((\"video/.*\", 0.1),)"],
}


def load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def run(command: list[str]) -> tuple[float, float, str, str]:
    """(launch time, wall seconds, load before, load after) of a command run as a user would: one CPU device."""
    print("$", " ".join(command), flush=True)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    # A cold compilation cache, as on a first run (vlm/compilation_cache.py), unless one is named.
    env.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="vlm_bench_jax_cache_"))
    before, start = load(), time.time()
    proc = subprocess.run(command, cwd=ROOT, env=env)
    if proc.returncode != 0:
        sys.exit(f"{command[:3]} failed with exit code {proc.returncode}")
    return start, time.time() - start, before, load()


def vlm(*args: str) -> list[str]:
    return [sys.executable, "-m", "vlm.main", *args]


def eval_rows(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    losses = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    return [{**r, "train/loss": losses.get(r["step"], float("nan"))} for r in rows if "eval/cider" in r]


def decode_speed(workdir: str, modes=(("greedy", {}), ("beam 4", dict(decode="beam", beam_size=4)))) -> list[tuple]:
    """[(mode, captions/s, metrics)] on the held-out split with the run's final weights, one CPU device."""
    import jax
    import numpy as np

    from input_pipeline import pipeline
    from input_pipeline.tokenizer import get_tokenizer
    from vlm import train
    from vlm.eval import caption_metrics
    from vlm.tasks import captioning

    model, config, _ = train.load_model(workdir)
    tokenizer = get_tokenizer(config.data)
    batches = list(pipeline.create_eval_iterator(config.data, global_batch_size=config.eval_batch_size))
    out = []
    for name, options in modes:
        o = captioning.caption_options(options, config.data.max_text_len)
        jax.block_until_ready(captioning.generate(model, batches[0]["video"], o))  # compile
        start, tokens = time.time(), []
        for batch in batches:
            tokens.append(np.asarray(captioning.generate(model, batch["video"], o))[batch["mask"]])
        seconds = time.time() - start
        predictions = tokenizer.decode_batch(np.concatenate(tokens))
        references = [c for batch in batches for c, m in zip(batch["caption"], batch["mask"]) if m]
        metrics = caption_metrics.compute(dict(enumerate(predictions)), {i: [r] for i, r in enumerate(references)})
        metrics.update(captioning.attribute_scores(predictions, references))
        out.append((name, len(predictions) / seconds, metrics))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="/tmp/vlm_captioner_benchmark")
    parser.add_argument("--runs", default="scratch,frozen", help="comma-separated: " + ", ".join(INIT))
    parser.add_argument("extra", nargs="*", help="extra flags passed to every captioner `vlm train` (after --)")
    args = parser.parse_args()
    runs = [r for r in args.runs.split(",") if r]
    unknown = [r for r in runs if r not in INIT]
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {', '.join(INIT)}")

    timings, ok = {}, True
    if any(r != "scratch" for r in runs):
        de = os.path.join(args.root, "dual_encoder")
        shutil.rmtree(de, ignore_errors=True)
        timings["dual_encoder"] = run(vlm("train", "--config=configs/dual_encoder.py:tiny", f"--workdir={de}"))
    for name in runs:
        workdir = os.path.join(args.root, name)
        shutil.rmtree(workdir, ignore_errors=True)
        init = [] if name == "scratch" else [f"--config.init_from.workdir={os.path.join(args.root, 'dual_encoder')}",
                                             f"--config.init_from.mapping={MAPPING}"]
        timings[name] = run(vlm("train", "--config=configs/captioner.py:tiny", f"--workdir={workdir}", *init,
                                *INIT[name], *args.extra))

    if "dual_encoder" in timings:
        _, seconds, before, after = timings["dual_encoder"]
        print(f"\ndual encoder (configs/dual_encoder.py:tiny): {seconds:.0f} s, load average {before} → {after}")
    for name in runs:
        launch, seconds, before, after = timings[name]
        rows = eval_rows(os.path.join(args.root, name))
        print(f"\n### {name}: {seconds:.0f} s for the whole command, load average {before} → {after}\n")
        print("| step | wall time (s) | train loss | CIDEr-D | BLEU-4 | ROUGE-L | attributes all right | shape | held-out loss |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        reached = None
        for r in rows:
            wall = r["time"] - launch
            print(f"| {r['step']} | {wall:.0f} | {r['train/loss']:.3f} | {r['eval/cider']:.3f} | {r['eval/bleu4']:.3f} "
                  f"| {r['eval/rougeL']:.3f} | {r['eval/attributes_all_right']:.3f} | {r['eval/shape']:.3f} "
                  f"| {r['eval/loss']:.3f} |")
            if reached is None and r["eval/cider"] >= BAR_CIDER:
                reached = (r["step"], wall)
        passed = reached is not None and seconds <= BAR_SECONDS
        ok &= passed
        print(f"\nbar CIDEr-D ≥ {BAR_CIDER}: " + (f"first met at step {reached[0]}, {reached[1]:.0f} s after launch"
                                               if reached else "not met")
              + f"; command {seconds:.0f} s → {'PASS' if passed else 'FAIL'} (within {BAR_SECONDS:.0f} s)")

    print(f"\n### decoding the held-out clips with {runs[0]}'s final weights (load average {load()})\n")
    print("| mode | captions/s | CIDEr-D | BLEU-4 | ROUGE-L | attributes all right |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode, speed, m in decode_speed(os.path.join(args.root, runs[0])):
        print(f"| {mode} | {speed:.0f} | {m['cider']:.3f} | {m['bleu4']:.3f} | {m['rougeL']:.3f} "
              f"| {m['attributes_all_right']:.3f} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
