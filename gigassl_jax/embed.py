"""Slides -> embedding bank: `python -m gigassl_jax.embed --slides=DIR --bank=DIR`.

For every slide: choose the read level (target magnification / mpp), compute the
tissue mask and the tile grid, draw Naug batches of Nt tissue tiles uniformly with
replacement, apply ONE shared augmentation per batch, encode with the frozen tile
encoder and store the float16 embeddings with the level-0 tile coordinates
(docs/method.md sections 1-2). The host side runs ahead of the device
(embed_reading.SlideStream): each distinct tile of a slide is read once, by a thread
pool, within --read_cache_mb, and the next slide is prepared and read while this one
is augmented and encoded.

Reliability:
* resumable: a slide is done when its file exists under its final name (written
  to a temp name and renamed), so a killed run restarted with the same flags
  skips finished slides, and since every random draw depends only on (seed,
  slide id, augmentation index), the final bank equals an uninterrupted run's;
* bad slides (unreadable, not a slide, no tissue, too small, no mpp when refused)
  never stop the run: each gets a status file with its reason, the manifest
  (manifest.json / manifest.csv) lists every slide, and the exit code is 1 when
  any slide of this process failed;
* sharding: process i of n takes slides i, i + n, ... of the sorted listing
  (default: the JAX process index and count, so each host of a pod takes its
  share); whoever finishes last and sees no pending slide packs the bank.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import pathlib
import pickle
import sys
import time
import traceback
import zipfile

import numpy as np
from absl import flags

from gigassl_jax import bank as bank_lib
from gigassl_jax import cli, embed_device, embed_manifest, embed_reading
from gigassl_jax import slides as slides_lib
from gigassl_jax.embed_listing import default_shards, list_slides, shard, slide_id
from gigassl_jax.embed_manifest import THUMB_DIR, manifest, write_manifest, write_status

F = cli.field


@dataclasses.dataclass(frozen=True)
class EmbedConfig:
  """Everything `run` needs; every field is also a flag of `python -m gigassl_jax.embed`."""

  slides: str = F(
    dataclasses.MISSING,
    "Directory of slides (recursive), list file (.txt, one path a line) or comma-separated "
    "paths. (required unless --pack_only)",
  )
  bank: str = F(dataclasses.MISSING, "Output bank directory.", required=True)
  n_aug: int = F(50, "Augmented batches per slide (Naug).")
  n_tiles: int = F(256, "Tiles per batch (Nt), drawn uniformly with replacement.")
  encoder: str = F("efficientnet_lite0", "Tile encoder: resnet18 or efficientnet_lite0.")
  weights: str | None = F(None, "Encoder checkpoint (.pth, torchvision or MoCo format).")
  tile_size: int = F(224, "Tile side in pixels.")
  magnification: float = F(10.0, "Target magnification (10x = 1.0 mpp).")
  mpp: float | None = F(None, "Target microns per pixel (overrides --magnification).")
  fallback_level: int = F(1, "Level read when a slide has no mpp; -1 fails such slides.")
  tissue_tolerance: float = F(0.1, "A tile is kept when its tissue fraction exceeds this.")
  seed: int = F(0, "Seed of tile draws and augmentations.")
  num_shards: int | None = F(None, "Processes sharing the slides (default: JAX process count).")
  shard_index: int | None = F(None, "This process's share (default: JAX process index).")
  read_threads: int | None = F(None, "Tile-reading threads (default 2 x cores, at most 32).")
  read_cache_mb: float = F(
    2048,
    "Host memory for read tiles (MiB): each distinct tile of a slide is read once when half "
    "of this holds them, else in chunks of batches; the other half reads ahead.",
  )
  encode_batch: int = F(256, "Tiles per encoder call.")
  thumbnails: bool = F(True, "Write thumbnails/<id>.png with the tissue mask and tile grid.")
  pack: bool = F(True, "Pack the bank when no slide is pending.")
  pack_only: bool = F(False, "Only (re)pack the finished slides of --bank (no --slides needed).")
  progress: bool = F(True, "Show the progress bar.")


# --------------------------------------------------------------------------
# One slide.


def prepare_slide(path: pathlib.Path, cfg: EmbedConfig) -> embed_reading.Prepared:
  """Opens a slide, chooses its level, computes mask, grid and draws, writes the thumbnail.

  Runs in the reading thread, ahead of the device (raises SlideError; closes the slide then).
  """
  sid = slide_id(path)
  slide = slides_lib.open_slide(path)
  try:
    plan = slides_lib.choose_level(
            slide, cfg.tile_size, magnification=cfg.magnification, mpp=cfg.mpp,
            fallback_level=cfg.fallback_level,
        )  # fmt: skip
    rgb, mask_ds = slides_lib.mask_image(slide)
    mask = slides_lib.tissue_mask_from_rgb(rgb)
    grid, _ = slides_lib.tile_grid(
      slide.dimensions, plan.extent, mask, mask_ds, cfg.tissue_tolerance
    )
    if cfg.thumbnails:
      embed_manifest.write_thumbnail(
        pathlib.Path(cfg.bank) / THUMB_DIR / f"{sid}.png", rgb, mask, mask_ds, grid, plan.extent
      )
    if len(grid) == 0:
      raise slides_lib.SlideError(
        f"{path}: no tissue: no tile has a tissue fraction > {cfg.tissue_tolerance} "
        f"(tissue mask covers {mask.mean():.2%} of the low-resolution image)"
      )
  except BaseException:
    slide.close()
    raise
  idx = embed_device.sample_tiles(len(grid), cfg.n_aug, cfg.n_tiles, cfg.seed, sid)
  return embed_reading.Prepared(slide, plan, grid, idx, {"sid": sid, "path": path})


def embed_slide(
  stream: embed_reading.SlideStream,
  item: embed_reading.SlideItem,
  cfg: EmbedConfig,
  device: embed_device.TileEncoderDevice,
  progress=None,
) -> dict:
  """Encodes one prepared slide from its read tiles into the bank; returns its status record.

  Raises:
    SlideError (or whatever its preparation raised).
  """
  if item.error is not None:
    raise item.error
  prep = item.prepared
  sid, path, plan, grid, slide = prep.info["sid"], item.path, prep.plan, prep.grid, prep.slide
  feats = []
  for chunk in stream.chunks(item):
    for k in range(chunk.k0, chunk.k1):
      feats.append(device.embed(chunk.tiles(k), sid, k))
      if len(feats) > 1:  # wait for the previous batch only: keeps one in flight
        feats[-2] = np.asarray(feats[-2])
        if progress is not None:
          progress.update(cfg.n_tiles)
  if len(feats) != cfg.n_aug:  # the stream stopped early: never write a partial slide
    raise RuntimeError(f"{path}: {len(feats)} of {cfg.n_aug} batches read")
  feats[-1] = np.asarray(feats[-1])
  if progress is not None:
    progress.update(cfg.n_tiles)
  emb = np.stack(feats)  # [Naug, Nt, F] float16
  meta = {
    **_run_settings(cfg),
    "encoder": device.encoder.name,
    "weights_id": device.encoder.weights_id,
    "feature_dim": int(emb.shape[-1]),
    "path": str(path),
    "dimensions": list(slide.dimensions),
    "level": plan.level,
    "level_mpp": plan.level_mpp,
    "mpp": plan.tile_mpp,
    "read_size": plan.read_size,
    "tile_size": plan.tile_size,
    "extent": plan.extent,
    "n_tissue_tiles": int(len(grid)),
    "augment": dataclasses.asdict(device.aug_cfg),
    "warnings": plan.warning or "",
  }
  bank_lib.write_slide(pathlib.Path(cfg.bank), sid, emb, grid[prep.idx], meta)
  return {
        "slide_id": sid, "path": str(path), "status": "done", "reason": "",
        "warnings": plan.warning or "", "n_tissue_tiles": int(len(grid)), "level": plan.level,
        "tile_mpp": plan.tile_mpp, "seconds": round(time.time() - item.t0, 2),
    }  # fmt: skip


# --------------------------------------------------------------------------
# The run.


def _run_settings(cfg: EmbedConfig) -> dict:
  """Settings that must agree between a bank's slides (stored in each slide's meta)."""
  return {
        "encoder": cfg.encoder, "n_aug": cfg.n_aug, "n_tiles": cfg.n_tiles,
        "tile_size": cfg.tile_size, "seed": cfg.seed,
        "target_mpp": slides_lib.target_mpp(cfg.magnification, cfg.mpp),
        "fallback_level": cfg.fallback_level, "tissue_tolerance": cfg.tissue_tolerance,
    }  # fmt: skip


def check_compatible(bank: pathlib.Path, sids: list[str], cfg: EmbedConfig):
  """Refuses to resume into a bank whose finished slides were made differently.

  Raises:
    ValueError: naming the slide file and the settings that differ.
  """
  want = _run_settings(cfg)
  for sid in sids:
    path = bank_lib.slide_path(bank, sid)
    with np.load(path) as z:  # reads the small meta member only
      meta = json.loads(str(z["meta"]))
    diff = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
    if diff:
      raise ValueError(
        f"{path} was made with other settings (stored, asked): {diff}; "
        "rerun with the same flags or use a new --bank"
      )


def _load_encoder(cfg: EmbedConfig):
  """encoders.get_encoder for cfg; a file that is no checkpoint is a ValueError naming --weights."""
  from gigassl_jax import encoders  # pylint: disable=import-outside-toplevel

  try:
    return encoders.get_encoder(cfg.encoder, cfg.weights, seed=cfg.seed)
  except (pickle.UnpicklingError, zipfile.BadZipFile) as e:
    raise ValueError(f"--weights: not a usable {cfg.encoder} checkpoint: {e}") from e


def run(cfg: EmbedConfig) -> dict:
  """Embeds this process's share of the slides, then packs when nothing is pending.

  Returns:
    {"done": [...ids], "failed": {id: reason}, "skipped": [...ids already done],
     "pending_elsewhere": int, "packed": path or None}.
  """
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  # Every input is checked before the bank folder is made: a typo leaves nothing behind.
  if not cfg.slides or not cfg.slides.strip(" ,"):
    raise ValueError("--slides is empty: give a folder of slides, a list file or paths")
  all_paths = list_slides(cfg.slides)
  if not all_paths:
    raise FileNotFoundError(f"--slides={cfg.slides}: no slide found")
  if not cfg.read_cache_mb > 0:
    raise ValueError(f"--read_cache_mb={cfg.read_cache_mb}: must be positive")
  if cfg.weights and not os.path.isfile(cfg.weights):
    raise FileNotFoundError(f"--weights={cfg.weights}: no such file")
  # A given weights file is read now (a bad one is refused before any folder is made);
  # the bundled weights only when there is work to do.
  encoder = _load_encoder(cfg) if cfg.weights else None
  bank = pathlib.Path(cfg.bank)
  if bank.exists() and not bank.is_dir():
    raise FileExistsError(f"--bank={cfg.bank} is a file, not a folder")
  # Every finished slide, not only this listing's: new slides embedded with other
  # settings would make a bank that cannot be packed.
  check_compatible(bank, bank_lib.finished_slides(bank), cfg)
  bank.mkdir(parents=True, exist_ok=True)
  bank_lib.remove_stale_temps(bank)
  num_shards, shard_index = cfg.num_shards, cfg.shard_index
  if num_shards is None or shard_index is None:
    n, i = default_shards()
    num_shards = n if num_shards is None else num_shards
    shard_index = i if shard_index is None else shard_index
  mine = shard(all_paths, num_shards, shard_index)
  todo = [p for p in mine if not bank_lib.is_finished(bank, slide_id(p))]
  skipped = [slide_id(p) for p in mine if p not in todo]
  done, failed = [], {}
  print(
        f"embed: {len(all_paths)} slides listed, shard {shard_index}/{num_shards}: {len(mine)}, "
        f"{len(skipped)} already done, {len(todo)} to embed", file=sys.stderr,
    )  # fmt: skip
  if todo:
    encoder = encoder or _load_encoder(cfg)
    device = embed_device.TileEncoderDevice(
      encoder,
      encode_batch=cfg.encode_batch,
      n_tiles=cfg.n_tiles,
      tile_size=cfg.tile_size,
      seed=cfg.seed,
    )
    progress = tqdm(
            total=len(todo) * cfg.n_aug * cfg.n_tiles, unit="tile", unit_scale=True,
            disable=not cfg.progress, dynamic_ncols=True, smoothing=0.1,
        )  # fmt: skip
    stream = embed_reading.SlideStream(
      todo,
      lambda p: prepare_slide(p, cfg),
      tile_bytes=cfg.tile_size * cfg.tile_size * 3,
      budget_bytes=int(cfg.read_cache_mb * 2**20),
      threads=cfg.read_threads,
    )
    with stream:
      for item in stream:
        cli.check_interrupt()
        path = item.path
        sid = slide_id(path)
        progress.set_postfix_str(sid[-30:])
        before = progress.n
        try:
          record = embed_slide(stream, item, cfg, device, progress)
          done.append(sid)
        except Exception as e:  # noqa: BLE001 - a bad slide must never stop the run
          reason = (
            str(e) if isinstance(e, slides_lib.SlideError) else f"{path}: {type(e).__name__}: {e}"
          )
          record = {"slide_id": sid, "path": str(path), "status": "failed", "reason": reason,
                            "warnings": ""}  # fmt: skip
          if not isinstance(e, slides_lib.SlideError):
            record["traceback"] = item.traceback or traceback.format_exc()
          failed[sid] = reason
          # Count the slide's tiles as processed so the ETA stays right.
          progress.update(cfg.n_aug * cfg.n_tiles - (progress.n - before))
          tqdm.write(f"FAILED {sid}: {reason}", file=sys.stderr)
        finally:
          stream.finish(item)
        write_status(bank, record)
    progress.close()

  # The manifest covers every listed slide; pack when none is pending.
  records = manifest(bank, all_paths)
  write_manifest(bank, records)
  pending = [r["slide_id"] for r in records if r["status"] == "pending"]
  packed = None
  if cfg.pack and not pending and any(r["status"] == "done" for r in records):
    ids = [r["slide_id"] for r in records if r["status"] == "done"]
    with open(bank / ".pack.lock", "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent finishers pack one at a time
      packed = bank_lib.pack(bank, ids)
  _report(records, failed, pending, packed)
  return {"done": done, "failed": failed, "skipped": skipped,
            "pending_elsewhere": len(pending), "packed": packed}  # fmt: skip


def _report(records, failed, pending, packed):
  n_done = sum(r["status"] == "done" for r in records)
  all_failed = [r for r in records if r["status"] == "failed"]
  lines = [f"embed: {n_done}/{len(records)} slides done, {len(all_failed)} failed, "
             f"{len(pending)} pending"]  # fmt: skip
  for r in all_failed:
    mark = " (this run)" if r["slide_id"] in failed else ""
    lines.append(f"  FAILED{mark} {r['slide_id']}: {r['reason']}")
  for r in records:
    if r["status"] == "done" and r.get("warnings"):
      lines.append(f"  warning {r['slide_id']}: {r['warnings']}")
  if pending:
    lines.append(f"  {len(pending)} slides pending (other shards?): not packed yet; "
                     "the last shard to finish packs, or rerun with --pack_only")  # fmt: skip
  if packed:
    lines.append(f"  bank packed: {packed}")
  print("\n".join(lines), file=sys.stderr)


# --------------------------------------------------------------------------
# CLI.


def main(argv):
  if len(argv) > 1:
    print(f"embed: error: unexpected arguments {argv[1:]}", file=sys.stderr)
    return 2
  fl = flags.FLAGS
  try:
    if fl.pack_only:
      print(f"packed: {bank_lib.pack(fl.bank)}")
      return 0
    if not fl.slides:
      raise ValueError("--slides is required (unless --pack_only)")
    result = run(cli.from_flags(EmbedConfig))
  except (OSError, ValueError) as e:  # missing or unwritable files too: one line, exit 2
    print(f"embed: error: {e}", file=sys.stderr)
    return 2
  return 1 if result["failed"] else 0


def resume_hint() -> str:
  """What Ctrl-C leaves: the finished slides of --bank, kept; a re-run embeds the rest."""
  bank = flags.FLAGS.bank
  n = len(bank_lib.finished_slides(bank)) if bank else 0
  return (
    f"{n} slides finished in {bank} (kept); re-run the same command to embed the rest "
    "(finished slides are skipped)"
  )


if __name__ == "__main__":
  cli.define_flags(EmbedConfig)
  cli.run(main, resume_hint=resume_hint)
