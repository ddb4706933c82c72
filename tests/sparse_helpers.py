"""Random sparse maps and an independent dense oracle for the sparse-core tests.

The oracle scatters sites into a dense grid and runs lax.conv_general_dilated
(written here, independently of kernels/sparse_conv/dense.py).
"""

import jax
import jax.numpy as jnp
import numpy as np

from gigassl_jax.sparse import maps


def random_grid_views(
  rng, n_views, n_tiles, extent, *, dense_patch=False, dup_frac=0.3, invalid_frac=0.0
):
  """Random tile grid coordinates with duplicates, isolated sites and dense patches.

  Returns grid int32 [V, T, 2], valid bool [V, T].
  """
  g = rng.integers(0, extent, size=(n_views, n_tiles, 2))
  if dense_patch:
    # First view: a fully dense square patch (every site has all 8 neighbours).
    side = int(np.sqrt(n_tiles))
    yy, xx = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    patch = np.stack([xx.ravel(), yy.ravel()], -1) + 1
    g[0, : len(patch)] = patch
  # Duplicates: copy some tiles onto others' cells.
  n_dup = int(dup_frac * n_tiles)
  for v in range(n_views):
    src = rng.integers(0, n_tiles, n_dup)
    dst = rng.integers(0, n_tiles, n_dup)
    if dense_patch and v == 0:
      continue
    g[v, dst] = g[v, src]
  valid = rng.random((n_views, n_tiles)) >= invalid_frac
  valid[:, 0] = True
  return g.astype(np.int32), valid


def random_map(rng, n_views=3, n_tiles=40, extent=12, channels=8, **kw):
  g, valid = random_grid_views(rng, n_views, n_tiles, extent, **kw)
  feats = rng.standard_normal((n_views, n_tiles, channels)).astype(np.float32)
  return maps.from_grid(g, feats, valid)


def to_dense(feats, coords, mask, extent):
  """[V, S, C] -> [V, extent, extent, C] by plain numpy-style indexing."""
  v, s, c = feats.shape
  dense = jnp.zeros((v, extent, extent, c), feats.dtype)
  vi, si = np.nonzero(np.asarray(mask))
  cc = np.asarray(coords)[vi, si]
  return dense.at[vi, cc[:, 0], cc[:, 1]].set(feats[vi, si])


def from_dense(dense, coords, mask):
  vi, si = np.nonzero(np.asarray(mask))
  cc = np.asarray(coords)[vi, si]
  out = jnp.zeros(mask.shape + (dense.shape[-1],), dense.dtype)
  return out.at[vi, si].set(dense[vi, cc[:, 0], cc[:, 1]])


def oracle_conv(feats, weight, coords, mask, out_coords, out_mask, extent, stride, ksize):
  """Dense-grid convolution restricted to the sparse output sites."""
  dense = to_dense(feats, coords, mask, extent)
  kernel = weight.reshape(ksize, ksize, weight.shape[1], weight.shape[2])
  pad = [(ksize // 2, ksize // 2)] * 2 if stride == 1 else [(0, ksize - 1)] * 2
  out = jax.lax.conv_general_dilated(
    dense,
    kernel,
    (stride, stride),
    pad,
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    precision=jax.lax.Precision.HIGHEST,
  )
  return from_dense(out, out_coords, out_mask)


def oracle_strided_sites(coords, mask, extent, spatial_size=None):
  """Output sites of the unpadded 3x3/2 conv by brute force over every window."""
  res = []
  for v in range(coords.shape[0]):
    pts = {tuple(p) for p, m in zip(np.asarray(coords[v]).tolist(), np.asarray(mask[v])) if m}
    lim = (
      [(extent + 1) // 2 + 1] * 2 if spatial_size is None else [(s - 1) // 2 for s in spatial_size]
    )
    out = []
    for j0 in range(lim[0]):
      for j1 in range(lim[1]):
        if any((2 * j0 + a, 2 * j1 + b) in pts for a in range(3) for b in range(3)):
          out.append((j0, j1))
    res.append(sorted(out))
  return res
