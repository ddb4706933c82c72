"""The demo cohort: real tissue, composed offline into pyramidal slides with SYNTHETIC labels.

    python -m gigassl_jax.cohort --out=DIR [--n_per_class=16] [--grid=12] [--seed=0]

Raw material: three real H&E images bundled in gigassl_jax/data (see its
ATTRIBUTION): normal skin stroma/epidermis from the CC0 OpenSlide test slide,
and two tumour fields (tiatoolbox's target image, stardist's histo.jpg). Each
slide is an irregular tissue section on glass; inside it a smooth random field
decides, pixel by pixel, whether the tissue shows "tumour" or "stroma" texture
(each texture quilted from random 112-pixel patches of its source images,
randomly rotated and flipped, so slides do not repeat each other).

The two classes differ in composition AND arrangement, visibly in thumbnails:

* ``stroma_rich``: tumour covers 15-45 % of the tissue, in many small foci;
* ``tumour_rich``: tumour covers 30-60 % of the tissue, in a few large nests.

The fractions overlap on purpose, so the task is not trivially separable. Each
slide also gets its own stain (a per-channel gain of 1 +- 0.12 on the tissue),
independent of the label, as slides of different patients differ.
These labels are synthetic: they say how the slide was composed, nothing about
a diagnosis. Level 0 is written at 1.0 um/pixel (10x), so the default
embedding reads 224-pixel tiles from it without resampling (the source images'
own pixel sizes, ~0.25-0.5 um, are not resampled: the tissue looks magnified).
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.resources
import os
import pathlib
import sys

import numpy as np

CLASSES = ("stroma_rich", "tumour_rich")
_SOURCES = {
  "stroma": ("stroma_cmu_dermis_1.jpg", "stroma_cmu_dermis_2.jpg", "stroma_cmu_dermis_3.jpg"),
  "tumour": ("tumour_tiatoolbox_target.jpg", "tumour_stardist_histo.jpg"),
}
# Per class: tumour fraction range and the size (in cells) of the smoothing that
# makes the tumour field: small = many small foci, large = a few big nests.
_CLASS_PARAMS = {
  "stroma_rich": dict(fraction=(0.15, 0.45), blob_cells=0.5),
  "tumour_rich": dict(fraction=(0.30, 0.60), blob_cells=2.0),
}
_GLASS = np.array([242, 240, 244], np.float32)
# Per-slide stain variation: each RGB channel of the tissue scaled by 1 +- this.
STAIN_VARIATION = 0.12


@dataclasses.dataclass(frozen=True)
class CohortConfig:
  """What `make_cohort` builds.

  Attributes:
    out: output folder (slides/*.svs, labels.csv, cohort.png).
    n_per_class: slides per class.
    grid: slide side in 224-pixel cells (level-0 side = grid * cell).
    cell: level-0 pixels per tile at 10x.
    seed: everything random derives from it.
  """

  out: str
  n_per_class: int = 16
  grid: int = 12
  cell: int = 224
  seed: int = 0


def data_path(name: str) -> pathlib.Path:
  """Path of a file bundled in gigassl_jax/data."""
  p = importlib.resources.files("gigassl_jax") / "data" / name
  return pathlib.Path(str(p))


def load_textures() -> dict:
  """{"stroma": [uint8 [h, w, 3], ...], "tumour": [...]} from the bundled images."""
  from PIL import Image  # pylint: disable=import-outside-toplevel

  out = {}
  for kind, names in _SOURCES.items():
    out[kind] = []
    for n in names:
      p = data_path(n)
      if not p.is_file():
        raise FileNotFoundError(f"bundled image {p} is missing (reinstall gigassl_jax)")
      out[kind].append(np.asarray(Image.open(p).convert("RGB")))
  return out


def _smooth_field(rng, shape, sigma):
  """Gaussian-smoothed white noise, standardised: float32 [h, w]."""
  from scipy import ndimage  # pylint: disable=import-outside-toplevel

  f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
  return (f - f.mean()) / (f.std() + 1e-6)


def _quilt(rng, sources: list, h: int, w: int, patch: int = 112) -> np.ndarray:
  """A [h, w, 3] texture quilted from random patches of the sources.

  Each patch x patch square is a random crop of a random source, rotated by a
  random multiple of 90 degrees and maybe flipped: slides never repeat each
  other and no mirror symmetry shows (seams between patches do).
  """
  out = np.empty((h, w, 3), np.uint8)
  for y in range(0, h, patch):
    for x in range(0, w, patch):
      src = sources[int(rng.integers(len(sources)))]
      sy = int(rng.integers(src.shape[0] - patch + 1))
      sx = int(rng.integers(src.shape[1] - patch + 1))
      p = np.rot90(src[sy : sy + patch, sx : sx + patch], k=int(rng.integers(4)))
      if rng.random() < 0.5:
        p = p[:, ::-1]
      out[y : y + patch, x : x + patch] = p[: h - y, : w - x]
  return out


def render_slide(
  rng: np.random.Generator, label: str, textures: dict, grid: int = 12, cell: int = 224
) -> tuple[np.ndarray, dict]:
  """One slide of class `label`.

  Args:
    rng: numpy Generator (the slide's own).
    label: one of CLASSES.
    textures: from load_textures().
    grid: slide side in cells; cell: level-0 pixels per cell.

  Returns:
    (uint8 [grid * cell, grid * cell, 3] RGB, info dict with the measured
     tumour fraction of the tissue).
  """
  if label not in _CLASS_PARAMS:
    raise ValueError(f"unknown class {label!r}; valid: {CLASSES}")
  p = _CLASS_PARAMS[label]
  side = grid * cell
  # Fields are drawn at 1/8 resolution and upsampled: smooth shapes, cheap.
  lo = side // 8
  up = lambda a: np.repeat(np.repeat(a, 8, 0), 8, 1)  # noqa: E731
  # Tissue: an ellipse deformed by low-frequency noise, about 60 % of the glass.
  yy, xx = np.mgrid[0:lo, 0:lo].astype(np.float32) / lo - 0.5
  rx, ry = rng.uniform(0.32, 0.45, 2)
  ang = rng.uniform(0, np.pi)
  u = xx * np.cos(ang) + yy * np.sin(ang)
  v = -xx * np.sin(ang) + yy * np.cos(ang)
  ell = 1.0 - (u / rx) ** 2 - (v / ry) ** 2
  tissue = ell + 0.35 * _smooth_field(rng, (lo, lo), lo / 10) > 0
  # Tumour: the top `fraction` of a smooth field inside the tissue.
  frac = rng.uniform(*p["fraction"])
  field = _smooth_field(rng, (lo, lo), p["blob_cells"] * cell / 8)
  thr = np.quantile(field[tissue], 1.0 - frac) if tissue.any() else np.inf
  tumour = tissue & (field > thr)
  tissue_px, tumour_px = up(tissue), up(tumour)
  stroma_img = _quilt(rng, textures["stroma"], side, side)
  tumour_img = _quilt(rng, textures["tumour"], side, side)
  img = np.where(tumour_px[..., None], tumour_img, stroma_img).astype(np.float32)
  # Each slide its own stain batch (per-channel gain), as slides of different
  # patients and days differ: it is what tells two slides apart, not the label.
  img *= rng.uniform(1.0 - STAIN_VARIATION, 1.0 + STAIN_VARIATION, 3).astype(np.float32)
  # Glass with a little noise (a flat background leaves Otsu nothing to split).
  glass = _GLASS + rng.normal(0, 2.0, (side, side, 1)).astype(np.float32)
  img = np.where(tissue_px[..., None], img, glass)
  info = {
    "tumour_fraction": float(tumour.sum() / max(tissue.sum(), 1)),
    "tissue_fraction": float(tissue.mean()),
  }
  return np.clip(img, 0, 255).astype(np.uint8), info


def write_pyramid(
  path,
  rgb: np.ndarray,
  *,
  mpp: float = 1.0,
  app_mag: float = 10,
  n_levels: int = 3,
  downsample: int = 4,
  tile: int = 256,
) -> pathlib.Path:
  """Writes an RGB image as an Aperio-flavoured pyramidal JPEG TIFF (atomically).

  One tiled page per level (OpenSlide does not see SubIFD levels); the
  ImageDescription makes OpenSlide report vendor aperio and the mpp.
  """
  import tifffile  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel

  path = pathlib.Path(path)
  h, w = rgb.shape[:2]
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  level = rgb
  with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
    for k in range(n_levels):
      if k:
        lw, lh = w // downsample**k, h // downsample**k
        if lw < 16 or lh < 16:
          break
        level = np.asarray(Image.fromarray(rgb).resize((lw, lh), Image.BOX))
      kwargs = {}
      if k == 0:
        kwargs["description"] = (
          f"Aperio Image Library v10.0.50\r\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) "
          f"JPEG/RGB Q=90|AppMag = {app_mag:g}|MPP = {mpp:g}"
        )
      tw.write(
        level,
        tile=(tile, tile),
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": 90},
        subfiletype=0 if k == 0 else 1,
        metadata=None,
        **kwargs,
      )
  os.replace(tmp, path)
  return path


def make_cohort(cfg: CohortConfig, progress: bool = True) -> pathlib.Path:
  """Writes slides/<id>.svs, labels.csv (ID,label,tumour_fraction) and cohort.png.

  Slide ids alternate classes (demo_000 stroma_rich, demo_001 tumour_rich, ...).
  Slides already present are kept (the demo is resumable); returns labels.csv.
  """
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  if cfg.n_per_class < 1 or cfg.grid < 3:
    raise ValueError(f"need n_per_class >= 1 and grid >= 3, got {cfg.n_per_class}, {cfg.grid}")
  out = pathlib.Path(cfg.out)
  (out / "slides").mkdir(parents=True, exist_ok=True)
  textures = load_textures()
  rows, thumbs = [], []
  n = 2 * cfg.n_per_class
  for i in tqdm(range(n), desc="cohort", unit="slide", disable=not progress, dynamic_ncols=True):
    label = CLASSES[i % 2]
    sid = f"demo_{i:03d}"
    rng = np.random.default_rng([cfg.seed, i])
    rgb, info = render_slide(rng, label, textures, cfg.grid, cfg.cell)
    path = out / "slides" / f"{sid}.svs"
    if not path.is_file():
      write_pyramid(path, rgb)
    rows.append({"ID": sid, "label": label, "tumour_fraction": f"{info['tumour_fraction']:.3f}"})
    thumbs.append((sid, label, rgb[::8, ::8]))
  labels = out / "labels.csv"
  tmp = labels.with_name(f".{labels.name}.tmp-{os.getpid()}")
  with open(tmp, "w", newline="") as f:
    w = csv.DictWriter(f, ["ID", "label", "tumour_fraction"])
    w.writeheader()
    w.writerows(rows)
  os.replace(tmp, labels)
  contact_sheet(thumbs, out / "cohort.png")
  return labels


def contact_sheet(thumbs: list, path, per_row: int = 6) -> pathlib.Path:
  """A PNG grid of slide thumbnails, one row block per class, captioned id/label."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  by_class = {c: [t for t in thumbs if t[1] == c] for c in CLASSES}
  n_rows = sum(-(-len(v) // per_row) for v in by_class.values())
  fig, axes = plt.subplots(n_rows, per_row, figsize=(2.6 * per_row, 2.9 * n_rows), squeeze=False)
  for ax in axes.ravel():
    ax.axis("off")
  r = 0
  for c in CLASSES:
    items = by_class[c]
    for j, (sid, label, img) in enumerate(items):
      ax = axes[r + j // per_row, j % per_row]
      ax.imshow(img)
      ax.set_title(f"{sid}\n{label}", fontsize=7, color="C0" if label == CLASSES[0] else "C3")
    r += -(-len(items) // per_row)
  fig.suptitle(
    "demo cohort (synthetic labels): tumour texture in small foci (stroma_rich) "
    "vs large nests (tumour_rich)",
    fontsize=9,
  )
  fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (2.9 * n_rows)))
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, path)
  return path


def main(argv=None):
  import argparse  # pylint: disable=import-outside-toplevel

  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--n_per_class", type=int, default=16)
  ap.add_argument("--grid", type=int, default=12)
  ap.add_argument("--seed", type=int, default=0)
  a = ap.parse_args(argv)
  labels = make_cohort(CohortConfig(out=a.out, n_per_class=a.n_per_class, grid=a.grid, seed=a.seed))
  print(f"cohort: {labels}", file=sys.stderr)


if __name__ == "__main__":
  main()
