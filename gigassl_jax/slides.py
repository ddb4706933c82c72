"""Whole-slide access: read level from a magnification, tissue mask, tile grid, tile reads.

Everything OpenSlide opens (Aperio .svs, Hamamatsu .ndpi, generic tiled TIFF,
MIRAX, ...) goes through openslide-python with the library from the
openslide-bin wheel. docs/method.md section 1 is followed:

* the read level is chosen from a target resolution in microns per pixel (mpp;
  10x is taken as 1.0 mpp), falling back to a level index when the slide has no
  mpp; when no level has exactly the target mpp, the next finer level is read
  and resized (PIL, antialiased) so tiles always show the target resolution;
* the tissue mask is computed on the lowest-resolution level (grayscale, border
  band of 1/30 cleared, Otsu on gray in (0.02, 0.98), tissue = gray < t and
  gray > 0.02, closing then opening with a 2 x 2 square);
* a tile of the non-overlapping grid is kept when its tissue fraction exceeds a
  tolerance (0.1); its position is its level-0 (x, y) top-left corner.

Tile reads run in a thread pool: OpenSlide is thread-safe and ctypes releases
the GIL during its calls, so reading scales with cores.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
import pathlib

import numpy as np
import openslide
import skimage.color
import skimage.filters
import skimage.morphology
from PIL import Image

# Tiles whose read size is within this fraction of the tile size are read
# without resizing (e.g. 0.499 mpp x 2 = 0.998 mpp is "1.0 mpp").
MPP_TOLERANCE = 0.02
# A lowest level larger than this (pixels per side) is replaced by a thumbnail
# for the mask, so single-level gigapixel files do not need GBs of memory.
MAX_MASK_SIDE = 4096


class SlideError(Exception):
  """A slide that cannot be used; the message says why and names the file."""


@dataclasses.dataclass(frozen=True)
class ReadPlan:
  """How tiles of one slide are read.

  Attributes:
    level: pyramid level read.
    read_size: pixels per tile side read at `level` (resized to tile_size).
    tile_size: pixels per tile side handed to the encoder.
    extent: level-0 pixels per tile side (grid step).
    level_mpp: mpp of `level`, None when the slide has no mpp.
    tile_mpp: mpp of the tiles handed to the encoder, None without mpp.
    warning: a note for the manifest (e.g. the mpp fallback), or None.
  """

  level: int
  read_size: int
  tile_size: int
  extent: int
  level_mpp: float | None
  tile_mpp: float | None
  warning: str | None = None


def open_slide(path: str | os.PathLike) -> openslide.OpenSlide:
  """Opens a slide, turning every failure into a SlideError naming the file."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise SlideError(f"{path}: not a file")
  try:
    return openslide.OpenSlide(str(path))
  except openslide.OpenSlideUnsupportedFormatError as e:
    raise SlideError(
      f"{path}: not a slide format OpenSlide reads, or a truncated/corrupt file ({e})"
    ) from e
  except (openslide.OpenSlideError, OSError, ValueError) as e:
    raise SlideError(f"{path}: unreadable or corrupt slide ({e})") from e


def _name(slide: openslide.OpenSlide) -> str:
  return str(getattr(slide, "_filename", "slide"))


def slide_mpp(slide: openslide.OpenSlide) -> float | None:
  """Level-0 microns per pixel (mean of x and y), None when the slide has none."""
  try:
    mx = float(slide.properties[openslide.PROPERTY_NAME_MPP_X])
    my = float(slide.properties[openslide.PROPERTY_NAME_MPP_Y])
  except (KeyError, ValueError):
    return None
  if not (mx > 0 and my > 0 and math.isfinite(mx) and math.isfinite(my)):
    return None
  return (mx + my) / 2


def target_mpp(magnification: float = 10.0, mpp: float | None = None) -> float:
  """The tile resolution asked for: `mpp` if given, else 10 / magnification."""
  if mpp is not None:
    if mpp <= 0:
      raise ValueError(f"mpp must be positive, got {mpp}")
    return float(mpp)
  if magnification <= 0:
    raise ValueError(f"magnification must be positive, got {magnification}")
  return 10.0 / magnification


