"""Sparse-convolution implementations vs the dense oracle, spconv, and each other.

One shared test base (`KernelTestBase`, as jax's Pallas tests do) runs every
implementation: a subclass per native implementation, and an interpret-mode
subclass per Pallas kernel (interpret mode starts outputs and scratch buffers as
NaN, so an unwritten element fails); on its own backend a Pallas kernel's
native subclass runs, elsewhere it is skipped (it cannot compile there).
Forward and gradients (features and weights) vs `dense` on seeded random inputs
(fixed, parameterised seeds printed on failure), for submanifold and strided
convolutions on several site patterns, in float32 and bfloat16. Input padding
rows are poisoned with NaN: no implementation may read them.
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gigassl_jax.kernels.sparse_conv import api, bench, pairs, pallas_gpu, pallas_tpu, shapes
from jax.experimental import pallas as pl

from gigassl_jax.sparse import maps, tables

# Small blocks keep interpret mode fast (the grid is a loop there).
CONFIGS = {
  "pallas_gpu": api.PallasGpuConfig(block_m=16, block_n=16, block_k=16),
  # wgrad_split=2: two partial d/dw sums per tap, added outside the kernel.
  "pallas_gpu_igemm": api.IgemmConfig(block_m=16, block_n=16, block_k=16, wgrad_split=2),
  "pallas_tpu": api.PallasTpuConfig(block_m=16),
  "pairs": api.PairsConfig(tile=8),
}
SEEDS = (0, 1)


def _pattern(name, rng):
  """(grid [V, T, 2], valid [V, T]) site patterns."""
  if name == "isolated":  # training-like: a few tiles ~4 cells apart
    g = rng.integers(0, 6, (6, 5, 2)) * 4 + rng.integers(0, 2, (6, 5, 2))
    return g, np.ones((6, 5), bool)
  if name == "duplicates":  # several tiles per cell, a view with one tile only
    g = rng.integers(0, 3, (3, 10, 2))
    valid = np.ones((3, 10), bool)
    valid[2, 1:] = False
    return g, valid
  if name == "dense":  # a fully covered patch plus a far isolated site
    a = np.stack(np.meshgrid(np.arange(5), np.arange(5), indexing="ij"), -1).reshape(-1, 2)
    g = np.concatenate([a + 1, [[12, 9]]])[None]
    return rng.permutation(g, axis=1), np.ones((1, 26), bool)
  if name == "mixed":
    return rng.integers(0, 7, (2, 24, 2)), rng.random((2, 24)) < 0.9
  raise ValueError(name)


def _inputs(pattern, kind, c_in, c_out, dtype, seed):
  rng = np.random.default_rng(seed)
  g, valid = _pattern(pattern, rng)
  feats = rng.standard_normal(g.shape[:2] + (c_in,)).astype(np.float32)
  smap = maps.from_grid(g, feats, valid)
  rb = tables.submanifold_rulebook(smap) if kind == "subm" else tables.strided_rulebook(smap)
  w = rng.standard_normal((9, c_in, c_out)).astype(np.float32) / np.sqrt(9 * c_in)
  ct = rng.standard_normal(rb.out_mask.shape + (c_out,)).astype(np.float32)
  ct = ct * np.asarray(rb.out_mask)[..., None]
  x = np.asarray(smap.feats)
  # Round to the dtype first: the oracle then sees exactly the same numbers.
  x = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))
  w = np.asarray(jnp.asarray(w, dtype).astype(jnp.float32))
  return x, w, ct, rb


def _oracle(x, w, ct, rb):
  f = functools.partial(api.sparse_conv, rulebook=rb, implementation="dense", precision="highest")
  out, vjp = jax.vjp(lambda a, b: f(a, b), jnp.asarray(x), jnp.asarray(w))
  dx, dw = vjp(jnp.asarray(ct))
  return np.asarray(out), np.asarray(dx), np.asarray(dw)


def _close(ours, ref, tol, what):
  ours = np.asarray(jnp.asarray(ours).astype(jnp.float32))
  assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
  assert np.isfinite(ours).all(), f"{what}: non-finite values (unwritten or poisoned read)"
  scale = max(float(np.abs(ref).max()), 1e-6)
  err = float(np.abs(ours - ref).max())
  assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} x {scale:.3g}"


def _run(impl, x, w, ct, rb, dtype, interpret=False):
  """Forward and (dx, dw) of impl, with input padding rows set to NaN."""
  xin = np.where(np.asarray(rb.in_mask)[..., None], x, np.nan)
  kw = {"config": CONFIGS.get(impl), "interpret": interpret, "precision": "highest"}

  @jax.jit
  def go(a, b, c):
    out, vjp = jax.vjp(lambda a, b: api.sparse_conv(a, b, rb, implementation=impl, **kw), a, b)
    return (out,) + vjp(c.astype(out.dtype))

  return go(jnp.asarray(xin, dtype), jnp.asarray(w, dtype), jnp.asarray(ct))


CASES = [
  ("isolated", "subm"),
  ("isolated", "strided"),
  ("duplicates", "strided"),
  ("dense", "subm"),
  ("dense", "strided"),
  ("mixed", "subm"),
]
# Interpret mode and bfloat16 are slow: fewer cases.
FEW_CASES = {"float32": [("isolated", "subm"), ("mixed", "strided")]}
FEW_CASES["bfloat16"] = [("mixed", "subm"), ("isolated", "strided")]


class KernelTestBase:
  """Every implementation vs the dense oracle. Subclasses set IMPL (and INTERPRET)."""

  IMPL: str
  INTERPRET = False
  CHANNELS = (5, 7)

  def setup_method(self):
    if not self.INTERPRET and not api.supported(self.IMPL):
      pytest.skip(f"{self.IMPL} compiles only on {sorted(api.IMPLEMENTATIONS[self.IMPL].backends)}")

  def cases(self, dtype):
    return CASES if dtype == "float32" and not self.INTERPRET else FEW_CASES[dtype]

  @pytest.mark.parametrize("seed", SEEDS)
  @pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
  def test_matches_dense_oracle(self, dtype, seed):
    """Forward, d/dx and d/dw vs the dense oracle (at HIGHEST precision).

    Tolerance, relative to the largest reference value: float32 reductions over
    K * C_in <= 9 * 16 products in a different order (a few ulp each, 2^-23 ~
    1.2e-7) -> 2e-5 leaves ~100x margin; bfloat16 rounds the output (and dx,
    dw) to 8 bits (2^-8 ~ 4e-3) after float32 accumulation, plus the bf16
    cotangent -> 2e-2.
    """
    tol = 2e-5 if dtype == "float32" else 2e-2
    dtype = jnp.dtype(dtype)
    for i, (pattern, kind) in enumerate(self.cases(dtype.name)):
      case_seed = 100 * seed + i
      c_in, c_out = self.CHANNELS
      x, w, ct, rb = _inputs(pattern, kind, c_in, c_out, dtype, case_seed)
      out, dx, dw = _run(self.IMPL, x, w, ct, rb, dtype, self.INTERPRET)
      ref_out, ref_dx, ref_dw = _oracle(x, w, ct, rb)
      what = f"{self.IMPL} {dtype.name} {pattern} {kind} seed={case_seed}"
      _close(out, ref_out, tol, what + " forward")
      # Padding input rows get no gradient: compare on active rows, require 0 elsewhere.
      m = np.asarray(rb.in_mask)
      _close(np.where(m[..., None], dx, 0), ref_dx, tol, what + " d/dx")
      assert not np.asarray(jnp.abs(dx.astype(jnp.float32))[~m]).any(), what + " d/dx padding"
      _close(dw, ref_dw, tol, what + " d/dw")
      assert out.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype, what


class TestReference(KernelTestBase):
  IMPL = "reference"


class TestGather(KernelTestBase):
  IMPL = "gather"


class TestPairs(KernelTestBase):
  IMPL = "pairs"


class TestPallasGpu(KernelTestBase):
  IMPL = "pallas_gpu"
  CHANNELS = (16, 24)


class TestPallasGpuInterpret(TestPallasGpu):
  INTERPRET = True


class TestPallasGpuIgemm(KernelTestBase):
  IMPL = "pallas_gpu_igemm"
  CHANNELS = (16, 24)  # C_out not a multiple of the 16-channel block: padded channels are cut


class TestPallasGpuIgemmInterpret(TestPallasGpuIgemm):
  INTERPRET = True


class TestPallasTpu(KernelTestBase):
  IMPL = "pallas_tpu"
  CHANNELS = (16, 24)


class TestPallasTpuInterpret(TestPallasTpu):
  INTERPRET = True


def test_interpret_mode_poisons_unwritten_outputs():
  """The premise of the Pallas tests: an unwritten output element reads NaN."""

  def kernel(x_ref, o_ref):
    @pl.when(pl.program_id(0) == 0)
    def _():
      o_ref[...] = x_ref[...]

  x = jnp.ones((16, 8), jnp.float32)
  out = pl.pallas_call(
    kernel,
    grid=(2,),
    in_specs=[pl.BlockSpec((8, 8), lambda i: (i, 0))],
    out_specs=pl.BlockSpec((8, 8), lambda i: (i, 0)),
    out_shape=jax.ShapeDtypeStruct((16, 8), jnp.float32),
    interpret=True,
  )(x)
  assert np.all(np.asarray(out[:8]) == 1) and np.isnan(np.asarray(out[8:])).all()


@pytest.mark.parametrize("tile", [1, 3, 64])
def test_pairs_any_tile_size(tile):
  """Tiles smaller than a tap's pair count, not dividing it, or larger than all pairs."""
  x, w, ct, rb = _inputs("mixed", "subm", 4, 6, jnp.float32, 7 + tile)
  ref, _, ref_dw = _oracle(x, w, ct, rb)
  f = jax.jit(lambda a, b: pairs.conv_pairs(a, b, rb, api.PairsConfig(tile=tile)))
  _close(f(x, w), ref, 2e-5, f"tile={tile}")
  dw = jax.grad(lambda b: jnp.sum(f(x, b) * ct))(jnp.asarray(w))
  _close(dw, ref_dw, 2e-5, f"tile={tile} d/dw")


