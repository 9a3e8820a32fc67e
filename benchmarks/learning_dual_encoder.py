"""Learning benchmark: the README's default command, timed, with its retrieval curve.

    python benchmarks/learning_dual_encoder.py [--workdir=/tmp/vlm_learning] [-- extra vlm flags]

Runs `vlm train --config=configs/dual_encoder.py:tiny --workdir=W` exactly as the
README does (one process, all of this machine's CPU cores as one device), then
prints a table of (step, wall time since launch, train loss, held-out R@1 both
ways, median rank) at every eval, and checks the bar: held-out t2v R@1 ≥ 0.25
on 256 pairs within 10 minutes of wall time (chance is 1/256 ≈ 0.004).
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

BAR_R1, BAR_SECONDS = 0.25, 600.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/vlm_learning_benchmark")
    parser.add_argument("extra", nargs="*", help="extra flags passed to vlm train (after --)")
    args = parser.parse_args()

    shutil.rmtree(args.workdir, ignore_errors=True)
    # `python -m vlm.main` is the `vlm` console script's entry point (vlm.main:run), run from this checkout.
    command = [sys.executable, "-m", "vlm.main", "train", "--config=configs/dual_encoder.py:tiny",
               f"--workdir={args.workdir}", *args.extra]
    print("$", " ".join(["vlm", *command[3:]]), flush=True)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # as a user would run it: one CPU device
    # A cold compilation cache, as on a first run (vlm/compilation_cache.py), unless one is named.
    env.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="vlm_bench_jax_cache_"))
    start = time.time()
    proc = subprocess.run(command, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env)
    total = time.time() - start
    if proc.returncode != 0:
        print(f"vlm train failed with exit code {proc.returncode}")
        return proc.returncode

    with open(os.path.join(args.workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    losses = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    evals = [r for r in rows if "eval/t2v_r1" in r]

    print(f"\n| step | wall time (s) | train loss | t2v R@1 | v2t R@1 | t2v R@5 | t2v MedR |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    reached = None
    for r in evals:
        wall = r["time"] - start
        loss = losses.get(r["step"], float("nan"))
        print(f"| {r['step']} | {wall:.0f} | {loss:.3f} | {r['eval/t2v_r1']:.3f} | {r['eval/v2t_r1']:.3f} "
              f"| {r['eval/t2v_r5']:.3f} | {r['eval/t2v_medr']:.0f} |")
        if reached is None and r["eval/t2v_r1"] >= BAR_R1:
            reached = (r["step"], wall)
    print(f"\ntotal wall time of the command: {total:.0f} s (including startup, compile, evals and checkpoints)")
    if reached:
        print(f"bar t2v R@1 ≥ {BAR_R1} first met at step {reached[0]}, {reached[1]:.0f} s after launch")
    final = evals[-1]
    ok = reached is not None and reached[1] <= BAR_SECONDS and total <= BAR_SECONDS
    print(f"final t2v R@1 {final['eval/t2v_r1']:.3f}, v2t R@1 {final['eval/v2t_r1']:.3f} → "
          f"{'PASS' if ok else 'FAIL'} (bar: R@1 ≥ {BAR_R1} within {BAR_SECONDS:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
