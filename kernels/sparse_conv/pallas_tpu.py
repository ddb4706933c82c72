"""`pallas_tpu`: gather-GEMM Pallas kernel for TPUs (Mosaic TPU lowering).

Mosaic TPU has no in-kernel vector gather, so rows are gathered by DMA: each
program receives only its own [BM, K] block of the neighbour table in SMEM (a
blocked SMEM input, pipelined by Pallas like any block), the features stay in
HBM (`memory_space=ANY`), and the program issues one row DMA per (output row,
tap) into a VMEM buffer, then multiplies the buffer tap by tap on the MXU.

One program per (block of BM output rows i, block of BN output channels j):

  nbr_blk = nbr[i*BM : (i+1)*BM, :]         # this block's table rows, SMEM
  for k, r in taps x rows:                  # K * BM row DMAs, one semaphore
    src = nbr_blk[r, k]
    buf[k, r, :] <- x[src if src >= 0 else ZERO_ROW, :]   # HBM -> VMEM
  wait for all K * BM copies
  out[i-block, j-block] = sum_k buf[k] @ w[k, :, j-block]   # f32 accumulation

x gets one extra all-zero row (ZERO_ROW = N_in) that absent taps read, so every
buffer row is written before use. The rows are gathered again for every
output-channel block j (BN = C_out by default keeps that to one gather).

Memory (`memory_bytes` computes it from the same specs the kernel runs with):
- SMEM: two buffers of one [BM, K] int32 table block, whatever the table
  size: 2 x 128 x 128 x 4 = 128 KiB at the default BM = 128 if Mosaic pads
  it to (8, 128) tiles as it does vector memory (9 KiB unpadded). (A flat
  [BM * K] block would need no padding, but Mosaic takes rank-1 blocks only in
  multiples of 1024 entries or powers of two.) The table was scalar-prefetched
  whole before (N_out x K x 4 bytes: 3.6 MB at slide100k), more than the 1 MiB
  of SMEM per TensorCore of v4-v7 (16 KiB on v2/v3), per jax's own TPU table,
  jax/_src/pallas/mosaic/tpu_info.py (`smem_capacity_bytes`).
- VMEM: the gather buffer K x BM x C_in, two buffers of the weight block
  K x C_in x BN and two of the output block BM x BN. At C_in = C_out = 512 in
  float32 that is ~21 MB with BN = C_out: inside v5e/v6e's 128 MiB and v5p's
  64 MiB (the kernel raises Mosaic's scoped VMEM limit to what it needs), but
  v4's 16 MiB needs block_n <= 128 there.

Backward (custom_vjp): dx = the same kernel with the mirrored table nbr_t, the
cotangent and w[k].T (a gather, no scatter-add: deterministic); dw[k] =
sum_o x[nbr[o, k]].T g[o] via XLA (gather + einsum, also deterministic).
"""

from __future__ import annotations

import dataclasses
import functools
import math

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
  # nbr_smem: int32 [BM, K], this row block's rows of the table (SMEM block);
  # x_hbm: [N_in + 1, C_in] in HBM; w_ref: [K, C_in, BN]; o_ref: [BM,
  # BN]; buf: VMEM [K, BM, C_in]; sem: DMA [1].
  bm = o_ref.shape[0]

  def copy(k, r):
    src = nbr_smem[r, k]  # local row r: the block holds table rows i*BM .. i*BM + BM - 1
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


