"""The published Giga-SSL pooling networks: read them, and write ours in their layout.

A released checkpoint (Democratizing_WSI's `gigassl-scm-*.pth[.tar]`) is a
torch pickle `{'config': {..., 'downmap', 'num_class', ...}, 'state_dict': {...}}`.
Its pooling network's keys are

    backbone.mil.net.mil_model.sparse_pooling.0.{b}.{conv}.weight      [taps, 1, C_in', C]
    backbone.mil.net.mil_model.sparse_pooling.0.{b}.{norm}.{weight,bias,running_mean,running_var}

with b in {0, 1}, conv in {conv1, conv2, convd (block 0 only)}, norm in
{norm1, norm2, normd (block 0 only)}; the older gigassl code's checkpoints lack
the `mil.` (prefix `backbone.`). Conv weights are in SparseConvNet's layout,
tap k = 3*d0 + d1 with d0 along the level-0 x axis, which is PoolingNet's own
layout (it takes (x, y) coordinates), so they load as they are after dropping
the groups axis. Projector and `linear_classifier` keys are ignored.

The file is read with gigassl_jax.pth (a restricted unpickler: no code runs).
`export` writes a PoolingNet back in the same key layout as a zip checkpoint
that `torch.load` reads.

Command line (export a training run):
  python -m gigassl_jax.released --workdir=RUN --out=gigassl-ours.pth
"""

from __future__ import annotations

import dataclasses
import os
import sys

import jax.numpy as jnp
import numpy as np
from flax import nnx

from gigassl_jax import cli, models, pca, pth

POOL_KEY = "net.mil_model.sparse_pooling.0."
PREFIXES = ("backbone.mil.", "backbone.", "")  # newest first; "" = already stripped
EXPORT_PREFIX = "backbone.mil."
# Our parameter -> the released name under POOL_KEY.
CONVS = {
  "b0_conv1": "0.conv1",
  "b0_conv2": "0.conv2",
  "b0_convd": "0.convd",
  "b1_conv1": "1.conv1",
  "b1_conv2": "1.conv2",
}
NORMS = {
  "b0_norm1": "0.norm1",
  "b0_norm2": "0.norm2",
  "b0_normd": "0.normd",
  "b1_norm1": "1.norm1",
  "b1_norm2": "1.norm2",
}
# Our BN variable -> torch's name.
BN_FIELDS = (
  ("scale", "weight"),
  ("bias", "bias"),
  ("mean", "running_mean"),
  ("var", "running_var"),
)


@dataclasses.dataclass
class Released:
  """A loaded released checkpoint.

  Attributes:
    pool: PoolingNet (eval mode) with the checkpoint's weights and BN statistics.
    downmap: the grid cell (level-0 px) the model was trained with, or None
      when the file has no config.
    config: the checkpoint's config dict (tensors dropped), {} if none.
    in_features, features: widths read from the tensors.
    prefix: the key prefix found (e.g. 'backbone.mil.').
    ignored: number of other keys (projector, classifier, ...).
  """

  pool: models.PoolingNet
  downmap: int | None
  config: dict
  in_features: int
  features: int
  prefix: str
  ignored: int


def _summary(keys) -> str:
  """The distinct two-component key prefixes, for an error message."""
  heads = sorted({".".join(k.split(".")[:2]) for k in keys})
  more = f" (+{len(heads) - 12} more)" if len(heads) > 12 else ""
  return ", ".join(heads[:12]) + more


def pooling_weights(state_dict: dict, path: str = "checkpoint") -> tuple[dict, str, int]:
  """Released keys -> {our name: array} (convs [taps, C_in, C]; BN dicts), prefix, n ignored.

  Raises:
    ValueError: no prefix gives the full set of pooling keys (the message
      lists what the file holds), or a tensor has a shape that does not fit.
  """
  for prefix in PREFIXES:
    base = prefix + POOL_KEY
    if any(k.startswith(base) for k in state_dict):
      break
  else:
    raise ValueError(
      f"{path}: no Giga-SSL pooling network found (expected keys "
      f"'backbone.mil.{POOL_KEY}*' or 'backbone.{POOL_KEY}*'); the file holds "
      f"{len(state_dict)} tensors under: {_summary(state_dict) or 'nothing'}"
    )
  out, used = {}, set()

  def take(key):
    full = base + key
    if full not in state_dict:
      found = _summary(k[len(base) :] for k in state_dict if k.startswith(base))
      raise ValueError(f"{path}: missing {full!r} (found under {base}: {found})")
    used.add(full)
    return np.asarray(state_dict[full], np.float32)

  for ours, theirs in CONVS.items():
    w = take(theirs + ".weight")
    if w.ndim != 4 or w.shape[1] != 1 or w.shape[0] not in (1, 9):
      raise ValueError(
        f"{path}: {base}{theirs}.weight has shape {w.shape}; expected "
        "SparseConvNet's [taps (9 or 1), 1, C_in, C_out]"
      )
    out[ours] = w[:, 0]
  for ours, theirs in NORMS.items():
    out[ours] = {f: take(f"{theirs}.{t}") for f, t in BN_FIELDS}
  c_in, c = out["b0_conv1"].shape[1:]
  want = {
    "b0_conv1": (9, c_in, c),
    "b0_conv2": (9, c, c),
    "b0_convd": (1, c_in, c),
    "b1_conv1": (9, c, c),
    "b1_conv2": (9, c, c),
  }
  for name, shape in want.items():
    if out[name].shape != shape:
      raise ValueError(f"{path}: {name} has shape {out[name].shape}, expected {shape}")
  for name in NORMS:
    for f, arr in out[name].items():
      if arr.shape != (c,):
        raise ValueError(f"{path}: {name}.{f} has shape {arr.shape}, expected ({c},)")
  extra = [k for k in state_dict if k.startswith(base) and k not in used]
  if extra:
    raise ValueError(f"{path}: unexpected pooling keys {extra[:5]} (not a Giga-SSL layer4?)")
  return out, prefix, len(state_dict) - len(used)


