"""Reads PyTorch checkpoint files (`.pth`/`.pt`) into numpy, without torch.

Two on-disk formats exist:
  * zip (torch.save default since PyTorch 1.6): an archive `<name>/data.pkl`
    whose tensors point, through pickle persistent ids, at raw storages stored
    as `<name>/data/<key>`;
  * legacy (pre-1.6, or `_use_new_zipfile_serialization=False`): five pickles
    in a row (magic number, protocol version, system info, the object, the list
    of storage keys), followed by each storage as an int64 element count and
    its raw bytes.

A checkpoint is a pickle, and unpickling runs whatever callables the file names.
This reader therefore uses a restricted unpickler: only the few torch rebuild
functions, storage types, dtypes and `collections.OrderedDict` are accepted,
and they are mapped onto this module's own numpy implementations; any other
global is rejected with an error naming the file and the global. Tensors
become C-contiguous numpy arrays (views into a shared storage become copies).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# Storage class name (as torch pickles it) -> numpy dtype.
_STORAGE_DTYPES = {
  "DoubleStorage": np.float64,
  "FloatStorage": np.float32,
  "HalfStorage": np.float16,
  "BFloat16Storage": ml_dtypes.bfloat16,
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
  "ComplexFloatStorage": np.complex64,
  "ComplexDoubleStorage": np.complex128,
  "UntypedStorage": np.uint8,
}
# torch dtype attribute name -> numpy dtype (used by _rebuild_tensor_v3).
_TORCH_DTYPES = {
  "float64": np.float64,
  "float32": np.float32,
  "float16": np.float16,
  "bfloat16": ml_dtypes.bfloat16,
  "int64": np.int64,
  "int32": np.int32,
  "int16": np.int16,
  "int8": np.int8,
  "uint8": np.uint8,
  "bool": np.bool_,
  "complex64": np.complex64,
  "complex128": np.complex128,
}


class UnsafeCheckpointError(pickle.UnpicklingError):
  """The checkpoint names a global that a plain tensor checkpoint never needs."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
  name: str
  dtype: Any


@dataclasses.dataclass(frozen=True)
class _TorchDtype:
  dtype: Any


@dataclasses.dataclass
class _Storage:
  """A storage referenced by the pickle; `data` is filled once it is read."""

  key: str
  dtype: Any
  numel: int
  data: np.ndarray | None = None
  # (root storage, offset in elements) for legacy storage views.
  view_of: tuple[_Storage, int] | None = None

  def array(self) -> np.ndarray:
    if self.view_of is not None:
      root, offset = self.view_of
      return root.array()[offset : offset + self.numel]
    if self.data is None:
      raise pickle.UnpicklingError(f"storage {self.key!r} has no data in the file")
    return self.data


@dataclasses.dataclass
class _Tensor:
  """A tensor placeholder, resolved after all storages are read."""

  storage: _Storage
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]
  dtype: Any = None  # set by _rebuild_tensor_v3 when it differs from storage's

  def resolve(self, path: str) -> np.ndarray:
    flat = self.storage.array()
    if self.dtype is not None and np.dtype(self.dtype) != flat.dtype:
      flat = flat.view(self.dtype)
    if len(self.size) != len(self.stride):
      raise pickle.UnpicklingError(
        f"{path}: tensor size {self.size} and stride {self.stride} differ in rank"
      )
    if any(s < 0 for s in self.size) or any(s < 0 for s in self.stride) or self.offset < 0:
      raise pickle.UnpicklingError(f"{path}: negative size/stride/offset in tensor")
    if 0 in self.size:
      return np.zeros(self.size, flat.dtype)
    # Bounds check before as_strided, which would otherwise read arbitrary
    # memory on a corrupt or hostile file.
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if last >= flat.size:
      raise pickle.UnpicklingError(
        f"{path}: tensor (offset {self.offset}, size {self.size}, stride "
        f"{self.stride}) reaches element {last} of a storage of {flat.size}"
      )
    base = flat[self.offset :]
    view = np.lib.stride_tricks.as_strided(
      base, shape=self.size, strides=[s * flat.itemsize for s in self.stride], writeable=False
    )
    return np.array(view, order="C")  # copy; ascontiguousarray would make 0-d 1-d


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  return _Tensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, hooks, dtype, *unused):
  del requires_grad, hooks
  t = _rebuild_tensor(storage, storage_offset, size, stride)
  t.dtype = dtype.dtype if isinstance(dtype, _TorchDtype) else None
  return t


