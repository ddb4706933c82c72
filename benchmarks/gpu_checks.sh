#!/usr/bin/env bash
# Every GPU check of the project in one run, for a short lease on an NVIDIA card:
#   1. the kernel, sparse-core and conformance tests on the GPU (Pallas kernels
#      compiled by Triton, not interpreted; float32 matmuls at "highest"
#      precision so the tests' float32 tolerances apply rather than TF32's);
#   2. the card's dense matrix rate (XLA GEMM 8192^3, float32/TF32 and bfloat16);
#   3. the sparse-conv kernel benchmark (every GPU implementation + spconv on CUDA);
#   4. the training-step benchmark (views/s per kernel + PyTorch/spconv on CUDA);
#   5. the SparseConvNet golden vectors (conformance) with each GPU implementation;
#   6. the host input pipeline (views/s per number of reading processes);
#   7. the training program end to end (synthetic bank, batch 256, input pipeline
#      included);
#   8. igemm: the masked implicit-GEMM kernel `pallas_gpu_igemm`, tests compiled
#      on the card, block tuning and benchmark vs `gather`
#      (benchmarks/gpu_igemm_step.sh, its logs in OUTDIR/igemm/);
#   9. determinism: two identical training runs and a killed-and-resumed one,
#      compared bit for bit (benchmarks/gpu_determinism_step.sh);
#  10. e2e: the device-only step rate vs `python -m gigassl_jax.train` end to end
#      at the same batch, bank resident on the device and streamed
#      (benchmarks/bench_e2e.py);
#  11. embed: encoder-only vs end-to-end embedding, tiles/s and slides/hour at
#      embed's defaults (benchmarks/bench_embed.py; the first call writes a
#      synthetic 40k x 40k slide to /tmp, ~2 min of CPU, inside the limit).
# Usage, from the repository root:  [GPU_STEPS="kernels train_cli"] benchmarks/gpu_checks.sh OUTDIR
# GPU_STEPS picks steps (default: all); each step's log and JSON land in OUTDIR;
# a failing step does not stop the rest.
#
# Sizing: every step's limit, plus ~30 s of start-up (nvidia-smi, jax import),
# fits one 10-minute call, so a lease of 10-minute calls runs any single step,
# e.g. `GPU_STEPS=igemm benchmarks/gpu_checks.sh OUTDIR` (590 s, its four
# sub-steps 560 s). All steps together take ~40 minutes: split them over calls
# with GPU_STEPS, e.g. "tests gemm kernels", "train_bench input train_cli",
# "conformance_gather conformance_pallas_gpu", "conformance_pairs", "igemm".
set -uo pipefail
out=${1:?usage: benchmarks/gpu_checks.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false

steps=${GPU_STEPS:-tests gemm kernels train_bench conformance_gather conformance_pallas_gpu \
  conformance_pairs input train_cli igemm determinism e2e embed}
source "$(dirname "${BASH_SOURCE[0]}")/gpu_step.sh"  # step NAME SECONDS COMMAND...

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import jax, jaxlib; print('jax', jax.__version__, jax.devices())"

# The tests ask for their matmul precision explicitly (no global setting). The
# interpret-mode classes are left to the CPU suite: on the card the compiled
# kernels are what is new, and interpret mode would eat the step's time.
step tests "${GPU_TESTS_S:-300}" env JAX_PLATFORMS=cuda \
  python3 -m pytest -q -p no:cacheprovider \
  -k "not PallasTpu and not pallas_tpu and not over_devices and not Interpret" \
  tests/test_kernels.py tests/test_conformance.py tests/test_sparse_core.py

step gemm 60 python3 - <<'EOF'
import time, jax, jax.numpy as jnp
n = 8192
for dt in (jnp.float32, jnp.bfloat16):
  a = jax.random.normal(jax.random.key(0), (n, n), dt)
  b = jax.random.normal(jax.random.key(1), (n, n), dt)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  ts = []
  for _ in range(10):
    t = time.perf_counter(); f(a, b).block_until_ready(); ts.append(time.perf_counter() - t)
  ts.sort()
  print(f"{jax.devices()[0].device_kind} XLA GEMM {n}^3 {jnp.dtype(dt).name} (default precision): "
        f"{2 * n**3 / ts[len(ts) // 2] / 1e12:.0f} TFLOP/s (median of 10)")
EOF

step kernels "${GPU_KERNELS_S:-220}" python3 -m gigassl_jax.kernels.sparse_conv.bench \
  --out="$out/kernels_gpu.json" --shapes=train,train256,slide16k,slide100k \
  --impls=gather,pairs,pallas_gpu --spconv_threads=1 --repeats="${GPU_REPEATS:-10}"

step train_bench "${GPU_TRAIN_S:-150}" python3 benchmarks/bench_train.py --batch=256 \
  --impls=gather,pairs,pallas_gpu --repeats="${GPU_REPEATS:-10}"

for impl in gather pallas_gpu pairs; do
  step conformance_$impl 300 \
    python3 -m gigassl_jax.conformance tests/fixtures/golden_scn --implementation=$impl
done

step input 120 python3 benchmarks/bench_input.py --workers=0,4,auto --synthetic=512,8,256,256

run=$(mktemp -d)
step train_cli "${GPU_CLI_S:-100}" python3 -m gigassl_jax.train \
  --flagfile=experiments/base.flags --workdir="$run" --data_bank=synthetic \
  --data_synthetic_shape=1024,4,64,256 --train_steps=120 --train_log_every=20 \
  --train_ckpt_every=1000 --notrain_progress
cp "$run/metrics.jsonl" "$out/train_cli_metrics.jsonl" 2>/dev/null

# Its own sub-steps (IGEMM_STEPS; limits 120 + 150 + 150 + 140 s) stay inside this limit.
step igemm "${GPU_IGEMM_S:-590}" benchmarks/gpu_igemm_step.sh "$out/igemm"
step determinism "${GPU_DETERMINISM_S:-300}" benchmarks/gpu_determinism_step.sh "$out/determinism"
step e2e "${GPU_E2E_S:-300}" python3 benchmarks/bench_e2e.py --batch=256 --steps=50 --warmup=5 \
  --bank_shape=2048,8,256,256 --out="$out/bench_e2e.json"
step embed "${GPU_EMBED_S:-500}" python3 benchmarks/bench_embed.py \
  --encoders=resnet18,efficientnet_lite0 --e2e_slides=2 --out="$out/bench_embed.json"
