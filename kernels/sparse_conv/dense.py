"""`dense` implementation, the oracle: scatter to a dense grid + lax.conv.

Independent of the neighbour tables (it only uses the site coordinates), so it
checks the tables as well as the arithmetic. Memory grows with the grid area:
for tests and small maps only.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from gigassl_jax.kernels.sparse_conv.rulebook import is_concrete


@dataclasses.dataclass(frozen=True)
class DenseConfig:
  """extent: static grid size per axis (> every input coordinate); None = computed
  from the coordinates, which must then be concrete (not traced)."""

  extent: int | None = None


def _extent(rulebook):
  if not is_concrete(rulebook.in_coords, rulebook.in_mask):
    raise ValueError(
      "the dense implementation needs a static grid size under jit: pass DenseConfig(extent=...)"
    )
  c = np.asarray(rulebook.in_coords)[np.asarray(rulebook.in_mask)]
  return int(c.max(initial=0)) + 1


def scatter_dense(feats, coords, mask, extent):
  """[V, S, C] sparse -> [V, extent, extent, C] dense (zeros where inactive)."""
  v, s, c = feats.shape
  grid = jnp.zeros((v, extent, extent, c), feats.dtype)
  vi = jnp.broadcast_to(jnp.arange(v)[:, None], (v, s))
  x = jnp.where(mask, coords[..., 0], extent)  # out of range -> dropped
  y = jnp.where(mask, coords[..., 1], extent)
  return grid.at[vi, x, y].set(feats, mode="drop")


def conv_dense(feats, weight, rulebook, config=DenseConfig(), *, precision=None):
  """Sparse convolution through a dense grid.

  Args:
    feats: [V, S_in, C_in]; weight: [K, C_in, C_out]; rulebook: rulebook.Rulebook.
    config: DenseConfig (the grid extent).
    precision: of the convolution; None = HIGHEST (this is the oracle).

  Returns:
    [V, S_out, C_out], zero on inactive output rows.
  """
  extent = _extent(rulebook) if config.extent is None else config.extent
  ks = rulebook.ksize
  dense = scatter_dense(feats, rulebook.in_coords, rulebook.in_mask, extent)
  kernel = weight.reshape(ks, ks, weight.shape[1], weight.shape[2])  # [d0, d1, Cin, Cout]
  if rulebook.stride == 1:
    pad = [(ks // 2, ks // 2)] * 2
  else:
    # Unpadded conv; pad the high side so every window holding an active input
    # exists (windows past the reference's spatial size are simply not read).
    pad = [(0, ks - 1)] * 2
  out = jax.lax.conv_general_dilated(
    dense,
    kernel.astype(dense.dtype),
    (rulebook.stride,) * 2,
    pad,
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    precision=jax.lax.Precision.HIGHEST if precision is None else precision,
  )
  v, s_out = rulebook.out_mask.shape
  vi = jnp.broadcast_to(jnp.arange(v)[:, None], (v, s_out))
  rows = out[
    vi,
    rulebook.out_coords[..., 0].clip(0, out.shape[1] - 1),
    rulebook.out_coords[..., 1].clip(0, out.shape[2] - 1),
  ]
  return jnp.where(rulebook.out_mask[..., None], rows, 0)
