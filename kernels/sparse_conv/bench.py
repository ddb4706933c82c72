r"""Benchmark of the sparse-convolution implementations, the table builders and spconv.

    python -m gigassl_jax.kernels.sparse_conv.bench --out=FILE.json \
        [--shapes=train,slide16k,slide100k] [--impls=pairs,gather,...] [--repeats=5] \
        [--reference_scn=DIR --reference_gigassl=DIR [--reference_threads=2]]

Per named shape (kernels/sparse_conv/shapes.py):
  train*     the whole pooling network (strided conv + BN/ReLU + submanifold convs
             + average-pool shortcut + 1x1 conv, both residual blocks) forward and
             forward+backward (gradients of all parameters), neighbour tables
             built inside the timed function, as in training;
  slide*     one submanifold 3x3 conv 256 -> 512 on precomputed tables (forward;
             forward+backward except for slide100k).
Rows: every implementation registered in api.IMPLEMENTATIONS (except `dense`,
whose grid is too large here, and Pallas kernels off their backend), extra
`pairs@T` tile sizes (api.PairsConfig(tile=T)), `<impl>+pool:<method>` (train
shapes: the first implementation with the average pool's window sum computed by
the api.window_sum implementation this backend does not use by default), spconv (when installed)
at 1 and 2 torch threads on the
same inputs (for slides its index pairs are built before timing, as ours), the
table builders (sort, hash), and `gemm`: one dense GEMM doing the same useful
FLOPs (real pairs only), XLA's dense rate on this device.
With --reference_scn and --reference_gigassl (checkouts of SparseConvNet, built
in place, and trislaz/gigassl; reference_arm.py says how to get them), train
shapes also time the original code's pooling block (`sparse_pooling` + its
global average, forward + backward; reference_arm.run_child, part="block") on
the same augmented tile positions and features, in a child process with
--reference_threads torch threads, after the JAX arms of that shape; the table
then gets an "x reference" column. Without them no ratio to the reference is
printed: a ratio comes only from a reference measured in the same run.
Median of --repeats timed rounds after one warm-up (compile) run; within a
round the arms run in turn, so a shared machine's drifting load hits all alike.

The JSON holds {command, date, machine, threads, records}: a list of records
{shape, implementation, pass, median_ms, device, gflop, threads} (the reference
row's name holds the two checkouts' commits, and it adds its raw seconds); the printed table gives each row's GFLOP/s on real pairs, its
speed relative to the fastest spconv row (>1 = faster than spconv) and its time
relative to the same-FLOP GEMM (1 = at the compute limit).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from gigassl_jax.kernels.sparse_conv import api, pairs, reference_arm, shapes

from gigassl_jax import cli, models
from gigassl_jax.sparse import coord_augment, maps, tables
from gigassl_jax.machine import cpu_name as _cpu_name

SKIP = {"dense"}


def _impl_and_config(label):
  """Arm label -> (implementation, config): "pairs@T" is `pairs` with tile T."""
  if label.startswith("pairs@"):
    return "pairs", api.PairsConfig(tile=int(label.split("@", 1)[1]))
  return label, None


def _block(fn):
  return jax.block_until_ready(fn())


def _time_interleaved(arms, repeats):
  """Median seconds per (arm, pass), the arms timed in turn within each round.

  This machine is shared and its load drifts: interleaving gives every arm the
  same conditions, so ratios measured in one run are comparable.

  Args:
    arms: {name: {pass: callable}}, each callable already warmed up.
  """
  times = {(a, p): [] for a, passes in arms.items() for p in passes}
  for _ in range(repeats):
    for a, passes in arms.items():
      for p, fn in passes.items():
        t = time.perf_counter()
        _block(fn)
        times[(a, p)].append(time.perf_counter() - t)
  return {k: statistics.median(v) for k, v in times.items()}


def _device():
  d = jax.devices()[0]
  return f"{d.platform}:{d.device_kind}"


def sparse_map(sites: shapes.Sites) -> maps.SparseMap:
  """A benchmark shape's sites placed on a sparse map, as the model's input pipeline does.

  Level-0 positions get the reference coordinate augmentation (key
  `sites.augment_seed`) and are quantised with `sites.cell`; grid cells are
  used as they are.
  """
  if sites.cell is None:
    return maps.from_grid(sites.xy, sites.feats)
  return maps.build_views(_augmented_xy(sites), sites.feats, cell=sites.cell)


def _augmented_xy(sites: shapes.Sites) -> np.ndarray:
  """Level-0 positions after the coordinate augmentation (key sites.augment_seed), if any."""
  if sites.augment_seed is None:
    return sites.xy
  return np.asarray(coord_augment.augment_views(jax.random.PRNGKey(sites.augment_seed), sites.xy))


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


def _other_pool_method():
  default = api.WINDOW_SUM_DEFAULT_BY_BACKEND.get(jax.default_backend(), "gather")
  return next(m for m in pairs.WINDOW_SUM_METHODS if m != default)


def _jax_block(impl, shape, smap, builder, pool_method=None):
  """{pass: warmed-up callable} of the whole pooling network on `smap`."""
  conv_impl, conv_config = _impl_and_config(impl)
  net = models.PoolingNet(
    shape.c_in,
    shape.c_out,
    conv_impl=conv_impl,
    conv_config=conv_config,
    pool_impl=pool_method,
    table_builder=builder,
    rngs=nnx.Rngs(0),
  )
  gdef, params, rest = nnx.split(net, nnx.Param, ...)
  ct = jnp.asarray(
    np.random.default_rng(0)
    .standard_normal((smap.num_views, 4 * smap.capacity, shape.c_out))
    .astype(np.float32)
  )

  def loss(params, rest, smap):
    # Fresh copies of the batch stats at this trace level: BN updates them.
    rest = jax.tree.map(jnp.asarray, rest)
    feats = nnx.merge(gdef, params, rest).sites(smap).feats
    return jnp.sum(feats * ct)

  fwd = jax.jit(lambda p, r, s: nnx.merge(gdef, p, jax.tree.map(jnp.asarray, r)).sites(s).feats)
  fb = jax.jit(jax.grad(loss))
  fns = {"fwd": lambda: fwd(params, rest, smap), "fwd_bwd": lambda: fb(params, rest, smap)}
  for f in fns.values():  # compile
    _block(f)
  return fns


def _jax_conv(impl, x, w, rb, passes):
  # The rule book is an argument, not a constant: its per-call preprocessing
  # (e.g. the pair plan) is timed, and XLA cannot fold it at compile time.
  name, config = _impl_and_config(impl)

  def f(x, w, rb):
    return api.sparse_conv(x, w, rb, implementation=name, config=config)

  # A random cotangent: with ones XLA could simplify the backward GEMMs to sums.
  ct = jnp.asarray(
    np.random.default_rng(2).standard_normal(rb.out_mask.shape + (w.shape[-1],)).astype(np.float32)
  ).astype(x.dtype)
  fns = {"fwd": functools.partial(jax.jit(f), x, w, rb)}
  if "fwd_bwd" in passes:
    g = jax.jit(jax.grad(lambda x, w, rb: jnp.sum(f(x, w, rb) * ct), (0, 1)))
    fns["fwd_bwd"] = functools.partial(g, x, w, rb)
  for fn in fns.values():
    _block(fn)
  return fns


def _gemm(flops, c_in, c_out, passes):
  """Dense GEMMs [M, c_in] @ [c_in, c_out] doing `flops[pass]` FLOPs."""
  fns = {}
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.standard_normal((c_in, c_out)).astype(np.float32))
  for p in passes:
    m = round(flops[p] / (2 * c_in * c_out * (1 if p == "fwd" else 3)))
    x = jnp.asarray(rng.standard_normal((m, c_in)).astype(np.float32))
    if p == "fwd":
      f = jax.jit(lambda x, w: x @ w)
      fns[p] = functools.partial(f, x, w)
    else:  # forward + both gradients (random cotangent: no simplification to sums)
      ct = jnp.asarray(rng.standard_normal((m, c_out)).astype(np.float32))
      f = jax.jit(jax.grad(lambda x, w, ct: jnp.sum((x @ w) * ct), (0, 1)))
      fns[p] = functools.partial(f, x, w, ct)
    _block(fns[p])
  return fns


def _builder(shape, smap, b):
  if shape.block:
    f = jax.jit(lambda s: _block_geometry(s, b))
  else:
    f = jax.jit(lambda s: tables.submanifold_rulebook(s, builder=b))
  fn = functools.partial(f, smap)
  _block(fn)
  return {"build": fn}


# ------------------------------------------------------------------ spconv --


def _spconv(shape, smap, passes, threads, device="cpu"):
  """{pass: warmed-up callable} running the spconv peer with `threads` torch threads.

  device "cuda": spconv's GPU kernels, each call ending with a device sync.
  """
  import torch
  from gigassl_jax.kernels.sparse_conv import peer

  coords, feats, mask = (np.asarray(a) for a in (smap.coords, smap.feats, smap.mask))
  if shape.block:
    blk = peer.PoolingBlock(shape.c_in, shape.c_out).to(device)

    def fwd():
      with torch.no_grad():
        return blk(peer.sparse_tensor(coords, feats, mask, device=device)).features

    def fb():
      blk.zero_grad(set_to_none=True)
      y = blk(peer.sparse_tensor(coords, feats, mask, device=device)).features
      y.sum().backward()
      return y

  else:
    conv = peer.subm_conv(shape.c_in, shape.c_out).to(device)
    t0 = peer.sparse_tensor(coords, feats, mask, device=device)
    with torch.no_grad():
      y0 = conv(t0)  # builds and caches the index pairs under key "subm"

    def make(requires_grad):
      f = t0.features.detach().clone().requires_grad_(requires_grad)
      return peer.spconv.SparseConvTensor(
        f, t0.indices, t0.spatial_shape, t0.batch_size, indice_dict=y0.indice_dict
      )

    def fwd():
      with torch.no_grad():
        return conv(make(False)).features

    def fb():
      conv.zero_grad(set_to_none=True)
      y = conv(make(True)).features
      y.sum().backward()
      return y

  def with_threads(fn):
    def run():
      torch.set_num_threads(threads)
      out = fn()
      if device != "cpu":
        torch.cuda.synchronize()
      return out

    return run

  fns = {p: with_threads({"fwd": fwd, "fwd_bwd": fb}[p]) for p in passes}
  for fn in fns.values():
    fn()
  return fns


# -------------------------------------------------------------------- main --


def reference_batch(sites: shapes.Sites) -> dict:
  """A train shape's tiles as the reference arm's batch: feats [V, 2, T, C], xy [V, 2, T, 2].

  The positions are the JAX arms' augmented level-0 positions (sparse_map's),
  so both place the same tiles on the same grid (the reference divides by its
  downmap, 224 = shapes.CELL). Part "block" reads view 0; view 1 is a copy.
  """

  def two(a):
    return np.repeat(np.asarray(a)[:, None], 2, axis=1)

  return {"feats": two(sites.feats), "xy": two(_augmented_xy(sites))}


def _reference_record(name, shape, reference, repeats):
  """The original code's pooling block (fwd+bwd) on `shape`, timed in a child process."""
  scn, gig, threads = reference
  print(f"  reference arm ({threads} torch threads, child process)", flush=True)
  time.sleep(5)  # XLA's worker threads spin for a while after the JAX arms
  ref = reference_arm.run_child(scn, gig, reference_batch(shape.sites), "block", threads, repeats)
  sec = statistics.median(ref["seconds"])
  label = f"reference SCN {ref['scn_commit']} + gigassl {ref['gigassl_commit']}"
  print(f"  {name:9s} {label:22s} fwd_bwd  {1e3 * sec:10.1f} ms", flush=True)
  return {
    "implementation": label,
    "pass": "fwd_bwd",
    "median_ms": 1e3 * sec,
    "device": f"cpu:{_cpu_name()} (torch)",
    "threads": threads,
    "raw_seconds": ref["seconds"],
  }


