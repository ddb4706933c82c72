r"""Benchmark of the sparse-convolution implementations, the table builders and spconv.

    python -m gigassl_jax.kernels.sparse_conv.bench --out=FILE.json \
        [--shapes=train,slide16k,slide100k] [--impls=pairs,gather,...] [--repeats=5]

Per named shape (kernels/sparse_conv/shapes.py):
  train*     the whole pooling network (strided conv + BN/ReLU + submanifold convs
             + average-pool shortcut + 1x1 conv, both residual blocks) forward and
             forward+backward (gradients of all parameters), neighbour tables
             built inside the timed function, as in training;
  slide*     one submanifold 3x3 conv 256 -> 512 on precomputed tables (forward;
             forward+backward except for slide100k).
Rows: every implementation registered in api.IMPLEMENTATIONS (except `dense`,
whose grid is too large here, and Pallas kernels off their backend), extra
`pairs@T` tile sizes, spconv (when installed) at 1 and 2 torch threads on the
same inputs (for slides its index pairs are built before timing, as ours), the
table builders (sort, hash), and `gemm`: one dense GEMM doing the same useful
FLOPs (real pairs only), the compute limit of this device.
Median of --repeats timed runs after one warm-up (compile) run.

The JSON is a list of records {shape, implementation, pass, median_ms, device,
gflop, threads}; the printed table gives each row's GFLOP/s on real pairs, its
speed relative to the fastest spconv row (>1 = faster than spconv) and its time
relative to the same-FLOP GEMM (1 = at the compute limit).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gigassl_jax import models
from gigassl_jax.kernels.sparse_conv import api, pairs, shapes
from gigassl_jax.sparse import maps, tables

SKIP = {"dense"}
BACKEND_ONLY = {"pallas_gpu": "gpu", "pallas_tpu": "tpu"}


def _time(fn, repeats):
  """Median seconds of `repeats` calls after one warm-up call."""
  jax.block_until_ready(fn())
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t)
  return statistics.median(ts)


def _device():
  d = jax.devices()[0]
  return f"{d.platform}:{d.device_kind}"


def _cpu_name():
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "cpu"


# ------------------------------------------------------------------- FLOPs --


def _block_geometry(smap, builder=tables.DEFAULT_BUILDER):
  rb_s = tables.strided_rulebook(smap, builder=builder)
  out = maps.SparseMap(coords=rb_s.out_coords, feats=None, mask=rb_s.out_mask)
  rb_m = tables.submanifold_rulebook(out, builder=builder)
  return rb_s, rb_m


def block_flops(smap, c_in, c):
  """Useful FLOPs (real pairs) of the pooling network: (forward, forward+backward)."""
  rb_s, rb_m = _block_geometry(smap)
  fs = 2 * int(pairs.count_pairs(rb_s)) * c_in * c
  fd = 2 * int(rb_s.out_mask.sum()) * c_in * c  # 1x1 conv on the active outputs
  fm = 2 * int(pairs.count_pairs(rb_m)) * c * c
  fwd = fs + fd + 3 * fm
  # Backward: every weight gradient (= fwd) plus input gradients of the three
  # submanifold convs (the block's input needs none).
  return fwd, 2 * fwd + 3 * fm


# ------------------------------------------------------------------- JAX ----


def _jax_block(impl, shape, builder, repeats, ct_seed=0):
  net = models.PoolingNet(shape.c_in, shape.c_out, conv_impl=impl, table_builder=builder,
                          rngs=nnx.Rngs(0))
  gdef, params, rest = nnx.split(net, nnx.Param, ...)
  smap = shape.smap
  ct = jnp.asarray(np.random.default_rng(ct_seed).standard_normal(
      (smap.num_views, 4 * smap.capacity, shape.c_out)).astype(np.float32))

  def loss(params, rest, smap):
    # Fresh copies of the batch stats at this trace level: BN updates them.
    rest = jax.tree.map(jnp.asarray, rest)
    feats = nnx.merge(gdef, params, rest).sites(smap).feats
    return jnp.sum(feats * ct)

  fwd = jax.jit(lambda p, r, s: nnx.merge(gdef, p, r).sites(s).feats)
  fb = jax.jit(jax.grad(loss))
  return {"fwd": _time(lambda: fwd(params, rest, smap), repeats),
          "fwd_bwd": _time(lambda: fb(params, rest, smap), repeats)}


def _jax_conv(impl, x, w, rb, passes, repeats):
  f = functools.partial(api.sparse_conv, rulebook=rb, implementation=impl)
  ct = jnp.ones(rb.out_mask.shape + (w.shape[-1],), x.dtype)
  res = {"fwd": _time(functools.partial(jax.jit(f), x, w), repeats)}
  if "fwd_bwd" in passes:
    g = jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w) * ct), (0, 1)))
    res["fwd_bwd"] = _time(functools.partial(g, x, w), repeats)
  return res


def _gemm(flops, c_in, c_out, passes, repeats):
  """Time of dense GEMMs [M, c_in] @ [c_in, c_out] doing `flops[pass]` FLOPs."""
  res = {}
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.standard_normal((c_in, c_out)).astype(np.float32))
  for p in passes:
    m = int(round(flops[p] / (2 * c_in * c_out * (1 if p == "fwd" else 3))))
    x = jnp.asarray(rng.standard_normal((m, c_in)).astype(np.float32))
    if p == "fwd":
      f = jax.jit(lambda x, w: x @ w)
    else:
      f = jax.jit(jax.grad(lambda x, w: jnp.sum(x @ w), (0, 1)))
    res[p] = _time(functools.partial(f, x, w), repeats)
  return res


def _builders(shape, repeats):
  res = {}
  for b in tables.BUILDERS:
    if shape.block:
      f = jax.jit(lambda s, b=b: _block_geometry(s, b))
    else:
      f = jax.jit(lambda s, b=b: tables.submanifold_rulebook(s, builder=b))
    res[b] = _time(lambda f=f: f(shape.smap), repeats)
  return res


# ------------------------------------------------------------------ spconv --


def _spconv(shape, passes, repeats, threads):
  import torch  # noqa: PLC0415  (peer only)

  from gigassl_jax.kernels.sparse_conv import peer  # noqa: PLC0415

  torch.set_num_threads(threads)
  smap = shape.smap
  coords, feats, mask = (np.asarray(a) for a in (smap.coords, smap.feats, smap.mask))
  res = {}
  if shape.block:
    blk = peer.PoolingBlock(shape.c_in, shape.c_out)
    for p in blk.parameters():
      p.requires_grad_(True)

    def fwd():
      with torch.no_grad():
        return blk(peer.sparse_tensor(coords, feats, mask)).features

    def fb():
      y = blk(peer.sparse_tensor(coords, feats, mask)).features
      (y * 1.0).sum().backward()
      return y

  else:
    conv = peer.subm_conv(shape.c_in, shape.c_out)
    t0 = peer.sparse_tensor(coords, feats, mask)
    with torch.no_grad():
      y0 = conv(t0)  # builds and caches the index pairs under key "subm"
    f_t = t0.features.clone()

    def make(requires_grad):
      f = f_t.clone().requires_grad_(requires_grad)
      return peer.spconv.SparseConvTensor(f, t0.indices, t0.spatial_shape, t0.batch_size,
                                          indice_dict=y0.indice_dict)

    def fwd():
      with torch.no_grad():
        return conv(make(False)).features

    def fb():
      y = conv(make(True)).features
      y.sum().backward()
      return y

  fns = {"fwd": fwd, "fwd_bwd": fb}
  for p in passes:
    fns[p]()
    ts = []
    for _ in range(repeats):
      t = time.perf_counter()
      fns[p]()
      ts.append(time.perf_counter() - t)
    res[p] = statistics.median(ts)
  return res


# -------------------------------------------------------------------- main --


def run(names, impls, repeats, tiles, spconv_threads):
  """All records for the named shapes."""
  records = []
  dev = _device()
  cpu = _cpu_name()
  for t in tiles:
    api.IMPLEMENTATIONS[f"pairs@{t}"] = functools.partial(pairs.conv_pairs, tile=t)
  for name in names:
    shape = shapes.make(name)
    passes = ("fwd",) if name == "slide100k" else ("fwd", "fwd_bwd")
    if shape.block:
      fwd_f, fb_f = block_flops(shape.smap, shape.c_in, shape.c_out)
      flops = {"fwd": fwd_f, "fwd_bwd": fb_f}
    else:
      rb = tables.submanifold_rulebook(shape.smap)
      f = 2 * int(pairs.count_pairs(rb)) * shape.c_in * shape.c_out
      flops = {"fwd": f, "fwd_bwd": 3 * f}
      w = jnp.asarray(np.random.default_rng(1).standard_normal(
          (9, shape.c_in, shape.c_out)).astype(np.float32) * 0.02)

    def add(impl, res, device=dev, threads=None):
      for p, s in res.items():
        records.append({"shape": name, "implementation": impl, "pass": p,
                        "median_ms": 1e3 * s, "device": device,
                        "gflop": flops.get(p, 0) / 1e9 if impl != "tables" else 0.0,
                        "threads": threads})
        print(f"  {name:9s} {impl:18s} {p:8s} {1e3 * s:10.1f} ms", flush=True)

    add("gemm", _gemm(flops, shape.c_out if shape.block else shape.c_in, shape.c_out,
                      passes, repeats))
    for b, s in _builders(shape, repeats).items():
      add(f"tables:{b}", {"build": s})
    run_impls = list(impls) + [f"pairs@{t}" for t in tiles]
    for impl in run_impls:
      if impl in BACKEND_ONLY and jax.default_backend() != BACKEND_ONLY[impl]:
        continue
      try:
        if shape.block:
          res = _jax_block(impl, shape, tables.DEFAULT_BUILDER, repeats)
        else:
          res = _jax_conv(impl, shape.smap.feats, w, rb, passes, repeats)
      except Exception as e:  # a failing arm is reported, the others still run
        print(f"  {name} {impl}: FAILED {type(e).__name__}: {e}", flush=True)
        continue
      add(impl, res)
    for th in spconv_threads:
      try:
        res = _spconv(shape, passes, repeats, th)
      except ImportError as e:
        print(f"  spconv not run: {e}")
        break
      add(f"spconv(threads={th})", res, device=f"cpu:{cpu} (torch)", threads=th)
  return records


def table(records) -> str:
  """Markdown table: per shape and pass, rows sorted by time."""
  lines = ["| shape | pass | implementation | median ms | GFLOP/s (real pairs) "
           "| x spconv (>1 faster) | / same-FLOP GEMM |",
           "|---|---|---|---:|---:|---:|---:|"]
  keys = sorted({(r["shape"], r["pass"]) for r in records},
                key=lambda k: (shapes.NAMES.index(k[0]) if k[0] in shapes.NAMES else 99, k[1]))
  for shape, p in keys:
    rows = sorted((r for r in records if r["shape"] == shape and r["pass"] == p),
                  key=lambda r: r["median_ms"])
    sp = [r["median_ms"] for r in rows if r["implementation"].startswith("spconv")]
    gm = [r["median_ms"] for r in rows if r["implementation"] == "gemm"]
    for r in rows:
      ms = r["median_ms"]
      gf = f"{r['gflop'] / (ms / 1e3):.1f}" if r["gflop"] else ""
      xs = f"{min(sp) / ms:.2f}" if sp and r["gflop"] else ""
      xg = f"{ms / gm[0]:.2f}" if gm and r["gflop"] else ""
      lines.append(f"| {shape} | {p} | {r['implementation']} | {ms:.1f} | {gf} | {xs} | {xg} |")
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", required=True, help="JSON file for the records")
  ap.add_argument("--shapes", default="train,slide16k,slide100k")
  ap.add_argument("--impls", default=",".join(i for i in api.IMPLEMENTATIONS if i not in SKIP))
  ap.add_argument("--pairs_tiles", default="", help="extra pairs tile sizes, e.g. 128,512")
  ap.add_argument("--spconv_threads", default="1,2")
  ap.add_argument("--repeats", type=int, default=5)
  a = ap.parse_args(argv)
  names = [s for s in a.shapes.split(",") if s]
  for n in names:
    if n not in shapes.NAMES:
      ap.error(f"unknown shape {n!r}; valid: {shapes.NAMES}")
  impls = [i for i in a.impls.split(",") if i]
  for i in impls:
    api.resolve(i)
  tiles = [int(t) for t in a.pairs_tiles.split(",") if t]
  threads = [int(t) for t in a.spconv_threads.split(",") if t]
  print(f"device {_device()} ({_cpu_name()}, {os.cpu_count()} cpus), jax {jax.__version__}",
        flush=True)
  records = run(names, impls, a.repeats, tiles, threads)
  with open(a.out, "w") as f:
    json.dump(records, f, indent=1)
  print(table(records))


if __name__ == "__main__":
  main()
