#!/usr/bin/env bash
# The first-GPU benchmark, in at most 10 minutes on one H100/H200:
#   * the imagenet256 U-ViT train step in bf16 at the largest batch that fits
#     (BENCH_BATCH_SIZES tried largest first; out-of-memory is caught), with MFU
#     from the corrected model FLOPs (simple_diffusion/flops.py) and memory;
#   * sampling throughput for 256 DDPM steps (the config's guidance);
#   * the same train step on an FSDP mesh against a pure data-parallel mesh.
# Writes OUT_DIR/gpu_benchmark.json and OUT_DIR/gpu_benchmark.md (after every
# phase, so a run cut short keeps what it measured) and prints the table.
#
#   benchmarks/gpu.sh [OUT_DIR]            # default OUT_DIR: /tmp/gpu_benchmark
#
# Environment (defaults are the GPU run; tests/test_benchmark.py runs it on a CPU
# with configs/tiny.py and tiny batches):
#   BENCH_CONFIG        configs/imagenet256.py
#   BENCH_DTYPE         bfloat16
#   BENCH_BATCH_SIZES   global batch sizes, largest first; default by GPU memory:
#                       64,48,32,16 from 120 GB (H200), else 24,16,8 (H100 80 GB),
#                       from the compiled-memory estimates in docs/benchmarks.md;
#                       each size tried costs a compile, so keep the list short
#   BENCH_SAMPLE_STEPS  256         BENCH_SAMPLE_BATCH  16
#   BENCH_REPEATS       5           BENCH_WARMUP        1
#   BENCH_TIME_BUDGET_S 420         (later phases start only within it)
#   BENCH_TIMEOUT_S     600         (hard stop for the whole run)
#   BENCH_FLAGS         extra flags, e.g. "--config.model.transformer_depth=1"
#   PYTHON              .venv/bin/python if present, else python3
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit 0
fi
cd "$(dirname "$0")/.."

out_dir=${1:-/tmp/gpu_benchmark}
mkdir -p "$out_dir"
python=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}

# Let XLA use (almost) all of the GPU memory (JAX preallocates 75% by default), and
# cache compiled programs so that a rerun skips most compilation.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$out_dir/jax_cache}

gpu_mib=0
if command -v nvidia-smi >/dev/null; then
  nvidia-smi > "$out_dir/nvidia-smi.txt" 2>&1 || true
  gpu_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null \
    | head -n 1 | tr -dc '0-9' || true)
fi
if (( ${gpu_mib:-0} >= 120000 )); then default_batches=64,48,32,16; else default_batches=24,16,8; fi

# shellcheck disable=SC2086  # BENCH_FLAGS is a list of flags.
timeout "${BENCH_TIMEOUT_S:-600}" "$python" -m simple_diffusion.benchmark gpu \
  --config="${BENCH_CONFIG:-configs/imagenet256.py}" \
  --config.model.dtype="${BENCH_DTYPE:-bfloat16}" \
  --batch_sizes="${BENCH_BATCH_SIZES:-$default_batches}" \
  --sample_steps="${BENCH_SAMPLE_STEPS:-256}" \
  --sample_batch="${BENCH_SAMPLE_BATCH:-16}" \
  --repeats="${BENCH_REPEATS:-5}" \
  --warmup="${BENCH_WARMUP:-1}" \
  --time_budget_s="${BENCH_TIME_BUDGET_S:-420}" \
  --output_dir="$out_dir" \
  ${BENCH_FLAGS:-}