def _shape_records(
  name, impls, repeats, tiles, spconv_threads, spconv_device="cpu", reference=None
):
  """Records of every arm on one named shape (reference: (scn, gigassl, threads) or None)."""
  dev, cpu = _device(), _cpu_name()
  print(f"shape {name}: building inputs and compiling", flush=True)
  shape = shapes.make(name)
  smap = sparse_map(shape.sites)
  passes = ("fwd",) if name == "slide100k" else ("fwd", "fwd_bwd")
  rb = w = None
  if shape.block:
    fwd_f, fb_f = block_flops(smap, shape.c_in, shape.c_out)
    flops = {"fwd": fwd_f, "fwd_bwd": fb_f}
  else:
    rb = tables.submanifold_rulebook(smap)
    f = 2 * int(pairs.count_pairs(rb)) * shape.c_in * shape.c_out
    flops = {"fwd": f, "fwd_bwd": 3 * f}
    w = jnp.asarray(
      np.random.default_rng(1).standard_normal((9, shape.c_in, shape.c_out)).astype(np.float32)
      * 0.02
    )
  arms, meta = {}, {}

  def arm(label, make, device=dev, threads=None):
    try:
      arms[label] = make()
      meta[label] = (device, threads)
    except ImportError as e:
      print(f"  {label}: not run ({e})", flush=True)
    except Exception as e:  # noqa: BLE001  a failing arm is reported, the others run
      print(f"  {label}: FAILED {type(e).__name__}: {e}", flush=True)

  arm("gemm", lambda: _gemm(flops, shape.c_out if shape.block else shape.c_in, shape.c_out, passes))
  for b in tables.BUILDERS:
    arm(f"tables:{b}", functools.partial(_builder, shape, smap, b))
  for impl in list(impls) + [f"pairs@{t}" for t in tiles]:
    if not api.supported(_impl_and_config(impl)[0]):  # Pallas kernels off their backend
      continue
    if shape.block:
      arm(impl, functools.partial(_jax_block, impl, shape, smap, tables.DEFAULT_BUILDER))
    else:
      arm(impl, functools.partial(_jax_conv, impl, smap.feats, w, rb, passes))
  if shape.block and impls:
    other = _other_pool_method()
    arm(
      f"{impls[0]}+pool:{other}",
      functools.partial(
        _jax_block, impls[0], shape, smap, tables.DEFAULT_BUILDER, pool_method=other
      ),
    )
  for th in spconv_threads:
    if spconv_device == "cpu":
      arm(
        f"spconv(threads={th})",
        functools.partial(_spconv, shape, smap, passes, th),
        device=f"cpu:{cpu} (torch)",
        threads=th,
      )
    else:
      arm(
        "spconv(cuda)",
        functools.partial(_spconv, shape, smap, passes, th, spconv_device),
        device=f"{_torch_gpu_name()} (torch)",
        threads=th,
      )
      break
  print(f"  timing {len(arms)} arms x {repeats} interleaved rounds", flush=True)
  records = []
  for (label, p), sec in _time_interleaved(arms, repeats).items():
    device, threads = meta[label]
    records.append(
      {
        "shape": name,
        "implementation": label,
        "pass": p,
        "median_ms": 1e3 * sec,
        "device": device,
        "gflop": 0.0 if p == "build" else flops[p] / 1e9,
        "threads": threads,
      }
    )
    print(f"  {name:9s} {label:22s} {p:8s} {1e3 * sec:10.1f} ms", flush=True)
  if reference and shape.block:
    rec = _reference_record(name, shape, reference, repeats)
    records.append({"shape": name, **rec, "gflop": flops["fwd_bwd"] / 1e9})
  return records


