"""`pairs` implementation: only real (input, output, tap) pairs are multiplied.

At Giga-SSL's training shape almost every site is isolated (~2.5 real pairs per
output site of a submanifold 3x3 conv, ~1 per output of the strided conv, and
half the rows of the strided conv's output capacity are padding), so padding
every row to 9 taps (the `gather` implementation) multiplies 4-8x more rows
than there are pairs. Here the pairs are compacted, grouped by tap and cut
into tiles of `tile` rows; a loop whose trip count is the number of tiles
actually used (data-dependent, so work follows the real pairs, not the static
capacity) multiplies each tile by its tap's weight:

  for t in range(n_used):            # tiles, grouped by tap
    k = tap[t]
    out[dst[t]] += x[src[t]] @ w[k]   # [tile, C_in] @ [C_in, C_out]

Within one tile every output row (and every input row) appears at most once:
a tile holds pairs of a single tap, and through one tap an output reads at most
one input and an input is read by at most one output. Unused slots point at
distinct rows past the end (dropped by the scatter, zero in the gather), so
each scatter-add has unique indices, and tiles are applied in a fixed order:
forward and backward are deterministic on every backend (no atomics).

Backward (custom_vjp), same tiles in the same order:
  dx[src[t]] += g[dst[t]] @ w[k].T ;  dw[k] += x[src[t]].T @ g[dst[t]]
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

DEFAULT_TILE = 256


@dataclasses.dataclass(frozen=True)
class PairsConfig:
  """tile: rows per tile (static). Smaller tiles waste fewer rows (at most
  K * (tile - 1) padding rows in all), larger ones run faster GEMMs."""

  tile: int = DEFAULT_TILE

  def __post_init__(self):
    if self.tile < 1:
      raise ValueError(f"tile must be a positive number of rows, got {self.tile}")


def _plan(nbr, n_in, tile):
  """Tap-grouped, tiled pair lists from a flat neighbour table.

  Args:
    nbr: int32 [N_out, K] flat input row per (output row, tap), -1 none.
    n_in: number of input rows N_in.
    tile: rows per tile T.

  Returns:
    src: int32 [n_tiles, T] input row of each slot (N_in + j for unused slot j).
    dst: int32 [n_tiles, T] output row of each slot (N_out + j when unused).
    tap: int32 [n_tiles] the tap of each tile.
    n_used: int32 [] tiles holding at least one pair (they come first).
  """
  n_out, k = nbr.shape
  # Static worst case: through one tap each output reads <= 1 input and each
  # input is read by <= 1 output, so tap k has <= min(N_out, N_in) pairs.
  per_tap = -(-min(n_out, n_in) // tile)
  n_tiles = max(1, k * per_tap)
  valid = nbr >= 0
  count = jnp.sum(valid, axis=0, dtype=jnp.int32)  # [K] pairs per tap
  tiles_k = (count + tile - 1) // tile  # [K] tiles per tap
  tile_end = jnp.cumsum(tiles_k)  # [K] first tile after tap k's tiles
  tile_start = tile_end - tiles_k
  # Slot of pair (o, k) = first slot of tap k + rank of o among tap k's pairs
  # (ranks follow the output row order, so each tile reads ascending rows).
  rank = jnp.cumsum(valid, axis=0, dtype=jnp.int32) - 1
  slot = tile_start[None, :] * tile + rank
  slot = jnp.where(valid, slot, n_tiles * tile).reshape(-1)  # invalid -> dropped
  j = jnp.arange(n_tiles * tile, dtype=jnp.int32) % tile
  rows = jnp.broadcast_to(jnp.arange(n_out, dtype=jnp.int32)[:, None], (n_out, k))
  src = (n_in + j).at[slot].set(nbr.reshape(-1), mode="drop", unique_indices=True)
  dst = (n_out + j).at[slot].set(rows.reshape(-1), mode="drop", unique_indices=True)
  # Tile t belongs to the tap whose tile range holds it: #taps ending at or before t.
  t = jnp.arange(n_tiles, dtype=jnp.int32)
  tap = jnp.sum(tile_end[None, :] <= t[:, None], axis=1, dtype=jnp.int32)
  tap = jnp.minimum(tap, k - 1)
  return src.reshape(n_tiles, tile), dst.reshape(n_tiles, tile), tap, tile_end[-1]


def _rows(a, idx):
  """a[idx] with zero rows for indices past the end."""
  return a.at[idx].get(mode="fill", fill_value=0, unique_indices=False)


def _dot(a, b, precision):
  return jnp.dot(a, b, precision=precision, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def tiled_pairs(x, w, src, dst, tap, n_used, n_out, precision=None):
  """out[dst[t]] += x[src[t]] @ w[tap[t]] for the first n_used tiles.

  Args:
    x: [N_in, C_in]; w: [K, C_in, C_out]; src, dst: int32 [n_tiles, T];
    tap: int32 [n_tiles]; n_used: int32 [] tiles to run; n_out: static N_out;
    precision: of the GEMMs (static; None = JAX's default).

  Returns:
    [N_out, C_out] in x's dtype (accumulated in float32).
  """
  return _forward(x, w, src, dst, tap, n_used, n_out, precision)


def _forward(x, w, src, dst, tap, n_used, n_out, precision):
  out = jnp.zeros((n_out, w.shape[2]), jnp.float32)

  def body(t, out):
    y = _dot(_rows(x, src[t]), w[tap[t]], precision)
    return out.at[dst[t]].add(y, mode="drop", unique_indices=True)

  out = jax.lax.fori_loop(0, n_used, body, out)
  return out.astype(x.dtype)


def _fwd(x, w, src, dst, tap, n_used, n_out, precision):
  return _forward(x, w, src, dst, tap, n_used, n_out, precision), (x, w, src, dst, tap, n_used)


def _bwd(n_out, precision, res, g):
  del n_out
  x, w, src, dst, tap, n_used = res

  # One loop for both gradients: each tile's g rows are gathered once and feed
  # both GEMMs. When the input needs no gradient (the pooling network's first
  # conv: tile embeddings are frozen) the dx carry is dead, and XLA's while-loop
  # simplifier drops it with its GEMM and scatter.
  def body(t, carry):
    dx, dw = carry
    gt = _rows(g, dst[t]).astype(x.dtype)  # [T, C_out]; zero on unused slots
    dx = dx.at[src[t]].add(_dot(gt, w[tap[t]].T, precision), mode="drop", unique_indices=True)
    dw = dw.at[tap[t]].add(_dot(_rows(x, src[t]).T, gt, precision))
    return dx, dw

  dx, dw = jax.lax.fori_loop(
    0, n_used, body, (jnp.zeros(x.shape, jnp.float32), jnp.zeros(w.shape, jnp.float32))
  )
  return (dx.astype(x.dtype), dw.astype(w.dtype), None, None, None, None)


tiled_pairs.defvjp(_fwd, _bwd)


def flat_table(nbr, s_in):
  """[V, S_out, K] per-view input rows -> [V*S_out, K] rows of the flat [V*S_in] input."""
  v = nbr.shape[0]
  base = (jnp.arange(v, dtype=jnp.int32) * s_in)[:, None, None]
  return jnp.where(nbr >= 0, nbr + base, -1).reshape(-1, nbr.shape[-1])


def conv_pairs(feats, weight, rulebook, config=PairsConfig(), *, precision=None):
  """Pair-compacted sparse convolution.

  Args:
    feats: [V, S_in, C_in]; weight: [K, C_in, C_out]; rulebook: rulebook.Rulebook.
    config: PairsConfig (the tile size).
    precision: of the GEMMs (None = JAX's default).

  Returns:
    [V, S_out, C_out]; rows with no pair (inactive outputs) are zero.
  """
  tile = config.tile
  v, s_in, c_in = feats.shape
  s_out = rulebook.nbr.shape[1]
  nbr = flat_table(rulebook.nbr, s_in)
  src, dst, tap, n_used = _plan(nbr, v * s_in, tile)
  dtype = jnp.result_type(feats, weight)
  out = tiled_pairs(
    feats.reshape(v * s_in, c_in).astype(dtype),
    weight.astype(dtype),
    src,
    dst,
    tap,
    n_used,
    v * s_out,
    precision,
  )
  return out.reshape(v, s_out, weight.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def tiled_sum(x, src, dst, n_used, n_out):
  """out[dst[t]] += x[src[t]] for the first n_used tiles: tiled_pairs without weights.

  Args:
    x: [N_in, C]; src, dst: int32 [n_tiles, T]; n_used: int32 []; n_out: static.

  Returns:
    [N_out, C] in x's dtype (accumulated in float32, tiles in tap order).
  """
  return _scatter_tiles(x, src, dst, n_used, n_out)


def _scatter_tiles(x, src, dst, n_used, n_out):
  def body(t, out):
    return out.at[dst[t]].add(
      _rows(x, src[t]).astype(jnp.float32), mode="drop", unique_indices=True
    )

  out = jax.lax.fori_loop(0, n_used, body, jnp.zeros((n_out, x.shape[1]), jnp.float32))
  return out.astype(x.dtype)


def _tiled_sum_fwd(x, src, dst, n_used, n_out):
  return _scatter_tiles(x, src, dst, n_used, n_out), (x.shape[0], src, dst, n_used)


def _tiled_sum_bwd(n_out, res, g):
  del n_out
  n_in, src, dst, n_used = res
  # The same tiles with src and dst swapped: dx[src[t]] += g[dst[t]].
  return _scatter_tiles(g, dst, src, n_used, n_in), None, None, None


tiled_sum.defvjp(_tiled_sum_fwd, _tiled_sum_bwd)


WINDOW_SUM_METHODS = ("tiles", "gather")


def window_sum(feats, rulebook, method: str, tile: int = DEFAULT_TILE):
  """Sum of the active inputs in each output's window: out[o] = sum_k feats[nbr[o, k]].

  What SparseConvNet's average pooling computes before dividing by the window
  size (avg_pool = window_sum / 9). Both methods sum each output's taps in the
  order k = 0..K-1 and are deterministic (no atomics):

  - "tiles" (api's CPU default): the pairs of the strided conv's plan (the same rule
    book, so XLA computes the plan once for both) are added tile by tile: ~1
    pair per output at the training shape, where K row gathers over all output
    rows cost 9x more. The backward runs the same tiles with src and dst
    swapped. Being a loop, it also keeps XLA from fusing the gathers into
    their consumers (on CPU the backward's gathers of the batch-norm gradient
    had become a 70 ms transposing loop fusion).
  - "gather" (api's default elsewhere): K row gathers, one per tap, fused with the
    sum; the backward gathers through `nbr_t`. On a GPU a sequential tile loop
    costs a few kernel launches per tile (the `pairs` conv ran 4x slower than
    `gather` on an H200 for that reason), while the gathers fuse into one kernel.

  Args:
    feats: [V, S_in, C]; rulebook: rulebook.Rulebook.
    method: one of WINDOW_SUM_METHODS (api.window_sum picks it per backend).
    tile: rows per tile ("tiles").

  Returns:
    [V, S_out, C].
  """
  if method not in WINDOW_SUM_METHODS:
    raise ValueError(f"unknown window_sum method {method!r}; valid: {WINDOW_SUM_METHODS}")
  v, s_in, c = feats.shape
  s_out = rulebook.nbr.shape[1]
  x = feats.reshape(v * s_in, c)
  if method == "gather":
    out = _window_sum_gather(x, flat_table(rulebook.nbr, s_in), flat_table(rulebook.nbr_t, s_out))
  else:
    src, dst, _, n_used = _plan(flat_table(rulebook.nbr, s_in), v * s_in, tile)
    out = tiled_sum(x, src, dst, n_used, v * s_out)
  return out.reshape(v, s_out, c)


def _sum_taps(x, nbr):
  """out[o] = sum_k x[nbr[o, k]] in float32: x [N_in, C], nbr int32 [N_out, K] flat (-1 none)."""
  out = jnp.zeros((nbr.shape[0], x.shape[1]), jnp.float32)
  for k in range(nbr.shape[1]):  # one row gather per tap, fused with the sum
    # Absent taps point past the end, where the gather fills zeros (a -1 would
    # wrap around to the last row).
    rows = jnp.where(nbr[:, k] >= 0, nbr[:, k], x.shape[0])
    out = out + jnp.take(x, rows, axis=0, mode="fill", fill_value=0).astype(jnp.float32)
  return out


@jax.custom_vjp
def _window_sum_gather(x, nbr, nbr_t):
  return _sum_taps(x, nbr).astype(x.dtype)


def _window_sum_gather_fwd(x, nbr, nbr_t):
  return _window_sum_gather(x, nbr, nbr_t), nbr_t


def _window_sum_gather_bwd(nbr_t, g):
  # dx[i] = sum_k g[nbr_t[i, k]]: a gather through the mirrored table, no scatter.
  return _sum_taps(g, nbr_t).astype(g.dtype), None, None


_window_sum_gather.defvjp(_window_sum_gather_fwd, _window_sum_gather_bwd)


def count_pairs(rulebook) -> jax.Array:
  """int32 []: real (input, output, tap) pairs of a rule book."""
  return jnp.sum(rulebook.nbr >= 0, dtype=jnp.int32)


__all__ = [
  "DEFAULT_TILE",
  "WINDOW_SUM_METHODS",
  "PairsConfig",
  "conv_pairs",
  "count_pairs",
  "flat_table",
  "tiled_pairs",
  "tiled_sum",
  "window_sum",
]
