"""Sparse 2-D maps as padded coordinate lists, and building them from tiles.

A batch of V views, each with at most S active sites (a static capacity, so every
shape is fixed under jit):

  coords  int32 [V, S, 2]  grid coordinates (c0, c1) = (x, y), SparseConvNet order
  feats   float [V, S, C]  features of the active sites (zero on padding rows)
  mask    bool  [V, S]     True for the active sites

Invariant kept by every builder in this package: the active sites of a view come
first, in lexicographic (c0, c1) order, with no duplicates; padding rows have
coords 0 and features 0. Sorting makes outputs comparable row by row with the
SparseConvNet golden vectors (which are sorted the same way).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from gigassl_jax.kernels.sparse_conv.rulebook import is_concrete

# Grid coordinates must lie in [0, COORD_LIMIT) per axis: site keys are packed
# as c0 * COORD_LIMIT + c1 in int32 (< 2**30), which leaves room for the +-1
# neighbour offsets without overflow.
COORD_BITS = 15
COORD_LIMIT = 1 << COORD_BITS
# Key of a padding row: larger than any real key, so padding sorts last.
PAD_KEY = np.int32(np.iinfo(np.int32).max)


@struct.dataclass
class SparseMap:
  """A batch of sparse 2-D maps (see the module docstring for the layout)."""

  coords: jax.Array  # int32 [V, S, 2]
  feats: jax.Array  # [V, S, C]
  mask: jax.Array  # bool [V, S]

  @property
  def num_views(self) -> int:
    return self.coords.shape[0]

  @property
  def capacity(self) -> int:
    return self.coords.shape[1]

  @property
  def channels(self) -> int:
    return self.feats.shape[-1]

  def num_sites(self) -> jax.Array:
    """int32 [V]: active sites per view."""
    return jnp.sum(self.mask, axis=1, dtype=jnp.int32)


def pack_keys(coords: jax.Array, valid: jax.Array) -> jax.Array:
  """int32 [..., 2] coords -> int32 [...] keys c0 * COORD_LIMIT + c1; PAD_KEY where invalid."""
  key = coords[..., 0] * COORD_LIMIT + coords[..., 1]
  return jnp.where(valid, key, PAD_KEY)


def unpack_keys(keys: jax.Array) -> jax.Array:
  """Inverse of pack_keys for real keys: int32 [...] -> int32 [..., 2]."""
  return jnp.stack([keys // COORD_LIMIT, keys % COORD_LIMIT], axis=-1)


def unique_sites(keys: jax.Array, capacity: int):
  """Sorted unique keys of one view, compacted to a static capacity.

  Args:
    keys: int32 [N] candidate site keys, PAD_KEY for none.
    capacity: static number of output rows (>= the number of distinct keys).

  Returns:
    site_keys: int32 [capacity] sorted distinct keys, PAD_KEY after the last.
    seg: int32 [N] row of each candidate's site (capacity for PAD_KEY
      candidates, so segment ops with num_segments=capacity drop them).
  """
  order = jnp.argsort(keys, stable=True)
  skeys = keys[order]
  real = skeys != PAD_KEY
  first = real & jnp.concatenate([jnp.ones((1,), bool), skeys[1:] != skeys[:-1]])
  seg_sorted = jnp.cumsum(first, dtype=jnp.int32) - 1
  seg_sorted = jnp.where(real, seg_sorted, capacity)
  seg = jnp.zeros_like(seg_sorted).at[order].set(seg_sorted)
  site_keys = jnp.full((capacity,), PAD_KEY, jnp.int32)
  site_keys = site_keys.at[seg_sorted].set(skeys, mode="drop")
  return site_keys, seg


@functools.partial(jax.jit, static_argnames=("cell",))
def quantize(xy: jax.Array, valid: jax.Array, cell: int) -> jax.Array:
  """Level-0 tile positions -> grid coordinates, relative to each view's minimum.

  floor((xy - min xy) / cell) in exact integer arithmetic (the reference does it
  in float32, which is wrong for ~0.05 % of pairs), with the minimum taken per
  view and per axis over the valid tiles only.

  Args:
    xy: int [V, T, 2] level-0 (x, y) positions.
    valid: bool [V, T].
    cell: level-0 pixels per grid cell (224 in Giga-SSL).

  Returns:
    int32 [V, T, 2] grid coordinates (0 where invalid).
  """
  xy = xy.astype(jnp.int32)
  big = jnp.iinfo(jnp.int32).max
  mn = jnp.min(jnp.where(valid[..., None], xy, big), axis=1, keepdims=True)
  g = jnp.floor_divide(xy - mn, cell)
  return jnp.where(valid[..., None], g, 0)


def _check_views(xy, feats, valid, cell):
  if np.ndim(xy) != 3 or np.shape(xy)[-1] != 2:
    raise ValueError(f"tile coordinates must be [V, T, 2], got shape {np.shape(xy)}")
  if np.ndim(feats) != 3 or np.shape(feats)[:2] != np.shape(xy)[:2]:
    raise ValueError(
      f"tile features must be [V, T, C] matching coordinates {np.shape(xy)[:2]}, "
      f"got shape {np.shape(feats)}"
    )
  if int(cell) <= 0:
    raise ValueError(f"cell size must be a positive number of pixels, got {cell}")
  if not is_concrete(xy, feats, valid):
    return
  xy = np.asarray(xy)
  valid = np.asarray(valid)
  if not np.issubdtype(xy.dtype, np.integer):
    raise ValueError(f"tile coordinates must be integers (level-0 pixels), got {xy.dtype}")
  f = np.asarray(feats)
  bad = ~np.isfinite(f[valid].astype(np.float32))
  if bad.any():
    v, t = np.argwhere(valid)[np.argwhere(bad.any(-1))[0, 0]]
    raise ValueError(f"non-finite tile feature in view {v}, tile {t}")
  if np.abs(xy).max(initial=0) >= 2**31 // 2:
    raise ValueError("tile coordinates exceed the int32 range usable here (|x| < 2**30)")
  for v in range(xy.shape[0]):
    if not valid[v].any():
      continue
    p = xy[v][valid[v]]
    ext = (p.max(0) - p.min(0)) // int(cell)
    if (ext >= COORD_LIMIT).any():
      raise ValueError(
        f"view {v} spans {ext.tolist()} grid cells; at most {COORD_LIMIT - 1} per "
        f"axis are representable (cell={cell} level-0 pixels)"
      )


def build_views(xy, feats, valid=None, *, cell: int = 224) -> SparseMap:
  """Places tiles on sparse maps: quantise, merge duplicates by averaging.

  SparseConvNet InputLayer mode 4 semantics: each distinct cell becomes one
  active site whose feature is the mean of the tiles that land there.

  Args:
    xy: int [V, T, 2] level-0 (x, y) tile positions (x = column).
    feats: float [V, T, C] tile embeddings.
    valid: optional bool [V, T]; default all tiles valid.
    cell: level-0 pixels per grid cell.

  Returns:
    SparseMap with capacity S = T (there cannot be more sites than tiles).
  """
  if valid is None:
    valid = np.ones(np.shape(xy)[:2], bool)
  # Checked before any conversion: int64 positions beyond int32 would wrap.
  _check_views(xy, feats, valid, cell)
  xy, feats, valid = jnp.asarray(xy), jnp.asarray(feats), jnp.asarray(valid, bool)
  g = quantize(xy, valid, cell)
  return from_grid(g, feats, valid)


def from_grid(grid, feats, valid=None) -> SparseMap:
  """Sparse maps from integer grid coordinates (duplicates averaged).

  Args:
    grid: int [V, T, 2] grid coordinates in [0, COORD_LIMIT).
    feats: float [V, T, C].
    valid: optional bool [V, T].

  Returns:
    SparseMap with capacity T.
  """
  grid = jnp.asarray(grid).astype(jnp.int32)
  feats = jnp.asarray(feats)
  if valid is None:
    valid = jnp.ones(grid.shape[:2], bool)
  valid = jnp.asarray(valid, bool)
  if is_concrete(grid, valid):
    gv = np.asarray(grid)[np.asarray(valid)]
    if gv.size and (gv.min() < 0 or gv.max() >= COORD_LIMIT):
      raise ValueError(
        f"grid coordinates must lie in [0, {COORD_LIMIT}); got range [{gv.min()}, {gv.max()}]"
      )
  return _from_grid(grid, feats, valid)


@jax.jit
def _from_grid(grid, feats, valid):
  cap = grid.shape[1]

  def one(g, f, m):
    keys, seg = unique_sites(pack_keys(g, m), cap)
    cnt = jax.ops.segment_sum(m.astype(jnp.float32), seg, num_segments=cap)
    s = jax.ops.segment_sum(f.astype(jnp.float32), seg, num_segments=cap)
    mean = s / jnp.maximum(cnt, 1.0)[:, None]
    smask = keys != PAD_KEY
    coords = jnp.where(smask[:, None], unpack_keys(keys), 0)
    return coords, mean.astype(f.dtype), smask

  coords, f, m = jax.vmap(one)(grid, feats, valid)
  return SparseMap(coords=coords, feats=f, mask=m)
