"""The embedding bank on disk: per-slide files written resumably, packed for random access.

Layout of a bank directory:

    slides/<slide_id>.npz   one finished slide: embeddings float16 [Naug, Nt, F],
                            coords int32 [Naug, Nt, 2] (level-0 x, y top-left of
                            each tile), meta (JSON: encoder, weights_id, level,
                            mpp, tile_size, ...). Written to a temp name and
                            renamed, so a file under its final name is complete.
    packed/                 a TensorFlow Datasets dataset (array_record format,
                            written and read without TensorFlow), one record per
                            (slide, augmentation), records in slide-major order:
                            record = slide_index * Naug + aug_index.

The training program reads the packed dataset with `open_bank(dir).get(s, k)`:
one record is ~128 KB (256 tiles x 256 features x float16), read on demand.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import uuid
import zipfile

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils

SLIDES_DIR = "slides"
PACKED_DIR = "packed"
_SUFFIX = ".npz"
_BUILDER_NAME = "gigassl_bank"
_VERSION = "1.0.0"


def _check_id(slide_id: str) -> str:
  if not slide_id or "/" in slide_id or "\\" in slide_id or slide_id.startswith("."):
    raise ValueError(f"invalid slide id {slide_id!r}: must be non-empty, no '/', no leading '.'")
  return slide_id


def slide_path(bank_dir: str | os.PathLike, slide_id: str) -> pathlib.Path:
  """Where the finished file of `slide_id` lives."""
  return pathlib.Path(bank_dir) / SLIDES_DIR / (_check_id(slide_id) + _SUFFIX)


def write_slide(
  bank_dir: str | os.PathLike,
  slide_id: str,
  embeddings: np.ndarray,
  coords: np.ndarray,
  meta: dict,
) -> pathlib.Path:
  """Writes one finished slide atomically (temp file + rename).

  Args:
    bank_dir: the bank directory (created if needed).
    slide_id: the slide's id (file stem); no '/'.
    embeddings: float16 [Naug, Nt, F] (other float dtypes are cast).
    coords: int [Naug, Nt, 2], level-0 (x, y) top-left of each tile.
    meta: JSON-serialisable dict (encoder, weights_id, level, mpp, tile_size, ...).

  Returns:
    The final path.
  """
  path = slide_path(bank_dir, slide_id)
  embeddings = np.asarray(embeddings)
  coords = np.asarray(coords)
  if embeddings.ndim != 3:
    raise ValueError(f"{slide_id}: embeddings must be [Naug, Nt, F], got {embeddings.shape}")
  if coords.shape != embeddings.shape[:2] + (2,):
    raise ValueError(
      f"{slide_id}: coords {coords.shape} do not match embeddings {embeddings.shape}"
    )
  if not np.all(np.isfinite(embeddings)):
    raise ValueError(f"{slide_id}: embeddings contain NaN or inf")
  meta = dict(meta, slide_id=slide_id)
  path.parent.mkdir(parents=True, exist_ok=True)
  # Unique temp name per writer: several processes may share a bank directory.
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
  try:
    with open(tmp, "wb") as f:
      np.savez(
        f,
        embeddings=embeddings.astype(np.float16),
        coords=coords.astype(np.int32),
        meta=np.array(json.dumps(meta, sort_keys=True)),
      )
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()
  return path


def read_slide(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict]:
  """Reads a per-slide file: (float16 [Naug, Nt, F], int32 [Naug, Nt, 2], meta)."""
  with np.load(path) as z:
    return z["embeddings"], z["coords"], json.loads(str(z["meta"]))


def is_finished(bank_dir: str | os.PathLike, slide_id: str) -> bool:
  """True when the slide's final file exists and is a complete npz archive.

  The rename makes a final name imply a complete file; the zip check also
  catches a file truncated later (e.g. a full disk on a network file system).
  """
  path = slide_path(bank_dir, slide_id)
  if not path.is_file():
    return False
  try:
    with zipfile.ZipFile(path) as z:
      return {"embeddings.npy", "coords.npy", "meta.npy"} <= set(z.namelist())
  except (zipfile.BadZipFile, OSError):
    return False


def finished_slides(bank_dir: str | os.PathLike) -> list[str]:
  """Sorted ids of the slides with a final file (temp files are ignored)."""
  d = pathlib.Path(bank_dir) / SLIDES_DIR
  if not d.is_dir():
    return []
  return sorted(
    p.name[: -len(_SUFFIX)] for p in d.glob("*" + _SUFFIX) if not p.name.startswith(".")
  )


def remove_stale_temps(bank_dir: str | os.PathLike, pid: int | None = None) -> int:
  """Deletes temp files left by killed writers of this host; returns how many.

  Only temps of processes that no longer run are removed (another live
  process may be writing its own).
  """
  d = pathlib.Path(bank_dir) / SLIDES_DIR
  n = 0
  for p in d.glob(".*.tmp-*") if d.is_dir() else []:
    try:
      owner = int(p.name.rsplit(".tmp-", 1)[1].split("-")[0])
    except ValueError:
      continue
    if owner == pid or not _pid_alive(owner):
      p.unlink(missing_ok=True)
      n += 1
  return n


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class _BankBuilder(tfds.core.GeneratorBasedBuilder):
  """TFDS builder writing one record per (slide, augmentation), in order."""

  VERSION = tfds.core.Version(_VERSION)
  name = _BUILDER_NAME

  def __init__(self, *, paths, n_tiles, feature_dim, metadata, **kwargs):
    # Set before super().__init__, which calls _info().
    self._paths = paths
    self._n_tiles = n_tiles
    self._feature_dim = feature_dim
    self._metadata = metadata
    super().__init__(**kwargs)

  # TFDS looks for checksum files next to the builder's code through
  # importlib_resources, which it does not install and which breaks with an
  # editable install: this builder downloads nothing, so there is no code path.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return None

  # TFDS prints "Downloading and preparing..." banners: nothing is downloaded.
  def _log_download_bytes(self):
    pass

  def _log_download_done(self):
    pass

  def _info(self):
    bytes_ = tfds.features.Encoding.BYTES  # raw bytes: no float16 -> float32 widening
    return tfds.core.DatasetInfo(
      builder=self,
      description="Giga-SSL embedding bank: one record per (slide, augmentation).",
      features=tfds.features.FeaturesDict(
        {
          "embeddings": tfds.features.Tensor(
            shape=(self._n_tiles, self._feature_dim), dtype=np.float16, encoding=bytes_
          ),
          "coords": tfds.features.Tensor(shape=(self._n_tiles, 2), dtype=np.int32, encoding=bytes_),
          "slide_index": np.int32,
          "aug_index": np.int32,
        }
      ),
      metadata=tfds.core.MetadataDict(self._metadata),
      # Keep generation order so record = slide_index * n_aug + aug_index.
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for s, path in enumerate(self._paths):
      emb, coords, _ = read_slide(path)
      for k in range(emb.shape[0]):
        yield (
          f"{s:09d}_{k:06d}",
          {
            "embeddings": emb[k],
            "coords": coords[k],
            "slide_index": s,
            "aug_index": k,
          },
        )


def pack(bank_dir: str | os.PathLike, slide_ids: list[str] | None = None) -> pathlib.Path:
  """Packs finished per-slide files into the TFDS array_record dataset `packed/`.

  Args:
    bank_dir: the bank directory.
    slide_ids: slides to pack (default: every finished slide), sorted by id.

  Returns:
    The packed dataset directory. It replaces any older one only once complete.

  Raises:
    ValueError: no finished slide, a slide id without a file, or slides whose
      shapes/encoder differ (one bank = one encoder and one (Naug, Nt, F)).
  """
  bank_dir = pathlib.Path(bank_dir)
  ids = sorted(finished_slides(bank_dir) if slide_ids is None else slide_ids)
  if not ids:
    raise ValueError(f"{bank_dir}: no finished slide to pack")
  paths = [slide_path(bank_dir, i) for i in ids]
  metas, shape = [], None
  for sid, p in zip(ids, paths):
    if not p.is_file():
      raise ValueError(f"{bank_dir}: slide {sid!r} has no finished file {p}")
    with np.load(p) as z:
      meta = json.loads(str(z["meta"]))
      s = z["embeddings"].shape  # reads the array; fine, packing reads it anyway
    metas.append(meta)
    if shape is None:
      shape, first = s, (sid, meta)
    if s != shape:
      raise ValueError(
        f"{p}: embeddings {s} differ from {shape} of slide {first[0]!r}; "
        "one bank holds one (Naug, Nt, F)"
      )
    for key in ("encoder", "weights_id"):
      if meta.get(key) != first[1].get(key):
        raise ValueError(
          f"{p}: {key} {meta.get(key)!r} differs from {first[1].get(key)!r} of slide {first[0]!r}"
        )
  n_aug, n_tiles, feature_dim = shape
  metadata = {
    "slide_ids": ids,
    "n_aug": n_aug,
    "n_tiles": n_tiles,
    "feature_dim": feature_dim,
    "slides": metas,
  }
  work = bank_dir / f".packing-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  try:
    builder = _BankBuilder(
      paths=paths,
      n_tiles=n_tiles,
      feature_dim=feature_dim,
      metadata=metadata,
      data_dir=str(work),
      file_format="array_record",
    )
    # TFDS's own progress bars would interleave with embed's; restore after.
    was_active = getattr(tqdm_utils, "_active", True)
    tfds.display_progress_bar(False)
    try:
      builder.download_and_prepare(
        download_dir=str(work / "downloads"),
        download_config=tfds.download.DownloadConfig(),
      )
    finally:
      tfds.display_progress_bar(was_active)
    built = pathlib.Path(builder.data_dir)
    final = bank_dir / PACKED_DIR
    # Swap in the new dataset: a reader sees the old one or the new one.
    old = bank_dir / f".packed-old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if final.exists():
      os.replace(final, old)
    os.replace(built, final)
    shutil.rmtree(old, ignore_errors=True)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  return final


class BankReader:
  """Random access to a packed bank.

  Attributes:
    slide_ids: list[str], slide index -> id.
    n_aug: augmentations per slide (Naug).
    n_tiles: tiles per augmentation (Nt).
    feature_dim: F.
    meta: dict of bank-level metadata (incl. "slides": per-slide meta list).
  """

  def __init__(self, packed_dir: pathlib.Path):
    self.path = packed_dir
    builder = tfds.builder_from_directory(str(packed_dir))
    self.meta = dict(builder.info.metadata)
    self.slide_ids = list(self.meta["slide_ids"])
    self.n_aug = int(self.meta["n_aug"])
    self.n_tiles = int(self.meta["n_tiles"])
    self.feature_dim = int(self.meta["feature_dim"])
    self._source = builder.as_data_source(split="train")
    if len(self._source) != len(self.slide_ids) * self.n_aug:
      raise ValueError(
        f"{packed_dir}: {len(self._source)} records, expected "
        f"{len(self.slide_ids)} slides x {self.n_aug} augmentations"
      )

  def __len__(self) -> int:
    return len(self.slide_ids)

  def get(self, slide_index: int, aug_index: int) -> tuple[np.ndarray, np.ndarray]:
    """One augmentation of one slide: (float16 [Nt, F], int32 [Nt, 2] level-0 x, y)."""
    if not 0 <= slide_index < len(self.slide_ids):
      raise IndexError(f"slide_index {slide_index} not in [0, {len(self.slide_ids)})")
    if not 0 <= aug_index < self.n_aug:
      raise IndexError(f"aug_index {aug_index} not in [0, {self.n_aug})")
    rec = self._source[slide_index * self.n_aug + aug_index]
    if rec["slide_index"] != slide_index or rec["aug_index"] != aug_index:
      raise RuntimeError(f"{self.path}: record order broken at ({slide_index}, {aug_index})")
    return rec["embeddings"], rec["coords"]


# ------------------------------------------------------- grid geometry -----

# The pooling network was trained with neighbouring tiles this many grid cells
# apart: the reference reads 224-px tiles at level 1 (4x downsample), so
# neighbours are 896 level-0 px apart, and its cell (downmap) is 224 px.
REFERENCE_SPACING = 4
REFERENCE_CELL = 224


def grid_cell_for(patch_size_level0: float | None, spacing: int = REFERENCE_SPACING) -> int:
  """The grid cell (level-0 px) that puts neighbouring patches `spacing` cells apart.

  Rule: cell = round(patch_size_level0 / spacing), at least 1. The reference's
  896-px patches give its 224-px cell; TRIDENT's 20x 256-px patches of a 40x
  scan (512 level-0 px) give 128; unknown patch size (None) gives the
  reference's 224. A released checkpoint brings its own cell (its `downmap`);
  neighbours then sit patch_size_level0 / downmap cells apart, which should be
  close to `spacing` for the model to see the geometry it was trained on.
  """
  if patch_size_level0 is None:
    return REFERENCE_CELL
  if patch_size_level0 <= 0:
    raise ValueError(f"patch_size_level0 must be > 0, got {patch_size_level0}")
  if spacing < 1:
    raise ValueError(f"spacing must be >= 1, got {spacing}")
  return max(1, int(round(patch_size_level0 / spacing)))


def spacing_warning(
  patch_size_level0: float | None, cell: int, spacing: int = REFERENCE_SPACING
) -> str | None:
  """A warning when patches sit a different number of cells apart than `spacing`.

  For a model with its own cell (a released checkpoint's downmap): neighbours
  at patch_size_level0 / cell cells; more than 25 % away from the training
  spacing, its kernels see another geometry. None when fine or unknown.
  """
  if patch_size_level0 is None:
    return None
  got = patch_size_level0 / cell
  if abs(got - spacing) <= 0.25 * spacing:
    return None
  match = grid_cell_for(patch_size_level0, spacing)
  return (
    f"the bank's patches ({patch_size_level0:g} level-0 px) sit {got:.3g} grid cells apart "
    f"with cell {cell}; the model was trained with {spacing} (cell {match} would match)"
  )


def slide_patch_size_level0(meta: dict) -> float | None:
  """A slide's patch size in level-0 px from its meta: `patch_size_level0`
  (import_features) or `extent` (embed's level-0 px per tile); None if unknown."""
  for key in ("patch_size_level0", "extent"):
    if meta.get(key):
      return float(meta[key])
  return None


def bank_patch_size_level0(reader: BankReader) -> float | None:
  """The bank's patch size in level-0 px: the median over its slides (None if unknown).

  Slides scanned at different resolutions differ a little; the median is the
  one cell that fits most of them (train/encode use one cell per run).
  """
  sizes = [slide_patch_size_level0(m) for m in reader.meta.get("slides", [])]
  sizes = [s for s in sizes if s]
  return float(np.median(sizes)) if sizes else None


def open_bank(bank_dir: str | os.PathLike) -> BankReader:
  """Opens the packed bank of `bank_dir` for reading.

  Raises:
    FileNotFoundError: the directory or its packed dataset is missing.
  """
  bank_dir = pathlib.Path(bank_dir)
  if not bank_dir.is_dir():
    raise FileNotFoundError(f"embedding bank {bank_dir} does not exist")
  packed = bank_dir / PACKED_DIR
  if not (packed / "dataset_info.json").is_file():
    n = len(finished_slides(bank_dir))
    raise FileNotFoundError(
      f"embedding bank {bank_dir} is not packed ({n} finished slide files): run "
      f"`python -m gigassl_jax.embed` to the end or call gigassl_jax.bank.pack({str(bank_dir)!r})"
    )
  return BankReader(packed)