def _torch_gpu_name():
  import torch

  return f"cuda:{torch.cuda.get_device_name()}"


def run(names, impls, repeats, tiles, spconv_threads, spconv_device="cpu", reference=None):
  """All records for the named shapes."""
  records = []
  for name in names:
    records += _shape_records(name, impls, repeats, tiles, spconv_threads, spconv_device, reference)
  return records


def _is_reference(r):
  return r["implementation"].startswith("reference SCN")


def table(records) -> str:
  """Markdown table: per shape and pass, rows sorted by time.

  "x reference" (>1 = faster than the original code) appears only when a
  reference record of the same shape and pass was measured in this run.
  """
  with_ref = any(_is_reference(r) for r in records)
  lines = [
    (
      "| shape | pass | implementation | threads | median ms | GFLOP/s (real pairs) "
      "| x spconv (>1 faster) | / same-FLOP GEMM |"
      + (" x reference (>1 faster) |" if with_ref else "")
    ),
    "|---|---|---|---:|---:|---:|---:|---:|" + ("---:|" if with_ref else ""),
  ]
  keys = sorted(
    {(r["shape"], r["pass"]) for r in records},
    key=lambda k: (shapes.NAMES.index(k[0]) if k[0] in shapes.NAMES else 99, k[1]),
  )
  for shape, p in keys:
    rows = sorted(
      (r for r in records if r["shape"] == shape and r["pass"] == p), key=lambda r: r["median_ms"]
    )
    sp = [r["median_ms"] for r in rows if r["implementation"].startswith("spconv")]
    gm = [r["median_ms"] for r in rows if r["implementation"] == "gemm"]
    ref = [r["median_ms"] for r in rows if _is_reference(r)]
    for r in rows:
      ms = r["median_ms"]
      gf = f"{r['gflop'] / (ms / 1e3):.1f}" if r["gflop"] else ""
      xs = f"{min(sp) / ms:.2f}" if sp and r["gflop"] else ""
      xg = f"{ms / gm[0]:.2f}" if gm and r["gflop"] else ""
      th = _threads(r)
      line = f"| {shape} | {p} | {r['implementation']} | {th} | {ms:.1f} | {gf} | {xs} | {xg} |"
      if with_ref:
        line += f" {ref[0] / ms:.2f} |" if ref and r["gflop"] else " |"
      lines.append(line)
  return "\n".join(lines)


