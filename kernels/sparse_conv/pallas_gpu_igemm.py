"""`pallas_gpu_igemm`: masked implicit-GEMM sparse convolution in Pallas (Triton lowering).

The design of FlexGEMM's masked implicit GEMM, written for this package:

1. Plan (XLA, once per rule book and pass, outside the kernels). Every output
   row gets a K-bit mask of its valid taps (bit k set when nbr[o, k] >= 0).
   Rows are sorted by that mask (stable argsort), so the rows of one block of
   BM sorted rows nearly always share their set of taps: at the training shape
   almost every site is isolated and its block holds the centre tap only; on a
   slide the interior blocks hold all 9 and the border blocks a few. Per block
   the union of its rows' masks becomes a short list of taps (a small int
   array `meta` [n_blocks, 16]: the count, then the taps).

2. Forward kernel, one program per (C_out block j, row block i):

     acc[BM, BN] = 0
     for t in range(meta[i, 0]):            # this block's valid taps only
       k = meta[i, 1 + t]
       rows = nbr_sorted[i*BM : (i+1)*BM, k] # input row per output row, -1 none
       for c in range(C_in // BK):          # (one flat loop over (t, c) in the kernel)
         acc += x[rows, c*BK : (c+1)*BK] @ w[k, c*BK : (c+1)*BK, j*BN : (j+1)*BN]
     out[perm[i*BM : (i+1)*BM], j*BN : (j+1)*BN] = acc   # scatter store

   The gather is a masked per-row load straight from x (absent taps read 0), the
   product a tensor-core `jnp.dot` accumulating in float32; no [N, K, C] buffer
   exists in HBM. `perm` is a permutation, so the store writes every output row
   exactly once: the result leaves the kernel in the original row order without
   a second pass. The C_out block is the fastest grid axis, so the programs
   that gather the same rows run together and share them through L2.

3. Backward (custom_vjp; jax.grad cannot go through pallas_call):
   - dx: the same kernel on the mirrored table nbr_t (input row -> output row
     per tap), the cotangent and the transposed taps w[k].T, with its own plan
     (input rows sorted by their nbr_t masks): input i receives
     g[nbr_t[i, k]] @ w[k].T. A gather, never a scatter-add: deterministic.
   - dw[k] = sum_o x[nbr[o, k]].T @ g[o]: one program per (tap k, C_in block,
     C_out block, split s) loops over the row blocks whose tap set holds k (a
     per-tap block list from the same plan), every s-th one; each program owns
     its output tile, so there are no atomics, and the `wgrad_split` partial
     sums are added by XLA in a fixed order.

Blocks and launch parameters are an `IgemmConfig`; `tuning_grid()` lists the
candidates benchmarks/bench_igemm.py times on a GPU. Off a GPU the kernels run
only in Pallas interpret mode and only when asked (`interpret=True`): there is
no silent fallback.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from gigassl_jax.kernels.sparse_conv import pairs
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

META_WIDTH = 16  # columns of the per-block tap list: count + up to 15 taps (3x3 uses 9)


def _is_pow2(n):
  return n >= 1 and n & (n - 1) == 0


def _next_pow2(n):
  return 1 << max(0, int(n) - 1).bit_length()


def _round_up(n, m):
  return -(-n // m) * m


@dataclasses.dataclass(frozen=True)
class IgemmConfig:
  """Blocks and Triton launch parameters of the three kernels.

  block_m: rows per block (output rows in the forward, input rows in dx, rows
    per reduction step in dw); smaller blocks mix fewer tap sets.
  block_n: output channels per program (C_out forward, C_in in dx).
  block_k: reduction channels per dot (C_in forward, C_out in dx; the C_in
    tile of dw).
  num_warps, num_stages: Triton launch parameters.
  wgrad_split: dw programs per (tap, channel tile), each summing every
    wgrad_split-th row block; the partial sums are added outside the kernel.
  Block sizes are powers of two >= 16 (Triton's dot); channel blocks shrink to
  the (power-of-two rounded) channel counts.
  """

  block_m: int = 64
  block_n: int = 64
  block_k: int = 32
  num_warps: int = 4
  num_stages: int = 2
  wgrad_split: int = 1

  def __post_init__(self):
    for name in ("block_m", "block_n", "block_k"):
      v = getattr(self, name)
      if not (_is_pow2(v) and v >= 16):
        raise ValueError(f"IgemmConfig.{name} must be a power of two >= 16, got {v}")
    if not (_is_pow2(self.num_warps) and self.num_warps <= 32):
      raise ValueError(f"IgemmConfig.num_warps must be a power of two <= 32, got {self.num_warps}")
    if self.num_stages < 1 or self.wgrad_split < 1:
      raise ValueError(f"IgemmConfig.num_stages and wgrad_split must be >= 1, got {self}")


DEFAULT_CONFIG = IgemmConfig()


def tuning_grid() -> list[IgemmConfig]:
  """The candidate configurations tuned on a GPU (small: each costs a compile).

  Spans row blocks 32-128 (tap-set mixing vs. reuse of each weight tile),
  output-channel blocks 64-128, reduction blocks 32-64, 4 or 8 warps and 2-3
  pipeline stages; the default comes first.
  """
  return [
    DEFAULT_CONFIG,
    IgemmConfig(32, 64, 32, 4, 2),
    IgemmConfig(64, 128, 32, 4, 3),
    IgemmConfig(64, 64, 64, 4, 3),
    IgemmConfig(128, 64, 32, 4, 3),
    IgemmConfig(128, 128, 32, 8, 3),
    IgemmConfig(64, 128, 64, 8, 3, wgrad_split=2),
    IgemmConfig(128, 128, 64, 8, 2, wgrad_split=4),
  ]


class Plan(NamedTuple):
  """Rows of one table sorted by tap mask, cut into blocks of BM rows.

  perm: int32 [n_pad] table row at each sorted position (>= N past the end).
  nbr: int32 [n_pad, K] the table in sorted order (-1 = none, also padding).
  meta: int32 [n_blocks, META_WIDTH] per block: number of valid taps, then the
    taps (ascending), then zeros.
  tap_blocks: int32 [K, 1 + n_blocks] per tap: number of blocks using it, then
    those blocks (ascending), then the others.
  """

  perm: jax.Array
  nbr: jax.Array
  meta: jax.Array
  tap_blocks: jax.Array


def plan(nbr, block_m):
  """The sorted, blocked form of a flat table nbr int32 [N, K] (-1 none)."""
  n, k = nbr.shape
  if k + 1 > META_WIDTH:
    raise ValueError(f"at most {META_WIDTH - 1} taps per table, got {k}")
  valid = nbr >= 0
  key = jnp.sum(valid.astype(jnp.int32) << jnp.arange(k, dtype=jnp.int32), axis=1)
  n_pad = _round_up(max(n, 1), block_m)
  perm = jnp.concatenate(
    [jnp.argsort(key, stable=True).astype(jnp.int32), jnp.arange(n, n_pad, dtype=jnp.int32)]
  )
  nbr_s = jnp.concatenate([nbr, jnp.full((n_pad - n, k), -1, jnp.int32)])[perm]
  has = jnp.any((nbr_s >= 0).reshape(n_pad // block_m, block_m, k), axis=1)  # [n_blocks, K]
  # Stable argsort of "not used" lists the used taps first, in ascending order.
  taps = jnp.argsort(~has, axis=1, stable=True).astype(jnp.int32)
  count = jnp.sum(has, axis=1, dtype=jnp.int32)
  meta = jnp.concatenate(
    [count[:, None], taps, jnp.zeros((taps.shape[0], META_WIDTH - 1 - k), jnp.int32)], axis=1
  )
  blocks = jnp.argsort(~has.T, axis=1, stable=True).astype(jnp.int32)
  tap_blocks = jnp.concatenate([jnp.sum(has, axis=0, dtype=jnp.int32)[:, None], blocks], axis=1)
  return Plan(perm, nbr_s, meta, tap_blocks)


def _channel_blocks(c_in, c_out, cfg):
  """(block_k, block_n, padded C_in, padded C_out) for one kernel."""
  bk = min(cfg.block_k, max(16, _next_pow2(c_in)))
  bn = min(cfg.block_n, max(16, _next_pow2(c_out)))
  return bk, bn, _round_up(c_in, bk), _round_up(c_out, bn)


def _pad_axis(a, axis, size):
  if a.shape[axis] == size:
    return a
  pad = [(0, 0)] * a.ndim
  pad[axis] = (0, size - a.shape[axis])
  return jnp.pad(a, pad)


def _compiler_params(cfg):
  return pl_triton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


# ------------------------------------------------------------ forward / dx --


def _igemm_kernel(meta_ref, perm_ref, nbr_ref, x_ref, w_ref, o_ref, *, block_k, n_rows, precision):
  # meta_ref: int32 [1, META_WIDTH] this block's tap count and taps;
  # perm_ref: int32 [BM] destination row of each sorted row; nbr_ref: int32
  # [BM, K] their input rows; x_ref: [N_in, C_in] whole (read by gather loads);
  # w_ref: [K, C_in, BN]; o_ref: [N_out, BN] whole column block (scatter store).
  bm = nbr_ref.shape[0]
  n_chan = x_ref.shape[1] // block_k
  bn = o_ref.shape[1]

  # One flat loop over (valid tap t, input-channel block c): a single
  # software-pipelined loop (num_stages) instead of a new pipeline per tap.
  def step(u, acc):
    t = jax.lax.div(u, n_chan)  # u >= 0: truncating division (jnp's // and % select on signs)
    c = u - t * n_chan
    k = meta_ref[0, 1 + t]
    idx = nbr_ref[:, k]  # [BM] input rows through tap k, -1 = none
    ok = idx >= 0
    rows = jnp.where(ok, idx, 0)[:, None]
    cols = (c * block_k + jnp.arange(block_k, dtype=jnp.int32))[None, :]
    xk = pl_triton.load(x_ref.at[rows, cols], mask=ok[:, None], other=0)
    wk = w_ref[k, pl.ds(c * block_k, block_k), :]
    return acc + jnp.dot(xk, wk, precision=precision, preferred_element_type=jnp.float32)

  # Trip count = this block's number of valid taps (data-dependent) x channel blocks.
  trips = meta_ref[0, 0] * n_chan
  acc = jax.lax.fori_loop(0, trips, step, jnp.zeros((bm, bn), jnp.float32))
  dst = perm_ref[...]
  live = dst < n_rows  # sorted padding rows have no destination
  dst = jnp.where(live, dst, 0)[:, None]
  cols = jnp.arange(bn, dtype=jnp.int32)[None, :]
  pl_triton.store(o_ref.at[dst, cols], acc.astype(o_ref.dtype), mask=live[:, None])


def implicit_gemm(p, x, w, n_rows, cfg, *, interpret=False, precision=None):
  """out[r] = sum_k x[nbr[r, k]] @ w[k] over the valid taps, with the plan p of nbr.

  Args:
    p: Plan of the table nbr [n_rows, K] (block_m = cfg.block_m).
    x: [N_in, C_in]; w: [K, C_in, C_out]; n_rows: rows of the result (static).

  Returns:
    [n_rows, C_out] in x's dtype (float32 accumulation).
  """
  taps, c_in, c_out = w.shape
  bm = cfg.block_m
  bk, bn, ci_pad, co_pad = _channel_blocks(c_in, c_out, cfg)
  n_blocks = p.meta.shape[0]
  x = _pad_axis(x, 1, ci_pad)
  w = _pad_axis(_pad_axis(w.astype(x.dtype), 1, ci_pad), 2, co_pad)
  out = pl.pallas_call(
    functools.partial(_igemm_kernel, block_k=bk, n_rows=n_rows, precision=precision),
    grid=(co_pad // bn, n_blocks),
    in_specs=[
      pl.BlockSpec((1, META_WIDTH), lambda j, i: (i, 0)),
      pl.BlockSpec((bm,), lambda j, i: (i,)),
      pl.BlockSpec((bm, taps), lambda j, i: (i, 0)),
      pl.BlockSpec(x.shape, lambda j, i: (0, 0)),
      pl.BlockSpec((taps, ci_pad, bn), lambda j, i: (0, 0, j)),
    ],
    out_specs=pl.BlockSpec((n_rows, bn), lambda j, i: (0, j)),
    out_shape=jax.ShapeDtypeStruct((n_rows, co_pad), x.dtype),
    compiler_params=_compiler_params(cfg),
    interpret=interpret,
  )(p.meta, p.perm, p.nbr, x, w)
  return out[:, :c_out]


# ---------------------------------------------------------------------- dw --


def _wgrad_kernel(
  tb_ref, perm_ref, nbr_ref, x_ref, g_ref, o_ref, *, block_m, split, n_out, precision
):
  # Program (k * split + s, a, b): the s-th partial sum of dw[k] tile (a, b).
  # tb_ref: int32 [K, 1 + n_blocks] blocks per tap; perm_ref: int32 [n_pad];
  # nbr_ref: int32 [n_pad, K] sorted table; x_ref: [N_in, C_in];
  # g_ref: [N_out, BN] column block b of the cotangent; o_ref: [1, BK, BN].
  q = pl.program_id(0)
  k = jax.lax.div(q, split)  # q >= 0 (see _igemm_kernel on // and % in Triton)
  s = q - k * split
  a = pl.program_id(1)
  bk, bn = o_ref.shape[1:]
  n_used = tb_ref[k, 0]
  kcol = jnp.full((block_m,), k, jnp.int32)
  xcols = (a * bk + jnp.arange(bk, dtype=jnp.int32))[None, :]
  gcols = jnp.arange(bn, dtype=jnp.int32)[None, :]

  def step(t, acc):
    r = tb_ref[k, 1 + s + t * split]  # a row block holding tap k
    pos = r * block_m + jnp.arange(block_m, dtype=jnp.int32)
    idx = pl_triton.load(nbr_ref.at[pos, kcol])  # [BM] input rows, -1 none
    ok = idx >= 0
    rows = jnp.where(ok, idx, 0)[:, None]
    dst = pl_triton.load(perm_ref.at[pos])  # [BM] their output rows
    dst = jnp.where(ok & (dst < n_out), dst, 0)[:, None]
    xk = pl_triton.load(x_ref.at[rows, xcols], mask=ok[:, None], other=0)  # [BM, BK]
    # Rows without tap k read a zero cotangent too: a non-finite g on a row that
    # has no pair through k must not reach dw[k] (0 * inf = nan).
    gk = pl_triton.load(g_ref.at[dst, gcols], mask=ok[:, None], other=0)  # [BM, BN]
    return acc + jnp.dot(xk.T, gk, precision=precision, preferred_element_type=jnp.float32)

  trips = jnp.maximum(n_used - s + split - 1, 0) // split
  acc = jax.lax.fori_loop(0, trips, step, jnp.zeros((bk, bn), jnp.float32))
  o_ref[0] = acc


def weight_grad(p, x, g, cfg, *, interpret=False, precision=None):
  """dw[k] = sum_o x[nbr[o, k]].T @ g[o] over the plan p of nbr: float32 [K, C_in, C_out]."""
  taps = p.nbr.shape[1]
  c_in, c_out = x.shape[1], g.shape[1]
  n_out = g.shape[0]
  split = cfg.wgrad_split
  bk, bn, ci_pad, co_pad = _channel_blocks(c_in, c_out, cfg)
  x = _pad_axis(x, 1, ci_pad)
  g = _pad_axis(g.astype(x.dtype), 1, co_pad)
  kernel = functools.partial(
    _wgrad_kernel, block_m=cfg.block_m, split=split, n_out=n_out, precision=precision
  )
  dw = pl.pallas_call(
    kernel,
    grid=(taps * split, ci_pad // bk, co_pad // bn),
    in_specs=[
      pl.BlockSpec(p.tap_blocks.shape, lambda q, a, b: (0, 0)),
      pl.BlockSpec(p.perm.shape, lambda q, a, b: (0,)),
      pl.BlockSpec(p.nbr.shape, lambda q, a, b: (0, 0)),
      pl.BlockSpec(x.shape, lambda q, a, b: (0, 0)),
      pl.BlockSpec((n_out, bn), lambda q, a, b: (0, b)),
    ],
    out_specs=pl.BlockSpec((1, bk, bn), lambda q, a, b: (q, a, b)),
    out_shape=jax.ShapeDtypeStruct((taps * split, ci_pad, co_pad), jnp.float32),
    compiler_params=_compiler_params(cfg),
    interpret=interpret,
  )(p.tap_blocks, p.perm, p.nbr, x, g)
  # Partial sums in a fixed order (XLA reduction of a static axis): deterministic.
  dw = dw.reshape(taps, split, ci_pad, co_pad).sum(axis=1) if split > 1 else dw
  return dw[:, :c_in, :c_out]


# ---------------------------------------------------------------- custom_vjp --


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _conv(x, w, fwd_plan, bwd_plan, n_out, cfg, interpret, precision):
  return implicit_gemm(fwd_plan, x, w, n_out, cfg, interpret=interpret, precision=precision)


def _conv_fwd(x, w, fwd_plan, bwd_plan, n_out, cfg, interpret, precision):
  out = _conv(x, w, fwd_plan, bwd_plan, n_out, cfg, interpret, precision)
  return out, (x, w, fwd_plan, bwd_plan)


def _conv_bwd(n_out, cfg, interpret, precision, res, g):
  x, w, fwd_plan, bwd_plan = res
  g = g.astype(x.dtype)
  # Input i receives g[nbr_t[i, k]] @ w[k].T through tap k.
  dx = implicit_gemm(
    bwd_plan,
    g,
    jnp.swapaxes(w, 1, 2),
    x.shape[0],
    cfg,
    interpret=interpret,
    precision=precision,
  )
  dw = weight_grad(fwd_plan, x, g, cfg, interpret=interpret, precision=precision)
  zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, jax.dtypes.float0), (fwd_plan, bwd_plan))
  return (dx, dw.astype(w.dtype)) + zeros


_conv.defvjp(_conv_fwd, _conv_bwd)


def _on_gpu():
  return jax.default_backend() == "gpu"


def _resolve_precision(precision):
  """None -> the precision jax.default_matmul_precision names (TF32 when unset)."""
  if precision is not None:
    return jax.lax.Precision(precision)
  name = jax.config.jax_default_matmul_precision
  if name in ("highest", "float32"):
    return jax.lax.Precision.HIGHEST
  if name in ("high", "bfloat16_3x", "tensorfloat32"):
    return jax.lax.Precision.HIGH
  return jax.lax.Precision.DEFAULT


def conv_pallas_gpu_igemm(
  feats, weight, rulebook, config=DEFAULT_CONFIG, *, interpret=False, precision=None
):
  """Sparse convolution with the masked implicit-GEMM Triton kernels.

  The api's `sparse_conv(..., implementation="pallas_gpu_igemm")` calls this with
  its config, interpret and canonical precision, as for every Pallas kernel.

  Args:
    feats: [V, S_in, C_in]; weight: [K, C_in, C_out]; rulebook: a Rulebook
      (fields nbr [V, S_out, K], nbr_t [V, S_in, K]).
    config: IgemmConfig (None = DEFAULT_CONFIG).
    interpret: run the kernels in Pallas interpret mode (any backend). Without
      it a backend other than a GPU raises ValueError, as the api does for
      every Pallas kernel off its backend: no silent fallback.
    precision: jax.lax.Precision of the float32 dots: DEFAULT = TF32 tensor
      cores (XLA's default on the same card), HIGHEST = IEEE float32. None
      follows jax.default_matmul_precision (unset = DEFAULT).

  Returns:
    [V, S_out, C_out] in the promoted dtype of feats and weight; rows of
    inactive output sites are zero.
  """
  if not interpret and not _on_gpu():
    raise ValueError(
      f"sparse-conv implementation 'pallas_gpu_igemm' runs on ['gpu'], not on this "
      f"{jax.default_backend()!r} backend; pass interpret=True to run it in Pallas interpret mode"
    )
  cfg = DEFAULT_CONFIG if config is None else config
  if not isinstance(cfg, IgemmConfig):
    raise TypeError(f"config must be an IgemmConfig, got {type(cfg).__name__}")
  v, s_in, c_in = feats.shape
  s_out = rulebook.nbr.shape[1]
  dtype = jnp.result_type(feats, weight)
  nbr = pairs.flat_table(rulebook.nbr, s_in)
  nbr_t = pairs.flat_table(rulebook.nbr_t, s_out)
  # Plans are built once per call, outside the kernels; under jit the forward's
  # unused dx plan is dead code.
  fwd_plan = plan(nbr, cfg.block_m)
  bwd_plan = plan(nbr_t, cfg.block_m)
  out = _conv(
    feats.reshape(v * s_in, c_in).astype(dtype),
    weight.astype(dtype),
    fwd_plan,
    bwd_plan,
    v * s_out,
    cfg,
    bool(interpret),
    _resolve_precision(precision),
  )
  return out.reshape(v, s_out, weight.shape[-1])
