"""`pallas_tpu` fits a TPU's on-chip memory at any table size: budgets read off its pallas_call.

The tests record the arguments the kernel passes to `pl.pallas_call` (its block
specs, scratch shapes, scalar-prefetch operands and compiler parameters) while
the forward and backward of every convolution of a bench shape are traced
(jax.eval_shape: no table is built, no kernel runs), and count the on-chip
memory they ask for with a counter of their own:

- SMEM: scalar-prefetch operands whole, every SMEM block twice (Pallas
  double-buffers blocks), SMEM scratch once; arrays of rank >= 2 padded to
  (8, 128) tiles, an upper bound of Mosaic's layouts for 32-bit data.
- The budget is 1 MiB: SMEM per TensorCore on TPU v4, v5e, v5p, v6e and v7
  (16 KiB on v2/v3), per the `smem_capacity_bytes` entries of JAX's own table
  of TPU generations, jax/_src/pallas/mosaic/tpu_info.py
  (https://github.com/jax-ml/jax/blob/main/jax/_src/pallas/mosaic/tpu_info.py,
  as shipped in jax 0.10.2); the Pallas TPU guide describes SMEM as the
  TensorCore's small scalar memory that scalar-prefetch operands are loaded
  into (https://docs.jax.dev/en/latest/pallas/tpu/sparse.html).
- VMEM: the scoped limit the kernel asks Mosaic for stays within 64 MiB, the
  smallest VMEM of v5e/v5p/v6e in the same table (v4 has 16 MiB: docs/kernels.md
  says which blocks fit there).

A kernel that would overflow fails here, not on the pod.
"""

import math

import jax
import jax.numpy as jnp
import pytest
from gigassl_jax.kernels.sparse_conv import pallas_tpu
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from test_kernels import bench_convs

SMEM_BUDGET = 1 << 20  # 1 MiB per TensorCore, v4-v7 (module docstring)
VMEM_BUDGET = 64 << 20  # v5p's 64 MiB, the smallest VMEM of v5e/v5p/v6e


