"""View retrieval: does a slide's representation find the other view of the same slide?

Two measures that show whether a training learns slide identity, each with its
chance level:

* `batch_retrieval_top1(z1, z2)`: during training, on the global batch of 2B
  projections (as `losses.nt_xent` sees them), the fraction of the 2B anchors
  whose nearest other view (cosine) is the other view of the same slide.
  Chance: `batch_chance(B)` = 1 / (2B - 1).
* `pair_retrieval_top1(a, b)`: after training, per slide two vectors built
  from disjoint tile sets of different augmentation files (`split_pairs`,
  `ensemble`); the fraction of slides whose vector in `a` finds its own vector
  in `b` among all slides' (centred cosine; both directions averaged).
  Chance: 1 / N.

Pure jax/numpy: layer 2 (beside the losses), importable by train, encode and
the demo alike.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gigassl_jax import losses


def batch_chance(batch: int) -> float:
  """Chance level of `batch_retrieval_top1` for a global batch of `batch` slides."""
  if batch < 2:
    raise ValueError(f"retrieval needs a batch of at least 2 slides, got {batch}")
  return 1.0 / (2 * batch - 1)


def batch_retrieval_top1(z1, z2, axis_name: str | None = None):
  """Top-1 view retrieval on the batch: same anchors, keys and exclusions as nt_xent.

  For each of the 2n anchors (z1 then z2 rows) the candidates are the other
  2N - 1 views (itself excluded); a hit when the most similar (cosine) is the
  other view of the same slide. Ties count as a hit only if the positive is the
  first maximum (argmax), so identical inputs everywhere do not score 1.

  With `axis_name` (inside shard_map), z1/z2 are this device's share [n, D];
  the keys are gathered from every device (global candidates) and the value is
  the mean over the LOCAL anchors: average it over the devices (pmean) for the
  global accuracy, as for the loss.

  Args:
    z1, z2: [n, D] projections (or representations) of the two views, row i = slide i.
    axis_name: None or the mesh axis of the data-parallel devices.

  Returns:
    scalar float32 in [0, 1].
  """
  sim, pos_idx = losses.view_similarities(z1, z2, axis_name)
  return jnp.mean((jnp.argmax(sim, axis=1) == pos_idx).astype(jnp.float32))


def pair_retrieval_top1(a, b, centre: bool = True) -> float:
  """Top-1 of finding slide i's `b` vector from its `a` vector among all N slides.

  Cosine similarity after subtracting the mean of all 2N vectors (centred:
  features every slide shares, e.g. the encoder's offset, would otherwise
  dominate the cosine). Averaged over both directions (a -> b and b -> a).

  Args:
    a, b: [N, D] float arrays, row i = slide i (N >= 2).
    centre: subtract the common mean first.

  Returns:
    float in [0, 1]; chance is 1 / N.
  """
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 2 or a.shape[0] < 2:
    raise ValueError(f"a and b must both be [N >= 2, D], got {a.shape} and {b.shape}")
  if centre:
    mu = np.concatenate([a, b]).mean(axis=0)
    a, b = a - mu, b - mu
  a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
  b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
  sim = a @ b.T  # [N, N]
  idx = np.arange(a.shape[0])
  hits = (np.argmax(sim, axis=1) == idx).mean() + (np.argmax(sim, axis=0) == idx).mean()
  return float(hits / 2)


def split_pairs(
  coords: np.ndarray, aug_a: int = 0, aug_b: int = 1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
  """Indices of two disjoint tile sets of one slide, from two augmentation files.

  The bank draws each augmentation file's tiles independently (with
  replacement), so a tile position can appear in both files. Set A keeps the
  tiles of file `aug_a` at a random half of the slide's distinct positions,
  set B the tiles of file `aug_b` at the other half: no tissue is in both.

  Args:
    coords: int [Naug, Nt, 2] the slide's tile positions (bank layout).
    aug_a, aug_b: two different augmentation files.
    seed: the random halving of the positions (per slide: pass e.g. a hash of
      the slide index).

  Returns:
    (ia, ib): int arrays of tile indices into coords[aug_a] and coords[aug_b]
    (either may be empty when a slide has very few distinct positions).
  """
  coords = np.asarray(coords)
  if aug_a == aug_b or not (0 <= aug_a < coords.shape[0] and 0 <= aug_b < coords.shape[0]):
    raise ValueError(
      f"need two different augmentation files of {coords.shape[0]}, got {aug_a}, {aug_b}"
    )
  pos = np.unique(np.concatenate([coords[aug_a], coords[aug_b]]), axis=0)
  rng = np.random.default_rng(seed)
  half = rng.permutation(len(pos)) < len(pos) // 2 + len(pos) % 2
  in_a = {tuple(p) for p in pos[half]}

  def pick(c, keep_a):
    return np.array([j for j, p in enumerate(c) if (tuple(p) in in_a) == keep_a], np.int64)

  return pick(coords[aug_a], True), pick(coords[aug_b], False)


def ensemble(
  feats: np.ndarray,
  xy: np.ndarray,
  encode: Callable[[np.ndarray, np.ndarray], np.ndarray],
  tiles: int,
) -> np.ndarray:
  """Mean of `encode` over consecutive T-tile chunks of one tile set (an ensemble of views).

  Args:
    feats: [n, F] tile embeddings; xy: [n, 2] their positions.
    encode: (feats [V, T, F], xy [V, T, 2]) -> [V, D] vectors of V views.
    tiles: T; the last partial chunk is dropped unless it is the only one
      (then it is padded by repeating tiles, as views draw with replacement).

  Returns:
    [D] float64 vector.
  """
  n = feats.shape[0]
  if n == 0:
    raise ValueError("an ensemble needs at least one tile")
  v = max(n // tiles, 1)
  idx = np.resize(np.arange(n), v * tiles).reshape(v, tiles)
  return np.asarray(encode(feats[idx], xy[idx]), np.float64).mean(axis=0)


def mean_of_tiles(feats: np.ndarray, xy: np.ndarray) -> np.ndarray:
  """The no-network baseline encoder: [V, T, F] -> [V, F] mean over the tiles."""
  del xy
  return np.asarray(feats, np.float64).mean(axis=1)
