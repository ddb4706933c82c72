"""What an embed run reports into its bank: per-slide status files, the manifest, thumbnails.

Every file is written atomically (temp name + rename), so a killed run leaves
either the old file or the new one.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pathlib

import numpy as np

from gigassl_jax import bank as bank_lib
from gigassl_jax.embed_listing import slide_id

STATUS_DIR = "status"
THUMB_DIR = "thumbnails"


def atomic_write(path: pathlib.Path, data: bytes):
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  tmp.write_bytes(data)
  os.replace(tmp, path)


def _status_path(bank: pathlib.Path, sid: str) -> pathlib.Path:
  return bank / STATUS_DIR / f"{sid}.json"


def write_status(bank: pathlib.Path, record: dict):
  atomic_write(_status_path(bank, record["slide_id"]), json.dumps(record, indent=1).encode())


def manifest(bank: pathlib.Path, paths: list[pathlib.Path]) -> list[dict]:
  """One record per listed slide: status done / failed / pending, reason, warnings."""
  out = []
  for p in paths:
    sid = slide_id(p)
    rec = {"slide_id": sid, "path": str(p), "status": "pending", "reason": "", "warnings": ""}
    sp = _status_path(bank, sid)
    if sp.is_file():
      rec.update(json.loads(sp.read_text()))
    if bank_lib.is_finished(bank, sid):
      rec["status"], rec["reason"] = "done", ""
    elif rec["status"] == "done":  # status says done but the file is gone
      rec["status"] = "pending"
    out.append(rec)
  return out


def write_manifest(bank: pathlib.Path, records: list[dict]):
  """manifest.json (everything) and manifest.csv (one line per slide)."""
  atomic_write(bank / "manifest.json", json.dumps(records, indent=1).encode())
  buf = io.StringIO()
  cols = ["slide_id", "status", "reason", "warnings", "path", "n_tissue_tiles", "level", "tile_mpp"]
  w = csv.DictWriter(buf, cols, extrasaction="ignore")
  w.writeheader()
  for r in records:
    w.writerow(r)
  atomic_write(bank / "manifest.csv", buf.getvalue().encode())


def write_thumbnail(
  path: pathlib.Path, rgb, mask, mask_ds: float, coords, extent: int, max_side=2048
):
  """PNG: the low-resolution image, tissue mask tinted green, kept tiles outlined blue.

  Args:
    rgb: uint8 [h, w, 3] lowest-level image; mask: bool [h, w].
    mask_ds: level-0 pixels per image pixel.
    coords: int32 [N, 2] level-0 (x, y) of the kept tiles; extent: their side.
  """
  from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel

  tint = rgb.astype(np.float32)
  tint[mask] = 0.6 * tint[mask] + 0.4 * np.array([0, 200, 0], np.float32)
  img = Image.fromarray(tint.round().astype(np.uint8))
  scale = min(1.0, max_side / max(img.size))
  if scale < 1:
    img = img.resize((max(1, int(img.width * scale)), max(1, int(img.height * scale))))
  draw = ImageDraw.Draw(img)
  f = scale / mask_ds  # level-0 -> thumbnail pixels
  for x, y in np.asarray(coords):
    draw.rectangle([x * f, y * f, (x + extent) * f - 1, (y + extent) * f - 1], outline=(0, 0, 255))
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  atomic_write(path, buf.getvalue())
