"""Conformance against SparseConvNet golden vectors.

    python -m gigassl_jax.conformance DIR [--tol=1e-4] [--implementation=gather]

Reads every `*.npz` golden file in DIR (format:
tests/fixtures/golden_scn/README.md),
recognises its kind by its keys, runs the matching layer, the whole pooling
block or the loss with the recorded inputs and weights, and prints one row per
file: name, max abs error, max relative error (max abs error / max |reference|
over every compared array), pass/fail. Exits 1 when any file fails or is not
recognised, 2 when DIR has no golden file.

An end-to-end tool (it runs the models and the loss, so it sits above them): it
compares at full float32 precision, set per run (a context), never globally.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gigassl_jax import cli, losses, models
from gigassl_jax.kernels.sparse_conv import api as conv_api
from gigassl_jax.sparse import layers, maps, tables

CONV_NAMES = ("b0_conv1", "b0_conv2", "b0_convd", "b1_conv1", "b1_conv2")
BN_NAMES = ("b0_norm1", "b0_norm2", "b0_normd", "b1_norm1", "b1_norm2")


class Comparison:
  """Accumulates the worst error over several (ours, reference) array pairs."""

  def __init__(self):
    self.abs = 0.0
    self.rel = 0.0
    self.notes = []

  def add(self, what, ours, ref, scale=None):
    """Worst |ours - ref| relative to `scale` (default max |ref|)."""
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
      self.notes.append(f"{what}: shape {ours.shape} != reference {ref.shape}")
      self.abs = self.rel = math.inf
      return
    err = float(np.max(np.abs(ours - ref), initial=0.0))
    if scale is None:
      scale = float(np.max(np.abs(ref), initial=0.0))
    rel = err / scale if scale > 0 else (0.0 if err == 0 else math.inf)
    if not np.isfinite(ours).all():
      rel = err = math.inf
    self.abs = max(self.abs, err)
    if rel > self.rel:
      self.rel = rel
      self.worst = what

  def require(self, what, ok):
    if not ok:
      self.notes.append(what)
      self.rel = math.inf


# ------------------------------------------------------------- helpers -----


def _views(coords3, feats):
  """Flat [N, 3] (batch, c0, c1) rows -> padded [V, T, 2] grid, [V, T, C] feats, valid.

  Rows keep their feed order within each view; returns the row -> (v, t) map.
  """
  b = coords3[:, 0].astype(int)
  nv = int(b.max()) + 1
  t_max = int(np.bincount(b).max())
  grid = np.zeros((nv, t_max, 2), np.int32)
  f = np.zeros((nv, t_max, feats.shape[1]), np.float32)
  valid = np.zeros((nv, t_max), bool)
  where = np.zeros((len(b), 2), int)
  fill = np.zeros(nv, int)
  for r, v in enumerate(b):
    t = fill[v]
    fill[v] += 1
    grid[v, t] = coords3[r, 1:]
    f[v, t] = feats[r]
    valid[v, t] = True
    where[r] = (v, t)
  return grid, f, valid, where


def _flat(coords, mask, feats=None):
  """Padded per-view sites -> flat rows sorted by (batch, c0, c1), like the goldens."""
  coords, mask = np.asarray(coords), np.asarray(mask)
  v, s = np.nonzero(mask)  # row-major: view order, then sorted site order
  c3 = np.concatenate([v[:, None], coords[v, s]], axis=1)
  if feats is None:
    return c3
  return c3, np.asarray(feats)[v, s]


def _scatter_flat(flat, coords, mask, c):
  """Flat rows (sorted like _flat) -> padded [V, S, C]."""
  out = np.zeros(mask.shape + (c,), np.float32)
  v, s = np.nonzero(np.asarray(mask))
  out[v, s] = flat
  return out


def reference_spatial_size(grid):
  """gigassl's corrected spatial size of a batch of grid coordinates [..., 2]."""
  sizes = []
  for axis in range(2):
    s = int(np.max(grid[..., axis])) + 1
    if s < 5:
      s = 5
    if s % 2 == 0:
      s += 1
    if (s // 2) % 2 == 0:
      s += 2
    sizes.append(s)
  return tuple(sizes)


def regenerate_weights(seed, c_in, c):
  """The golden README's recipe for the layer4 conv weights."""
  rng = np.random.default_rng(int(seed))
  w = {}
  for name, vol, nin, nout in [
    ("b0_conv1", 9, c_in, c),
    ("b0_conv2", 9, c, c),
    ("b0_convd", 1, c_in, c),
    ("b1_conv1", 9, c, c),
    ("b1_conv2", 9, c, c),
  ]:
    a = math.sqrt(2.0 / (nin * vol)) * math.sqrt(3.0)
    w[name] = ((rng.random((vol, nin, nout)) * 2.0 - 1.0) * a).astype(np.float32)
  return w


def _layer4_weights(d, cmp):
  c_in, c = int(d["c_in"]), int(d["c"])
  if "w_b0_conv1" in d.files:
    return {n: d["w_" + n] for n in CONV_NAMES}
  w = regenerate_weights(d["weight_seed"], c_in, c)
  import hashlib

  for n in CONV_NAMES:
    key = f"fp_{n}_sha256"
    if key in d.files:
      got = hashlib.sha256(np.ascontiguousarray(w[n]).astype("<f4").tobytes()).hexdigest()
      cmp.require(f"regenerated {n} weights do not match their sha256", got == str(d[key]))
  return w


def _pooling_net(d, w, impl, prefix_running=""):
  c_in, c = int(d["c_in"]), int(d["c"])
  net = models.PoolingNet(c_in, c, conv_impl=impl, precision="highest", rngs=nnx.Rngs(0))
  for n in CONV_NAMES:
    getattr(net, n).weight.set_value(jnp.asarray(w[n]))
  for n in BN_NAMES:
    bn = getattr(net, n)
    bn.scale.set_value(jnp.asarray(d[f"{n}_weight"]))
    bn.bias.set_value(jnp.asarray(d[f"{n}_bias"]))
    bn.mean.set_value(jnp.asarray(d[f"{n}_running_mean"]))
    bn.var.set_value(jnp.asarray(d[f"{n}_running_var"]))
  return net


# ------------------------------------------------------------- checkers ----


def check_input_layer(d, impl, cmp):
  grid, f, valid, where = _views(d["in_coords"], d["in_features"])

  def fwd(f):
    sm = maps.from_grid(grid, f, valid)
    return sm.feats, sm

  _, vjp, sm = jax.vjp(fwd, jnp.asarray(f), has_aux=True)
  c3, feats = _flat(sm.coords, sm.mask, sm.feats)
  cmp.require("input-layer output sites differ", np.array_equal(c3, d["out_coords"]))
  cmp.add("out_features", feats, d["out_features"])
  r = _scatter_flat(d["R"], sm.coords, sm.mask, f.shape[-1])
  (g,) = vjp(jnp.asarray(r))
  cmp.add("grad_in_features", np.asarray(g)[where[:, 0], where[:, 1]], d["grad_in_features"])


def check_conv_like(d, impl, cmp, kind):
  grid, f, valid, where = _views(d["in_coords"], d["in_features"])
  ss = tuple(int(s) for s in d["spatial_size"])
  w = jnp.asarray(d["weight"]) if "weight" in d.files else None

  def run(f, w):
    sm = maps.from_grid(grid, f, valid)
    if kind == "subm":
      rb = tables.submanifold_rulebook(sm, 3)
      out = conv_api.sparse_conv(sm.feats, w, rb, implementation=impl, precision="highest")
    elif kind == "strided":
      rb = tables.strided_rulebook(sm, spatial_size=ss)
      out = conv_api.sparse_conv(sm.feats, w, rb, implementation=impl, precision="highest")
    else:
      rb = tables.strided_rulebook(sm, spatial_size=ss)
      out = layers.avg_pool(sm.feats, rb)
    return out, (rb.out_coords, rb.out_mask)

  out, vjp, (oc, om) = jax.vjp(run, jnp.asarray(f), w, has_aux=True)
  c3, feats = _flat(oc, om, out)
  cmp.require(
    f"{kind} output sites differ from the reference's", np.array_equal(c3, d["out_coords"])
  )
  if not np.array_equal(c3, d["out_coords"]):
    return
  cmp.add("out_features", feats, d["out_features"])
  r = _scatter_flat(d["R"], oc, om, out.shape[-1])
  gf, gw = vjp(jnp.asarray(r))
  cmp.add("grad_in_features", np.asarray(gf)[where[:, 0], where[:, 1]], d["grad_in_features"])
  if "grad_weight" in d.files:
    cmp.add("grad_weight", gw, d["grad_weight"])
  if "out_n_active_inputs" in d.files:
    rb = tables.strided_rulebook(maps.from_grid(grid, f, valid), spatial_size=ss)
    n_in = np.sum(np.asarray(rb.nbr) >= 0, axis=-1)
    cmp.require(
      "active-input counts differ",
      np.array_equal(_flat(oc, om, n_in[..., None])[1][:, 0], d["out_n_active_inputs"]),
    )


def check_bn(d, impl, cmp):
  train = "running_mean_out" in d.files
  x = jnp.asarray(d["x"])[None]
  mask = jnp.ones(x.shape[:2], bool)

  def run(x, scale, bias):
    return layers.batch_norm(
      x,
      mask,
      scale,
      bias,
      jnp.asarray(d["running_mean_in"]),
      jnp.asarray(d["running_var_in"]),
      train=train,
      momentum=float(d["momentum"]),
      eps=float(d["eps"]),
    )

  (y, m, v), vjp = jax.vjp(run, x, jnp.asarray(d["weight"]), jnp.asarray(d["bias"]))
  cmp.add("y", y[0], d["y"])
  if train:
    cmp.add("running_mean_out", m, d["running_mean_out"])
    cmp.add("running_var_out", v, d["running_var_out"])
    gx, gs, gb = vjp((jnp.asarray(d["R"])[None], jnp.zeros_like(m), jnp.zeros_like(v)))
    cmp.add("grad_x", gx[0], d["grad_x"])
    cmp.add("grad_weight", gs, d["grad_weight"])
    cmp.add("grad_bias", gb, d["grad_bias"])


def check_layer4_eval(d, impl, cmp):
  w = _layer4_weights(d, cmp)
  net = _pooling_net(d, w, impl)
  net.eval()
  sites = nnx.jit(lambda m, sm, ss: m.sites(sm, ss))
  for p in "ABC":
    grid = d[f"{p}_grid_coords"].astype(np.int32)
    feats = d[f"{p}_tile_features"].astype(np.float32)
    ss = tuple(int(s) for s in d[f"{p}_spatial_size"])
    cmp.require(
      f"{p}: reference spatial size rule disagrees",
      reference_spatial_size(d[f"{p}_grid_coords_float"]) == ss,
    )
    sm = maps.from_grid(grid, feats)
    cmp.require(
      f"{p}: input sites differ", np.array_equal(_flat(sm.coords, sm.mask), d[f"{p}_in_coords"])
    )
    out = sites(net, sm, np.asarray(ss))
    cmp.require(
      f"{p}: block-0 output sites differ",
      np.array_equal(_flat(out.coords, out.mask), d[f"{p}_b0_coords"]),
    )
    cmp.add(f"{p}_pooled", layers.global_mean(out.feats, out.mask), d[f"{p}_pooled"])
    if f"{p}_b1_out" in d.files:
      cmp.add(f"{p}_b1_out", _flat(out.coords, out.mask, out.feats)[1], d[f"{p}_b1_out"])
      cmp.add(f"{p}_in_features", _flat(sm.coords, sm.mask, sm.feats)[1], d[f"{p}_in_features"])
    if f"{p}_pooled_single" in d.files:
      single = []
      for v in range(grid.shape[0]):
        s1 = maps.from_grid(grid[v : v + 1], feats[v : v + 1])
        o1 = sites(net, s1, np.asarray(reference_spatial_size(grid[v])))
        single.append(layers.global_mean(o1.feats, o1.mask)[0])
      cmp.add(f"{p}_pooled_single", np.stack(single), d[f"{p}_pooled_single"])
  if "coordq_x" in d.files:
    x = d["coordq_x"].astype(np.int32)
    mn = d["coordq_min"].astype(np.int32)
    ours = np.asarray(
      maps.quantize(
        jnp.stack([x, mn], 0)[:, :, None].repeat(2, -1).transpose(1, 0, 2),
        jnp.ones((len(x), 2), bool),
        int(d["downmap"]),
      )
    )[:, 0, 0]
    cmp.require(
      "exact integer quantisation disagrees with coordq_exact_floor",
      np.array_equal(ours, d["coordq_exact_floor"]),
    )


def check_layer4_train(d, impl, cmp):
  w = _layer4_weights(d, cmp)
  net = _pooling_net(d, w, impl)
  net.train()
  grid = d["grid_coords"].astype(np.int32)
  ss = tuple(int(s) for s in d["spatial_size"])
  graphdef, params, rest = nnx.split(net, nnx.Param, ...)

  def loss(params, feats):
    m = nnx.merge(graphdef, params, rest, copy=True)
    pooled = m(maps.from_grid(grid, feats), spatial_size=ss)
    return jnp.sum(pooled * d["R"]), (pooled, nnx.state(m, nnx.BatchStat))

  (val, (pooled, stats)), (gp, gf) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
    params, jnp.asarray(d["tile_features"], jnp.float32)
  )
  cmp.add("pooled", pooled, d["pooled"])
  cmp.add("loss", val, d["loss"])
  cmp.add("grad_tile_features", gf, d["grad_tile_features"])
  for n in CONV_NAMES:
    g = np.asarray(gp[n]["weight"][...])
    if f"grad_w_{n}" in d.files:
      cmp.add(f"grad_w_{n}", g, d[f"grad_w_{n}"])
    # A sum cancels: judge its error against sqrt(N * sum g^2) >= sum |g|,
    # the size of the terms it adds (reference values only).
    cmp.add(
      f"grad_w_{n}_sum",
      g.sum(),
      d[f"grad_w_{n}_sum"],
      scale=math.sqrt(g.size * float(d[f"grad_w_{n}_sumsq"])),
    )
    cmp.add(f"grad_w_{n}_sumsq", np.square(g.astype(np.float64)).sum(), d[f"grad_w_{n}_sumsq"])
    cmp.add(f"grad_w_{n}_absmax", np.abs(g).max(), d[f"grad_w_{n}_absmax"])
  if "grad_w_b0_conv1_slice" in d.files:
    k = int(d["grad_w_b0_conv1_slice_cin"])
    cmp.add(
      "grad_w_b0_conv1_slice",
      np.asarray(gp["b0_conv1"]["weight"][...])[:, :k],
      d["grad_w_b0_conv1_slice"],
    )
  for n in BN_NAMES:
    cmp.add(f"grad_{n}_weight", gp[n]["scale"][...], d[f"grad_{n}_weight"])
    cmp.add(f"grad_{n}_bias", gp[n]["bias"][...], d[f"grad_{n}_bias"])
    cmp.add(f"{n}_running_mean_out", stats[n]["mean"][...], d[f"{n}_running_mean_out"])
    cmp.add(f"{n}_running_var_out", stats[n]["var"][...], d[f"{n}_running_var_out"])


