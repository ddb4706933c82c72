"""Neighbour tables (rule books) for sparse convolutions, built on device under jit.

A table `nbr` int32 [V, S_out, K] says, for each output site o of a view and each
kernel tap k, which input row of the same view that tap reads (-1 = none).
Tap order is SparseConvNet's: k = ksize * d0 + d1, d0 the offset along c0 (x).

Two interchangeable lookup structures find a coordinate's row:
  "sort": sort the view's site keys, then searchsorted (binary search);
  "hash": an open-addressing hash table (linear probing), filled in parallel
          rounds with a scatter-min arbitration of collisions.
Both give identical tables (a test asserts it); `DEFAULT_BUILDER` is the one
measured faster on CPU (see kernels/sparse_conv/bench.py).

The tables are returned as the kernel package's own type,
`gigassl_jax.kernels.sparse_conv.rulebook.Rulebook` (re-exported here).

The mirrored table `nbr_t` [V, S_in, K] lists, for each INPUT row and tap, the
output row that reads it through that tap (-1 = none). Backward passes gather
with it instead of scatter-adding, which keeps them deterministic on GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from gigassl_jax.kernels.sparse_conv.rulebook import Rulebook
from gigassl_jax.sparse import maps

BUILDERS = ("sort", "hash")
DEFAULT_BUILDER = "sort"

_EMPTY = np.int32(-1)

__all__ = [
  "BUILDERS",
  "DEFAULT_BUILDER",
  "Rulebook",
  "lookup",
  "strided_output_sites",
  "strided_rulebook",
  "submanifold_rulebook",
]


# ---------------------------------------------------------------- lookups ----


def _sort_lookup(site_keys: jax.Array, queries: jax.Array) -> jax.Array:
  """Rows of `queries` keys among `site_keys` ([S] int32, PAD_KEY = none); -1 if absent."""
  order = jnp.argsort(site_keys)
  skeys = site_keys[order]
  q = queries.reshape(-1)
  pos = jnp.clip(jnp.searchsorted(skeys, q), 0, skeys.shape[0] - 1)
  hit = (skeys[pos] == q) & (q != maps.PAD_KEY)
  return jnp.where(hit, order[pos], -1).reshape(queries.shape)


def _hash(keys: jax.Array, size: int) -> jax.Array:
  # Knuth's multiplicative hash in uint32 (wraps), top bits select the slot.
  h = keys.astype(jnp.uint32) * jnp.uint32(2654435761)
  shift = 32 - int(np.log2(size))
  return (h >> jnp.uint32(shift)).astype(jnp.int32) if shift < 32 else jnp.zeros_like(keys)


def _hash_insert(site_keys: jax.Array):
  """Open-addressing table of one view's sites: (slot_keys [H], slot_rows [H])."""
  n = site_keys.shape[0]
  size = max(2, 1 << int(np.ceil(np.log2(2 * n))))  # load factor <= 1/2
  rows = jnp.arange(n, dtype=jnp.int32)
  home = _hash(site_keys, size)

  def cond(state):
    return jnp.any(state[2])

  def body(state):
    slot_keys, slot_rows, pending, probe = state
    slot = (home + probe) & (size - 1)
    free = slot_keys[slot] == _EMPTY
    # Every pending row bids for its slot; the lowest row index wins it.
    bid = jnp.where(pending & free, rows, n)
    winner = jnp.full((size,), n, jnp.int32).at[slot].min(bid)
    won = pending & free & (winner[slot] == rows)
    tgt = jnp.where(won, slot, size)  # size = out of range -> dropped
    slot_keys = slot_keys.at[tgt].set(site_keys, mode="drop")
    slot_rows = slot_rows.at[tgt].set(rows, mode="drop")
    # Losers and rows whose slot was taken probe the next slot.
    probe = jnp.where(pending & ~won, probe + 1, probe)
    return slot_keys, slot_rows, pending & ~won, probe

  init = (
    jnp.full((size,), _EMPTY, jnp.int32),
    jnp.full((size,), -1, jnp.int32),
    site_keys != maps.PAD_KEY,
    jnp.zeros((n,), jnp.int32),
  )
  slot_keys, slot_rows, _, _ = jax.lax.while_loop(cond, body, init)
  return slot_keys, slot_rows


