"""`pallas_gpu_igemm` (masked implicit-GEMM Triton kernels) vs the dense oracle, and its lowering.

Off a GPU the kernels run in Pallas interpret mode, where outputs start as NaN,
so an output row the scatter store never writes fails the finiteness check. On
a GPU the same tests run the compiled kernels (IEEE float32 dots). Input padding
rows and the cotangent of inactive output rows are poisoned (NaN or the largest
finite value): no kernel may read them.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gigassl_jax.kernels.sparse_conv import api, bench, dense, shapes
from gigassl_jax.kernels.sparse_conv import pallas_gpu_igemm as igemm
from test_kernels import _inputs, _sds, _target, bench_convs

from gigassl_jax.sparse import tables

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU
# Blocks of 16 keep interpret mode fast (its grid is a Python-level loop) and
# give several row blocks, so tap lists differ between blocks.
SMALL = igemm.IgemmConfig(block_m=16, block_n=16, block_k=16, wgrad_split=2)
C_IN, C_OUT = 16, 24  # C_OUT not a multiple of the block: the padded channels are cut


def _oracle(x, w, ct, rb):
  """(out, dx, dw) of the dense oracle in float64-free IEEE float32 (precision highest)."""
  f = functools.partial(dense.conv_dense, rulebook=rb)
  with jax.default_matmul_precision("highest"):
    out, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(ct))
  return np.asarray(out), np.asarray(dx), np.asarray(dw)


def _check(ours, ref, bound, what):
  """|ours - ref| <= bound elementwise (so rows with no pair must be exactly 0)."""
  ours = np.asarray(jnp.asarray(ours).astype(jnp.float32))
  assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
  assert np.isfinite(ours).all(), f"{what}: non-finite values (unwritten row or poisoned read)"
  err = np.abs(ours - ref)
  bad = np.argmax(err - bound)
  assert (err <= bound).all(), (
    f"{what}: error {err.flat[bad]:.3g} > bound {bound.flat[bad]:.3g} at flat index {bad}"
  )


CASES = [  # (dtype, convolution, poison of padding rows, seed)
  ("float32", "subm", np.nan, 11),
  ("float32", "strided", np.finfo(np.float32).max, 12),
  ("bfloat16", "subm", float(jnp.finfo(jnp.bfloat16).max), 13),
  ("bfloat16", "strided", np.nan, 14),
]


@pytest.mark.parametrize("dtype,kind,poison,seed", CASES)
def test_matches_dense_oracle(dtype, kind, poison, seed):
  """Forward, d/dx and d/dw vs the dense oracle, within a derived rounding bound."""
  dtype = jnp.dtype(dtype)
  x, w, ct, rb = _inputs("mixed", kind, C_IN, C_OUT, dtype, seed)
  # The cotangent in the kernel's dtype too, so both sides see the same numbers.
  ct = np.asarray(jnp.asarray(ct, dtype).astype(jnp.float32))
  in_m = np.asarray(rb.in_mask)[..., None]
  out_m = np.asarray(rb.out_mask)[..., None]
  xin = np.where(in_m, x, poison)
  ctin = np.where(out_m, ct, poison)

  @jax.jit
  def run(a, b, c):
    f = functools.partial(
      igemm.conv_pallas_gpu_igemm,
      rulebook=rb,
      config=SMALL,
      interpret=INTERPRET,
      precision=jax.lax.Precision.HIGHEST,
    )
    out, vjp = jax.vjp(lambda a, b: f(a, b), a, b)
    return (out,) + vjp(c.astype(out.dtype))

  args = (jnp.asarray(xin, dtype), jnp.asarray(w, dtype), jnp.asarray(ctin))
  out, dx, dw = run(*args)
  # Deterministic (no atomics, no scatter-add): a second run is bitwise equal.
  for name, a, b in zip(("forward", "d/dx", "d/dw"), (out, dx, dw), run(*args)):
    assert np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True), f"{name} seed={seed}"
  ref = _oracle(x, w, ct, rb)
  # Rounding bound (Higham): a float32 sum of n products differs from the exact
  # one by at most gamma_n * sum|products|, gamma_n = n u / (1 - n u), u = 2^-24.
  # sum|products| is the same convolution on |x|, |w|, |ct| (the oracle on
  # absolute values). Both sides round, so twice that; n is the longest
  # reduction of either side: K * C (taps x channels) for out and dx, and the
  # oracle's d/dw sums over every view and grid cell (V * extent^2 terms).
  # bfloat16 adds one rounding of the result to bfloat16: 2^-8 |ref|.
  absref = _oracle(np.abs(x), np.abs(w), np.abs(ct), rb)
  extent = int(np.asarray(rb.in_coords).max()) + 1
  n = max(9 * C_IN, 9 * C_OUT, x.shape[0] * extent**2)
  u = 2.0**-24
  gamma = n * u / (1 - n * u)
  u_out = 2.0**-8 if dtype == jnp.bfloat16 else 0.0
  what = f"{dtype.name} {kind} poison={poison} seed={seed}"
  for name, ours, r, a in zip(("forward", "d/dx", "d/dw"), (out, dx, dw), ref, absref):
    if name == "d/dx":  # padding input rows get no gradient: exactly 0 there
      assert not np.asarray(jnp.abs(ours.astype(jnp.float32)) * (1 - in_m)).any(), what
    _check(ours, r, 2 * gamma * a + u_out * np.abs(r), f"{what} {name}")
  assert out.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype, what


@pytest.mark.parametrize("seed", [0, 1])
def test_plan_groups_rows_by_tap_set(seed):
  """The plan: a permutation; each block lists exactly its rows' taps; per-tap block lists."""
  smap = bench.sparse_map(shapes.slide_sites(seed=seed, sites=300, channels=1))
  nbr = np.asarray(tables.submanifold_rulebook(smap).nbr)[0]
  bm = 16
  p = jax.tree.map(np.asarray, igemm.plan(jnp.asarray(nbr), bm))
  n, k = nbr.shape
  n_blocks = p.meta.shape[0]
  what = f"seed={seed}"
  assert sorted(p.perm.tolist()) == list(range(n_blocks * bm)), what
  padded = np.concatenate([nbr, -np.ones((n_blocks * bm - n, k), np.int32)])
  np.testing.assert_array_equal(p.nbr, padded[p.perm], err_msg=what)
  has = (p.nbr >= 0).reshape(n_blocks, bm, k).any(axis=1)
  for b in range(n_blocks):
    cnt = p.meta[b, 0]
    assert p.meta[b, 1 : 1 + cnt].tolist() == np.nonzero(has[b])[0].tolist(), (what, b)
  for t in range(k):
    cnt = p.tap_blocks[t, 0]
    assert p.tap_blocks[t, 1 : 1 + cnt].tolist() == np.nonzero(has[:, t])[0].tolist(), (what, t)
  # Sorted by tap mask, at most one block per boundary between two masks mixes
  # masks: the rest run exactly the taps of each of their rows.
  masks = ((p.nbr >= 0) << np.arange(k)).sum(1).reshape(n_blocks, bm)
  mixed = int(sum(len(set(m.tolist())) > 1 for m in masks))
  assert mixed <= len(set(masks.ravel().tolist())) - 1, (what, mixed)
  # Fewer taps run than the 9 per row of a dense loop (interior rows use all 9).
  assert p.meta[:, 0].sum() < 9 * n_blocks, what


