"""Slide-vector files: one vector per slide, written by encode, read by evaluate.

Layer 3 (state/IO). The project's own format is an `.npz` with `ids` [N],
`reps` float32 [N, D], `method` and `meta` (JSON provenance), plus
`<stem>_ids.csv` beside it; both are written to a temporary name and renamed.

`load_reps` also reads the published Giga-SSL slide embeddings:

  * `TCGA-gigassl_{encoder}.npy` (Democratizing_WSI): `np.save` of a dict
    {slide_id: vector}, i.e. a pickle inside the .npy;
  * the gigassl repository's `embeddings.npy` [N, D] + `ids.npy` [N] in one
    folder (pass either file or the folder).

Unpickling runs whatever callables a file names, and these files come from
the internet, so pickles are read by a restricted unpickler (as
gigassl_jax.pth does for checkpoints): only numpy's array, dtype and scalar
reconstructors are accepted, each mapped to a stub that rebuilds the data
with np.frombuffer from numeric or string dtypes; dicts, lists, strings and
numbers are pickle opcodes and need no global. Anything else is refused.

Bad files raise RepsError naming the file and the row.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pathlib
import pickle

import numpy as np


class RepsError(ValueError):
  """Bad or unsafe slide-vector file; the message names the file (and row)."""


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
  """Reads slide vectors: our `.npz`, a pickled-dict `.npy`, or embeddings.npy + ids.npy.

  Args:
    path: an `.npz` written by `save_reps` (or gigassl_jax.encode); a `.npy`
      holding a dict {slide_id: vector} (`TCGA-gigassl_{encoder}.npy`); the
      gigassl repository's `embeddings.npy` or `ids.npy` (the other must sit
      beside it), or the folder holding both.

  Returns:
    Reps with float32 vectors [N, D]; method = the file's `method` field, else
    the file stem (the folder name for the two-file layout).

  Raises:
    RepsError: missing file or keys, a pickle naming anything but numpy's
      array/dtype/scalar reconstructors, shape mismatch, duplicate ids, NaN/inf rows.
  """
  path = pathlib.Path(path)
  if path.is_dir() or path.name in ("embeddings.npy", "ids.npy"):
    folder = path if path.is_dir() else path.parent
    emb, ids_file = folder / "embeddings.npy", folder / "ids.npy"
    for f in (emb, ids_file):
      if not f.is_file():
        raise RepsError(f"{f}: not found (the two-file layout needs embeddings.npy and ids.npy)")
    vectors = _as_matrix(_read_npy(emb), emb)
    ids = _as_ids(_read_npy(ids_file), ids_file)
    return _checked(str(emb), folder.resolve().name, ids, vectors)
  if not path.is_file():
    raise RepsError(f"{path}: representation file not found")
  if path.suffix == ".npy":
    obj = _read_npy(path)
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
      obj = obj.item()  # np.save of a dict: a 0-d object array holding it
    if not isinstance(obj, dict):
      what = f"array {obj.shape} {obj.dtype}" if isinstance(obj, np.ndarray) else type(obj).__name__
      raise RepsError(
        f"{path}: holds {what}, not a dict {{slide_id: vector}} (for an [N, D] array, "
        "put the slide ids in ids.npy and name it embeddings.npy)"
      )
    ids, rows = [], []
    for k, v in obj.items():
      if not isinstance(k, str):
        raise RepsError(f"{path}: key {k!r} is not a slide id string")
      v = np.asarray(v) if not isinstance(v, np.ndarray) else v
      if (
        v.dtype.kind not in "fiub"
        or v.size == 0
        or v.ndim > 2
        or (v.ndim == 2 and 1 not in v.shape)
      ):
        raise RepsError(f"{path}: slide {str(k)!r}: value {v.shape} {v.dtype} is not a vector")
      ids.append(str(k))
      rows.append(v.reshape(-1))
    if not ids:
      raise RepsError(f"{path}: the dict is empty")
    dims = {r.size for r in rows}
    if len(dims) > 1:
      r = next(i for i, x in enumerate(rows) if x.size != rows[0].size)
      raise RepsError(
        f"{path}: slide {ids[r]!r} has {rows[r].size} values, slide {ids[0]!r} {rows[0].size}"
      )
    return _checked(str(path), path.stem, ids, np.stack(rows).astype(np.float32))
  try:
    with np.load(path, allow_pickle=False) as z:
      if not hasattr(z, "files"):
        raise RepsError(f"{path}: not an .npz or .npy representation file")
      missing = {"ids", "reps"} - set(z.files)
      if missing:
        raise RepsError(
          f"{path}: not a representation file (keys {sorted(z.files)}, missing {sorted(missing)})"
        )
      ids = [str(s) for s in z["ids"]]
      vectors = np.asarray(z["reps"], np.float32)
      method = str(z["method"]) if "method" in z.files else path.stem
  except (OSError, ValueError, EOFError) as e:
    if isinstance(e, RepsError):
      raise
    raise RepsError(f"{path}: cannot read representations: {e}") from e
  return _checked(str(path), method, ids, vectors)


def _checked(path: str, method: str, ids: list, vectors: np.ndarray) -> Reps:
  """Shape, finiteness and unique-id checks shared by every format."""
  if vectors.ndim != 2 or vectors.shape[0] != len(ids):
    raise RepsError(f"{path}: vectors have shape {vectors.shape}, expected [{len(ids)}, D]")
  bad = ~np.isfinite(vectors).all(axis=1)
  if bad.any():
    r = int(np.argmax(bad))
    raise RepsError(
      f"{path}: row {r} (slide {ids[r]!r}) has NaN or inf values ({int(bad.sum())} such rows)"
    )
  seen = {}
  for r, s in enumerate(ids):
    if s in seen:
      raise RepsError(f"{path}: slide {s!r} appears twice (rows {seen[s]} and {r})")
    seen[s] = r
  return Reps(method=method, path=path, ids=ids, vectors=vectors)


def _as_matrix(a, path) -> np.ndarray:
  if not isinstance(a, np.ndarray) or a.dtype.kind not in "fiub" or a.ndim != 2:
    what = f"{a.shape} {a.dtype}" if isinstance(a, np.ndarray) else type(a).__name__
    raise RepsError(f"{path}: expected a numeric [N, D] array, found {what}")
  return a.astype(np.float32)


def _as_ids(a, path) -> list:
  if isinstance(a, np.ndarray) and a.ndim == 1 and a.dtype.kind in "UO":
    out = []
    for r, s in enumerate(a.tolist()):
      if not isinstance(s, str):
        raise RepsError(f"{path}: row {r} is {type(s).__name__}, not a slide id string")
      out.append(s)
    return out
  what = f"{a.shape} {a.dtype}" if isinstance(a, np.ndarray) else type(a).__name__
  raise RepsError(f"{path}: expected a 1-d array of slide ids, found {what}")


# --------------------------------------------------------------------------
# .npy files, pickles included, without running code.

# dtype kinds np.frombuffer may rebuild: numbers, booleans, unicode/bytes strings.
_DATA_KINDS = "fiubcUS"


def _safe_dtype(descr, path) -> np.dtype:
  try:
    dt = np.dtype(descr)
  except TypeError as e:
    raise RepsError(f"{path}: unsupported dtype {descr!r} in the pickle") from e
  if dt.kind not in _DATA_KINDS and dt != np.dtype(object):
    raise RepsError(f"{path}: unsupported dtype {dt} in the pickle")
  return dt


class _DtypeStub:
  """numpy.dtype(descr, align, copy) as pickled; __setstate__ brings the byte order."""

  def __init__(self, path, descr, *unused):
    self.path, self.descr, self.order = path, str(descr), "="

  def __setstate__(self, state):
    if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
      self.order = state[1]

  def dtype(self) -> np.dtype:
    order = self.order if self.order in "<>" else "="
    dt = _safe_dtype(self.descr, self.path)
    return dt.newbyteorder(order) if dt.kind not in "bOS" and dt.itemsize > 1 else dt


class _ArrayStub:
  """numpy's _reconstruct(ndarray, (0,), b'b'); __setstate__ brings shape, dtype and data."""

  def __init__(self, path):
    self.path, self.state = path, None

  def __setstate__(self, state):
    self.state = state

  def array(self) -> np.ndarray:
    st = self.state
    if not isinstance(st, tuple) or len(st) != 5 or not isinstance(st[2], _DtypeStub):
      raise RepsError(f"{self.path}: malformed numpy array in the pickle")
    _, shape, dt, fortran, raw = st
    dt = dt.dtype()
    shape = tuple(int(n) for n in shape)
    order = "F" if fortran else "C"
    if dt == np.dtype(object):
      if not isinstance(raw, list) or len(raw) != int(np.prod(shape)):
        raise RepsError(f"{self.path}: malformed object array in the pickle")
      out = np.empty(len(raw), object)
      out[:] = [_resolve(x) for x in raw]
      return out.reshape(shape, order=order)
    if isinstance(raw, str):  # Python 2 pickles store the bytes as a latin-1 str
      raw = raw.encode("latin-1")
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != int(np.prod(shape)) * dt.itemsize:
      raise RepsError(f"{self.path}: numpy array data of the wrong size in the pickle")
    return np.frombuffer(raw, dt).reshape(shape, order=order).copy()