def _threads(r):
  """Thread count of a record: torch's for spconv and the reference, XLA's host threads else."""
  if r.get("threads") is not None:
    return str(r["threads"])
  return f"{os.cpu_count()} (XLA)" if r["device"].startswith("cpu") else "-"


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """The bench's flags (comma lists stay strings: they are recorded as given)."""

  out: str = cli.field("", "JSON file for the records.", required=True)
  shapes: str = cli.field("train,slide16k,slide100k", "Comma list of bench shapes.")
  impls: str = cli.field(
    ",".join(i for i in api.IMPLEMENTATIONS if i not in SKIP), "Comma list of implementations."
  )
  pairs_tiles: str = cli.field("", "Extra pairs tile sizes, e.g. 128,512.")
  spconv_threads: str = cli.field("1,2", "Comma list of spconv torch thread counts.")
  spconv_device: str = cli.field(
    "auto",
    "auto: cuda when JAX runs on a GPU (the peer on the same card).",
    choices=("auto", "cpu", "cuda"),
  )
  repeats: int = cli.field(5, "Timed repeats per row.")
  reference_scn: str = cli.field("", "SparseConvNet checkout built in place.")
  reference_gigassl: str = cli.field("", "trislaz/gigassl checkout.")
  reference_threads: int = cli.field(2, "Torch threads (reference).")


