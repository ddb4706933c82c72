"""Import foundation-model tile features written by TRIDENT or CLAM into an embedding bank.

  python -m gigassl_jax.import_features --features=DIR[,DIR...] --bank=BANK \\
      [--format=auto|trident|clam] [--patch_size_level0=N] [--patches=DIR] \\
      [--pca_dim=256 | --pca=FILE | --pca_dim=0] [--n_tiles=256] [--seed=0]

Inputs (h5 files, read with h5py):
  * TRIDENT: `{job}/{mag}x_{ps}px_{ov}px_overlap/features_{encoder}/{slide}.h5`,
    datasets `features` (N, D) and `coords` (N, 2) int level-0 (x, y); the
    `coords` attributes give `patch_size_level0` (and magnifications).
  * CLAM: `{feat_dir}/h5_files/{slide}.h5`, `features` (N, D) float32 and
    `coords` (N, 2) int32 level-0, no attributes: the patch size in level-0 px
    comes from --patch_size_level0, or from CLAM's patching h5
    (`{patches}/{slide}.h5`, `coords` attributes `patch_size` and `downsample`).
    CLAM's `pt_files/*.pt` have no coordinates and are refused.
Several folders (comma-separated) are the augmentations of the same slides
(bank axis Naug, one folder per augmentation).

Each slide keeps --n_tiles tiles per augmentation, drawn uniformly with
replacement from its h5 with a per-slide seed (the bank holds one
(Naug, Nt, F) shape; that is how embed fills it too). Features are reduced
to --pca_dim with a PCA fitted on a seeded streamed sample of tiles
(mean + covariance accumulated chunk by chunk, so memory is D x D), or with
--pca=FILE (ours, or a published scikit-learn pickle: its first --pca_dim
components, as Democratizing_WSI keeps); --pca_dim=0 keeps D (or all of them).

Output: BANK/slides/*.npz (atomic, resumable: finished slides are skipped),
BANK/pca.npz (the PCA used), BANK/import_manifest.json (files it could not
use, with the reason), then the packed bank. Exit 0 when every slide
imported, 1 when some failed (the rest is in the bank), 2 on bad flags or
input, 130 on Ctrl-C (rerun the same command to resume).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import sys
import time

import numpy as np

from gigassl_jax import bank as bank_lib
from gigassl_jax import cli
from gigassl_jax import pca as pca_lib

FORMATS = ("auto", "trident", "clam")
MANIFEST = "import_manifest.json"
PCA_FILE = "pca.npz"
CHUNK = 8192  # rows read at a time: 8192 x 1536 float32 = 50 MB


class InputError(Exception):
  """Bad flags or input folder: one line, exit 2."""


class BadFile(Exception):
  """One h5 file that cannot be used (goes to the manifest)."""


@dataclasses.dataclass
class Source:
  """One feature h5 of one slide in one augmentation folder."""

  slide: str
  aug: int
  path: pathlib.Path
  fmt: str  # trident | clam


def _h5():
  import h5py  # pylint: disable=import-outside-toplevel

  return h5py


def find_sources(folders: list[str], fmt: str) -> dict[str, list[Source | None]]:
  """slide id -> one Source per folder (None where a folder lacks the slide).

  Raises:
    InputError: a folder is missing, holds no h5, or is CLAM's pt_files.
  """
  per_folder = []
  for k, folder in enumerate(folders):
    d = pathlib.Path(folder)
    if not d.is_dir():
      raise InputError(f"--features: {d} is not a directory")
    h5_dir = d / "h5_files" if (d / "h5_files").is_dir() else d
    files = sorted(p for p in h5_dir.glob("*.h5") if not p.name.startswith("."))
    if not files:
      pts = list(d.glob("*.pt")) + list((d / "pt_files").glob("*.pt"))
      if pts or d.name == "pt_files":
        raise InputError(
          f"--features: {d} holds CLAM .pt files, which have no tile coordinates; "
          "point --features at CLAM's h5_files folder (or its parent) instead"
        )
      raise InputError(f"--features: no .h5 file in {h5_dir}")
    kind = fmt
    if fmt == "auto":
      kind = "clam" if h5_dir.name == "h5_files" else "trident"
    per_folder.append({p.stem: Source(p.stem, k, p, kind) for p in files})
  ids = sorted(set().union(*per_folder))
  return {sid: [f.get(sid) for f in per_folder] for sid in ids}


def _clam_patch_size(patches: str | pathlib.Path | None, slide: str) -> float | None:
  if not patches:
    return None
  p = pathlib.Path(patches) / f"{slide}.h5"
  if not p.is_file():
    return None
  try:
    with _h5().File(p, "r") as f:
      a = f["coords"].attrs
      ds = np.atleast_1d(np.asarray(a.get("downsample", [1.0]), np.float64))
      return float(a["patch_size"]) * float(ds[0])
  except (OSError, KeyError) as e:
    raise BadFile(f"CLAM patch file {p}: {e}") from e


def open_source(src: Source, patch_size_flag: float | None, patches) -> tuple:
  """Opens and validates one h5: (h5 file, features dataset, coords int64 [N, 2], patch size).

  Raises:
    BadFile: unreadable, missing dataset, wrong shape, no tiles, no patch size.
  """
  try:
    f = _h5().File(src.path, "r")
  except OSError as e:
    raise BadFile(f"unreadable h5 ({str(e).splitlines()[0]})") from e
  try:
    for name in ("features", "coords"):
      if name not in f:
        raise BadFile(f"missing dataset '{name}' (has {sorted(f.keys())})")
    feats, c = f["features"], f["coords"]
    if feats.ndim == 3 and feats.shape[0] == 1:  # some CLAM versions keep a batch axis
      raise BadFile(f"features has shape {feats.shape}; expected (N, D)")
    if feats.ndim != 2 or c.ndim != 2 or c.shape[1] != 2 or c.shape[0] != feats.shape[0]:
      raise BadFile(
        f"wrong shape: features {feats.shape}, coords {c.shape}; expected (N, D), (N, 2)"
      )
    if feats.shape[0] == 0:
      raise BadFile("no tiles")
    if not np.issubdtype(feats.dtype, np.floating):
      raise BadFile(f"features dtype {feats.dtype} is not floating point")
    coords = np.asarray(c[...])
    # Float coordinates are accepted when they hold whole level-0 pixels.
    if not np.issubdtype(coords.dtype, np.integer) and (
      not np.all(np.isfinite(coords)) or np.any(coords != np.round(coords))
    ):
      raise BadFile("coords are not integer level-0 pixels")
    coords = coords.astype(np.int64)
    ps = patch_size_flag
    if "patch_size_level0" in c.attrs:
      ps = float(c.attrs["patch_size_level0"]) if ps is None else ps
    if ps is None:
      ps = _clam_patch_size(patches, src.slide)
    if ps is None:
      raise BadFile(
        "no patch size: pass --patch_size_level0=N or --patches=DIR (CLAM's patching h5 folder)"
      )
    attrs = {
      k: (v.item() if hasattr(v, "item") and np.size(v) == 1 else str(v))
      for k, v in c.attrs.items()
      if k in ("patch_size", "level0_magnification", "target_magnification", "overlap")
    }
    return f, feats, coords, float(ps), attrs
  except BadFile:
    f.close()
    raise
  except Exception as e:  # a corrupt h5 raises anything from h5py
    f.close()
    raise BadFile(f"unreadable h5 ({type(e).__name__}: {str(e).splitlines()[0]})") from e


def _rng(seed: int, slide: str, aug: int, what: str) -> np.random.Generator:
  h = hashlib.sha256(f"{seed}/{slide}/{aug}/{what}".encode()).digest()
  return np.random.default_rng(int.from_bytes(h[:8], "little"))


def read_rows(feats, idx: np.ndarray) -> np.ndarray:
  """Rows idx (any order, repeats) of an h5 dataset, scanning it in chunks.

  Every row of the file is checked for NaN/inf on the way (the manifest
  reports such files), and only the requested rows are kept: a slide's full
  feature matrix is never held.
  """
  n, d = feats.shape
  out = np.empty((len(idx), d), np.float32)
  order = np.argsort(idx, kind="stable")
  sorted_idx = idx[order]
  for start in range(0, n, CHUNK):
    block = np.asarray(feats[start : start + CHUNK], np.float32)
    bad = ~np.all(np.isfinite(block), axis=1)
    if bad.any():
      raise BadFile(f"NaN/inf in feature row {start + int(np.argmax(bad))}")
    lo, hi = np.searchsorted(sorted_idx, [start, start + len(block)])
    out[order[lo:hi]] = block[sorted_idx[lo:hi] - start]
  return out


def _write_json(path: pathlib.Path, obj):
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
  os.replace(tmp, path)


def fit_pca(sources, dim, sample, seed, patch_size, patches, failed, progress=None):
  """PCA on a seeded streamed sample: up to sample / n_files rows of every usable file."""
  files = [s for row in sources.values() for s in row if s is not None]
  per_file = max(1, -(-sample // max(len(files), 1)))
  acc = pca_lib.CovAccumulator()
  for src in files:
    try:
      f, feats, _, _, _ = open_source(src, patch_size, patches)
      with f:
        n = feats.shape[0]
        idx = _rng(seed, src.slide, src.aug, "pca").choice(n, min(n, per_file), replace=False)
        acc.add(read_rows(feats, np.sort(idx)))
    except BadFile as e:
      failed[src.slide] = {"slide": src.slide, "file": str(src.path), "reason": str(e)}
    if progress is not None:
      progress.update(1)
  try:
    return acc.fit(dim, f"fitted: {acc.n} tiles, seed {seed}")
  except ValueError as e:
    raise InputError(f"--pca_dim={dim}: {e}") from e


def import_slide(bank, sid, row, cfg, pca, encoder) -> None:
  """Reads one slide's augmentations, samples and reduces them, writes the slide file."""
  embs, coords, per_aug = [], [], []
  ps_all = []
  for k, src in enumerate(row):
    if src is None:
      raise BadFile(f"missing from augmentation folder {k} ({cfg.features[k]})")
    f, feats, xy, ps, attrs = open_source(src, cfg.patch_size_level0, cfg.patches)
    with f:
      n, d = feats.shape
      if pca is not None and d != pca.in_dim:
        raise BadFile(f"{d}-d features, the PCA expects {pca.in_dim}-d")
      idx = _rng(cfg.seed, sid, k, "tiles").integers(0, n, cfg.n_tiles)
      x = read_rows(feats, idx)
    embs.append(pca.transform(x) if pca is not None else x)
    coords.append(xy[idx])
    ps_all.append(ps)
    per_aug.append({"file": str(src.path), "n_tiles_available": int(n), "raw_dim": int(d), **attrs})
  if len(set(ps_all)) > 1:
    raise BadFile(f"augmentation folders disagree on the patch size: {ps_all}")
  meta = {
    "encoder": encoder,
    "weights_id": (pca.source if pca is not None else "no-pca"),
    "source_format": row[0].fmt,
    "patch_size_level0": ps_all[0],
    "n_aug": len(row),
    "n_tiles": cfg.n_tiles,
    "seed": cfg.seed,
    "pca": pca.describe() if pca is not None else None,
    "augmentations": per_aug,
  }
  bank_lib.write_slide(bank, sid, np.stack(embs), np.stack(coords), meta)