def choose_level(
  slide: openslide.OpenSlide,
  tile_size: int = 224,
  *,
  magnification: float = 10.0,
  mpp: float | None = None,
  fallback_level: int = 1,
) -> ReadPlan:
  """Chooses the read level and read size for tiles at the target resolution.

  Args:
    slide: an open slide.
    tile_size: tile side in pixels handed to the encoder.
    magnification: target magnification (10x = 1.0 mpp); ignored when mpp given.
    mpp: target microns per pixel.
    fallback_level: level index used when the slide has no mpp (clamped to the
      last level); negative to refuse such slides.

  Returns:
    The ReadPlan.

  Raises:
    SlideError: no mpp and fallback_level < 0, or the slide is smaller than one tile.
  """
  name = _name(slide)
  mpp0 = slide_mpp(slide)
  downsamples = slide.level_downsamples
  warning = None
  if mpp0 is None:
    if fallback_level < 0:
      raise SlideError(f"{name}: missing mpp (and no fallback level allowed)")
    level = min(fallback_level, slide.level_count - 1)
    warning = f"missing mpp: read at level index {level}"
    if level != fallback_level:
      warning += f" (asked {fallback_level}, slide has {slide.level_count} levels)"
    read_size, level_mpp, tile_mpp = tile_size, None, None
  else:
    want = target_mpp(magnification, mpp)
    level_mpps = [mpp0 * d for d in downsamples]
    # The coarsest level still at least as fine as the target (up to tolerance).
    fine_enough = [i for i, m in enumerate(level_mpps) if m <= want * (1 + MPP_TOLERANCE)]
    level = max(fine_enough, key=lambda i: level_mpps[i]) if fine_enough else 0
    level_mpp = level_mpps[level]
    read_size = tile_size * want / level_mpp
    if abs(read_size / tile_size - 1) <= MPP_TOLERANCE:
      read_size = tile_size
    read_size = int(round(read_size))
    tile_mpp = level_mpp * read_size / tile_size
    if read_size < tile_size:
      warning = f"target {want:.3g} mpp is finer than level 0 ({mpp0:.3g} mpp): tiles upsampled"
  extent = int(round(read_size * downsamples[level]))
  w0, h0 = slide.dimensions
  if w0 < extent or h0 < extent:
    raise SlideError(
      f"{name}: too small for one tile: {w0} x {h0} level-0 pixels, one tile covers "
      f"{extent} x {extent}"
    )
  return ReadPlan(level, read_size, tile_size, extent, level_mpp, tile_mpp, warning)


def tissue_mask_from_rgb(rgb: np.ndarray) -> np.ndarray:
  """The docs/method.md section 1 tissue mask of a low-resolution RGB image.

  Args:
    rgb: uint8 [H, W, 3].

  Returns:
    bool [H, W], True on tissue. All False when no pixel is in (0.02, 0.98).
  """
  gray = skimage.color.rgb2gray(rgb)
  h, w = gray.shape
  # Clear a border band of 1/30 of each side (set to 0, i.e. neither counted
  # for Otsu nor tissue), like the reference's clear_border(prop=30).
  bh, bw = h // 30, w // 30
  gray[:bh] = 0
  gray[h - bh :] = 0
  gray[:, :bw] = 0
  gray[:, w - bw :] = 0
  pixels = gray[(gray > 0.02) & (gray < 0.98)]
  if pixels.size == 0 or pixels.min() == pixels.max():
    return np.zeros((h, w), bool)
  t = skimage.filters.threshold_otsu(pixels)
  mask = (gray < t) & (gray > 0.02)
  square = np.ones((2, 2), bool)
  return skimage.morphology.opening(skimage.morphology.closing(mask, square), square)


def mask_image(slide: openslide.OpenSlide) -> tuple[np.ndarray, float]:
  """RGB image of the lowest-resolution level (a thumbnail if that level is huge).

  Returns:
    (uint8 [h, w, 3], level-0 pixels per image pixel).
  """
  w, h = slide.level_dimensions[-1]
  w0 = slide.dimensions[0]
  try:
    if max(w, h) > MAX_MASK_SIDE:
      img = slide.get_thumbnail((MAX_MASK_SIDE, MAX_MASK_SIDE))
    else:
      img = slide.read_region((0, 0), slide.level_count - 1, (w, h))
  except openslide.OpenSlideError as e:
    raise SlideError(f"{_name(slide)}: corrupt slide, reading its lowest level failed ({e})") from e
  rgb = _to_rgb(np.asarray(img))
  return rgb, w0 / rgb.shape[1]


