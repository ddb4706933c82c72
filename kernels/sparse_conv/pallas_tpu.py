"""`pallas_tpu`: gather-GEMM Pallas kernel for TPUs (Mosaic TPU lowering).

Mosaic TPU has no in-kernel vector gather, so rows are gathered by DMA: the
flat neighbour table is scalar-prefetched into SMEM, the features stay in HBM
(`memory_space=ANY`), and each program issues one row DMA per (output row, tap)
into a VMEM buffer, then multiplies the buffer tap by tap on the MXU.

One program per (block of BM output rows i, block of BN output channels j):

  for k, r in taps x rows:                  # K * BM row DMAs, one semaphore
    src = nbr[(i*BM + r) * K + k]           # flat table in SMEM
    buf[k, r, :] <- x[src if src >= 0 else ZERO_ROW, :]   # HBM -> VMEM
  wait for all K * BM copies
  out[i-block, j-block] = sum_k buf[k] @ w[k, :, j-block]   # f32 accumulation

x gets one extra all-zero row (ZERO_ROW = N_in) that absent taps read, so every
buffer row is written before use. The rows are gathered again for every
output-channel block j (BN = C_out by default keeps that to one gather).

Backward (custom_vjp): dx = the same kernel with the mirrored table nbr_t, the
cotangent and w[k].T (a gather, no scatter-add: deterministic); dw[k] =
sum_o x[nbr[o, k]].T g[o] via XLA (gather + einsum, also deterministic).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from gigassl_jax.kernels.sparse_conv import flat_conv, gather
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


@dataclasses.dataclass(frozen=True)
class PallasTpuConfig:
  """block_m: output rows per program (a multiple of 8; 16 for bfloat16);
  block_n: output channels per program (None = all; must divide C_out)."""

  block_m: int = 128
  block_n: int | None = None

  def __post_init__(self):
    if self.block_m < 8 or self.block_m % 8:
      raise ValueError(f"block_m must be a multiple of 8, got {self.block_m}")


def _round_up(n, m):
  return -(-n // m) * m


def _kernel(nbr_smem, x_hbm, w_ref, o_ref, buf, sem, *, taps, zero_row, precision):
  # nbr_smem: int32 [N_pad * K] (scalar prefetch); x_hbm: [N_in + 1, C_in] in HBM;
  # w_ref: [K, C_in, BN]; o_ref: [BM, BN]; buf: VMEM [K, BM, C_in]; sem: DMA [1].
  i = pl.program_id(0)
  bm = o_ref.shape[0]

  def copy(k, r):
    src = nbr_smem[(i * bm + r) * taps + k]
    row = jnp.where(src >= 0, src, zero_row)
    return pltpu.make_async_copy(x_hbm.at[pl.ds(row, 1)], buf.at[k, pl.ds(r, 1)], sem.at[0])

  for k in range(taps):  # static: K is 9

    def start(r, c, k=k):
      copy(k, r).start()
      return c

    jax.lax.fori_loop(0, bm, start, 0)
  for k in range(taps):

    def wait(r, c, k=k):
      copy(k, r).wait()
      return c

    jax.lax.fori_loop(0, bm, wait, 0)
  acc = jnp.zeros(o_ref.shape, jnp.float32)
  for k in range(taps):
    acc += jnp.dot(buf[k], w_ref[k], precision=precision, preferred_element_type=jnp.float32)
  o_ref[...] = acc.astype(o_ref.dtype)


def gather_gemm(nbr, x, w, config=PallasTpuConfig(), *, interpret=False, precision=None):
  """out[o] = sum_k x[nbr[o, k]] @ w[k] with DMA row gathers.

  Args:
    nbr: int32 [N_out, K] flat input rows (-1 none); x: [N_in, C_in];
    w: [K, C_in, C_out]; config: block_m rows and block_n output channels per
    program (None = all); interpret: Pallas interpret mode; precision: of the
    MXU dots (Mosaic: HIGHEST = fp32 contraction).

  Returns:
    [N_out, C_out] in x's dtype.
  """
  block_m, block_n = config.block_m, config.block_n
  n_out, taps = nbr.shape
  n_in, c_in = x.shape
  c_out = w.shape[2]
  block_n = c_out if block_n is None else min(block_n, c_out)
  if c_out % block_n:
    raise ValueError(f"block_n={block_n} must divide the {c_out} output channels")
  n_pad = _round_up(n_out, block_m)
  nbr = jnp.pad(nbr, ((0, n_pad - n_out), (0, 0)), constant_values=-1).reshape(-1)
  x = jnp.concatenate([x, jnp.zeros((1, c_in), x.dtype)])  # row n_in: the zero row
  grid_spec = pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=1,
    grid=(n_pad // block_m, c_out // block_n),
    in_specs=[
      pl.BlockSpec(memory_space=pl.ANY),
      pl.BlockSpec((taps, c_in, block_n), lambda i, j, nbr: (0, 0, j)),
    ],
    out_specs=pl.BlockSpec((block_m, block_n), lambda i, j, nbr: (i, j)),
    scratch_shapes=[pltpu.VMEM((taps, block_m, c_in), x.dtype), pltpu.SemaphoreType.DMA((1,))],
  )
  out = pl.pallas_call(
    functools.partial(_kernel, taps=taps, zero_row=n_in, precision=precision),
    grid_spec=grid_spec,
    out_shape=jax.ShapeDtypeStruct((n_pad, c_out), x.dtype),
    interpret=interpret,
  )(nbr, x, w.astype(x.dtype))
  return out[:n_out]


def _backward(config, interpret, precision, res, g):
  x, w, nbr, nbr_t = res
  dx_config = dataclasses.replace(config, block_n=None)  # dx has C_in columns
  dx = gather_gemm(
    nbr_t,
    g.astype(x.dtype),
    jnp.swapaxes(w, 1, 2),
    dx_config,
    interpret=interpret,
    precision=precision,
  )
  # dw[k] = sum_o x[nbr[o, k]].T @ g[o]; gather_taps' rows are x[nbr[o, k]].
  xt = gather.gather_taps(x[None], nbr[None], jnp.full((1, x.shape[0], 1), -1, jnp.int32))[0]
  dw = jnp.einsum(
    "okc,od->kcd", xt, g.astype(x.dtype), precision=precision, preferred_element_type=jnp.float32
  )
  return dx, dw


_conv = flat_conv.custom_vjp_conv(gather_gemm, _backward)


def conv_pallas_tpu(
  feats, weight, rulebook, config=PallasTpuConfig(), *, interpret=False, precision=None
):
  """Sparse convolution with the DMA-gather Pallas TPU kernel.

  Args:
    feats: [V, S_in, C_in]; weight: [K, C_in, C_out]; rulebook: rulebook.Rulebook.
    config: PallasTpuConfig (block sizes).
    interpret: Pallas interpret mode (any backend; the api refuses this kernel
      off a TPU unless it is asked for).
    precision: of the dots (None = Mosaic's default).

  Returns:
    [V, S_out, C_out].
  """
  return flat_conv.apply(_conv, feats, weight, rulebook, config, interpret, precision)
