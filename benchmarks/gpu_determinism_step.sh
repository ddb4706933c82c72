#!/usr/bin/env bash
# Same seed, same parameters on the GPU: a step of benchmarks/gpu_checks.sh, ~4 min.
#   1. det_a, det_b     two identical `python -m gigassl_jax.train` runs (N steps,
#                       separate processes, no compilation cache: each compiles and
#                       autotunes on its own, as two jobs would);
#   2. det_resume       run a's workdir with its step-N checkpoint removed, started
#                       again: it resumes from step N/2 (what a kill just after that
#                       checkpoint leaves) and trains to N;
#   3. det_compare      final parameters + BN statistics of b and of the resumed run
#                       against a, bitwise, and their per-step losses; JSON summary.
#   4. det_flag_1/2     only if a and b differ: two runs under
#                       --xla_gpu_deterministic_ops=true, compared with each other,
#                       to tell XLA's own non-deterministic ops (and autotuning)
#                       from ours (adds ~2.5 min, in the failing case only).
# Usage, from the repository root:  benchmarks/gpu_determinism_step.sh OUTDIR
# (DET_STEPS, DET_SHAPE, DET_BATCH, DET_RUN_S override the sizes; with
# JAX_PLATFORMS=cpu and a small shape it runs on a CPU too.)
# Exit status 0 only when every comparison is bitwise equal.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_determinism_step.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
unset JAX_COMPILATION_CACHE_DIR
steps=${DET_STEPS:-20}
half=$((steps / 2))
shape=${DET_SHAPE:-512,4,64,256}
batch=${DET_BATCH:-256}
limit=${DET_RUN_S:-75}

train() {  # train NAME WORKDIR [extra flags...]
  local name=$1 wd=$2
  shift 2
  echo "=== $name (limit ${limit}s, $(date -u +%T))"
  timeout "$limit" python3 -m gigassl_jax.train --flagfile=experiments/base.flags \
    --workdir="$wd" --data_bank=synthetic --data_synthetic_shape="$shape" \
    --train_batch_size="$batch" --train_steps="$steps" --train_ckpt_every="$half" \
    --train_ckpt_keep=3 --train_log_every=1 --notrain_progress "$@" 2>&1 | tee "$out/$name.log"
  echo "=== $name rc=${PIPESTATUS[0]} ($(date -u +%T))"
}

compare() {  # compare NAME WORKDIR_A WORKDIR_B -> prints one JSON line, rc 0 if bitwise equal
  python3 - "$@" <<'EOF'
import json, pathlib, sys
import jax, numpy as np
from flax import nnx
from gigassl_jax import checkpoint

name, a, b = sys.argv[1:4]

def leaves(wd):
  model, _ = checkpoint.restore_model(wd)
  flat = jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}

def losses(wd):
  recs = [json.loads(l) for l in (pathlib.Path(wd) / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in recs}

pa, pb = leaves(a), leaves(b)
diff = {k: float(np.max(np.abs(pa[k].astype(np.float64) - pb[k]))) for k in pa
        if not np.array_equal(pa[k], pb[k])}
la, lb = losses(a), losses(b)
ldiff = {s: [la[s], lb[s]] for s in la if s in lb and la[s] != lb[s]}
rec = {"check": name, "bitwise_equal": not diff and not ldiff, "arrays": len(pa),
       "arrays_differing": len(diff), "max_abs_diff": max(diff.values(), default=0.0),
       "first_loss_diff": dict(list(ldiff.items())[:3]), "device": str(jax.devices()[0])}
print(json.dumps(rec))
sys.exit(0 if rec["bitwise_equal"] else 1)
EOF
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
python3 -c "import jax, jaxlib; print('jax', jax.__version__, jax.devices())"
run=$(mktemp -d)
train det_a "$run/a"
train det_b "$run/b"
# Resume: a copy of a without its last checkpoint and without the metrics after it.
cp -r "$run/a" "$run/r" && rm -rf "$run/r/checkpoints/$steps"
train det_resume "$run/r"

echo "=== det_compare ($(date -u +%T))"
rc=0
compare identical_runs "$run/a" "$run/b" | tee "$out/det_compare.jsonl" || rc=1
compare kill_resume "$run/a" "$run/r" | tee -a "$out/det_compare.jsonl" || rc=1
if grep -q '"check": "identical_runs", "bitwise_equal": false' "$out/det_compare.jsonl"; then
  for i in 1 2; do
    XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true" train "det_flag_$i" "$run/f$i"
  done
  compare identical_runs_xla_deterministic_ops "$run/f1" "$run/f2" |
    tee -a "$out/det_compare.jsonl"
fi
cp "$run/a/metrics.jsonl" "$out/det_a_metrics.jsonl" 2>/dev/null
echo "=== det_compare rc=$rc ($(date -u +%T))"
rm -rf "$run"
exit $rc
