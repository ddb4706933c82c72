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

The fractions overlap on purpose, so the task is not trivially separable.

Each slide also gets an IDENTITY, drawn per slide and independent of its label
(`draw_identity`), as the tissue of different patients differs: its own region
of each source image and its own mix of the sources (so its cells and
structures are its own), its own texture scale (zoom 0.5-2: cell size and
density per tile), its own haematoxylin and eosin amounts (nuclear density /
cellularity as seen in the stain), and its own stain vectors: the tissue is
colour-deconvolved into H&E optical densities with the standard vectors and
re-stained with the slide's perturbed ones (`restain`; its stain batch). The
identity is what survives the shared augmentations (colour jitter, crops), so
a contrastive training has something to learn; `identity_retrieval` measures
it on a bank: the mean of all tiles of one augmentation file finds the same
slide's other file among all slides.
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

from gigassl_jax import cli

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
# Per-slide identity (draw_identity), independent of the label. zoom: texture
# scale, log-uniform (the shared augmentations' random resized crop rescales by
# at most ~1.4, so a wider range stays visible); mix_alpha: Dirichlet
# concentration of the mix of source images (< 1: most slides favour one or two);
# window: side of the region of each source image a slide draws from, as a
# fraction of the image; h_gain / e_gain: haematoxylin / eosin amounts;
# stain_vector_sd: perturbation of the H and E optical-density vectors.
IDENTITY = {
  "zoom": (0.5, 2.0),
  "mix_alpha": 0.3,
  "window": 0.25,
  "h_gain": (0.6, 1.5),
  "e_gain": (0.6, 1.5),
  "stain_vector_sd": 0.15,
}


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


@dataclasses.dataclass(frozen=True)
class SlideIdentity:
  """What makes one slide recognisably itself, drawn per slide, independent of its label.

  Attributes:
    weights: {"stroma": [k], "tumour": [k]} mix of the source images (Dirichlet).
    windows: {"stroma": [(y0, x0, h, w), ...], ...} the region of each source
      image this slide's patches come from (its own "patient's tissue").
    zoom: texture scale (> 1 magnifies: larger cells, fewer per tile).
    h_gain, e_gain: haematoxylin / eosin amounts (nuclear density / cellularity
      and stroma staining), multiplying the HED concentrations.
    rgb_from_hed: [3, 3] the slide's own stain vectors (rows: H, E, DAB optical
      densities), the standard ones perturbed and renormalised: its stain batch.
  """

  weights: dict
  windows: dict
  zoom: float
  h_gain: float
  e_gain: float
  rgb_from_hed: np.ndarray


def draw_identity(rng: np.random.Generator, textures: dict, patch: int = 112) -> SlideIdentity:
  """A random `SlideIdentity` for the sources in `textures` (from load_textures())."""
  from skimage.color import rgb_from_hed  # pylint: disable=import-outside-toplevel

  zoom = float(np.exp(rng.uniform(np.log(IDENTITY["zoom"][0]), np.log(IDENTITY["zoom"][1]))))
  crop = int(np.ceil(patch / zoom))
  weights, windows = {}, {}
  for kind, srcs in textures.items():
    weights[kind] = rng.dirichlet(np.full(len(srcs), IDENTITY["mix_alpha"]))
    windows[kind] = []
    for src in srcs:
      h, w = src.shape[:2]
      wh = min(h, max(crop + 1, int(IDENTITY["window"] * h)))
      ww = min(w, max(crop + 1, int(IDENTITY["window"] * w)))
      windows[kind].append((int(rng.integers(h - wh + 1)), int(rng.integers(w - ww + 1)), wh, ww))
  stains = np.array(rgb_from_hed, np.float64)
  stains[:2] += rng.normal(0, IDENTITY["stain_vector_sd"], (2, 3))
  stains = np.abs(stains) / np.linalg.norm(stains, axis=1, keepdims=True)
  return SlideIdentity(
    weights=weights,
    windows=windows,
    zoom=zoom,
    h_gain=float(rng.uniform(*IDENTITY["h_gain"])),
    e_gain=float(rng.uniform(*IDENTITY["e_gain"])),
    rgb_from_hed=stains,
  )


def _quilt(rng, sources: list, h: int, w: int, patch: int = 112, weights=None, zoom=1.0):
  """A [h, w, 3] uint8 texture quilted from random patches of the sources.

  Each patch x patch square is a random crop of a source (drawn with
  `weights`, uniform if None) of side patch / zoom, resized to patch, rotated
  by a random multiple of 90 degrees and maybe flipped: slides never repeat
  each other and no mirror symmetry shows (seams between patches do).
  """
  from PIL import Image  # pylint: disable=import-outside-toplevel

  crop = int(np.ceil(patch / zoom))
  out = np.empty((h, w, 3), np.uint8)
  for y in range(0, h, patch):
    for x in range(0, w, patch):
      k = int(rng.choice(len(sources), p=weights))
      src = sources[k]
      c = min(crop, *src.shape[:2])
      sy = int(rng.integers(src.shape[0] - c + 1))
      sx = int(rng.integers(src.shape[1] - c + 1))
      p = src[sy : sy + c, sx : sx + c]
      if c != patch:
        p = np.asarray(Image.fromarray(p).resize((patch, patch), Image.BILINEAR))
      p = np.rot90(p, k=int(rng.integers(4)))
      if rng.random() < 0.5:
        p = p[:, ::-1]
      out[y : y + patch, x : x + patch] = p[: h - y, : w - x]
  return out


