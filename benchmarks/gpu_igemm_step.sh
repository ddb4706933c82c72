#!/usr/bin/env bash
# pallas_gpu_igemm on an NVIDIA GPU, in one call that fits 10 minutes (~9 min of
# step limits plus start-up), a step of benchmarks/gpu_checks.sh:
#   1. igemm_tests        tests/test_pallas_igemm.py with the kernels compiled by
#                         Triton on the card (IEEE float32 dots in the tests);
#   2. igemm_tune_train   the tuning grid (pallas_gpu_igemm.tuning_grid) timed
#                         fwd+bwd at `train` (its config also serves train256);
#   3. igemm_tune_slide   the same at `slide16k` (also serves slide100k);
#   4. igemm_bench        igemm (tuned configs) vs XLA `gather` at every bench
#                         shape, both at default (TF32) precision: table + JSON.
# Usage, from the repository root:  [IGEMM_STEPS="igemm_bench"] benchmarks/gpu_igemm_step.sh OUTDIR
# (or as the `igemm` step of benchmarks/gpu_checks.sh, whose 590 s limit holds these).
# Each step's log and JSON land in OUTDIR; a failing step does not stop the rest.
# Compiled kernels are cached in OUTDIR/jax_cache, so the benchmark reuses the
# tuning steps' compiles.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_igemm_step.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PLATFORMS=cuda
export JAX_COMPILATION_CACHE_DIR="$out/jax_cache" JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
unset JAX_DEFAULT_MATMUL_PRECISION  # the benchmark compares both arms at the default

# IGEMM_STEPS, not GPU_STEPS: gpu_checks.sh runs this script as its step "igemm".
steps=${IGEMM_STEPS:-igemm_tests igemm_tune_train igemm_tune_slide igemm_bench}
source "$(dirname "${BASH_SOURCE[0]}")/gpu_step.sh"  # step NAME SECONDS COMMAND...

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import jax, jaxlib; print('jax', jax.__version__, jax.devices())"

step igemm_tests "${IGEMM_TESTS_S:-120}" python3 -m pytest -q -p no:cacheprovider \
  tests/test_pallas_igemm.py

step igemm_tune_train "${IGEMM_TUNE_S:-150}" python3 benchmarks/bench_igemm.py --tune \
  --shapes=train --repeats=5 --out="$out/igemm_tune_train.json"

step igemm_tune_slide "${IGEMM_TUNE_S:-150}" python3 benchmarks/bench_igemm.py --tune \
  --shapes=slide16k --repeats=5 --out="$out/igemm_tune_slide.json"

tuned=$(ls "$out"/igemm_tune_*.json 2>/dev/null | paste -sd, -)
step igemm_bench "${IGEMM_BENCH_S:-140}" python3 benchmarks/bench_igemm.py \
  --shapes=train,train256,slide16k,slide100k --repeats="${GPU_REPEATS:-10}" \
  --configs="$tuned" --out="$out/igemm_bench.json"