def _encoder_name(folder: str) -> str:
  """TRIDENT's features_{encoder} folder name gives the encoder; else the folder name."""
  p = pathlib.Path(folder)
  name = p.parent.name if p.name == "h5_files" else p.name
  return name.removeprefix("features_")


def _check_resume(bank, sources, cfg, pca):
  """Refuses to add slides to a bank whose finished slides were imported differently."""
  want = {
    "n_aug": len(cfg.features),
    "n_tiles": cfg.n_tiles,
    "seed": cfg.seed,
    "pca": pca.describe() if pca is not None else None,
  }
  for sid in sources:
    path = bank_lib.slide_path(bank, sid)
    if not bank_lib.is_finished(bank, sid):
      continue
    with np.load(path) as z:
      meta = json.loads(str(z["meta"]))
    got = {k: meta.get(k) for k in want}
    if got != want:
      diff = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
      raise InputError(
        f"--bank={bank}: {path.name} was imported with other settings {diff} (have, asked); "
        "use a new --bank or the same flags"
      )


def run(cfg) -> int:
  """The whole import; returns the exit status."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  bank = pathlib.Path(cfg.bank)
  sources = find_sources(cfg.features, cfg.format)
  bank.mkdir(parents=True, exist_ok=True)
  bank_lib.remove_stale_temps(bank)
  failed: dict[str, dict] = {}
  show = not cfg.no_progress
  encoder = _encoder_name(cfg.features[0])
  pca = None
  pca_path = bank / PCA_FILE
  if cfg.pca:
    try:
      pca = pca_lib.load(cfg.pca)
    except Exception as e:  # any unreadable/unsafe file: one line
      raise InputError(f"--pca={cfg.pca}: {str(e).splitlines()[0]}") from e
    # A published projection may keep more components than the network takes:
    # keep the first --pca_dim, as Democratizing_WSI does (0 keeps them all).
    if cfg.pca_dim and pca.out_dim > cfg.pca_dim:
      pca = pca.truncate(cfg.pca_dim)
  elif pca_path.is_file():  # resume: the PCA fitted by an earlier run of this import
    pca = pca_lib.load(pca_path)
  elif cfg.pca_dim:
    bar = tqdm(total=sum(len(r) for r in sources.values()), desc="PCA sample", unit="file",
               disable=not show, dynamic_ncols=True)  # fmt: skip
    pca = fit_pca(
      sources, cfg.pca_dim, cfg.pca_sample, cfg.seed, cfg.patch_size_level0, cfg.patches, failed,
      bar,
    )  # fmt: skip
    bar.close()
  if pca is not None and (cfg.pca or not pca_path.is_file()):
    pca.save(pca_path)
  if pca is not None and cfg.pca_dim and not cfg.pca and pca.out_dim != cfg.pca_dim:
    raise InputError(
      f"--pca_dim={cfg.pca_dim}: {pca_path} (from an earlier run) has {pca.out_dim}; "
      "use a new --bank or delete it"
    )
  _check_resume(bank, sources, cfg, pca)
  todo = [s for s in sources if not bank_lib.is_finished(bank, s)]
  done0 = len(sources) - len(todo)
  bar = tqdm(total=len(sources), initial=done0, desc="import", unit="slide", disable=not show,
             dynamic_ncols=True)  # fmt: skip
  t0 = time.time()
  # Ctrl-C: cli.supervise says what finished (resume_hint); finished slides are kept.
  for sid in todo:
    cli.check_interrupt()
    try:
      import_slide(bank, sid, sources[sid], cfg, pca, encoder)
    except BadFile as e:
      src = next((s for s in sources[sid] if s is not None), None)
      failed[sid] = {"slide": sid, "file": str(src.path) if src else "", "reason": str(e)}
    bar.update(1)
  bar.close()
  # Failures of the PCA pass name files; keep those of slides that did not import.
  ok = set(bank_lib.finished_slides(bank)) & set(sources)
  failures = [v for v in failed.values() if v["slide"] not in ok]
  _write_json(
    bank / MANIFEST,
    {
      "features": list(cfg.features),
      "n_slides": len(sources),
      "n_imported": len(ok),
      "seconds": round(time.time() - t0, 2),
      "pca": pca.describe() if pca is not None else None,
      "failed": sorted(failures, key=lambda v: (v["slide"], v["file"])),
    },
  )
  if ok:
    bank_lib.pack(bank, sorted(ok))
  print(f"imported {len(ok)} of {len(sources)} slides into {bank}", file=sys.stderr)
  if failures:
    print(f"{len(failures)} slide(s) could not be imported: see {bank / MANIFEST}", file=sys.stderr)
    return 1
  return 0


F = cli.field


@dataclasses.dataclass(frozen=True)
class ImportConfig:
  """The import's settings (one absl flag per field, same name)."""

  features: tuple[str, ...] = F(
    (), "Folder(s) of h5 files, comma-separated or repeated; one per augmentation.", required=True
  )
  bank: str = F("", "Output bank directory.", required=True)
  format: str = F("auto", "Feature layout.", choices=FORMATS)
  patch_size_level0: float | None = F(
    None, "Patch side in level-0 px (CLAM; overrides TRIDENT's attribute)."
  )
  patches: str | None = F(None, "CLAM's patching h5 folder (patch size).")
  pca_dim: int = F(256, "PCA output dim; 0 = no PCA.")
  pca: str | None = F(None, "A PCA file (ours .npz, or a scikit-learn pickle).")
  pca_sample: int = F(65536, "Tiles to fit the PCA on.")
  n_tiles: int = F(256, "Tiles kept per slide and augmentation.")
  seed: int = F(0, "Seed of the tile draw and the PCA sample.")
  no_progress: bool = F(False, "No progress bars.")