def tile_grid(
  dimensions: tuple[int, int],
  extent: int,
  mask: np.ndarray,
  mask_downsample: float,
  tolerance: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
  """The kept tiles of the non-overlapping grid.

  Args:
    dimensions: level-0 (width, height).
    extent: level-0 pixels per tile side.
    mask: bool [h, w] tissue mask.
    mask_downsample: level-0 pixels per mask pixel.
    tolerance: a tile is kept when its tissue fraction is > tolerance.

  Returns:
    (int32 [N, 2] level-0 (x, y) top-left corners, row-major order;
     float32 [N] tissue fractions).
  """
  w0, h0 = dimensions
  xs = np.arange(0, w0 - extent + 1, extent)
  ys = np.arange(0, h0 - extent + 1, extent)
  gx, gy = np.meshgrid(xs, ys)  # [ny, nx]
  gx, gy = gx.ravel(), gy.ravel()
  mh, mw = mask.shape
  # Integral image: any rectangle's tissue count in O(1).
  integral = np.zeros((mh + 1, mw + 1), np.int64)
  integral[1:, 1:] = np.cumsum(np.cumsum(mask, 0), 1)

  def to_mask(v, limit):
    return np.clip(v / mask_downsample, 0, limit)

  x0 = np.floor(to_mask(gx, mw)).astype(np.int64)
  y0 = np.floor(to_mask(gy, mh)).astype(np.int64)
  x1 = np.maximum(np.ceil(to_mask(gx + extent, mw)).astype(np.int64), x0 + 1).clip(max=mw)
  y1 = np.maximum(np.ceil(to_mask(gy + extent, mh)).astype(np.int64), y0 + 1).clip(max=mh)
  count = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
  area = np.maximum((x1 - x0) * (y1 - y0), 1)
  frac = (count / area).astype(np.float32)
  keep = frac > tolerance
  coords = np.stack([gx[keep], gy[keep]], -1).astype(np.int32)
  return coords.reshape(-1, 2), frac[keep]


def _to_rgb(rgba: np.ndarray) -> np.ndarray:
  """RGBA -> RGB on a white background (transparent = outside the scanned area)."""
  if rgba.shape[-1] == 3:
    return np.ascontiguousarray(rgba)
  rgb = rgba[..., :3]
  alpha = rgba[..., 3:]
  if alpha.min() == 255:
    return np.ascontiguousarray(rgb)
  a = alpha.astype(np.float32) / 255
  return (rgb * a + 255 * (1 - a)).round().astype(np.uint8)


def default_read_threads() -> int:
  """Tile-reading threads when none are asked for: 2 x cores, at most 32."""
  return min(32, (os.cpu_count() or 1) * 2)


class TileReader:
  """Reads tiles of one slide in a thread pool (its own, or a shared one it does not close).

  Usage:
    with TileReader(slide, plan, threads=8) as reader:
      tiles = reader.read(coords)  # uint8 [B, tile_size, tile_size, 3]
  """

  def __init__(
    self,
    slide: openslide.OpenSlide,
    plan: ReadPlan,
    threads: int | None = None,
    pool: concurrent.futures.ThreadPoolExecutor | None = None,
  ):
    self.slide = slide
    self.plan = plan
    self.threads = threads or default_read_threads()  # with `pool`: the pool's, as told
    self._own_pool = pool is None
    self._pool = pool or concurrent.futures.ThreadPoolExecutor(self.threads)

  def read_one(self, xy: tuple[int, int]) -> np.ndarray:
    """One tile at level-0 (x, y): uint8 [tile_size, tile_size, 3]."""
    p = self.plan
    try:
      img = self.slide.read_region((int(xy[0]), int(xy[1])), p.level, (p.read_size, p.read_size))
    except openslide.OpenSlideError as e:
      raise SlideError(
        f"{_name(self.slide)}: corrupt slide, reading the tile at level-0 "
        f"{tuple(int(v) for v in xy)} failed ({e})"
      ) from e
    if p.read_size != p.tile_size:
      img = img.resize((p.tile_size, p.tile_size), Image.Resampling.BILINEAR)
    return _to_rgb(np.asarray(img))

  def submit(self, coords: np.ndarray) -> "_Deferred":
    """Starts reading tiles [B, 2] in the background; result() gives [B, T, T, 3]."""
    futures = [self._pool.submit(self.read_one, xy) for xy in np.asarray(coords)]

    def gather():
      out = np.empty((len(futures), self.plan.tile_size, self.plan.tile_size, 3), np.uint8)
      for i, f in enumerate(futures):
        out[i] = f.result()
      return out

    return _Deferred(gather)

  def read(self, coords: np.ndarray) -> np.ndarray:
    """Reads tiles [B, 2] (level-0 x, y): uint8 [B, tile_size, tile_size, 3]."""
    return self.submit(coords).result()

  def close(self):
    if self._own_pool:
      self._pool.shutdown(wait=True, cancel_futures=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class _Deferred:
  """A result computed on first result() call (the tile futures run already)."""

  def __init__(self, fn):
    self._fn = fn

  def result(self):
    return self._fn()