def check_ntxent(d, impl, cmp):
  tau = float(d["temperature"])
  val, (g1, g2) = jax.value_and_grad(losses.nt_xent, argnums=(0, 1))(
    jnp.asarray(d["z1"]), jnp.asarray(d["z2"]), tau
  )
  cmp.add("loss", val, d["loss_float64"])
  cmp.add("grad_z1", g1, d["grad_z1"])
  cmp.add("grad_z2", g2, d["grad_z2"])


def classify(files) -> str | None:
  """Kind of a golden file from its keys."""
  k = set(files)
  if {"z1", "z2", "grad_z1"} <= k:
    return "ntxent"
  if "grad_tile_features" in k:
    return "layer4_train"
  if "A_pooled" in k:
    return "layer4_eval"
  if "running_mean_in" in k:
    return "bn"
  if "out_count" in k:
    return "input_layer"
  if "in_coords" in k and "weight" in k:
    return "strided" if "out_spatial_size" in k else "subm"
  if "in_coords" in k and "out_n_active_inputs" in k:
    return "avgpool"
  return None


CHECKS = {
  "input_layer": check_input_layer,
  "subm": lambda d, i, c: check_conv_like(d, i, c, "subm"),
  "strided": lambda d, i, c: check_conv_like(d, i, c, "strided"),
  "avgpool": lambda d, i, c: check_conv_like(d, i, c, "avgpool"),
  "bn": check_bn,
  "layer4_eval": check_layer4_eval,
  "layer4_train": check_layer4_train,
  "ntxent": check_ntxent,
}