def restain(rgb: np.ndarray, ident: SlideIdentity) -> np.ndarray:
  """Colour deconvolution with the standard H&E vectors, re-staining with the slide's own.

  skimage.color's rgb2hed followed by combine_stains with the slide's vectors,
  written out in float32 (skimage works in float64: 3x slower on a slide).

  Args:
    rgb: uint8 or float [h, w, 3] (0-255).
    ident: the slide's identity (h_gain, e_gain, rgb_from_hed).

  Returns:
    float32 [h, w, 3] in 0-255.
  """
  from skimage.color import hed_from_rgb  # pylint: disable=import-outside-toplevel

  # Optical density in skimage's units: log(I) / log(1e-6), I in (0, 1].
  log_adjust = np.float32(np.log(1e-6))
  od = np.log(np.maximum(np.asarray(rgb, np.float32) / 255.0, 1e-6)) / log_adjust
  hed = np.maximum(od @ hed_from_rgb.astype(np.float32), 0)
  hed *= np.array([ident.h_gain, ident.e_gain, 1.0], np.float32)
  out = np.exp((hed * log_adjust) @ ident.rgb_from_hed.astype(np.float32))
  return np.clip(out, 0, 1) * 255.0


def render_slide(
  rng: np.random.Generator, label: str, textures: dict, grid: int = 12, cell: int = 224
) -> tuple[np.ndarray, dict]:
  """One slide of class `label`, with its own identity.

  The identity (`draw_identity`: source mix and regions, texture scale,
  haematoxylin / eosin amounts, stain vectors) is drawn first, from the same
  rng but independently of the label; the label decides only how much tumour
  texture there is and how it is arranged.

  Args:
    rng: numpy Generator (the slide's own).
    label: one of CLASSES.
    textures: from load_textures().
    grid: slide side in cells; cell: level-0 pixels per cell.

  Returns:
    (uint8 [grid * cell, grid * cell, 3] RGB, info dict with the measured
     tumour fraction of the tissue and the identity's scalars).
  """
  if label not in _CLASS_PARAMS:
    raise ValueError(f"unknown class {label!r}; valid: {CLASSES}")
  p = _CLASS_PARAMS[label]
  ident = draw_identity(rng, textures)
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
  # The slide's own tissue: its region of each source image, re-stained with
  # its own stain vectors and H/E amounts (pixelwise, so before quilting =
  # after, on ~1/6 of the pixels), then quilted at its own scale and mix.
  own = {
    kind: [
      np.clip(restain(src[y0 : y0 + wh, x0 : x0 + ww], ident), 0, 255).astype(np.uint8)
      for src, (y0, x0, wh, ww) in zip(srcs, ident.windows[kind])
    ]
    for kind, srcs in textures.items()
  }
  stroma_img, tumour_img = (
    _quilt(rng, own[k], side, side, weights=ident.weights[k], zoom=ident.zoom)
    for k in ("stroma", "tumour")
  )
  img = np.where(tumour_px[..., None], tumour_img, stroma_img).astype(np.float32)
  # Glass with a little noise (a flat background leaves Otsu nothing to split).
  glass = _GLASS + rng.normal(0, 2.0, (side, side, 1)).astype(np.float32)
  img = np.where(tissue_px[..., None], img, glass)
  info = {
    "tumour_fraction": float(tumour.sum() / max(tissue.sum(), 1)),
    "tissue_fraction": float(tissue.mean()),
    "zoom": ident.zoom,
    "h_gain": ident.h_gain,
    "e_gain": ident.e_gain,
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


def make_cohort(cfg: CohortConfig, progress: bool = True, sheet=None) -> pathlib.Path:
  """Writes slides/<id>.svs, labels.csv (ID,label,tumour_fraction) and the contact sheet.

  Slide ids alternate classes (demo_000 stroma_rich, demo_001 tumour_rich, ...).
  Slides already present are kept (the demo is resumable); returns labels.csv.
  The contact sheet goes to `sheet` (default: <out>/cohort.png).
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
  contact_sheet(thumbs, out / "cohort.png" if sheet is None else sheet)
  return labels


def identity_retrieval(bank_dir, aug_a: int = 0, aug_b: int = 1, max_tiles: int = 0) -> dict:
  """Do the slides of a bank have an identity that survives the shared augmentations?

  Per slide, the mean of ALL its tiles of augmentation file `aug_a` and of file
  `aug_b`; top-1 of finding the slide's `aug_b` mean from its `aug_a` mean among
  all slides (centred cosine, both directions averaged;
  retrieval.pair_retrieval_top1). Near chance (1 / N) when the shared colour
  and crop augmentations move a slide more than slides differ from each other.

  Args:
    bank_dir: an embedding bank (slides/<id>.npz, at least 2 slides and 2 files).
    aug_a, aug_b: the two augmentation files compared.
    max_tiles: if > 0, only the first max_tiles tiles of each file (the bank
      draws tiles independently, so they are a smaller bank's draw): compares
      banks of different sizes on equal terms.

  Returns:
    {"top1", "chance", "n_slides", "aug": [aug_a, aug_b], "tiles"}.
  """
  from gigassl_jax import bank as bank_lib  # pylint: disable=import-outside-toplevel
  from gigassl_jax import retrieval  # pylint: disable=import-outside-toplevel

  ids = bank_lib.finished_slides(bank_dir)
  if len(ids) < 2:
    raise ValueError(f"{bank_dir}: identity retrieval needs at least 2 slides, found {len(ids)}")
  a, b = [], []
  for sid in ids:
    emb, _, _ = bank_lib.read_slide(bank_lib.slide_path(bank_dir, sid))
    if max(aug_a, aug_b) >= emb.shape[0]:
      raise ValueError(f"{bank_dir}: slide {sid} has {emb.shape[0]} augmentation files")
    n = emb.shape[1] if max_tiles <= 0 else min(max_tiles, emb.shape[1])
    a.append(emb[aug_a, :n].astype(np.float64).mean(0))
    b.append(emb[aug_b, :n].astype(np.float64).mean(0))
  return {
    "top1": retrieval.pair_retrieval_top1(np.stack(a), np.stack(b)),
    "chance": 1.0 / len(ids),
    "n_slides": len(ids),
    "aug": [aug_a, aug_b],
    "tiles": n,
  }


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


def _print_identity(bank_dir, max_tiles: int):
  """JSON on stdout: identity_retrieval for every pair of augmentation files, and their mean."""
  import itertools  # pylint: disable=import-outside-toplevel
  import json  # pylint: disable=import-outside-toplevel

  from gigassl_jax import bank as bank_lib  # pylint: disable=import-outside-toplevel

  ids = bank_lib.finished_slides(bank_dir)
  if not ids:
    print(f"cohort: --identity_of={bank_dir}: no finished slides there", file=sys.stderr)
    sys.exit(2)
  n_aug = bank_lib.read_slide(bank_lib.slide_path(bank_dir, ids[0]))[0].shape[0]
  try:
    pairs = [
      identity_retrieval(bank_dir, i, j, max_tiles)
      for i, j in itertools.combinations(range(n_aug), 2)
    ]
  except ValueError as e:
    print(f"cohort: --identity_of={bank_dir}: {e}", file=sys.stderr)
    sys.exit(2)
  import datetime  # pylint: disable=import-outside-toplevel
  import platform  # pylint: disable=import-outside-toplevel

  out = {
    "command": " ".join(["python -m gigassl_jax.cohort", *sys.argv[1:]]),
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs",
    "bank": str(bank_dir),
    "mean_top1": float(np.mean([p["top1"] for p in pairs])),
    "chance": pairs[0]["chance"],
    "pairs": pairs,
  }
  print(json.dumps(out, indent=1))


@dataclasses.dataclass(frozen=True)
class CohortFlags:
  """The command line: a new cohort (make_cohort's CohortConfig), or --identity_of=BANK."""

  out: str | None = cli.field(None, "Output folder of a new cohort.")
  n_per_class: int = cli.field(CohortConfig.n_per_class, "Slides per class.")
  grid: int = cli.field(CohortConfig.grid, "Slide side in 224-pixel cells.")
  seed: int = cli.field(CohortConfig.seed, "Everything random derives from it.")
  identity_of: str | None = cli.field(
    None,
    "Instead: print the identity retrieval of this embedding bank (every pair of "
    "augmentation files) as JSON.",
  )
  max_tiles: int = cli.field(0, "With --identity_of: tiles per file.")


def main(argv) -> int:
  """A new cohort in --out, or the identity retrieval of --identity_of; the exit status."""
  del argv  # the flags hold the settings
  a = cli.from_flags(CohortFlags)
  if a.identity_of:
    _print_identity(a.identity_of, a.max_tiles)
    return 0
  if not a.out:
    print("cohort: error: --out is required (or --identity_of=BANK)", file=sys.stderr)
    return 2
  labels = make_cohort(CohortConfig(out=a.out, n_per_class=a.n_per_class, grid=a.grid, seed=a.seed))
  print(f"cohort: {labels}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  cli.define_flags(CohortFlags)
  cli.run(main)
