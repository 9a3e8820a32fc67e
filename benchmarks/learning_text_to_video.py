"""Learning benchmark of the whole text-to-video chain on the built-in synthetic set, as a user runs it.

    python benchmarks/learning_text_to_video.py [--root=/tmp/vlm_t2v] [--dit_minutes=30] [-- extra DiT flags]

Stages (each the README's command, one process, this machine's CPU cores as one device; a stage whose
workdir already holds its final checkpoint is kept, so the script resumes):

  de      vlm train --config=configs/dual_encoder.py:tiny --workdir=ROOT/de        text tower + scorer
  vae     vlm train --config=configs/video_vae.py:tiny --workdir=ROOT/vae          the autoencoder
  cache   vlm data encode --vae_workdir=ROOT/vae --out_name=synthetic_latents --max_examples=16384
  dit     vlm train --config=configs/dit_video.py:tiny --workdir=ROOT/dit --config.init_from.workdir=ROOT/de
            --config.model.vae_workdir=ROOT/vae --config.evals.generation.scorer_workdir=ROOT/de
          (with `--dit_minutes` < the default schedule's time, total_steps is cut to fit: see below)
  sample  vlm sample --workdir=ROOT/dit --prompt="a large red circle moves left quickly" --out=ROOT/red.mp4

then prints every stage's wall time (and the machine's load average), every evaluation of the DiT run
(fm_loss, gen_t2v_r1 against chance, gen_fd, real_t2v_r1, gen_attr_*) and checks the bar: within
`--dit_minutes` of DiT training, eval/gen_t2v_r1 ≥ 5x chance and eval/gen_attr_colour ≥ 0.6.
Data (synthetic set, tokenizer, latent cache) goes to ROOT/data (VLM_DATA_DIR).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a large red circle moves left quickly"


def load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def stage(name: str, command: list[str], env: dict, done: bool) -> dict:
    if done:
        print(f"[{name}] kept (already finished)", flush=True)
        return {"stage": name, "seconds": None}
    print(f"[{name}] $ {' '.join(command)}", flush=True)
    before, start = load(), time.time()
    proc = subprocess.run(command, cwd=ROOT, env=env)
    seconds = time.time() - start
    if proc.returncode != 0:
        sys.exit(f"[{name}] failed with exit code {proc.returncode}")
    print(f"[{name}] {seconds:.0f} s (load {before} → {load()})", flush=True)
    return {"stage": name, "seconds": seconds, "load": (before, load())}


def finished(workdir: str) -> bool:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return False
    config = json.load(open(os.path.join(workdir, "config.json")))
    rows = [json.loads(line) for line in open(path)]
    return any(r.get("step") == config["total_steps"] for r in rows)


def vlm(*args: str) -> list[str]:
    return [sys.executable, "-m", "vlm.main", *args]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default="/tmp/vlm_t2v")
    parser.add_argument("--dit_minutes", type=float, default=30.0)
    parser.add_argument("--dit_steps", type=int, default=0, help="DiT total_steps (0: the config's)")
    parser.add_argument("--cache_examples", type=int, default=16384, help="clips per split in the latent cache")
    parser.add_argument("--de_workdir", default="", help="a finished `configs/dual_encoder.py:tiny` run to reuse")
    parser.add_argument("--vae_workdir", default="", help="a finished `configs/video_vae.py:tiny` run to reuse")
    args, extra = parser.parse_known_args()
    extra = [e for e in extra if e != "--"]
    root = args.root
    os.makedirs(root, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    # A cold compilation cache, as on a first run (vlm/compilation_cache.py), unless one is named.
    env.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="vlm_bench_jax_cache_"))
    env["VLM_DATA_DIR"] = os.path.join(root, "data")
    de, vae, dit = (os.path.join(root, n) for n in ("de", "vae", "dit"))
    de, vae = args.de_workdir or de, args.vae_workdir or vae  # reused runs: their own wall time is listed
    times = [
        stage("de", vlm("train", "--config=configs/dual_encoder.py:tiny", f"--workdir={de}"), env, finished(de)),
        stage("vae", vlm("train", "--config=configs/video_vae.py:tiny", f"--workdir={vae}"), env, finished(vae)),
    ]
    cache_done = os.path.exists(os.path.join(env["VLM_DATA_DIR"], "synthetic_latents", "latent_info.json"))
    times.append(stage("cache", vlm("data", "encode", f"--vae_workdir={vae}", "--out_name=synthetic_latents",
                                         f"--max_examples={args.cache_examples}"),
                       env, cache_done))
    steps = [f"--config.total_steps={args.dit_steps}"] if args.dit_steps else []
    times.append(stage("dit", vlm("train", "--config=configs/dit_video.py:tiny", f"--workdir={dit}",
                                  f"--config.init_from.workdir={de}", f"--config.model.vae_workdir={vae}",
                                  f"--config.evals.generation.scorer_workdir={de}", *steps, *extra),
                       env, finished(dit)))
    out = os.path.join(root, "red.mp4")
    times.append(stage("sample", vlm("sample", f"--workdir={dit}", f"--prompt={PROMPT}", f"--out={out}"), env, False))

    print("\nstage wall times:")
    for name, workdir in (("de", de), ("vae", vae)):
        rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
        stamps = [r["time"] for r in rows if "time" in r]
        if stamps:
            print(f"  {name} run {workdir}: {max(stamps) - min(stamps):.0f} s from its first to its last metrics row")
    for t in times:
        print(f"  {t['stage']:<7} " + ("kept" if t["seconds"] is None else f"{t['seconds']:.0f} s (load {t['load'][0]} → {t['load'][1]})"))
    rows = [json.loads(line) for line in open(os.path.join(dit, "metrics.jsonl"))]
    print("\nDiT evaluations:")
    met = None
    for r in rows:
        gen = {k[5:]: v for k, v in r.items() if k.startswith("eval/")}
        if not gen:
            continue
        print(f"  step {r['step']}: " + " ".join(f"{k}={v:.4g}" for k, v in sorted(gen.items())))
        if "gen_t2v_r1" in gen and gen["gen_t2v_r1"] >= 5 * gen["gen_t2v_r1_chance"] and gen.get("gen_attr_colour", 0) >= 0.6:
            met = met or r["step"]
    dit_seconds = next((t["seconds"] for t in times if t["stage"] == "dit"), None)
    print(f"\nbar (gen_t2v_r1 ≥ 5x chance and gen_attr_colour ≥ 0.6 within {args.dit_minutes:.0f} min of DiT): "
          + (f"met at step {met}" if met else "NOT met") + (f"; DiT stage {dit_seconds:.0f} s" if dit_seconds else ""))
    print(f"sample: {out} (+ .gif); evaluation samples: {dit}/samples/<step>/generated.mp4")


if __name__ == "__main__":
    main()
