"""`pallas_gpu`: fused gather-GEMM Pallas kernels for NVIDIA GPUs (Triton lowering).

Why Triton and not Mosaic GPU: on jax 0.10/0.11 a plain `pallas_call` lowers for
cuda through Mosaic GPU, which rejects `dot_general` in its lane semantics and
has no per-lane gather load; the Triton lowering (selected by passing
`triton.CompilerParams`) lowers masked gather loads (`x_ref.at[rows, cols]` with
an index array per row) and `jnp.dot` to `tt.load` + `tt.dot` (tensor cores).
It is deprecated from jax 0.11 in favour of Mosaic GPU, but still present; the
lowering is checked by tests on both versions' APIs.

Forward, one program per (block of BM output rows i, block of BN output channels j):

  acc[BM, BN] = 0
  for k in range(K):                         # taps
    rows = nbr[i*BM : (i+1)*BM, k]           # input row per output row, -1 = none
    for c in range(C_in // BK):              # input-channel blocks
      xk = x[rows, c*BK : (c+1)*BK]          # gather load, masked rows read 0
      acc += xk @ w[k, c*BK : (c+1)*BK, j*BN : (j+1)*BN]
  out[i*BM : (i+1)*BM, j*BN : (j+1)*BN] = acc

Backward (custom_vjp; jax.grad cannot go through pallas_call):
  dx = the same kernel with the mirrored table nbr_t, the cotangent g and the
       transposed taps w[k].T (input i receives g[nbr_t[i, k]] @ w[k].T): a
       gather, no scatter-add, so deterministic.
  dw[k] = sum over output rows o of x[nbr[o, k]].T @ g[o]: one program per
       (k, C_in block, C_out block) loops over all output-row blocks; each
       program owns its output block, so no atomics either.
Accumulation is float32 for every input dtype.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from gigassl_jax.kernels.sparse_conv import flat_conv
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton


@dataclasses.dataclass(frozen=True)
class PallasGpuConfig:
  """Tile sizes and Triton launch parameters of the gather-GEMM kernels.

  block_m: output rows per program (BM); block_n: output channels (BN);
  block_k: input channels per inner step (BK); channel blocks shrink to the
  16-rounded channel counts, so >= 16 each. num_warps, num_stages: Triton's.
  """

  block_m: int = 64
  block_n: int = 64
  block_k: int = 32
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    for f in ("block_m", "block_n", "block_k"):
      if getattr(self, f) < 16:
        raise ValueError(f"{f} must be >= 16 (Triton's smallest dot), got {getattr(self, f)}")


def _round_up(n, m):
  return -(-n // m) * m


def _pad_to(a, axis, size, value=0):
  pad = [(0, 0)] * a.ndim
  pad[axis] = (0, size - a.shape[axis])
  return jnp.pad(a, pad, constant_values=value)


def _geometry(n_out, c_in, c_out, block_m, block_k, block_n):
  """(block_k, block_n, padded rows, padded C_in, padded C_out): channel blocks
  shrink to the (16-rounded) channel counts; every size is padded to its block."""
  block_k = min(block_k, _round_up(c_in, 16))
  block_n = min(block_n, _round_up(c_out, 16))
  return (
    block_k,
    block_n,
    _round_up(n_out, block_m),
    _round_up(c_in, block_k),
    _round_up(c_out, block_n),
  )


def _gather_gemm_kernel(nbr_ref, x_ref, w_ref, o_ref, *, block_k, precision):
  # nbr_ref: int32 [BM, K] block of the table; x_ref: [N_in, C_in] whole array
  # (read by gather loads); w_ref: [K, C_in, BN]; o_ref: [BM, BN].
  bm, taps = nbr_ref.shape
  c_in = x_ref.shape[1]
  bn = o_ref.shape[1]

  def tap(k, acc):
    idx = nbr_ref[:, k]  # [BM] input rows of this block's outputs through tap k
    ok = idx >= 0
    rows = jnp.where(ok, idx, 0)[:, None]

    def chan(c, acc):
      cols = (c * block_k + jnp.arange(block_k, dtype=jnp.int32))[None, :]
      xk = pl_triton.load(x_ref.at[rows, cols], mask=ok[:, None], other=0)
      wk = w_ref[k, pl.ds(c * block_k, block_k), :]
      return acc + jnp.dot(xk, wk, precision=precision, preferred_element_type=jnp.float32)

    return jax.lax.fori_loop(0, c_in // block_k, chan, acc)

  acc = jax.lax.fori_loop(0, taps, tap, jnp.zeros((bm, bn), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def gather_gemm(nbr, x, w, config=PallasGpuConfig(), *, interpret=False, precision=None):
  """out[o] = sum_k x[nbr[o, k]] @ w[k] (absent taps contribute 0).

  Args:
    nbr: int32 [N_out, K] flat input rows (-1 none); x: [N_in, C_in];
    w: [K, C_in, C_out]; config: blocks (BM rows, BN output and BK input
    channels) and launch parameters; interpret: Pallas interpret mode;
    precision: of the in-kernel dots (Triton: HIGHEST = IEEE fp32, else TF32).

  Returns:
    [N_out, C_out] in x's dtype.
  """
  block_m, block_n, block_k = config.block_m, config.block_n, config.block_k
  n_out, taps = nbr.shape
  _, c_in, c_out = w.shape
  block_k, block_n, n_pad, ci_pad, co_pad = _geometry(n_out, c_in, c_out, block_m, block_k, block_n)
  nbr = _pad_to(nbr, 0, n_pad, -1)
  x = _pad_to(x, 1, ci_pad)
  w = _pad_to(_pad_to(w.astype(x.dtype), 1, ci_pad), 2, co_pad)
  out = pl.pallas_call(
    functools.partial(_gather_gemm_kernel, block_k=block_k, precision=precision),
    grid=(n_pad // block_m, co_pad // block_n),
    in_specs=[
      pl.BlockSpec((block_m, taps), lambda i, j: (i, 0)),
      pl.BlockSpec(x.shape, lambda i, j: (0, 0)),
      pl.BlockSpec((taps, ci_pad, block_n), lambda i, j: (0, 0, j)),
    ],
    out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
    out_shape=jax.ShapeDtypeStruct((n_pad, co_pad), x.dtype),
    compiler_params=_compiler_params(config),
    interpret=interpret,
  )(nbr, x, w)
  return out[:n_out, :c_out]


def _compiler_params(config):
  return pl_triton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)


def _wgrad_kernel(nbr_ref, x_ref, g_ref, o_ref, *, block_m, precision):
  # Program (k, a, b): dw[k, a*BK:(a+1)*BK, b*BN:(b+1)*BN].
  # nbr_ref: int32 [N_out, K]; x_ref: [N_in, C_in]; g_ref: [N_out, BN] (column
  # block b of the cotangent); o_ref: [1, BK, BN].
  k = pl.program_id(0)
  a = pl.program_id(1)
  bk, bn = o_ref.shape[1:]
  n_out = nbr_ref.shape[0]

  def rows_block(r, acc):
    ridx = r * block_m + jnp.arange(block_m, dtype=jnp.int32)  # output rows
    idx = pl_triton.load(nbr_ref.at[ridx, jnp.full((block_m,), k, jnp.int32)])
    ok = idx >= 0
    rows = jnp.where(ok, idx, 0)[:, None]
    cols = (a * bk + jnp.arange(bk, dtype=jnp.int32))[None, :]
    xk = pl_triton.load(x_ref.at[rows, cols], mask=ok[:, None], other=0)  # [BM, BK]
    gk = pl_triton.load(g_ref.at[ridx[:, None], jnp.arange(bn, dtype=jnp.int32)[None, :]])
    return acc + jnp.dot(xk.T, gk, precision=precision, preferred_element_type=jnp.float32)

  acc = jax.lax.fori_loop(0, n_out // block_m, rows_block, jnp.zeros((bk, bn), jnp.float32))
  o_ref[0] = acc.astype(o_ref.dtype)


def weight_grad(nbr, x, g, config=PallasGpuConfig(), *, interpret=False, precision=None):
  """dw[k] = sum_o x[nbr[o, k]].T @ g[o]: float32 [K, C_in, C_out] (arguments as gather_gemm)."""
  block_m, block_n, block_k = config.block_m, config.block_n, config.block_k
  n_out, taps = nbr.shape
  c_in, c_out = x.shape[1], g.shape[1]
  block_k, block_n, n_pad, ci_pad, co_pad = _geometry(n_out, c_in, c_out, block_m, block_k, block_n)
  nbr = _pad_to(nbr, 0, n_pad, -1)
  x = _pad_to(x, 1, ci_pad)
  g = _pad_to(_pad_to(g.astype(x.dtype), 0, n_pad), 1, co_pad)
  dw = pl.pallas_call(
    functools.partial(_wgrad_kernel, block_m=block_m, precision=precision),
    grid=(taps, ci_pad // block_k, co_pad // block_n),
    in_specs=[
      pl.BlockSpec(nbr.shape, lambda k, a, b: (0, 0)),
      pl.BlockSpec(x.shape, lambda k, a, b: (0, 0)),
      pl.BlockSpec((n_pad, block_n), lambda k, a, b: (0, b)),
    ],
    out_specs=pl.BlockSpec((1, block_k, block_n), lambda k, a, b: (k, a, b)),
    out_shape=jax.ShapeDtypeStruct((taps, ci_pad, co_pad), jnp.float32),
    compiler_params=_compiler_params(config),
    interpret=interpret,
  )(nbr, x, g)
  return dw[:, :c_in, :c_out]


def _backward(config, interpret, precision, res, g):
  x, w, nbr, nbr_t = res
  kw = {"interpret": interpret, "precision": precision}
  # Input i receives g[nbr_t[i, k]] @ w[k].T through tap k.
  dx = gather_gemm(nbr_t, g.astype(x.dtype), jnp.swapaxes(w, 1, 2), config, **kw)
  return dx, weight_grad(nbr, x, g, config, **kw)


_conv = flat_conv.custom_vjp_conv(gather_gemm, _backward)


def conv_pallas_gpu(
  feats, weight, rulebook, config=PallasGpuConfig(), *, interpret=False, precision=None
):
  """Sparse convolution with the fused gather-GEMM Triton kernels.

  Args:
    feats: [V, S_in, C_in]; weight: [K, C_in, C_out]; rulebook: rulebook.Rulebook.
    config: PallasGpuConfig (tile sizes, launch parameters).
    interpret: run the kernels in Pallas interpret mode (any backend; the api
      refuses this kernel off a GPU unless it is asked for).
    precision: of the in-kernel dots (None = the Triton lowering's default).

  Returns:
    [V, S_out, C_out].
  """
  return flat_conv.apply(_conv, feats, weight, rulebook, config, interpret, precision)
