#!/usr/bin/env bash
# The GPU MFU table of the performance issue, prepared for the next session lent an H100/H200 (none so far on
# this issue's CPU box): the B/16 dual encoder (bar ≥ 40 % MFU) and the ~1.3B DiT at its default shapes
# (bar ≥ 45 %), each row in its own process (its own peak memory; an out-of-memory row is a FAILED line and
# the sweep goes on). Columns: config, batch, remat, attention, step ms, TFLOP/s, MFU, peak GiB
# (benchmarks/README.md, "throughput.py").
#
#   OUT=/tmp/gpu bash benchmarks/gpu_mfu.sh dit     # 3 rows, each killed at 180 s: ≤ 9.5 min (estimate ~5-7)
#   OUT=/tmp/gpu bash benchmarks/gpu_mfu.sh b16     # 3 rows, each killed at 150 s: ≤ 8 min (estimate ~5-6: per
#                                                   # row ~45 s compile, ~40 s init, as on the H200 on 2026-11-26)
#   EXTRA=--flops_only bash benchmarks/gpu_mfu.sh b16   # on a CPU: every row builds and counts its FLOPs
#
# Each part fits one 10-minute device command; both, with a machine's start, may not fit one session's
# 15 minutes: `dit` first (never measured on a GPU; B/16 has been: 21-28 % MFU). Rows were chosen from the H200
# table of 2026-11-26 (B/16 batch 64 without remat: 28.2 % MFU, 64.8 GiB; with full remat 22 %): larger
# batches with the `dots` policy (keeps the matmul outputs, recomputes the rest), and cuDNN's fused attention.
# The DiT's default shapes: 33 frames of 256x256 through a 4x8x8, 16-channel VAE (Wan 2.1's factors) = latents
# 9x32x32x16, 2304 tokens per clip; random latents stand in for the latent cache (throughput.py --latents). The
# XLA-attention DiT row is there in case the DiT's cuDNN path (never run on a GPU) fails.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/vlm_gpu_mfu}
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
part=${1:-b16}

case "$part" in
  b16)
    python3 benchmarks/throughput.py --config=configs/dual_encoder.py:B/16 --dtype=bfloat16 --steps=10 --warmup=2 \
      --isolate --row_timeout=150 --out="$OUT/b16.md" ${EXTRA:-} \
      --sweep=b16_b128_dots_xla:batch_size=128,remat=dots \
      --sweep=b16_b128_dots_cudnn:batch_size=128,remat=dots,model.attention_impl=cudnn \
      --sweep=b16_b96_none_cudnn:batch_size=96,remat=none,model.attention_impl=cudnn
    ;;
  dit)
    python3 benchmarks/throughput.py --config=configs/dit_video.py:1.3B --latents=9,32,32,16 --steps=5 --warmup=2 \
      --isolate --row_timeout=180 --out="$OUT/dit13.md" ${EXTRA:-} \
      --sweep=dit13_b8_full_cudnn:batch_size=8 \
      --sweep=dit13_b8_dots_cudnn:batch_size=8,remat=dots \
      --sweep=dit13_b8_full_xla:batch_size=8,model.attention_impl=xla
    ;;
  *)
    echo "usage: OUT=DIR bash benchmarks/gpu_mfu.sh b16|dit" >&2
    exit 2
    ;;
esac
