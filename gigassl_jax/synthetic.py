"""Synthetic inputs for tests, smoke runs and demos: slides and embedding banks.

`make_synthetic_bank` writes a small random embedding bank in the real bank's
format (what `--data_bank=synthetic` trains on). The rest writes synthetic
pyramidal whole-slide TIFFs that OpenSlide opens.

One tiled page per pyramid level (levels as SubIFDs are not seen by OpenSlide),
lower levels flagged `subfiletype=1`. Two flavours:

* ``vendor="aperio"``: an ImageDescription starting ``Aperio Image Library`` with
  ``|AppMag = ..|MPP = ..`` so OpenSlide reports vendor ``aperio`` and the mpp.
* ``vendor="generic"``: a plain tiled TIFF (OpenSlide vendor ``generic-tiff``);
  with ``mpp`` given, the TIFF resolution tags carry it, without it the slide has
  no mpp at all (the "missing mpp" case).

The picture is a function of level-0 coordinates, so every level shows the same
slide: white background, a few elliptic tissue blobs of H&E-like pink with purple
"nuclei" dots. Tiles are generated one at a time, so a 40k x 40k slide is
written without holding it in memory.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator, Sequence

import numpy as np
import tifffile

from gigassl_jax import bank as bank_lib

# Blobs as (centre x, centre y, radius x, radius y) in fractions of the slide size.
DEFAULT_BLOBS = ((0.35, 0.4, 0.22, 0.18), (0.68, 0.62, 0.2, 0.25))

_STROMA = np.array([226, 150, 190], np.float32)
_NUCLEUS = np.array([95, 60, 150], np.float32)


def render_region(
  x0: int,
  y0: int,
  width: int,
  height: int,
  downsample: float,
  slide_size: tuple[int, int],
  blobs: Sequence[tuple[float, float, float, float]] = DEFAULT_BLOBS,
  seed: int = 0,
  background: tuple[int, int, int] = (243, 241, 245),
) -> np.ndarray:
  """Renders the synthetic slide on a pixel grid.

  Args:
    x0, y0: top-left of the region in pixels of the rendered level.
    width, height: region size in pixels of that level.
    downsample: level-0 pixels per pixel of that level.
    slide_size: (width, height) of level 0.
    blobs: tissue ellipses, (cx, cy, rx, ry) as fractions of the slide size.
    seed: varies the texture phase.
    background: RGB of the glass (flat; (255, 255, 255) leaves nothing for Otsu).

  Returns:
    uint8 [height, width, 3] RGB.
  """
  w0, h0 = slide_size
  # Level-0 coordinates of the pixel centres.
  xs = (x0 + np.arange(width, dtype=np.float32) + 0.5) * downsample
  ys = (y0 + np.arange(height, dtype=np.float32) + 0.5) * downsample
  fx, fy = xs / w0, ys / h0
  tissue = np.zeros((height, width), bool)
  for cx, cy, rx, ry in blobs:
    tissue |= ((fx[None, :] - cx) / rx) ** 2 + ((fy[:, None] - cy) / ry) ** 2 < 1.0
  # Nuclei: a lattice of dots ~12 level-0 pixels wide, jittered by the seed.
  phase = 0.37 * (seed + 1)
  dots = np.sin(xs[None, :] * 0.21 + phase) * np.sin(ys[:, None] * 0.17 + 2 * phase)
  nucleus = tissue & (dots > 0.75)
  img = np.where(nucleus[..., None], _NUCLEUS, _STROMA)
  # Mild texture so tiles are not flat colours (and the encoder sees variation).
  texture = 8.0 * np.sin(xs[None, :] * 0.05 + ys[:, None] * 0.031 + phase)
  img = img + texture[..., None]
  img = np.where(tissue[..., None], img, np.asarray(background, np.float32))
  return np.clip(img, 0, 255).astype(np.uint8)


def _tiles(
  level_w: int, level_h: int, tile: int, downsample: float, **render
) -> Iterator[np.ndarray]:
  for ty in range(0, level_h, tile):
    for tx in range(0, level_w, tile):
      # Edge tiles are rendered full size: TIFF tiles are always full size.
      yield render_region(tx, ty, tile, tile, downsample, **render)


def write_slide(
  path: str | os.PathLike,
  width: int,
  height: int,
  *,
  vendor: str = "aperio",
  mpp: float | None = 0.5,
  app_mag: float = 20,
  n_levels: int = 3,
  level_downsample: int = 4,
  tile: int = 256,
  blobs: Sequence[tuple[float, float, float, float]] = DEFAULT_BLOBS,
  seed: int = 0,
  background: tuple[int, int, int] = (243, 241, 245),
  compression: str = "jpeg",
) -> pathlib.Path:
  """Writes a synthetic pyramidal TIFF and returns its path.

  Args:
    path: output file (.svs or .tif); written to a temp name and renamed.
    width, height: level-0 size in pixels.
    vendor: "aperio" (Aperio ImageDescription, needs mpp) or "generic".
    mpp: microns per level-0 pixel; None writes no mpp (generic only).
    app_mag: objective magnification written in the Aperio description.
    n_levels: pyramid levels; level k is downsampled by level_downsample**k.
      Levels smaller than one pixel are dropped.
    level_downsample: integer factor between levels.
    tile: TIFF tile size (multiple of 16).
    blobs: tissue ellipses (cx, cy, rx, ry) in fractions of the slide size;
      empty for a slide with no tissue.
    seed: varies the texture.
    background: RGB of the glass; (255, 255, 255) with no blobs is a blank slide.
    compression: tifffile compression ("jpeg", "zlib", None).

  Returns:
    The path written.
  """
  if vendor not in ("aperio", "generic"):
    raise ValueError(f"vendor must be 'aperio' or 'generic', got {vendor!r}")
  if vendor == "aperio" and mpp is None:
    raise ValueError("an Aperio description needs an mpp")
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  slide_size = (width, height)
  with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
    for level in range(n_levels):
      ds = level_downsample**level
      lw, lh = width // ds, height // ds
      if lw < 1 or lh < 1:
        break
      kwargs = {}
      if level == 0:
        if vendor == "aperio":
          kwargs["description"] = (
            f"Aperio Image Library v10.0.50\r\n{width}x{height} "
            f"[0,0 {width}x{height}] ({tile}x{tile}) JPEG/RGB Q=80"
            f"|AppMag = {app_mag:g}|MPP = {mpp:g}"
          )
        if vendor == "generic" and mpp is not None:
          # pixels per centimetre
          kwargs["resolution"] = (1e4 / mpp, 1e4 / mpp)
          kwargs["resolutionunit"] = "CENTIMETER"
      tw.write(
        _tiles(
          lw,
          lh,
          tile,
          ds,
          slide_size=slide_size,
          blobs=blobs,
          seed=seed,
          background=background,
        ),  # fmt: skip
        shape=(lh, lw, 3),
        dtype=np.uint8,
        tile=(tile, tile),
        photometric="rgb",
        compression=compression,
        subfiletype=0 if level == 0 else 1,
        metadata=None,
        **kwargs,
      )
  os.replace(tmp, path)
  return path


def make_synthetic_bank(
  bank_dir, n_slides: int, n_aug: int, n_tiles: int, dim: int, seed: int = 0
) -> pathlib.Path:
  """A small random bank with the real bank's format (for smoke runs and tests).

  Each slide has its own mean embedding (so slides are distinguishable, and a
  contrastive loss has something to learn); each augmentation perturbs it, and
  the tiles sit on a level-0 grid of pitch 896 (level-1 tiles, 4 cells apart).
  Idempotent: an already packed bank is left alone.
  """
  bank_dir = pathlib.Path(bank_dir)
  if (bank_dir / bank_lib.PACKED_DIR / "dataset_info.json").is_file():
    return bank_dir
  rng = np.random.default_rng(seed)
  meta = {"encoder": "synthetic", "weights_id": "random", "level": 1, "tile_size": 224}
  for s in range(n_slides):
    centre = 0.5 * rng.normal(size=(1, 1, dim))
    emb = centre + rng.normal(size=(n_aug, n_tiles, dim))
    h, w = rng.integers(4, 40, size=2)
    cells = rng.choice(h * w, size=min(n_tiles, h * w), replace=False)
    cells = np.resize(cells, n_tiles)
    xy = np.stack([cells % w, cells // w], -1) * 896 + rng.integers(0, 10**5, size=2)
    coords = np.broadcast_to(xy, (n_aug, n_tiles, 2)).copy()
    for k in range(n_aug):  # each augmentation draws its own tiles
      coords[k] = coords[k][rng.permutation(n_tiles)]
    bank_lib.write_slide(bank_dir, f"synthetic_{s:05d}", emb.astype(np.float16), coords, meta)
  bank_lib.pack(bank_dir)
  return bank_dir