def _padded(shape, dtype):
  shape = list(shape)
  if len(shape) >= 2:
    shape[-1] = -(-shape[-1] // 128) * 128
    shape[-2] = -(-shape[-2] // 8) * 8
  return math.prod(shape) * jnp.dtype(dtype).itemsize


def smem_bytes(kw, operands):
  """SMEM a pallas_call asks for, from its keyword arguments and operand shapes."""
  gs = kw.get("grid_spec")
  if gs is not None:
    n_sp = getattr(gs, "num_scalar_prefetch", 0)
    in_specs, out_specs, scratch = gs.in_specs, gs.out_specs, gs.scratch_shapes
  else:
    n_sp = 0
    in_specs, out_specs = kw.get("in_specs", ()), kw.get("out_specs")
    scratch = kw.get("scratch_shapes", ())
  total = sum(math.prod(o.shape) * jnp.dtype(o.dtype).itemsize for o in operands[:n_sp])
  blocked = list(zip(in_specs, operands[n_sp:])) + [(out_specs, kw["out_shape"])]
  for spec, arr in blocked:
    if getattr(spec, "memory_space", None) == pltpu.SMEM:
      shape = arr.shape if spec.block_shape is None else spec.block_shape
      total += 2 * _padded(shape, arr.dtype)
  for s in scratch:
    if getattr(s, "memory_space", None) == pltpu.SMEM:
      total += _padded(s.inner_aval.shape, s.inner_aval.dtype)
  return total


@pytest.fixture
def recorded(monkeypatch):
  """[(pallas_call kwargs, operand ShapeDtypeStructs)] of every call the kernel makes."""
  calls = []
  real = pl.pallas_call

  def spy(kernel, **kw):
    f = real(kernel, **kw)

    def call(*ops):
      calls.append((kw, [jax.ShapeDtypeStruct(o.shape, o.dtype) for o in ops]))
      return f(*ops)

    return call

  monkeypatch.setattr(pallas_tpu.pl, "pallas_call", spy)
  return calls


def _fwd_bwd(rb, c_in, c_out, dtype):
  """Traces forward, d/dx and d/dw of pallas_tpu on rule book shapes `rb` (no kernel runs)."""
  x = jax.ShapeDtypeStruct(rb.in_mask.shape + (c_in,), dtype)
  w = jax.ShapeDtypeStruct((9, c_in, c_out), dtype)
  ct = jax.ShapeDtypeStruct(rb.out_mask.shape + (c_out,), dtype)

  def f(x, w, rb, ct):
    _, vjp = jax.vjp(lambda a, b: pallas_tpu.conv_pallas_tpu(a, b, rb), x, w)
    return vjp(ct)

  return f, (x, w, rb, ct)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["train", "slide100k"])
def test_smem_and_vmem_fit_at_bench_shapes(name, dtype, recorded):
  """Forward and dx kernels of every conv of the shape stay inside SMEM and VMEM budgets."""
  for label, rb, c_in, c_out in bench_convs(name):
    recorded.clear()
    f, args = _fwd_bwd(rb, c_in, c_out, jnp.dtype(dtype))
    jax.eval_shape(f, *args)
    assert len(recorded) == 2, f"{name} {label}: {len(recorded)} pallas_calls (want fwd + dx)"
    n_rows = math.prod(rb.out_mask.shape)
    for kw, ops in recorded:
      smem = smem_bytes(kw, ops)
      what = f"{name} {label} {dtype}: table of {n_rows} rows"
      assert 0 < smem <= SMEM_BUDGET, f"{what}: SMEM {smem} bytes > {SMEM_BUDGET}"
      vmem = kw["compiler_params"].vmem_limit_bytes
      assert vmem <= VMEM_BUDGET, f"{what}: scoped VMEM {vmem} bytes > {VMEM_BUDGET}"
      # The limit covers what the blocks need (the kernel's own count).
      specs = {"in_specs": kw["in_specs"], "out_specs": kw["out_specs"]}
      specs.update(scratch_shapes=kw["scratch_shapes"], out_shape=kw["out_shape"], operands=ops)
      assert vmem >= pallas_tpu.memory_bytes(specs)["vmem"], what


def test_budget_counter_flags_a_whole_table_in_smem():
  """The counter is not vacuous: the old layout (whole table scalar-prefetched) fails at slide100k."""
  (_, rb, _, _), *_ = bench_convs("slide100k")
  table = jax.ShapeDtypeStruct((math.prod(rb.nbr.shape),), jnp.int32)  # N_out x 9, flat
  gs = pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=1,
    grid=(1,),
    in_specs=[],
    out_specs=pl.BlockSpec((8, 128), lambda i, nbr: (i, 0)),
  )
  out = jax.ShapeDtypeStruct((8, 128), jnp.float32)
  assert smem_bytes({"grid_spec": gs, "out_shape": out}, [table]) > SMEM_BUDGET
  # And the new layout's table block does not grow with the table.
  kw = {
    "in_specs": [pl.BlockSpec((128, 9), lambda i: (i, 0), memory_space=pltpu.SMEM)],
    "out_shape": out,
  }
  for n in (1024, 10**6):
    assert smem_bytes(kw, [jax.ShapeDtypeStruct((n, 9), jnp.int32)]) == 2 * 128 * 128 * 4


@pytest.mark.parametrize("name", ["train", "slide100k"])
def test_tpu_lowering_at_bench_shapes(name):
  """Forward and backward lower to Mosaic TPU kernels at the training and slide100k shapes."""
  for label, rb, c_in, c_out in bench_convs(name):
    f, args = _fwd_bwd(rb, c_in, c_out, jnp.float32)
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") >= 2, f"{name} {label}: no Mosaic kernels for fwd + dx"