def test_config_and_tuning_grid():
  grid = igemm.tuning_grid()
  assert grid[0] == igemm.DEFAULT_CONFIG and len(set(grid)) == len(grid) <= 12
  for bad in ({"block_m": 48}, {"block_n": 8}, {"num_warps": 3}, {"wgrad_split": 0}):
    with pytest.raises(ValueError, match=next(iter(bad))):
      igemm.IgemmConfig(**bad)


def test_no_silent_fallback():
  """Off a GPU, compiled mode raises (naming interpret=True) instead of running elsewhere.

  Called directly or through the api, the same ValueError as every Pallas kernel.
  """
  x, w, _, rb = _inputs("mixed", "subm", 4, 4, jnp.float32, 5)
  if ON_GPU:
    assert igemm.conv_pallas_gpu_igemm(x, w, rb).shape == rb.out_mask.shape + (4,)
  else:
    with pytest.raises(ValueError, match="interpret=True"):
      igemm.conv_pallas_gpu_igemm(x, w, rb)
    with pytest.raises(ValueError, match="interpret=True"):
      api.sparse_conv(x, w, rb, implementation="pallas_gpu_igemm")
  with pytest.raises(TypeError, match="IgemmConfig"):
    igemm.conv_pallas_gpu_igemm(x, w, rb, config={"block_m": 16}, interpret=True)


def _lower_fwd_bwd(name, configs, dtypes):
  """Lowers forward and backward for cuda; asserts which Triton kernels each holds."""
  for label, rb, c_in, c_out in bench_convs(name):
    for dtype, cfg in ((d, c) for d in dtypes for c in configs):
      x = jax.ShapeDtypeStruct(rb.in_mask.shape + (c_in,), dtype)
      w = jax.ShapeDtypeStruct((9, c_in, c_out), dtype)
      (ct,) = _sds(jnp.zeros(rb.out_mask.shape + (c_out,), jnp.float32))

      def fwd(a, b, rb, cfg=cfg):
        return igemm.conv_pallas_gpu_igemm(a, b, rb, config=cfg)

      def bwd(a, b, rb, c):
        _, vjp = jax.vjp(lambda a, b: fwd(a, b, rb), a, b)
        return vjp(c.astype(dtype))

      for fn, args, want in (
        (fwd, (x, w, rb), {"_igemm_kernel"}),
        (bwd, (x, w, rb, ct), {"_igemm_kernel", "_wgrad_kernel"}),
      ):
        with _target("cuda"):
          text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        got = set(re.findall(r"_(?:igemm|wgrad)_kernel", text))
        assert got == want, f"{name} {label} {jnp.dtype(dtype).name} {cfg} {fn.__name__}: {got}"


@pytest.mark.parametrize("name", shapes.NAMES)
def test_cuda_lowering_at_bench_shapes(name, monkeypatch):
  """Forward and backward lower to the two Triton kernels at every bench shape, default config."""
  monkeypatch.setattr(igemm, "_on_gpu", lambda: True)  # lower for cuda from any host
  _lower_fwd_bwd(name, [igemm.DEFAULT_CONFIG], (jnp.float32, jnp.bfloat16))


def test_cuda_lowering_of_tuning_grid(monkeypatch):
  """Every tuning candidate lowers for cuda (slide16k, float32).

  Shared-memory and register limits are only checked when Triton compiles on a
  GPU; the tuning records a candidate that fails there and goes on.
  """
  monkeypatch.setattr(igemm, "_on_gpu", lambda: True)
  _lower_fwd_bwd("slide16k", igemm.tuning_grid(), (jnp.float32,))
