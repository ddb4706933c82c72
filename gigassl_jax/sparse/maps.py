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


def sorted_runs(keys: jax.Array, capacity: int):
  """Sorts one view's candidate keys and finds the run of each distinct key.

  Args:
    keys: int32 [N] candidate site keys, PAD_KEY for none.
    capacity: static number of sites (>= the number of distinct keys).

  Returns:
    order: int32 [N] stable sorting permutation (equal keys keep their order).
    seg_sorted: int32 [N] site of each sorted candidate, nondecreasing
      (capacity for PAD_KEY candidates, which sort last).
    start: int32 [capacity] first sorted position of each site's run.
    count: int32 [capacity] candidates in each site's run (0 past the last site).
  """
  order = jnp.argsort(keys, stable=True)
  skeys = keys[order]
  real = skeys != PAD_KEY
  first = real & jnp.concatenate([jnp.ones((1,), bool), skeys[1:] != skeys[:-1]])
  seg_sorted = jnp.where(real, jnp.cumsum(first, dtype=jnp.int32) - 1, capacity)
  # Binary searches (compares and gathers), not a histogram: no scatter.
  sites = jnp.arange(capacity, dtype=jnp.int32)
  start = jnp.searchsorted(seg_sorted, sites, side="left").astype(jnp.int32)
  end = jnp.searchsorted(seg_sorted, sites, side="right").astype(jnp.int32)
  return order.astype(jnp.int32), seg_sorted, start, end - start


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
  order, seg_sorted, start, count = sorted_runs(keys, capacity)
  site_keys = _run_keys(keys, order, start, count)
  # order is a permutation: every index is written once (no accumulation).
  seg = jnp.zeros_like(seg_sorted).at[order].set(seg_sorted, unique_indices=True)
  return site_keys, seg


def _run_keys(keys, order, start, count):
  """int32 [S]: the key of each run (PAD_KEY for empty sites), by gathers."""
  first = keys[order[jnp.minimum(start, keys.shape[0] - 1)]]
  return jnp.where(count > 0, first, PAD_KEY)


@jax.custom_vjp
def run_means(feats, order, seg_sorted, start, count):
  """Mean of each site's run of features, summed in a fixed order on every backend.

  segment_sum is a scatter-add, which XLA GPU accumulates in an arbitrary
  order (run to run differences in the last bits). Here the k-th member of
  every run is added in round k (a gather: runs do not share rows), so each
  site sums its tiles first to last in their input order, ((0 + f_a) + f_b) +
  ..., which is also the order of XLA CPU's sequential scatter-add: the means
  are bitwise those of segment_sum on CPU. Rounds = the largest run (a few for
  views drawn with replacement; 1 when tiles sit on distinct cells).

  Args:
    feats: float [V, N, C] candidate features, in input order.
    order, seg_sorted: int32 [V, N]; start, count: int32 [V, S] (sorted_runs per view).

  Returns:
    float32 [V, S, C]: per-site means (0 for empty sites).
  """
  return _run_means(feats, order, start, count)


def _run_means(feats, order, start, count):
  f = jnp.take_along_axis(feats.astype(jnp.float32), order[..., None], axis=1)
  last = f.shape[1] - 1

  def body(carry):
    k, acc = carry
    row = jnp.take_along_axis(f, jnp.minimum(start + k, last)[..., None], axis=1)
    return k + 1, acc + jnp.where((k < count)[..., None], row, 0.0)

  acc = jnp.zeros(start.shape + (f.shape[-1],), jnp.float32)
  _, acc = jax.lax.while_loop(lambda c: c[0] < jnp.max(count), body, (jnp.int32(0), acc))
  return acc / jnp.maximum(count, 1).astype(jnp.float32)[..., None]


def _run_means_fwd(feats, order, seg_sorted, start, count):
  return _run_means(feats, order, start, count), (feats, order, seg_sorted, count)


def _run_means_bwd(res, g):
  # d feats[i] = g[site of i] / count: a gather, no scatter-add either.
  feats, order, seg_sorted, count = res
  s = count.shape[1]
  idx = jnp.minimum(seg_sorted, s - 1)[..., None]
  w = jnp.where(seg_sorted < s, 1.0, 0.0)[..., None]
  den = jnp.maximum(jnp.take_along_axis(count, idx[..., 0], axis=1), 1).astype(jnp.float32)
  gs = jnp.take_along_axis(g, idx, axis=1) * w / den[..., None]
  # Sorted -> input order by the inverse permutation (a gather as well).
  inv = jnp.argsort(order, axis=1)
  gf = jnp.take_along_axis(gs, inv[..., None], axis=1).astype(feats.dtype)
  return gf, None, None, None, None


run_means.defvjp(_run_means_fwd, _run_means_bwd)


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

  def runs(g, m):
    keys = pack_keys(g, m)
    order, seg_sorted, start, count = sorted_runs(keys, cap)
    return _run_keys(keys, order, start, count), order, seg_sorted, start, count

  keys, order, seg_sorted, start, count = jax.vmap(runs)(grid, valid)
  mean = run_means(feats, order, seg_sorted, start, count)
  smask = keys != PAD_KEY
  coords = jnp.where(smask[..., None], unpack_keys(keys), 0)
  return SparseMap(coords=coords, feats=mean.astype(feats.dtype), mask=smask)