def run(directory, tol: float = 1e-4, implementation: str | None = None, out=sys.stdout):
  """Checks every golden file in `directory`; returns (rows, all_passed)."""
  files = sorted(pathlib.Path(directory).glob("*.npz"))
  if not files:
    raise FileNotFoundError(f"no golden *.npz file in {directory}")
  rows = []
  print(f"{'file':28s} {'kind':12s} {'max abs err':>12s} {'max rel err':>12s}  result", file=out)
  for f in files:
    cmp = Comparison()
    kind = "?"
    try:
      with np.load(f, allow_pickle=False) as d:
        kind = classify(d.files) or "?"
        if kind == "?":
          raise ValueError("unrecognised golden file (keys match no known layer)")
        # Full float32 matmuls on every backend (TF32 on a GPU would exceed tol):
        # asked for explicitly above, and for any other matmul by this context.
        with jax.default_matmul_precision("highest"):
          CHECKS[kind](d, implementation, cmp)
      ok = cmp.rel <= tol and not cmp.notes
      note = "; ".join(cmp.notes)
    except Exception as e:  # a broken file fails its row, the others still run
      ok, note = False, f"{type(e).__name__}: {e}"
      cmp.abs = cmp.rel = math.inf
    rows.append((f.name, kind, cmp.abs, cmp.rel, ok, note))
    print(
      f"{f.name:28s} {kind:12s} {cmp.abs:12.3e} {cmp.rel:12.3e}  "
      f"{'PASS' if ok else 'FAIL'}{'  ' + note if note else ''}",
      file=out,
      flush=True,
    )
  n_ok = sum(r[4] for r in rows)
  print(f"{n_ok}/{len(rows)} golden files pass (relative tolerance {tol:g})", file=out)
  return rows, n_ok == len(rows)


F = cli.field


@dataclasses.dataclass(frozen=True)
class ConformanceConfig:
  """The runner's flags; the golden folder DIR is the one positional argument."""

  tol: float = F(1e-4, "Max relative error (abs err / max |ref|) per file.")
  implementation: str | None = F(
    None, f"Sparse-conv implementation ({', '.join(sorted(conv_api.IMPLEMENTATIONS))})."
  )


def main(argv) -> int:
  """argv: [program, DIR] (absl leaves the positional); returns the exit status."""
  if len(argv) != 2:
    print(f"conformance: error: give one golden folder DIR, got {argv[1:]}", file=sys.stderr)
    return 2
  cfg = cli.from_flags(ConformanceConfig)
  try:
    conv_api.resolve(cfg.implementation)
  except ValueError as e:
    print(f"conformance: error: --implementation: {e}", file=sys.stderr)
    return 2
  try:
    _, ok = run(argv[1], cfg.tol, cfg.implementation)
  except FileNotFoundError as e:
    print(f"conformance: error: {e}", file=sys.stderr)
    return 2
  return 0 if ok else 1


if __name__ == "__main__":
  cli.define_flags(ConformanceConfig)
  cli.run(main)
