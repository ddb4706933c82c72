"""PCA of tile features: fitted on a streamed sample, or read from a scikit-learn pickle.

A `Pca` maps features [N, D] to [N, K]: `(x - mean) @ components.T`, divided
by `sqrt(explained_variance)` when `whiten` (scikit-learn's `PCA.transform`).

Giga-SSL's published projections (`pca-*.pth` written with torch.save,
`pca-ctranspath.npy` with np.save) are pickled `sklearn.decomposition.PCA`
objects. A pickle runs whatever callables it names, so they are read with a
restricted unpickler: numpy's array/dtype/scalar reconstruction (re-done here
from the raw bytes) and the PCA class itself, recorded as a plain attribute
dict; any other global is refused (gigassl_jax.pth.UnsafeCheckpointError).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import pickle
import zipfile

import numpy as np

from gigassl_jax import pth


@dataclasses.dataclass(frozen=True)
class Pca:
  """mean [D], components [K, D], explained_variance [K], whiten; source names the origin."""

  mean: np.ndarray
  components: np.ndarray
  explained_variance: np.ndarray
  whiten: bool = False
  source: str = ""

  @property
  def in_dim(self) -> int:
    return int(self.components.shape[1])

  @property
  def out_dim(self) -> int:
    return int(self.components.shape[0])

  def transform(self, x: np.ndarray) -> np.ndarray:
    """[N, D] -> float32 [N, K] (computed in float64, as scikit-learn does for float64 input)."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[1] != self.in_dim:
      raise ValueError(f"PCA expects [N, {self.in_dim}] features, got {x.shape}")
    y = (x - self.mean) @ self.components.T
    if self.whiten:
      y /= np.sqrt(self.explained_variance)
    return y.astype(np.float32)

  def truncate(self, k: int) -> Pca:
    """The first k components (Democratizing_WSI keeps `transform(x)[:, :256]`)."""
    if not 1 <= k <= self.out_dim:
      raise ValueError(f"cannot keep {k} of {self.out_dim} PCA components")
    if k == self.out_dim:
      return self
    return dataclasses.replace(
      self, components=self.components[:k], explained_variance=self.explained_variance[:k]
    )

  def describe(self) -> dict:
    """JSON-able summary recorded in the bank's slide meta."""
    return {
      "in_dim": self.in_dim,
      "out_dim": self.out_dim,
      "whiten": bool(self.whiten),
      "source": self.source,
    }

  def save(self, path: str | os.PathLike) -> None:
    """Writes this PCA as an npz (atomic); `load` reads it back."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    try:
      np.savez(
        tmp,
        mean=self.mean,
        components=self.components,
        explained_variance=self.explained_variance,
        whiten=np.array(self.whiten),
        source=np.array(self.source),
      )
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.unlink(tmp)


class CovAccumulator:
  """Streamed mean and covariance (float64, shifted by the first batch's mean for accuracy)."""

  def __init__(self):
    self.n, self.shift, self.s, self.ss = 0, None, None, None

  def add(self, x: np.ndarray) -> None:
    """Adds rows x [n, D]."""
    x = np.asarray(x, np.float64)
    if self.shift is None:
      self.shift = x.mean(0)
      self.s = np.zeros_like(self.shift)
      self.ss = np.zeros((x.shape[1], x.shape[1]))
    xc = x - self.shift
    self.n += len(x)
    self.s += xc.sum(0)
    self.ss += xc.T @ xc

  def fit(self, dim: int, source: str = "fitted") -> Pca:
    """The top-`dim` principal axes of the rows added so far.

    Components are eigenvectors of the covariance, sign-fixed like
    scikit-learn's (largest-magnitude entry of each component positive), so
    results do not depend on the LAPACK build's sign choice.

    Raises:
      ValueError: fewer than 2 rows, or dim not in [1, min(n - 1, D)].
    """
    if self.n < 2:
      raise ValueError(f"PCA needs at least 2 rows, got {self.n}")
    d = self.s.shape[0]
    if not 1 <= dim <= min(self.n - 1, d):
      raise ValueError(f"PCA dimension {dim} not in [1, {min(self.n - 1, d)}] for {d}-d features")
    m = self.s / self.n
    cov = (self.ss - self.n * np.outer(m, m)) / (self.n - 1)
    vals, vecs = np.linalg.eigh((cov + cov.T) / 2)  # ascending
    order = np.argsort(vals)[::-1][:dim]
    comps = vecs[:, order].T
    signs = np.sign(comps[np.arange(dim), np.argmax(np.abs(comps), axis=1)])
    comps *= np.where(signs == 0, 1.0, signs)[:, None]
    return Pca(self.shift + m, comps, np.maximum(vals[order], 0.0), False, source)


def fit(sample: np.ndarray, dim: int, *, source: str = "fitted") -> Pca:
  """Fits a PCA on sample [N, D] held in memory (CovAccumulator for a streamed one)."""
  acc = CovAccumulator()
  acc.add(sample)
  return acc.fit(dim, source)


# ------------------------------------------------- scikit-learn pickles ----


class _Record:
  """Stand-in for a pickled object of an allowed class: keeps its state dict, runs nothing."""

  def __init__(self, name: str):
    self.name = name
    self.state = {}

  def __setstate__(self, state):
    if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
      state = state[0]
    if not isinstance(state, dict):
      raise pickle.UnpicklingError(f"unexpected {self.name} state {type(state).__name__}")
    self.state = dict(state)


def record_class(name: str) -> type:
  """A stand-in for a pickled class: creating it (NEWOBJ, copyreg) gives a _Record(name)."""

  def new(cls, *args):  # NEWOBJ calls cls.__new__(cls, *args); nothing of `args` runs
    del cls, args
    return _Record(name)

  return type(f"_{name}Record", (), {"__new__": new, "is_record": True})


_PcaClass = record_class("PCA")


class _NdarrayType:
  """numpy.ndarray as a pickle argument (only passed to _reconstruct)."""


class _Array:
  """numpy.core.multiarray._reconstruct result, filled by BUILD from raw bytes."""

  def __init__(self):
    self.value = None

  def __setstate__(self, state):
    # (version, shape, dtype, is_fortran, raw bytes or list of objects)
    _version, shape, dtype, fortran, raw = state if len(state) == 5 else (1, *state)
    dtype = np.dtype(dtype)
    if dtype.hasobject:
      arr = np.empty(len(raw), object)
      arr[:] = [unwrap(v) for v in raw]
      self.value = arr.reshape(shape, order="F" if fortran else "C")
      return
    if isinstance(raw, str):  # protocol-2 pickles of bytes under Python 3 text mode
      raw = raw.encode("latin1")
    n = int(np.prod(shape, dtype=np.int64))
    flat = np.frombuffer(raw, dtype, count=n)
    self.value = flat.reshape(shape, order="F" if fortran else "C").copy()


def _reconstruct(subtype, shape, dtype_code):
  del shape, dtype_code
  if subtype is not _NdarrayType:
    raise pickle.UnpicklingError("only plain numpy arrays are allowed")
  return _Array()


def _scalar(dtype, raw=None):
  dtype = np.dtype(dtype)
  if isinstance(raw, str):
    raw = raw.encode("latin1")
  if dtype.hasobject or raw is None:
    raise pickle.UnpicklingError("object scalars are not allowed")
  return np.frombuffer(raw, dtype, count=1)[0]


def _dtype(name, align=False, copy=True):
  del align, copy
  if not isinstance(name, str):
    raise pickle.UnpicklingError("bad dtype")
  return np.dtype(name)


def _newobj_reconstructor(cls, base, state):
  """copyreg._reconstructor (protocols 0/1): only for record_class stand-ins."""
  del base, state
  if not getattr(cls, "is_record", False):
    raise pickle.UnpicklingError("copyreg._reconstructor for a class that is not allowed")
  return cls()


def _dtype_of(name, *args):
  del args
  return np.dtype(name)


_GLOBALS = {}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
  _GLOBALS[(_mod, "_reconstruct")] = _reconstruct
  _GLOBALS[(_mod, "scalar")] = _scalar
_GLOBALS[("numpy", "ndarray")] = _NdarrayType
_GLOBALS[("numpy", "dtype")] = _dtype
_GLOBALS[("copyreg", "_reconstructor")] = _newobj_reconstructor


def _codecs_encode(text, encoding="latin1"):
  """Protocol-2 pickles write bytes as _codecs.encode(text, 'latin1')."""
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise pickle.UnpicklingError("_codecs.encode only for latin1 text")
  return text.encode("latin1")


_GLOBALS[("_codecs", "encode")] = _codecs_encode
_GLOBALS[("copyreg", "__newobj__")] = lambda cls, *a: cls.__new__(cls, *a)
# numpy >= 1.25 pickles dtypes by class (numpy.dtypes.Float64DType); map them back.
for _t in ("Float64", "Float32", "Float16", "Int64", "Int32", "Bool"):
  _GLOBALS[("numpy.dtypes", f"{_t}DType")] = functools.partial(_dtype_of, _t.lower())
# numpy arrays, dtypes and scalars, rebuilt from their bytes (for other readers too).
NUMPY_GLOBALS = dict(_GLOBALS)
for _mod in ("sklearn.decomposition._pca", "sklearn.decomposition.pca"):
  _GLOBALS[(_mod, "PCA")] = _PcaClass


def unwrap(v):
  """Replaces _Array / _Record stand-ins by arrays / attribute dicts, recursively."""
  if isinstance(v, _Array):
    return v.value
  if isinstance(v, _Record):
    return {"__class__": v.name, **{k: unwrap(x) for k, x in v.state.items()}}
  if isinstance(v, dict):
    return {k: unwrap(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return type(v)(unwrap(x) for x in v)
  return v


class _NpUnpickler(pth._RestrictedUnpickler):  # pylint: disable=protected-access
  def __init__(self, file, path):
    super().__init__(file, path, {}, _GLOBALS)

  def persistent_load(self, pid):
    raise pickle.UnpicklingError(f"{self._path}: unexpected persistent id in a .npy pickle")


def _load_npy_object(path: str):
  with open(path, "rb") as f:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
      shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
      shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    if not dtype.hasobject:
      return np.fromfile(f, dtype).reshape(shape, order="F" if fortran else "C")
    obj = _NpUnpickler(io.BufferedReader(f), path).load()
  obj = unwrap(obj)
  if isinstance(obj, np.ndarray) and obj.dtype == object and obj.size == 1:
    obj = obj.reshape(()).item()
  return obj


def read_sklearn_pca(path: str | os.PathLike) -> dict:
  """The attribute dict of a pickled scikit-learn PCA (.pth via torch.save, .npy via np.save).

  Raises:
    gigassl_jax.pth.UnsafeCheckpointError: the pickle names another global.
    ValueError: the file holds no PCA.
  """
  path = os.fspath(path)
  if path.endswith(".npy"):
    obj = _load_npy_object(path)
  elif zipfile.is_zipfile(path):
    obj = unwrap(pth.load(path, extra_globals=_GLOBALS))
  else:
    with open(path, "rb") as f:
      obj = _NpUnpickler(f, path).load()
    if obj == pth._LEGACY_MAGIC:  # pylint: disable=protected-access
      obj = pth.load(path, extra_globals=_GLOBALS)  # torch's legacy format
    obj = unwrap(obj)
  if not (isinstance(obj, dict) and obj.get("__class__") == "PCA"):
    raise ValueError(f"{path}: holds a {type(obj).__name__}, not a scikit-learn PCA")
  for key in ("mean_", "components_"):
    if not isinstance(obj.get(key), np.ndarray):
      raise ValueError(f"{path}: PCA without {key} (is it fitted?)")
  return obj


def load(path: str | os.PathLike) -> Pca:
  """A PCA from our npz, or from a pickled scikit-learn PCA (.pth / .npy / .pkl)."""
  path = os.fspath(path)
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as z:
      return Pca(
        z["mean"],
        z["components"],
        z["explained_variance"],
        bool(z["whiten"]),
        str(z["source"]),
      )
  a = read_sklearn_pca(path)
  comps = np.asarray(a["components_"], np.float64)
  ev = a.get("explained_variance_")
  ev = np.ones(comps.shape[0]) if ev is None else np.asarray(ev, np.float64)
  whiten = bool(a.get("whiten", False))
  return Pca(np.asarray(a["mean_"], np.float64), comps, ev, whiten, os.path.basename(path))
