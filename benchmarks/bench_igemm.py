r"""Benchmark and block tuning of `pallas_gpu_igemm` against XLA `gather` on a GPU.

    python benchmarks/bench_igemm.py --out=FILE.json [--shapes=train,slide16k] \
        [--tune] [--configs=TUNED.json,...] [--repeats=10]

Per bench shape (kernels/sparse_conv/shapes.py) the convolutions it runs: for
`train*` the pooling block's strided 3x3 conv (256 -> 512) and its submanifold
3x3 conv (512 -> 512, on the strided conv's output sites); for `slide*` one
submanifold 3x3 conv (256 -> 512). Each conv is timed forward (`fwd`) and
forward + both gradients (`fwd_bwd`, random cotangent), the rule book passed as
an argument, so per-call preprocessing (igemm's sort plan) is timed as in
training. Both arms run at the same default precision (float32 dots on TF32
tensor cores; the script refuses to run when JAX_DEFAULT_MATMUL_PRECISION is
set). Arms are timed in interleaved rounds (median of --repeats).

--tune: times fwd_bwd of every pallas_gpu_igemm.tuning_grid() config per shape
  (configs that fail to compile are recorded and skipped) and keeps the fastest
  per shape; the JSON (rewritten after each shape, temp + rename) lists every
  trial and the chosen config.
Otherwise: compares igemm (the config chosen per shape in --configs files, or
  that of its SIBLING shape, else the default) with `gather` and prints a table: ms, speed-up over gather,
  TFLOP/s on real pairs (2 x pairs x C_in x C_out per product; fwd_bwd = 3
  products) and that rate as a share of the card's XLA TF32 GEMM rate
  (8192^3 float32 at default precision, measured here). It also prints the
  largest difference between the two arms' forward outputs, relative to the
  largest output.

Needs a GPU (exit status 2 otherwise).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from gigassl_jax.kernels.sparse_conv import bench as kbench
from gigassl_jax.kernels.sparse_conv import gather, pairs, shapes

from gigassl_jax import cli
from gigassl_jax.kernels.sparse_conv import pallas_gpu_igemm as igemm

from gigassl_jax.sparse import maps, tables


# A shape without a tuned config of its own takes its sibling's: the same site
# pattern and channels, only more rows (tuning every shape does not fit one
# 10-minute GPU call).
SIBLING = {"train256": "train", "slide100k": "slide16k"}


def _convs(name):
  """[(label, rulebook, feats [V, S, C_in], C_out)] of a bench shape (seed 0)."""
  sh = shapes.make(name, seed=0)
  smap = kbench.sparse_map(sh.sites)
  if not sh.block:
    return [("subm", tables.submanifold_rulebook(smap), smap.feats, sh.c_out)]
  rb_s = tables.strided_rulebook(smap)
  out = maps.SparseMap(coords=rb_s.out_coords, feats=None, mask=rb_s.out_mask)
  rb_m = tables.submanifold_rulebook(out)
  rng = np.random.default_rng(1)
  h = rng.standard_normal(rb_s.out_mask.shape + (sh.c_out,)).astype(np.float32)
  h = jnp.asarray(h * np.asarray(rb_s.out_mask)[..., None])
  return [("strided", rb_s, smap.feats, sh.c_out), ("subm", rb_m, h, sh.c_out)]


def _arm(conv, x, w, rb, passes):
  """{pass: warmed-up callable} of conv(x, w, rb)."""
  ct = jnp.asarray(
    np.random.default_rng(2).standard_normal(rb.out_mask.shape + (w.shape[-1],)), jnp.float32
  )
  fns = {}
  if "fwd" in passes:
    f = jax.jit(conv)
    fns["fwd"] = lambda: f(x, w, rb)
  if "fwd_bwd" in passes:
    g = jax.jit(jax.grad(lambda x, w, rb: jnp.sum(conv(x, w, rb) * ct), (0, 1)))
    fns["fwd_bwd"] = lambda: g(x, w, rb)
  for fn in fns.values():
    jax.block_until_ready(fn())
  return fns


def _igemm(cfg):
  def conv(x, w, rb):
    return igemm.conv_pallas_gpu_igemm(x, w, rb, config=cfg, precision=jax.lax.Precision.DEFAULT)

  return conv


def _gather(x, w, rb):
  return gather.conv_gather(x, w, rb)


def _weights(c_in, c_out):
  w = np.random.default_rng(3).standard_normal((9, c_in, c_out)) / np.sqrt(9 * c_in)
  return jnp.asarray(w, jnp.float32)


def _write(path, obj):
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def _header(argv):
  d = jax.devices()[0]
  return {
    "command": "python benchmarks/bench_igemm.py " + " ".join(argv),
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "device": f"{d.platform}:{d.device_kind}",
    "jax": jax.__version__,
    "precision": "default (float32 dots on TF32 tensor cores)",
  }


def tune(names, repeats, out, argv):
  """Fastest tuning_grid() config per shape by fwd_bwd time summed over its convs."""
  result = dict(_header(argv), trials=[], best={})
  for name in names:
    convs = _convs(name)
    arms, errors = {}, {}
    for cfg in igemm.tuning_grid():
      key = json.dumps(dataclasses.asdict(cfg))
      try:
        mine = {
          (key, label): _arm(_igemm(cfg), x, _weights(x.shape[-1], c_out), rb, ["fwd_bwd"])
          for label, rb, x, c_out in convs
        }
      except Exception as e:  # noqa: BLE001 - a config the card cannot run (shared memory)
        errors[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        print(f"{name} {key}: failed: {errors[key]}", flush=True)
        continue
      arms.update(mine)
    times = kbench._time_interleaved(arms, repeats)
    total = {}
    for ((key, _label), _p), s in times.items():
      total[key] = total.get(key, 0.0) + s
    for key, err in errors.items():
      result["trials"].append({"shape": name, "config": json.loads(key), "error": err})
    for key, s in sorted(total.items(), key=lambda kv: kv[1]):
      result["trials"].append({"shape": name, "config": json.loads(key), "fwd_bwd_ms": s * 1e3})
      print(f"{name} fwd_bwd {s * 1e3:8.3f} ms  {key}", flush=True)
    if total:
      result["best"][name] = json.loads(min(total, key=total.get))
      print(f"{name} best: {result['best'][name]}", flush=True)
    _write(out, result)
  return result


def _gemm_tflops():
  n = 8192
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  jax.block_until_ready(f(a, b))
  ts = []
  for _ in range(10):
    t = time.perf_counter()
    jax.block_until_ready(f(a, b))
    ts.append(time.perf_counter() - t)
  return 2 * n**3 / sorted(ts)[len(ts) // 2] / 1e12


def compare(names, repeats, configs, out, argv):
  """Records of igemm vs gather per shape, conv and pass; also printed as a table."""
  gemm = _gemm_tflops()
  result = dict(_header(argv), gemm_tf32_tflops=gemm, records=[], max_rel_diff={})
  print(f"XLA GEMM 8192^3 float32 (default precision): {gemm:.0f} TFLOP/s", flush=True)
  for name in names:
    tuned = configs.get(name, configs.get(SIBLING.get(name)))
    cfg = igemm.DEFAULT_CONFIG if tuned is None else igemm.IgemmConfig(**tuned)
    print(f"{name}: igemm {'tuned' if tuned else 'default'} config {cfg}", flush=True)
    arms, flops = {}, {}
    for label, rb, x, c_out in _convs(name):
      w = _weights(x.shape[-1], c_out)
      flops[label] = 2 * int(pairs.count_pairs(rb)) * x.shape[-1] * c_out
      arms[("gather", label)] = _arm(_gather, x, w, rb, ["fwd", "fwd_bwd"])
      arms[("igemm", label)] = _arm(_igemm(cfg), x, w, rb, ["fwd", "fwd_bwd"])
      a, b = arms[("gather", label)]["fwd"](), arms[("igemm", label)]["fwd"]()
      diff = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
      result["max_rel_diff"][f"{name}/{label}"] = diff
      print(f"{name} {label}: igemm vs gather forward max |diff| / max |out| = {diff:.2e}")
    times = kbench._time_interleaved(arms, repeats)
    for ((impl, label), p), sec in times.items():
      f = flops[label] * (1 if p == "fwd" else 3)
      ms = sec * 1e3
      result["records"].append(
        {
          "shape": name,
          "conv": label,
          "implementation": impl,
          "pass": p,
          "median_ms": ms,
          "tflops_real_pairs": f / ms / 1e9,
          "config": dataclasses.asdict(cfg) if impl == "igemm" else None,
        }
      )
    _write(out, result)
  print(table(result))
  return result


def table(result) -> str:
  """Markdown table: per shape, conv (and the shape's total) and pass."""
  gemm = result["gemm_tf32_tflops"]
  rows = {}
  for r in result["records"]:
    for conv in (r["conv"], "total"):
      key = (r["shape"], conv, r["pass"], r["implementation"])
      ms, tf = rows.get(key, (0.0, 0.0))
      rows[key] = (ms + r["median_ms"], tf + r["tflops_real_pairs"] * r["median_ms"])
  lines = [
    f"{result['device']}, jax {result['jax']}, {result['date']}, both arms at {result['precision']}",
    "",
    (
      "| shape | conv | pass | gather ms | igemm ms | igemm / gather speed | igemm TFLOP/s "
      "(real pairs) | % of TF32 GEMM | gather TFLOP/s |"
    ),
    "|---|---|---|---|---|---|---|---|---|",
  ]
  order = {"strided": 0, "subm": 1, "total": 2}
  shapes_seen = list(dict.fromkeys(r["shape"] for r in result["records"]))
  keys = sorted(
    {k[:3] for k in rows}, key=lambda k: (shapes_seen.index(k[0]), k[2], order.get(k[1], 1))
  )
  for shape, conv, p in keys:
    ims, iwork = rows[(shape, conv, p, "igemm")]
    gms, gwork = rows[(shape, conv, p, "gather")]
    itf, gtf = iwork / ims, gwork / gms
    lines.append(
      f"| {shape} | {conv} | {p} | {gms:.3f} | {ims:.3f} | {gms / ims:.2f}x | {itf:.1f} | "
      f"{100 * itf / gemm:.0f} % | {gtf:.1f} |"
    )
  return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class IgemmConfig:
  """The benchmark's flags."""

  out: str = cli.field("", "JSON file (written atomically).", required=True)
  shapes: str = cli.field(",".join(shapes.NAMES), "Comma list of bench shapes.")
  tune: bool = cli.field(False, "Time the tuning grid instead.")
  configs: str = cli.field("", "Comma-separated --tune JSON files.")
  repeats: int = cli.field(10, "Timed repeats per arm.")


def main(argv) -> int:
  """Runs the comparison (or --tune) of the parsed flags; returns the exit status."""
  del argv  # the flags hold the settings; the record keeps the command line as given
  argv = sys.argv[1:]
  a = cli.from_flags(IgemmConfig)
  names = [s for s in a.shapes.split(",") if s]
  bad = [n for n in names if n not in shapes.NAMES]
  if bad:
    print(
      f"bench_igemm: error: --shapes: unknown shape {bad[0]!r}; valid: {','.join(shapes.NAMES)}",
      file=sys.stderr,
    )
    return 2
  if jax.default_backend() != "gpu":
    print(f"bench_igemm: needs a GPU; the backend is {jax.default_backend()!r}", file=sys.stderr)
    return 2
  if os.environ.get("JAX_DEFAULT_MATMUL_PRECISION"):
    print("bench_igemm: unset JAX_DEFAULT_MATMUL_PRECISION (both arms at default)", file=sys.stderr)
    return 2
  configs = {}
  for path in [p for p in a.configs.split(",") if p]:
    try:
      with open(path) as f:
        configs.update(json.load(f)["best"])
    except (OSError, ValueError, KeyError) as e:
      print(f"bench_igemm: --configs file {path}: {e}", file=sys.stderr)
      return 2
  print(json.dumps(_header(argv)), flush=True)
  if a.tune:
    tune(names, a.repeats, a.out, argv)
  else:
    compare(names, a.repeats, configs, a.out, argv)
  return 0


if __name__ == "__main__":
  cli.define_flags(IgemmConfig)
  cli.run(main)