def _usage_error(message: str) -> int:
  print(f"bench: error: {message}", file=sys.stderr)
  return 2


def main(argv) -> int:
  """Runs the bench of the parsed flags; returns the exit status."""
  del argv  # the flags hold the settings
  a = cli.from_flags(BenchConfig)
  if bool(a.reference_scn) != bool(a.reference_gigassl):
    return _usage_error("--reference_scn and --reference_gigassl go together")
  reference = (
    (a.reference_scn, a.reference_gigassl, a.reference_threads) if a.reference_scn else None
  )
  names = [s for s in a.shapes.split(",") if s]
  for n in names:
    if n not in shapes.NAMES:
      return _usage_error(f"--shapes: unknown shape {n!r}; valid: {shapes.NAMES}")
  impls = [i for i in a.impls.split(",") if i]
  for i in impls:
    if i not in api.IMPLEMENTATIONS:
      return _usage_error(
        f"--impls: unknown implementation {i!r}; valid: {sorted(api.IMPLEMENTATIONS)}"
      )
  tiles = [int(t) for t in a.pairs_tiles.split(",") if t]
  threads = [int(t) for t in a.spconv_threads.split(",") if t]
  machine = f"{_device()} ({_cpu_name()}, {os.cpu_count()} cpus), jax {jax.__version__}"
  thread_note = (
    f"XLA {os.cpu_count()} host threads, spconv {a.spconv_threads} torch thread(s), "
    f"reference {a.reference_threads if reference else '-'} torch thread(s)"
  )
  print(f"device {machine}; threads: {thread_note}", flush=True)
  sp_dev = a.spconv_device
  if sp_dev == "auto":
    sp_dev = "cuda" if jax.default_backend() == "gpu" else "cpu"
  records = run(names, impls, a.repeats, tiles, threads, sp_dev, reference)
  result = {
    "command": " ".join(["python -m gigassl_jax.kernels.sparse_conv.bench"] + sys.argv[1:]),
    "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    "machine": machine,
    "threads": thread_note,
    "records": records,
  }
  tmp = a.out + ".tmp"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=1)
  os.replace(tmp, a.out)  # atomic: a killed run leaves no half-written file
  print(table(records))
  return 0


if __name__ == "__main__":
  cli.define_flags(BenchConfig)
  cli.run(main)