def test_pairs_runs_only_real_pairs():
  """The tile count follows the real pairs, not the static capacity."""
  _, _, _, rb = _inputs("isolated", "subm", 4, 4, jnp.float32, 3)
  nbr = pairs.flat_table(rb.nbr, rb.nbr.shape[1])
  src, dst, tap, n_used = pairs._plan(nbr, nbr.shape[0], 4)
  count = np.asarray(rb.nbr >= 0).reshape(-1, 9).sum(0)
  assert int(n_used) == int(np.sum(-(-count // 4)))
  assert int(n_used) < src.shape[0]
  # Every real pair sits in exactly one slot of a tile of its own tap.
  used_src = np.asarray(src[: int(n_used)])
  used_dst = np.asarray(dst[: int(n_used)])
  taps = np.repeat(np.asarray(tap[: int(n_used)]), 4)
  real = used_dst.reshape(-1) < nbr.shape[0]
  got = sorted(zip(used_dst.reshape(-1)[real], taps[real], used_src.reshape(-1)[real]))
  want = sorted((o, k, int(nbr[o, k])) for o, k in zip(*np.nonzero(np.asarray(nbr) >= 0)))
  assert [tuple(map(int, g)) for g in got] == want


def test_api_rejects_bad_input():
  x, w, _, rb = _inputs("mixed", "subm", 4, 6, jnp.float32, 0)
  with pytest.raises(ValueError, match="valid: .*pairs"):
    api.sparse_conv(x, w, rb, implementation="nope")
  with pytest.raises(ValueError, match="input channels"):
    api.sparse_conv(x[..., :3], w, rb, implementation="pairs")
  with pytest.raises(ValueError, match="tile"):
    api.PairsConfig(tile=0)
  with pytest.raises(TypeError, match="PairsConfig"):
    api.sparse_conv(x, w, rb, implementation="pairs", config=api.PallasGpuConfig())
  with pytest.raises(ValueError, match="takes no config"):
    api.sparse_conv(x, w, rb, implementation="gather", config=api.PairsConfig())
  with pytest.raises(ValueError, match="Pallas kernels only"):
    api.sparse_conv(x, w, rb, implementation="gather", interpret=True)
  with pytest.raises(ValueError, match="matmul precision"):
    api.sparse_conv(x, w, rb, implementation="gather", precision="bf16ish")
  with pytest.raises(ValueError, match="valid: "):
    api.window_sum(jnp.asarray(x), rb, implementation="nope")


@pytest.mark.parametrize("backend", ["cpu", "gpu", "tpu"])
def test_default_is_the_measured_fastest_supported(backend):
  """None resolves to DEFAULT_BY_BACKEND (pairs on CPU, gather on GPU), which runs there."""
  want = {"cpu": "pairs", "gpu": "gather", "tpu": "gather"}[backend]
  assert api.DEFAULT_BY_BACKEND[backend] == want
  assert api.supported(want, backend)
  assert api.WINDOW_SUM_DEFAULT_BY_BACKEND[backend] == ("tiles" if backend == "cpu" else "gather")
  assert api.resolve(None) == api.DEFAULT_BY_BACKEND[jax.default_backend()]


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_gpu_igemm", "pallas_tpu"])
def test_pallas_off_its_backend_raises_unless_interpret(impl):
  """No silent fallback to interpret mode: off its backend a Pallas kernel needs interpret=True."""
  x, w, _, rb = _inputs("isolated", "subm", 16, 16, jnp.float32, 5)
  if api.supported(impl):
    pytest.skip(f"{impl} is native on this backend")
  with pytest.raises(ValueError, match="interpret=True"):
    api.sparse_conv(x, w, rb, implementation=impl)
  assert api.resolve(impl, interpret=True) == impl


def _sds(*arrays):
  return [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays]


def _target(platform):
  """Context naming an abstract accelerator to lower for.

  jax >= 0.12 lowers Triton kernels only for a known GPU model (its compute
  capability); with no GPU present, an abstract H100 stands in. Older versions
  need nothing.
  """
  if platform != "cuda" or not hasattr(jax.sharding, "AbstractDevice"):
    return contextlib.nullcontext()
  dev = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="cuda")
  return jax.sharding.use_abstract_mesh(
    jax.sharding.AbstractMesh((1,), ("x",), abstract_device=dev)
  )


@pytest.mark.parametrize("platform,impl", [("cuda", "pallas_gpu"), ("tpu", "pallas_tpu")])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lowering_for_accelerators(platform, impl, dtype):
  """Forward and backward lower for the real backend (Triton / Mosaic TPU), default blocks."""
  x, w, ct, rb = _inputs("mixed", "strided", 256, 512, jnp.float32, 1)
  f = {"pallas_gpu": pallas_gpu.conv_pallas_gpu, "pallas_tpu": pallas_tpu.conv_pallas_tpu}[impl]

  def fwd(a, b):
    return f(a, b, rb, interpret=False)

  def loss(a, b):
    return jnp.sum(fwd(a, b).astype(jnp.float32) * ct)

  args = _sds(jnp.asarray(x, dtype), jnp.asarray(w, dtype))
  marker = "triton" if platform == "cuda" else "tpu_custom_call"
  for fn in (fwd, jax.grad(loss, (0, 1))):
    with _target(platform):
      text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    assert marker in text, f"no {platform} kernel in the lowered {fn}"


@functools.lru_cache(maxsize=None)
def bench_convs(name):
  """[(label, rule book shapes, C_in, C_out)] of the convolutions run at a bench shape.

  Shapes only (jax.eval_shape): no table is built, so slide100k costs nothing.
  """
  sh = shapes.make(name, seed=0)
  smap = bench.sparse_map(sh.sites)
  if not sh.block:  # one submanifold conv
    return [("subm", jax.eval_shape(tables.submanifold_rulebook, smap), sh.c_in, sh.c_out)]
  # The pooling block: the strided conv C_in -> C, then submanifold convs C -> C
  # on its output sites.
  rb_s = jax.eval_shape(tables.strided_rulebook, smap)
  out = maps.SparseMap(coords=rb_s.out_coords, feats=None, mask=rb_s.out_mask)
  rb_m = jax.eval_shape(tables.submanifold_rulebook, out)
  return [("strided", rb_s, sh.c_in, sh.c_out), ("subm", rb_m, sh.c_out, sh.c_out)]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("make", ["train", "slide"])
def test_hash_and_sort_builders_agree(make, seed):
  if make == "train":
    smap = bench.sparse_map(shapes.train_views(seed=seed, views=32))
  else:
    smap = bench.sparse_map(shapes.slide_sites(seed=seed, sites=500))
  a = tables.submanifold_rulebook(smap, builder="sort")
  b = tables.submanifold_rulebook(smap, builder="hash")
  np.testing.assert_array_equal(a.nbr, b.nbr)
  np.testing.assert_array_equal(a.nbr_t, b.nbr_t)
  a = tables.strided_rulebook(smap, builder="sort")
  b = tables.strided_rulebook(smap, builder="hash")
  for f in ("nbr", "nbr_t", "out_coords", "out_mask"):
    np.testing.assert_array_equal(getattr(a, f), getattr(b, f))


@pytest.mark.parametrize("seed", SEEDS)
def test_train_shape_is_nearly_isolated(seed):
  """Level-1 tiles at d = 224 land ~4 cells apart: few sites have a neighbour."""
  smap = bench.sparse_map(shapes.train_views(seed=seed, views=64))
  rb = tables.submanifold_rulebook(smap)
  n = int(smap.mask.sum())
  assert 4 * 64 <= n <= 5 * 64, f"seed={seed}: {n} sites"  # few duplicates, <= 5 per view
  pairs_per_site = int((rb.nbr >= 0).sum()) / n
  assert 1.0 <= pairs_per_site < 1.3, f"seed={seed}: {pairs_per_site} pairs per site"
  cells = shapes.tissue_blob(np.random.default_rng(seed), 777)
  assert len({tuple(c) for c in cells.tolist()}) == 777, f"seed={seed}"


# ------------------------------------------------------------- spconv peer --


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ["subm", "strided"])
def test_matches_spconv(kind, seed):
  """Forward, d/dx and d/dw of `pairs` (and the oracle) vs spconv 2.x, 1 thread."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("spconv")
  from gigassl_jax.kernels.sparse_conv import peer

  torch.set_num_threads(1)  # spconv's CPU scatter-add races with 2 threads
  x, w, ct, rb = _inputs("mixed", kind, 8, 12, jnp.float32, seed)
  conv = peer.subm_conv(8, 12) if kind == "subm" else peer.strided_conv(8, 12)
  conv.weight.data[:] = peer.to_spconv_weight(w)
  t = peer.sparse_tensor(rb.in_coords, x, rb.in_mask, requires_grad=True)
  y = conv(t)
  theirs = peer.to_padded(y, rb.out_coords, rb.out_mask)  # raises if the site sets differ
  # Cotangent in spconv's row order.
  order = {tuple(r): i for i, r in enumerate(y.indices.numpy().tolist())}
  g = np.zeros(tuple(y.features.shape), np.float32)
  for v, s in zip(*np.nonzero(np.asarray(rb.out_mask))):
    c = np.asarray(rb.out_coords)[v, s]
    g[order[(int(v), int(c[0]), int(c[1]))]] = ct[v, s]
  y.features.backward(torch.from_numpy(g))
  dx_theirs = np.zeros_like(x)
  dx_theirs[np.asarray(rb.in_mask)] = t.features.grad.numpy()
  dw_theirs = conv.weight.grad.numpy().transpose(1, 2, 3, 0).reshape(9, 8, 12)

  out, dx, dw = _run("pairs", x, w, ct, rb, jnp.float32)
  for ours, ref, what in (
    (out, theirs, "forward"),
    (dx, dx_theirs, "d/dx"),
    (dw, dw_theirs, "d/dw"),
  ):
    _close(ours, ref, 1e-4, f"pairs vs spconv {kind} {what} seed={seed}")
  ref_out, _, _ = _oracle(x, w, ct, rb)
  _close(ref_out, theirs, 1e-4, f"dense oracle vs spconv {kind}")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("method", pairs.WINDOW_SUM_METHODS)
@pytest.mark.parametrize("kind", ["subm", "strided"])
def test_window_sum_matches_oracle(kind, method, seed):
  """window_sum (average pooling's numerator) = the dense conv with identity taps, via the api."""
  x, _, _, rb = _inputs("mixed", kind, 3, 3, jnp.float32, seed)
  eye = np.broadcast_to(np.eye(3, dtype=np.float32), (9, 3, 3))
  ct = np.random.default_rng(seed).standard_normal(rb.out_mask.shape + (3,)).astype(np.float32)
  ref, ref_dx, _ = _oracle(x, eye, ct * np.asarray(rb.out_mask)[..., None], rb)
  xin = np.where(np.asarray(rb.in_mask)[..., None], x, np.nan)
  out, vjp = jax.vjp(lambda a: api.window_sum(a, rb, implementation=method), jnp.asarray(xin))
  _close(out, ref, 1e-5, f"window_sum {method} {kind} seed={seed}")
  (dx,) = vjp(jnp.asarray(ct * np.asarray(rb.out_mask)[..., None]))
  _close(
    np.where(np.asarray(rb.in_mask)[..., None], dx, 0),
    ref_dx,
    1e-5,
    f"window_sum {method} d/dx seed={seed}",
  )


def test_bench_prints_a_reference_ratio_only_from_a_measured_reference():
  """No stored anchor: the "x reference" column exists only with a reference row of the run."""
  rows = [
    {"shape": "train256", "implementation": "pairs", "pass": "fwd_bwd", "median_ms": 400.0},
    {"shape": "train256", "implementation": "spconv(threads=1)", "pass": "fwd_bwd"},
  ]
  rows[1].update(median_ms=500.0, threads=1)
  for r in rows:
    r.setdefault("threads", None)
    r.update(device="cpu:x", gflop=10.0)
  text = bench.table(rows)
  assert "reference" not in text, text
  ref = dict(rows[1], implementation="reference SCN abc + gigassl def", median_ms=1000.0, threads=2)
  lines = bench.table(rows + [ref]).splitlines()
  assert lines[0].endswith("x reference (>1 faster) |"), lines[0]
  pairs_row = next(line for line in lines if "| pairs |" in line)
  # 1000 ms (reference) / 400 ms (pairs) = 2.50; the thread column says XLA's threads.
  assert pairs_row.endswith(" 2.50 |") and "(XLA)" in pairs_row, pairs_row
  ref_row = next(line for line in lines if "reference SCN" in line)
  assert "| 2 |" in ref_row and ref_row.endswith(" 1.00 |"), ref_row


def test_bench_reference_batch_holds_the_jax_arms_tiles():
  """The reference arm's batch: the same augmented level-0 positions the JAX arms quantise."""
  sites = shapes.train_views(seed=3, views=4, tiles=5, channels=8)
  batch = bench.reference_batch(sites)
  assert batch["feats"].shape == (4, 2, 5, 8) and batch["xy"].shape == (4, 2, 5, 2)
  np.testing.assert_array_equal(batch["feats"][:, 0], sites.feats)
  np.testing.assert_array_equal(batch["xy"][:, 0], batch["xy"][:, 1])
  # The positions the JAX arms quantise (sparse_map's augmentation, key = augment_seed).
  from gigassl_jax.sparse import coord_augment

  want = coord_augment.augment_views(jax.random.PRNGKey(sites.augment_seed), sites.xy)
  np.testing.assert_array_equal(batch["xy"][:, 0], np.asarray(want), err_msg="seed=3")
  assert np.any(batch["xy"][:, 0] != sites.xy), "seed=3: positions not augmented"
