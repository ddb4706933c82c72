"""Named benchmark shapes for the sparse convolution (numpy generators, seeded).

  train      Giga-SSL training batch: V = 512 views x T = 5 tiles. Each view's
             slide is a tissue blob of level-1 tiles (224 px at level 1 = 896
             level-0 px apart); 5 tiles are drawn with replacement, their
             level-0 positions get the reference coordinate augmentation
             (translation, rotation, flips, scale in [0.7, 1.3]) and are
             quantised with cell d = 224, so tiles land ~4 cells apart and
             nearly every site is isolated. Channels 256 -> 512 (pooling block).
  slide16k   one whole slide at the tile grid: 16,384 active sites forming a
             tissue-shaped dense region; submanifold 3x3, 256 -> 512.
  slide100k  the same with 100,000 sites.
  train256   `train` with 256 views (the batch of the issue's CPU anchors).

`make(name, seed)` returns a `Shape` holding the raw input `Sites` (tile
positions or grid cells, features drawn N(0, 1)) and the channel counts. Kernel-
level numpy data only: the benchmark (bench.sparse_map) places the sites on a
sparse map with gigassl_jax.sparse, as the model does.
"""

from __future__ import annotations

import dataclasses

import numpy as np

LEVEL0_PER_LEVEL1_TILE = 896  # a 224-px tile read at level 1 (downsample 4)
CELL = 224

NAMES = ("train", "train256", "slide16k", "slide100k")


@dataclasses.dataclass(frozen=True)
class Sites:
  """Raw sites of a benchmark input, before they are placed on a sparse map.

  xy: int32 [V, T, 2] level-0 (x, y) tile positions when `cell` is set (to be
    augmented with `augment_seed`, then quantised with cell `cell`), else grid
    cells (distinct per view).
  feats: float32 [V, T, C].
  cell: level-0 pixels per grid cell, or None (xy are grid cells).
  augment_seed: seed of the coordinate augmentation's key, or None (none).
  """

  xy: np.ndarray
  feats: np.ndarray
  cell: int | None = None
  augment_seed: int | None = None


@dataclasses.dataclass(frozen=True)
class Shape:
  """A named benchmark input: its sites and what to run on them."""

  name: str
  sites: Sites  # feats [V, S, c_in] float32
  c_in: int
  c_out: int
  block: bool  # True: the whole pooling block; False: one submanifold 3x3 conv


def tissue_blob(rng: np.random.Generator, n: int) -> np.ndarray:
  """int32 [n, 2] distinct grid cells forming one tissue-like blob.

  A smooth random field (a few anisotropic Gaussian bumps) on a square grid of
  ~2.5 n cells; the n cells of highest field value form the blob, so it has
  exactly n cells, one or a few lobes and ragged edges (a little noise).
  """
  side = int(np.ceil(np.sqrt(2.5 * n))) + 2
  yy, xx = np.mgrid[0:side, 0:side].astype(np.float64)
  field = np.zeros((side, side))
  for _ in range(rng.integers(1, 4)):
    cx, cy = rng.uniform(0.3, 0.7, 2) * side
    sx, sy = rng.uniform(0.15, 0.35, 2) * side
    field += rng.uniform(0.5, 1.0) * np.exp(-(((xx - cx) / sx) ** 2) - ((yy - cy) / sy) ** 2)
  field += 0.03 * rng.standard_normal(field.shape)
  idx = np.argsort(field.ravel())[::-1][:n]
  cells = np.stack([idx % side, idx // side], axis=-1)  # (x, y)
  return cells.astype(np.int32)


def train_views(
  seed: int = 0, views: int = 512, tiles: int = 5, channels: int = 256, augment: bool = True
) -> Sites:
  """A training batch: `views` views of `tiles` level-1 tiles, reference augmentation.

  Returns:
    Sites with level-0 positions [views, tiles, 2], cell CELL, feats
    [views, tiles, channels] float32; augmented with key `seed` when `augment`.
  """
  rng = np.random.default_rng(seed)
  xy = np.zeros((views, tiles, 2), np.int64)
  for v in range(views):
    # Slides have a few hundred to a few thousand tissue tiles at level 1.
    cells = tissue_blob(rng, int(rng.integers(300, 4000)))
    pick = rng.integers(0, len(cells), tiles)
    xy[v] = cells[pick].astype(np.int64) * LEVEL0_PER_LEVEL1_TILE
  feats = rng.standard_normal((views, tiles, channels)).astype(np.float32)
  return Sites(xy.astype(np.int32), feats, cell=CELL, augment_seed=seed if augment else None)


def slide_sites(seed: int = 0, sites: int = 16384, channels: int = 256) -> Sites:
  """One slide: `sites` active grid cells of a tissue blob, one view.

  Returns:
    Sites with grid cells [1, sites, 2] and feats [1, sites, channels] float32.
  """
  rng = np.random.default_rng(seed)
  cells = tissue_blob(rng, sites)
  feats = rng.standard_normal((1, sites, channels)).astype(np.float32)
  return Sites(cells[None], feats)


def make(name: str, seed: int = 0) -> Shape:
  """The named shape (see the module docstring)."""
  if name == "train":
    return Shape(name, train_views(seed, 512), 256, 512, block=True)
  if name == "train256":
    return Shape(name, train_views(seed, 256), 256, 512, block=True)
  if name == "slide16k":
    return Shape(name, slide_sites(seed, 16384), 256, 512, block=False)
  if name == "slide100k":
    return Shape(name, slide_sites(seed, 100_000), 256, 512, block=False)
  raise ValueError(f"unknown benchmark shape {name!r}; valid: {NAMES}")