def _hash_lookup(site_keys: jax.Array, queries: jax.Array) -> jax.Array:
  slot_keys, slot_rows = _hash_insert(site_keys)
  size = slot_keys.shape[0]
  q = queries.reshape(-1)
  home = _hash(q, size)

  def cond(state):
    return jnp.any(state[1])

  def body(state):
    res, active, probe = state
    slot = (home + probe) & (size - 1)
    k = slot_keys[slot]
    found = active & (k == q)
    res = jnp.where(found, slot_rows[slot], res)
    # Stop at the key, at an empty slot (absent), or after a full cycle.
    active = active & ~found & (k != _EMPTY) & (probe + 1 < size)
    return res, active, probe + 1

  init = (jnp.full(q.shape, -1, jnp.int32), q != maps.PAD_KEY, jnp.zeros(q.shape, jnp.int32))
  res, _, _ = jax.lax.while_loop(cond, body, init)
  return res.reshape(queries.shape)


def lookup(site_keys: jax.Array, queries: jax.Array, builder: str = DEFAULT_BUILDER) -> jax.Array:
  """Rows of query keys among one view's site keys (-1 if absent).

  Args:
    site_keys: int32 [S] keys of the view's sites (PAD_KEY for padding rows).
    queries: int32 [...] keys to find (PAD_KEY never matches).
    builder: "sort" or "hash".
  """
  if builder == "sort":
    return _sort_lookup(site_keys, queries)
  if builder == "hash":
    return _hash_lookup(site_keys, queries)
  raise ValueError(f"unknown neighbour-table builder {builder!r}; valid: {BUILDERS}")


# ------------------------------------------------------------ rule books ----


def _offsets(ksize: int) -> np.ndarray:
  """int32 [K, 2] tap offsets (d0, d1) in SparseConvNet order k = ksize*d0 + d1."""
  d = np.arange(ksize)
  return np.stack(np.meshgrid(d, d, indexing="ij"), -1).reshape(-1, 2).astype(np.int32)


def _query_keys(coords, mask, offsets):
  """Keys of coords + each offset: [S, K]; PAD_KEY where off-grid or masked."""
  q = coords[:, None, :] + offsets[None, :, :]
  ok = mask[:, None] & jnp.all((q >= 0) & (q < maps.COORD_LIMIT), axis=-1)
  return maps.pack_keys(q, ok)


@functools.partial(jax.jit, static_argnames=("ksize", "builder"))
def submanifold_rulebook(
  smap: maps.SparseMap, ksize: int = 3, builder: str = DEFAULT_BUILDER
) -> Rulebook:
  """Rule book of a submanifold convolution: output sites = input sites.

  Output o reads, through tap k = ksize*d0 + d1, the input at
  o + (d0 - ksize//2, d1 - ksize//2) when that site is active.
  """
  if ksize % 2 != 1:
    raise ValueError(f"submanifold kernels must have odd size, got {ksize}")
  offs = _offsets(ksize) - ksize // 2

  def one(coords, mask):
    keys = maps.pack_keys(coords, mask)
    return lookup(keys, _query_keys(coords, mask, offs), builder)

  nbr = jax.vmap(one)(smap.coords, smap.mask)
  # Input i is read by output o through tap k iff o = i - off_k = i + off_{K-1-k}.
  return Rulebook(
    nbr=nbr,
    nbr_t=nbr[:, :, ::-1],
    in_coords=smap.coords,
    in_mask=smap.mask,
    out_coords=smap.coords,
    out_mask=smap.mask,
    ksize=ksize,
    stride=1,
  )