def _rebuild_parameter(data, *unused):
  return data


# (module, name) -> what the restricted unpickler returns for that global.
_ALLOWED = {
  ("collections", "OrderedDict"): collections.OrderedDict,
  ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
  ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
  ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}
_ALLOWED.update({("torch", n): _StorageType(n, d) for n, d in _STORAGE_DTYPES.items()})
_ALLOWED.update({("torch", n): _TorchDtype(d) for n, d in _TORCH_DTYPES.items()})


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that only knows the globals in _ALLOWED."""

  def __init__(self, file, path: str, storages: dict[str, _Storage], extra=None):
    super().__init__(file, encoding="utf-8")
    self._path = path
    self._storages = storages
    self._extra = extra or {}

  def find_class(self, module, name):
    if (module, name) in self._extra:
      return self._extra[(module, name)]
    try:
      return _ALLOWED[(module, name)]
    except KeyError:
      raise UnsafeCheckpointError(
        f"{self._path}: refusing to load global {module}.{name}; only tensors, "
        "storages and (Ordered)dicts are allowed in a weights file (re-save "
        "just the state_dict with torch.save(model.state_dict(), path))"
      ) from None

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] not in ("storage", b"storage"):
      raise pickle.UnpicklingError(f"{self._path}: unsupported persistent id {pid!r:.200}")
    storage_type, key, _location, numel = pid[1:5]
    view = pid[5] if len(pid) > 5 else None
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f"{self._path}: bad storage type {storage_type!r:.100}")
    key = key.decode() if isinstance(key, bytes) else str(key)
    if key not in self._storages:
      self._storages[key] = _Storage(key, storage_type.dtype, int(numel))
    root = self._storages[key]
    if view is None:
      return root
    view_key, offset, view_size = view
    # Legacy storage views (PyTorch < 1.0): offset and size in elements.
    return _Storage(str(view_key), root.dtype, int(view_size), view_of=(root, int(offset)))


def _resolve(obj, path: str):
  """Replaces _Tensor/_Storage placeholders inside containers by numpy arrays."""
  if isinstance(obj, _Tensor):
    return obj.resolve(path)
  if isinstance(obj, _Storage):
    return obj.array().copy()
  if isinstance(obj, dict):
    return type(obj)((k, _resolve(v, path)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_resolve(v, path) for v in obj)
  return obj


def _load_zip(path: str, extra=None) -> Any:
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkls = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
      raise pickle.UnpicklingError(
        f"{path}: zip archive without a single <name>/data.pkl (TorchScript or not a checkpoint?)"
      )
    prefix = pkls[0][: -len("data.pkl")]
    order = "<"
    if prefix + "byteorder" in names and zf.read(prefix + "byteorder").strip() == b"big":
      order = ">"
    storages: dict[str, _Storage] = {}
    obj = _RestrictedUnpickler(io.BytesIO(zf.read(pkls[0])), path, storages, extra).load()
    for key, st in storages.items():
      member = f"{prefix}data/{key}"
      if member not in names:
        raise pickle.UnpicklingError(f"{path}: missing storage {member}")
      raw = zf.read(member)
      dtype = np.dtype(st.dtype).newbyteorder(order)
      if len(raw) < st.numel * dtype.itemsize:
        raise pickle.UnpicklingError(f"{path}: storage {member} is truncated")
      st.data = np.frombuffer(raw, dtype, count=st.numel).astype(np.dtype(st.dtype), copy=False)
  return _resolve(obj, path)


def _load_legacy(path: str, extra=None) -> Any:
  with open(path, "rb") as f:
    header = _RestrictedUnpickler(f, path, {})
    try:
      magic = header.load()
    except UnsafeCheckpointError:
      raise
    except Exception as e:  # a non-pickle file raises anything here
      raise pickle.UnpicklingError(f"{path}: not a PyTorch checkpoint ({e})") from e
    if magic != _LEGACY_MAGIC:
      raise pickle.UnpicklingError(f"{path}: not a PyTorch checkpoint (bad magic number)")
    protocol = _RestrictedUnpickler(f, path, {}).load()
    if protocol != _LEGACY_PROTOCOL:
      raise pickle.UnpicklingError(f"{path}: unsupported legacy protocol {protocol}")
    sys_info = _RestrictedUnpickler(f, path, {}).load()
    order = "<" if sys_info.get("little_endian", True) else ">"
    storages: dict[str, _Storage] = {}
    obj = _RestrictedUnpickler(f, path, storages, extra).load()
    keys = _RestrictedUnpickler(f, path, {}).load()
    for key in keys:
      key = str(key)
      if key not in storages:
        raise pickle.UnpicklingError(f"{path}: storage {key} listed but never referenced")
      st = storages[key]
      dtype = np.dtype(st.dtype).newbyteorder(order)
      (numel,) = struct.unpack(order + "q", f.read(8))
      raw = f.read(numel * dtype.itemsize)
      if numel < st.numel or len(raw) != numel * dtype.itemsize:
        raise pickle.UnpicklingError(f"{path}: storage {key} is truncated")
      st.data = np.frombuffer(raw, dtype).astype(np.dtype(st.dtype), copy=False)
  return _resolve(obj, path)


def load(path: str | os.PathLike, extra_globals: dict | None = None) -> Any:
  """Loads a PyTorch checkpoint without torch.

  Args:
    path: a file written by `torch.save` (zip or legacy format).
    extra_globals: (module, name) -> safe stand-in, for callers that accept
      a few more globals (e.g. gigassl_jax.pca's numpy/scikit-learn records).

  Returns:
    The saved object with every tensor replaced by a numpy array of the same
    shape and dtype (bfloat16 as `ml_dtypes.bfloat16`).

  Raises:
    UnsafeCheckpointError: the file names a global outside the allow-list.
    pickle.UnpicklingError: the file is not a readable checkpoint.
  """
  path = os.fspath(path)
  if zipfile.is_zipfile(path):
    return _load_zip(path, extra_globals)
  return _load_legacy(path, extra_globals)


_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "network")


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Loads the parameter dict of a checkpoint: name -> numpy array.

  A bare state_dict is returned as is; a training checkpoint such as MoCo's
  `{'epoch': ..., 'state_dict': {...}, 'optimizer': {...}}` gives its nested
  `state_dict` (or `model_state_dict`, `model`, `net`). Non-array entries are
  dropped; key prefixes are left to the caller.
  """
  obj = load(path)
  if not isinstance(obj, dict):
    raise ValueError(
      f"{os.fspath(path)}: checkpoint holds a {type(obj).__name__}, not a dict of tensors"
    )
  for key in _STATE_DICT_KEYS:
    if isinstance(obj.get(key), dict):
      obj = obj[key]
      break
  out = {str(k): v for k, v in obj.items() if isinstance(v, np.ndarray)}
  if not out:
    raise ValueError(f"{os.fspath(path)}: no tensors found (top-level keys: {list(obj)[:10]})")
  return out


# ------------------------------------------------------------- writing -----

# numpy dtype -> torch storage class name (the names torch.save itself writes).
_WRITE_STORAGES = {
  np.dtype(np.float64): "DoubleStorage",
  np.dtype(np.float32): "FloatStorage",
  np.dtype(np.float16): "HalfStorage",
  np.dtype(np.int64): "LongStorage",
  np.dtype(np.int32): "IntStorage",
  np.dtype(np.int16): "ShortStorage",
  np.dtype(np.int8): "CharStorage",
  np.dtype(np.uint8): "ByteStorage",
  np.dtype(np.bool_): "BoolStorage",
}


class _Writer:
  """Emits pickle protocol-2 opcodes for dicts/lists/scalars/strings and tensors.

  Tensors are written exactly as torch.save writes them: a call to
  `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False,
  OrderedDict())` whose storage is a persistent id
  `('storage', torch.<T>Storage, key, 'cpu', numel)`; torch.load (also with
  weights_only=True) reads that without running anything else.
  """

  def __init__(self):
    self.out = io.BytesIO()
    self.storages: list[np.ndarray] = []

  def op(self, b: bytes):
    self.out.write(b)

  def global_(self, module: str, name: str):
    self.op(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

  def str_(self, s: str):
    b = s.encode("utf-8")
    self.op(b"X" + struct.pack("<I", len(b)) + b)

  def int_(self, i: int):
    if -(2**31) <= i < 2**31:
      self.op(b"J" + struct.pack("<i", i))
    else:
      b = i.to_bytes((i.bit_length() + 8) // 8, "little", signed=True)
      self.op(b"\x8a" + bytes([len(b)]) + b)

  def tuple_(self, items):
    self.op(b"(")
    for v in items:
      self.obj(v)
    self.op(b"t")

  def tensor(self, a: np.ndarray):
    a = np.array(a, order="C")  # ascontiguousarray would make a 0-d array 1-d
    if a.dtype not in _WRITE_STORAGES:
      raise TypeError(f"cannot write a {a.dtype} tensor")
    key = str(len(self.storages))
    self.storages.append(a)
    self.global_("torch._utils", "_rebuild_tensor_v2")
    self.op(b"(")
    # Persistent id of the storage.
    self.op(b"(")
    self.str_("storage")
    self.global_("torch", _WRITE_STORAGES[a.dtype])
    self.str_(key)
    self.str_("cpu")
    self.int_(int(a.size))
    self.op(b"tQ")  # TUPLE, BINPERSID
    self.int_(0)
    self.tuple_([int(n) for n in a.shape])
    # C-order strides in elements (numpy's are in bytes and 0 on empty axes).
    self.tuple_([int(np.prod(a.shape[i + 1 :], dtype=np.int64)) for i in range(a.ndim)])
    self.op(b"\x89")  # NEWFALSE: requires_grad
    self.global_("collections", "OrderedDict")
    self.op(b")R")  # OrderedDict(): backward hooks
    self.op(b"tR")

  def obj(self, v):
    if isinstance(v, np.ndarray):
      self.tensor(v)
    elif v is None:
      self.op(b"N")
    elif isinstance(v, (bool, np.bool_)):
      self.op(b"\x88" if v else b"\x89")
    elif isinstance(v, (int, np.integer)):
      self.int_(int(v))
    elif isinstance(v, (float, np.floating)):
      self.op(b"G" + struct.pack(">d", float(v)))
    elif isinstance(v, str):
      self.str_(v)
    elif isinstance(v, dict):
      if isinstance(v, collections.OrderedDict):
        self.global_("collections", "OrderedDict")
        self.op(b")R")
      else:
        self.op(b"}")
      if v:
        self.op(b"(")
        for k, x in v.items():
          self.obj(k)
          self.obj(x)
        self.op(b"u")
    elif isinstance(v, tuple):
      self.tuple_(v)
    elif isinstance(v, list):
      self.op(b"](")
      for x in v:
        self.obj(x)
      self.op(b"e")
    else:
      raise TypeError(f"cannot write a {type(v).__name__} into a .pth file")


def save(obj: Any, path: str | os.PathLike) -> None:
  """Writes `obj` (dicts, lists, scalars, strings, numpy arrays) as a torch zip checkpoint.

  The file is what `torch.save` writes for the same object with the arrays as
  CPU tensors: `torch.load(path)` reads it (weights_only too), and so does
  `load` above. Written to a temp name and renamed: a reader never sees half.
  """
  path = os.fspath(path)
  w = _Writer()
  w.op(b"\x80\x02")  # PROTO 2
  w.obj(obj)
  w.op(b".")
  name = "archive"
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
      zf.writestr(f"{name}/data.pkl", w.out.getvalue())
      zf.writestr(f"{name}/byteorder", "little")
      for key, a in enumerate(w.storages):
        zf.writestr(f"{name}/data/{key}", a.astype(a.dtype.newbyteorder("<")).tobytes())
      zf.writestr(f"{name}/version", "3\n")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