def set_pool_weights(pool: models.PoolingNet, weights: dict) -> None:
  """Copies pooling_weights' dict into `pool` in place."""
  for name in CONVS:
    getattr(pool, name).weight.set_value(jnp.asarray(weights[name]))
  for name in NORMS:
    bn = getattr(pool, name)
    for f, _ in BN_FIELDS:
      getattr(bn, f).set_value(jnp.asarray(weights[name][f]))


def _path_str(*parts):
  """pathlib.*Path(*parts) in a config: kept as a string, no filesystem access."""
  if not all(isinstance(p, str) for p in parts):
    raise ValueError("a pickled path with non-string parts")
  return os.path.join(*parts) if parts else ""


# What a training config may hold besides plain values: numpy scalars/arrays,
# an argparse.Namespace (kept as a dict) and paths (kept as strings).
_CONFIG_GLOBALS = {
  **pca.NUMPY_GLOBALS,
  ("argparse", "Namespace"): pca.record_class("Namespace"),
  **{("pathlib", n): _path_str for n in ("PosixPath", "WindowsPath", "PurePosixPath", "Path")},
}


def load(path: str | os.PathLike, *, conv_impl: str | None = None) -> Released:
  """Reads a released checkpoint into a PoolingNet (eval mode).

  Raises:
    gigassl_jax.pth.UnsafeCheckpointError: the pickle names a global outside
      tensors and containers (nothing was run).
    ValueError: not a Giga-SSL checkpoint (the message lists what was found).
  """
  path = os.fspath(path)
  obj = pca.unwrap(pth.load(path, extra_globals=_CONFIG_GLOBALS))
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: holds a {type(obj).__name__}, not a checkpoint dict")
  config = obj.get("config") if isinstance(obj.get("config"), dict) else {}
  sd = obj.get("state_dict") if isinstance(obj.get("state_dict"), dict) else obj
  sd = {str(k): v for k, v in sd.items() if isinstance(v, np.ndarray)}
  weights, prefix, ignored = pooling_weights(sd, path)
  c_in, c = weights["b0_conv1"].shape[1:]
  pool = models.PoolingNet(int(c_in), int(c), conv_impl=conv_impl, rngs=nnx.Rngs(0))
  set_pool_weights(pool, weights)
  pool.eval()
  downmap = config.get("downmap")
  if downmap is not None:
    downmap = int(downmap)
    if downmap < 1:
      raise ValueError(f"{path}: config downmap {downmap} must be >= 1")
  plain = {k: v for k, v in config.items() if not isinstance(v, np.ndarray) or v.ndim == 0}
  return Released(pool, downmap, plain, int(c_in), int(c), prefix, ignored)


def state_dict(pool: models.PoolingNet, prefix: str = EXPORT_PREFIX) -> dict:
  """PoolingNet -> {released key: float32 array}, convs as [taps, 1, C_in, C]."""
  base = prefix + POOL_KEY
  out = {}
  for ours, theirs in CONVS.items():
    w = np.asarray(getattr(pool, ours).weight[...], np.float32)
    out[f"{base}{theirs}.weight"] = w[:, None]
  for ours, theirs in NORMS.items():
    bn = getattr(pool, ours)
    for f, t in BN_FIELDS:
      out[f"{base}{theirs}.{t}"] = np.asarray(getattr(bn, f)[...], np.float32)
  return out


def export(
  pool: models.PoolingNet,
  path: str | os.PathLike,
  *,
  downmap: int,
  config: dict | None = None,
) -> None:
  """Writes `pool` as a released-layout checkpoint (torch.load reads it).

  Args:
    pool: the pooling network.
    path: output file (written atomically).
    downmap: the grid cell (level-0 px) the model was trained with.
    config: extra config entries (JSON-like scalars/strings) to record.
  """
  cfg = dict(config or {})
  cfg.update(downmap=int(downmap), num_class=int(cfg.get("num_class", 0)))
  cfg.setdefault("in_features", int(pool.in_features))
  cfg.setdefault("features", int(pool.features))
  pth.save({"config": cfg, "state_dict": state_dict(pool)}, path)


@dataclasses.dataclass(frozen=True)
class ExportConfig:
  """`python -m gigassl_jax.released`: export a training run's pooling network in the
  released Giga-SSL layout."""

  workdir: str = cli.field("", "A training run directory.", required=True)
  out: str = cli.field("", "Output .pth file.", required=True)


def main(argv) -> int:
  """Exports the parsed --workdir's pooling network to --out; returns the exit status."""
  del argv  # the flags hold the settings
  args = cli.from_flags(ExportConfig)
  from gigassl_jax import checkpoint  # pylint: disable=import-outside-toplevel

  try:
    model, cfg = checkpoint.restore_model(args.workdir)
  except (FileNotFoundError, ValueError) as e:
    print(f"released: error: --workdir={args.workdir}: {e}", file=sys.stderr)
    return 2
  export(
    model.pool,
    args.out,
    downmap=cfg.cell,
    config={"source": "gigassl_jax", "workdir": os.path.abspath(args.workdir)},
  )
  print(f"wrote {args.out} (downmap {cfg.cell})")
  return 0


if __name__ == "__main__":
  cli.define_flags(ExportConfig)
  cli.run(main)