def check(cfg: ImportConfig) -> ImportConfig:
  """cfg with --features split on commas.

  Raises:
    InputError: naming the bad flag.
  """
  features = tuple(f for arg in cfg.features for f in arg.split(",") if f)
  if not features:
    raise InputError("--features: no folder given")
  if cfg.n_tiles < 1:
    raise InputError(f"--n_tiles must be >= 1, got {cfg.n_tiles}")
  if cfg.pca_dim < 0 or cfg.pca_sample < 2:
    raise InputError(
      f"--pca_dim must be >= 0 and --pca_sample >= 2, got {cfg.pca_dim}, {cfg.pca_sample}"
    )
  if cfg.patch_size_level0 is not None and cfg.patch_size_level0 <= 0:
    raise InputError(f"--patch_size_level0 must be > 0, got {cfg.patch_size_level0}")
  if cfg.pca and not os.path.isfile(cfg.pca):
    raise InputError(f"--pca={cfg.pca}: no such file")
  return dataclasses.replace(cfg, features=features)


def merge_repeated(argv: list[str], name: str) -> list[str]:
  """argv with every `--name=V` (or `--name V`) merged into one comma list.

  absl keeps only the last value of a repeated list flag; argparse's `append`
  kept them all, and the import still does.
  """
  vals, rest, it = [], [], iter(argv)
  for a in it:
    if a.startswith(f"--{name}="):
      vals.append(a.split("=", 1)[1])
    elif a == f"--{name}":
      vals.append(next(it, ""))
    else:
      rest.append(a)
  return argv if len(vals) < 2 else [*rest, f"--{name}={','.join(vals)}"]


def main(argv) -> int:
  """The import from the parsed flags; returns the exit status (cli.run adds Ctrl-C and timing)."""
  del argv  # the flags hold the settings
  try:
    cfg = check(cli.from_flags(ImportConfig))
    return run(cfg)
  except (InputError, ValueError) as e:
    print(f"import_features: error: {e}", file=sys.stderr)
    return 2
  except OSError as e:  # e.g. an unwritable --bank: one line, exit 2
    print(f"import_features: error: {e}", file=sys.stderr)
    return 2


def resume_hint() -> str:
  """What Ctrl-C leaves behind (finished slides are kept) and how to resume."""
  from absl import flags  # pylint: disable=import-outside-toplevel

  bank = flags.FLAGS.bank
  n = len(bank_lib.finished_slides(bank))
  return (
    f"{n} slides finished in {bank} (kept); re-run the same command to import "
    "the rest (finished slides are skipped)"
  )


if __name__ == "__main__":
  cli.define_flags(ImportConfig)
  cli.run(main, merge_repeated(sys.argv, "features"), resume_hint=resume_hint)