def strided_output_sites(coords, mask, spatial_size=None):
  """Active output sites of the 3x3 stride-2 unpadded convolution.

  Output j is active when some active input p has 0 <= p - 2j <= 2 per axis,
  i.e. j in {floor((p-1)/2), floor(p/2)} and j >= 0. With `spatial_size` (the
  reference's batch-wide input size S per axis, odd) windows are also limited to
  j <= (S-1)/2 - 1, SparseConvNet's edge clipping; None = no upper bound.

  Args:
    coords: int32 [V, S, 2]; mask: bool [V, S].
    spatial_size: None or int [2] (may be traced: one compilation serves all).

  Returns:
    (out_coords int32 [V, 4S, 2], out_mask bool [V, 4S]), sorted, capacity 4S.
  """
  lo = jnp.floor_divide(coords - 1, 2)
  hi = jnp.floor_divide(coords, 2)
  cand = []
  for a in (lo, hi):
    for b in (lo, hi):
      cand.append(jnp.stack([a[..., 0], b[..., 1]], axis=-1))
  cand = jnp.stack(cand, axis=2)  # [V, S, 4, 2]
  ok = mask[..., None] & jnp.all(cand >= 0, axis=-1)
  if spatial_size is not None:
    limit = (jnp.asarray(spatial_size, jnp.int32) - 1) // 2 - 1
    ok &= jnp.all(cand <= limit, axis=-1)
  v, s = mask.shape
  keys = maps.pack_keys(cand, ok).reshape(v, 4 * s)
  site_keys, _ = jax.vmap(lambda k: maps.unique_sites(k, 4 * s))(keys)
  out_mask = site_keys != maps.PAD_KEY
  out_coords = jnp.where(out_mask[..., None], maps.unpack_keys(site_keys), 0)
  return out_coords, out_mask


def strided_rulebook(
  smap: maps.SparseMap, builder: str = DEFAULT_BUILDER, spatial_size=None
) -> Rulebook:
  """Rule book of the 3x3 stride-2 unpadded convolution (and 3x3/2 pooling).

  Output j reads, through tap k = 3*d0 + d1, the input at 2j + (d0, d1).

  Args:
    smap: the input sites.
    builder: neighbour-lookup structure ("sort" or "hash").
    spatial_size: None (default: no upper bound on windows) or the reference's
      odd input size per axis, int [2], reproducing SparseConvNet's clipping.
  """
  if spatial_size is not None:
    spatial_size = jnp.asarray(spatial_size, jnp.int32)
    if maps.is_concrete(spatial_size):
      ss = np.asarray(spatial_size)
      if ss.shape != (2,) or (ss < 3).any() or (ss % 2 == 0).any():
        raise ValueError(f"spatial_size must be two odd sizes >= 3, got {ss.tolist()}")
  return _strided_rulebook(smap, builder, spatial_size)


@functools.partial(jax.jit, static_argnames=("builder",))
def _strided_rulebook(smap, builder, spatial_size):
  out_coords, out_mask = strided_output_sites(smap.coords, smap.mask, spatial_size)
  offs = _offsets(3)

  def one(in_coords, in_mask, oc, om):
    in_keys = maps.pack_keys(in_coords, in_mask)
    nbr = lookup(in_keys, _query_keys(2 * oc, om, offs), builder)
    # Input p is read by output j through tap d iff p - d = 2j: p - d even, >= 0.
    q = in_coords[:, None, :] - offs[None]
    ok = in_mask[:, None] & jnp.all((q >= 0) & (q % 2 == 0), axis=-1)
    out_keys = maps.pack_keys(oc, om)
    nbr_t = lookup(out_keys, maps.pack_keys(q // 2, ok), builder)
    return nbr, nbr_t

  nbr, nbr_t = jax.vmap(one)(smap.coords, smap.mask, out_coords, out_mask)
  return Rulebook(
    nbr=nbr,
    nbr_t=nbr_t,
    in_coords=smap.coords,
    in_mask=smap.mask,
    out_coords=out_coords,
    out_mask=out_mask,
    ksize=3,
    stride=2,
  )