def call_specs(n_out, taps, n_in, c_in, c_out, dtype, config=PallasTpuConfig()) -> dict:
  """The pallas_call layout of gather_gemm: grid, block specs, scratch, output.

  Args:
    n_out: output rows; taps: K; n_in: input rows; c_in, c_out: channels;
    dtype: of x and w;
    config: block sizes.

  Returns:
    {"grid", "in_specs" (table, x, w), "out_specs", "scratch_shapes",
    "out_shape", "operands" (ShapeDtypeStructs of the padded operands)}.
  """
  block_m = config.block_m
  block_n = c_out if config.block_n is None else min(config.block_n, c_out)
  if c_out % block_n:
    raise ValueError(f"block_n={block_n} must divide the {c_out} output channels")
  n_pad = _round_up(n_out, block_m)
  return {
    "grid": (n_pad // block_m, c_out // block_n),
    "in_specs": [
      # The table in blocks of BM rows in SMEM: SMEM holds one block per
      # pipeline buffer, never the whole table.
      pl.BlockSpec((block_m, taps), lambda i, j: (i, 0), memory_space=pltpu.SMEM),
      pl.BlockSpec(memory_space=pl.ANY),  # x stays in HBM; rows arrive by DMA
      pl.BlockSpec((taps, c_in, block_n), lambda i, j: (0, 0, j)),
    ],
    "out_specs": pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
    "scratch_shapes": [pltpu.VMEM((taps, block_m, c_in), dtype), pltpu.SemaphoreType.DMA((1,))],
    "out_shape": jax.ShapeDtypeStruct((n_pad, c_out), dtype),
    "operands": [
      jax.ShapeDtypeStruct((n_pad, taps), jnp.int32),
      jax.ShapeDtypeStruct((n_in + 1, c_in), dtype),  # + the zero row; in HBM
      jax.ShapeDtypeStruct((taps, c_in, c_out), dtype),
    ],
  }


def memory_bytes(specs: dict) -> dict:
  """{"smem", "vmem"}: on-chip bytes a pallas_call with these specs asks for.

  Blocked operands count two pipeline buffers each (Pallas double-buffers
  every BlockSpec), scratch once, HBM (`ANY`) operands nothing; arrays of rank
  >= 2 are counted padded to (8, 128) tiles (an upper bound of Mosaic's
  layouts for 32-bit data).
  """
  mem = {"smem": 0, "vmem": 0}
  specs_and_shapes = list(zip(specs["in_specs"], specs["operands"]))
  specs_and_shapes.append((specs["out_specs"], specs["out_shape"]))
  for spec, sds in specs_and_shapes:
    space = spec.memory_space
    if space == pl.ANY:
      continue
    n = 2 * _padded_bytes(spec.block_shape, sds.dtype)
    mem["smem" if space == pltpu.SMEM else "vmem"] += n
  for scratch in specs["scratch_shapes"]:
    space = getattr(scratch, "memory_space", None)
    if space in (pltpu.SMEM, pltpu.VMEM):
      n = _padded_bytes(scratch.inner_aval.shape, scratch.inner_aval.dtype)
      mem["smem" if space == pltpu.SMEM else "vmem"] += n
  return mem


def _padded_bytes(shape, dtype):
  """Bytes of an array with its last two dimensions padded to (8, 128) tiles."""
  shape = list(shape)
  if len(shape) >= 2:
    shape[-1] = _round_up(shape[-1], 128)
    shape[-2] = _round_up(shape[-2], 8)
  return math.prod(shape) * jnp.dtype(dtype).itemsize


# Mosaic's default scoped VMEM limit is below what C = 512 blocks need; ask for
# the computed need plus room for Mosaic's own temporaries (the dot's result).
_VMEM_HEADROOM = 4 << 20


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
  n_out, taps = nbr.shape
  n_in, c_in = x.shape
  c_out = w.shape[2]
  specs = call_specs(n_out, taps, n_in, c_in, c_out, x.dtype, config)
  n_pad = specs["out_shape"].shape[0]
  nbr = jnp.pad(nbr, ((0, n_pad - n_out), (0, 0)), constant_values=-1)
  x = jnp.concatenate([x, jnp.zeros((1, c_in), x.dtype)])  # row n_in: the zero row
  vmem = memory_bytes(specs)["vmem"] + _VMEM_HEADROOM
  out = pl.pallas_call(
    functools.partial(_kernel, taps=taps, zero_row=n_in, precision=precision),
    grid=specs["grid"],
    in_specs=specs["in_specs"],
    out_specs=specs["out_specs"],
    scratch_shapes=specs["scratch_shapes"],
    out_shape=specs["out_shape"],
    compiler_params=pltpu.CompilerParams(vmem_limit_bytes=vmem),
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