def _resolve(obj):
  """Stubs -> numpy arrays, recursively through dicts, lists and tuples."""
  if isinstance(obj, _ArrayStub):
    return obj.array()
  if isinstance(obj, dict):
    return {_resolve(k): _resolve(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_resolve(x) for x in obj)
  if isinstance(obj, _DtypeStub):
    return obj.dtype()
  return obj


_NDARRAY = ("numpy", "ndarray")


class _SafeUnpickler(pickle.Unpickler):
  """Knows only numpy's array/dtype/scalar reconstructors (as stubs) and latin-1 encoding."""

  def __init__(self, file, path):
    super().__init__(file, encoding="latin1")
    self._path = path

  def find_class(self, module, name):
    path = self._path
    mod = module.replace("numpy._core.", "numpy.core.")
    if (mod, name) == ("numpy.core.multiarray", "_reconstruct"):
      return lambda *args: _ArrayStub(path)
    if (mod, name) == ("numpy", "ndarray"):
      return _NDARRAY  # only passed to _reconstruct; not callable
    if (mod, name) == ("numpy", "dtype"):
      return lambda *args: _DtypeStub(path, *args)
    if (mod, name) == ("numpy.core.multiarray", "scalar"):
      return lambda dt, raw=b"": _scalar(path, dt, raw)
    if (mod, name) == ("_codecs", "encode"):
      return _latin1_encode
    raise RepsError(
      f"{path}: refusing to unpickle {module}.{name}: only numpy arrays, dicts, "
      "strings and numbers are read from a slide-vector file"
    )


def _scalar(path, dt, raw):
  if not isinstance(dt, _DtypeStub):
    raise RepsError(f"{path}: malformed numpy scalar in the pickle")
  dt = dt.dtype()
  if isinstance(raw, str):
    raw = raw.encode("latin-1")
  if dt == np.dtype(object) or not isinstance(raw, bytes) or len(raw) != dt.itemsize:
    raise RepsError(f"{path}: malformed numpy scalar in the pickle")
  v = np.frombuffer(raw, dt)[0]
  return str(v) if dt.kind in "US" else v.item()


def _latin1_encode(text, encoding="latin1"):
  """_codecs.encode as Python-2-era pickles use it for bytes: latin-1 only."""
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise pickle.UnpicklingError(f"_codecs.encode({encoding!r}) is not allowed")
  return text.encode("latin-1")


def _read_npy(path):
  """An .npy's content; a pickled (object) payload goes through _SafeUnpickler."""
  path = pathlib.Path(path)
  try:
    with open(path, "rb") as f:
      version = np.lib.format.read_magic(f)
      if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
      elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
      else:
        raise RepsError(f"{path}: .npy format version {version} is not supported")
      if not dtype.hasobject:
        return np.load(path, allow_pickle=False)
      obj = _resolve(_SafeUnpickler(f, path).load())
  except RepsError:
    raise
  except (
    OSError,
    ValueError,
    EOFError,
    pickle.UnpicklingError,
    TypeError,
    AttributeError,
    IndexError,
    KeyError,
  ) as e:
    raise RepsError(
      f"{path}: cannot read: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    ) from e
  if isinstance(obj, np.ndarray) and obj.shape != tuple(shape):
    raise RepsError(f"{path}: header shape {shape} but the pickle holds {obj.shape}")
  del fortran
  return obj
