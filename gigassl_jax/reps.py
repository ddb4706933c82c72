"""Slide-vector files: one vector per slide, written by encode, read by evaluate.

Layer 3 (state/IO). The project's own format is an `.npz` with `ids` [N],
`reps` float32 [N, D], `method` and `meta` (JSON provenance), plus
`<stem>_ids.csv` beside it; both are written to a temporary name and renamed.

Bad files raise EvalError naming the file and the row.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pathlib

import numpy as np

from gigassl_jax.splits import EvalError


@dataclasses.dataclass(frozen=True)
class Reps:
  """Slide representations of one method.

  Attributes:
    method: display name (the file's `method` field, else its stem).
    path: the file read.
    ids: list[str] [N] slide ids.
    vectors: float32 [N, D].
  """

  method: str
  path: str
  ids: list
  vectors: np.ndarray

  def index(self) -> dict:
    return {s: i for i, s in enumerate(self.ids)}


# --------------------------------------------------------------------------
# Representation files.


def save_reps(path, ids, vectors, method: str, meta: dict | None = None) -> pathlib.Path:
  """Writes representations atomically: `path` (.npz) and `<stem>_ids.csv`.

  Args:
    path: output .npz file.
    ids: [N] slide ids.
    vectors: float [N, D].
    method: display name stored in the file (used as the table's row name).
    meta: JSON-serialisable provenance.
  """
  path = pathlib.Path(path)
  if path.suffix != ".npz":
    path = path.with_name(path.name + ".npz")
  vectors = np.asarray(vectors, np.float32)
  ids = [str(s) for s in ids]
  if vectors.ndim != 2 or vectors.shape[0] != len(ids):
    raise ValueError(f"{path}: vectors {vectors.shape} do not match {len(ids)} ids")
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  with open(tmp, "wb") as f:
    np.savez(
      f,
      ids=np.array(ids),
      reps=vectors,
      method=np.array(method),
      meta=np.array(json.dumps(meta or {}, sort_keys=True)),
    )
  os.replace(tmp, path)
  ids_csv = path.with_name(path.stem + "_ids.csv")
  tmp = ids_csv.with_name(f".{ids_csv.name}.tmp-{os.getpid()}")
  with open(tmp, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["row", "ID"])
    w.writerows(enumerate(ids))
  os.replace(tmp, ids_csv)
  return path


def load_reps(path) -> Reps:
  """Reads a representation file written by `save_reps` (or gigassl_jax.encode).

  Raises:
    EvalError: missing file or keys, shape mismatch, duplicate ids, NaN/inf rows.
  """
  path = str(path)
  if not os.path.isfile(path):
    raise EvalError(f"{path}: representation file not found")
  try:
    with np.load(path, allow_pickle=False) as z:
      missing = {"ids", "reps"} - set(z.files)
      if missing:
        raise EvalError(
          f"{path}: not a representation file (keys {sorted(z.files)}, missing {sorted(missing)})"
        )
      ids = [str(s) for s in z["ids"]]
      vectors = np.asarray(z["reps"], np.float32)
      method = str(z["method"]) if "method" in z.files else pathlib.Path(path).stem
  except (OSError, ValueError) as e:
    if isinstance(e, EvalError):
      raise
    raise EvalError(f"{path}: cannot read representations: {e}") from e
  if vectors.ndim != 2 or vectors.shape[0] != len(ids):
    raise EvalError(f"{path}: 'reps' has shape {vectors.shape}, expected [{len(ids)}, D]")
  bad = ~np.isfinite(vectors).all(axis=1)
  if bad.any():
    r = int(np.argmax(bad))
    raise EvalError(
      f"{path}: row {r} (slide {ids[r]!r}) has NaN or inf values ({int(bad.sum())} such rows)"
    )
  seen = {}
  for r, s in enumerate(ids):
    if s in seen:
      raise EvalError(f"{path}: slide {s!r} appears twice (rows {seen[s]} and {r})")
    seen[s] = r
  return Reps(method=method, path=path, ids=ids, vectors=vectors)
