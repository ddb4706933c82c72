"""Training flags (absl, grouped by prefix) -> one frozen `Config`.

This is the only module that reads flags. Everything else takes a `Config` (or
plain arguments), so the model and the training step can be used without absl.

Groups: --data_* (bank and view sampling), --model_* (pooling net), --loss_*
(NT-Xent), --optim_* (Adam and schedule), --train_* (loop, checkpoints,
metrics), --dist_* (multi-host), plus --workdir.

The resolved configuration (every flag, plus values derived from the bank such
as `model_in_features`) is written into the workdir as `config.json` and as a
replayable `flags.txt`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

from absl import flags

from gigassl_jax.kernels.sparse_conv import api as conv_api
from gigassl_jax.sparse import tables

CONFIG_JSON = "config.json"
FLAGS_TXT = "flags.txt"
# Bank spec meaning "make a small random bank in <workdir>/synthetic_bank".
SYNTHETIC = "synthetic"


@dataclasses.dataclass(frozen=True)
class Config:
  """Every training setting; field names are the flag names."""

  workdir: str = ""
  # data
  data_bank: str = ""
  data_tiles: int = 5
  data_cell: int = 224
  data_translate: bool = True
  data_rotate: bool = True
  data_flip: bool = True
  data_scale: bool = True
  data_scale_range: tuple[float, float] = (0.7, 1.3)
  data_prefetch: int = 2
  data_read_threads: int = 8
  data_workers: int = -1  # -1 = auto (sampling.auto_workers)
  data_synthetic_shape: tuple[int, int, int, int] = (64, 4, 32, 32)
  # model
  model_in_features: int = 0  # 0 = the bank's feature dimension
  model_conv_impl: str = "auto"
  model_table_builder: str = tables.DEFAULT_BUILDER
  model_sync_bn: bool = True
  model_init: str = "random"
  model_weights: str = ""
  model_orientation: str = "natural"
  # loss
  loss_temperature: float = 0.05
  loss_negatives: str = "global"
  # optimiser
  optim_base_lr: float = 0.03
  optim_warmup_epochs: float = 10.0
  optim_final_lr: float = 0.0
  optim_b1: float = 0.9
  optim_b2: float = 0.999
  optim_eps: float = 1e-8
  optim_weight_decay: float = 0.0
  # loop
  train_batch_size: int = 256
  train_epochs: float = 3000.0
  train_steps: int = 0  # > 0 overrides train_epochs
  train_seed: int = 0
  train_log_every: int = 10
  train_ckpt_every: int = 500
  train_ckpt_keep: int = 3
  train_progress: bool = True
  # multi-host
  dist_init: str = "none"
  dist_coordinator: str = ""
  dist_num_processes: int = 1
  dist_process_id: int = 0
  dist_cpu_collectives: str = "gloo"

  @property
  def conv_impl(self) -> str | None:
    """The kernel name for models.GigaSSL (None = the backend's default)."""
    return None if self.model_conv_impl == "auto" else self.model_conv_impl

  @property
  def lr(self) -> float:
    """Peak learning rate: base_lr x batch / 256 (method.md section 5)."""
    return self.optim_base_lr * self.train_batch_size / 256.0

  def replace(self, **kw) -> Config:
    return dataclasses.replace(self, **kw)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict) -> Config:
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(names))
    if unknown:
      raise ValueError(f"unknown config keys {unknown}")
    kw = {}
    for k, v in d.items():
      kw[k] = tuple(v) if isinstance(v, list) else v
    return cls(**kw)

  def validate(self) -> Config:
    """Raises ValueError naming the flag of the first inconsistent value."""

    def need(cond, msg):
      if not cond:
        raise ValueError(msg)

    need(self.workdir, "--workdir is required")
    need(self.data_bank, "--data_bank is required (a bank directory or 'synthetic')")
    need(self.data_tiles >= 1, f"--data_tiles must be >= 1, got {self.data_tiles}")
    need(self.data_cell >= 1, f"--data_cell must be >= 1, got {self.data_cell}")
    lo, hi = self.data_scale_range
    need(0 < lo <= hi, f"--data_scale_range must be 0 < low <= high, got {self.data_scale_range}")
    need(
      len(self.data_synthetic_shape) == 4 and min(self.data_synthetic_shape) >= 1,
      f"--data_synthetic_shape must be 4 positive ints (slides, naug, tiles, dim), "
      f"got {self.data_synthetic_shape}",
    )
    need(self.data_prefetch >= 1, f"--data_prefetch must be >= 1, got {self.data_prefetch}")
    need(
      self.data_read_threads >= 1, f"--data_read_threads must be >= 1, got {self.data_read_threads}"
    )
    need(
      self.data_workers >= -1,
      f"--data_workers must be >= 0 (or -1 = auto), got {self.data_workers}",
    )
    need(
      self.train_batch_size >= 2,
      f"--train_batch_size must be >= 2 (NT-Xent needs negatives), got {self.train_batch_size}",
    )
    need(
      self.train_steps > 0 or self.train_epochs > 0, "--train_steps or --train_epochs must be > 0"
    )
    need(self.optim_eps > 0, f"--optim_eps must be > 0, got {self.optim_eps}")
    need(self.loss_temperature > 0, f"--loss_temperature must be > 0, got {self.loss_temperature}")
    need(self.train_log_every >= 1, f"--train_log_every must be >= 1, got {self.train_log_every}")
    need(
      self.train_ckpt_every >= 1, f"--train_ckpt_every must be >= 1, got {self.train_ckpt_every}"
    )
    need(
      self.model_init != "torchvision" or self.model_weights,
      "--model_init=torchvision needs --model_weights=PATH (a torchvision/MoCo .pth)",
    )
    need(
      self.dist_init != "explicit" or self.dist_coordinator,
      "--dist_init=explicit needs --dist_coordinator=HOST:PORT",
    )
    return self


def write(cfg: Config, workdir: str | os.PathLike) -> None:
  """Writes config.json and a replayable flags.txt into `workdir` atomically."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  lines = []
  for f in dataclasses.fields(cfg):
    v = getattr(cfg, f.name)
    if isinstance(v, bool):
      lines.append(f"--{f.name}" if v else f"--no{f.name}")
    elif isinstance(v, tuple):
      lines.append(f"--{f.name}={','.join(str(x) for x in v)}")
    else:
      lines.append(f"--{f.name}={v}")
  for name, text in ((CONFIG_JSON, cfg.to_json() + "\n"), (FLAGS_TXT, "\n".join(lines) + "\n")):
    tmp = workdir / f".{name}.tmp-{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, workdir / name)


def read(workdir: str | os.PathLike) -> Config:
  """The resolved Config a run wrote into `workdir`."""
  path = pathlib.Path(workdir) / CONFIG_JSON
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: is {workdir} a training workdir?")
  return Config.from_dict(json.loads(path.read_text()))


# ------------------------------------------------------------------ flags ---

_D = Config()


def define_flags() -> None:
  """Defines every training flag (idempotent)."""
  if "data_bank" in flags.FLAGS:
    return
  impls = ["auto"] + sorted(conv_api.IMPLEMENTATIONS)
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, config.")
  # data
  flags.DEFINE_string(
    "data_bank",
    None,
    "Embedding bank directory, or 'synthetic' for a small random bank "
    "made in <workdir>/synthetic_bank (shape from --data_synthetic_shape).",
  )
  flags.DEFINE_integer("data_tiles", _D.data_tiles, "T: tiles per view (with replacement).")
  flags.DEFINE_integer("data_cell", _D.data_cell, "Level-0 pixels per grid cell.")
  flags.DEFINE_boolean("data_translate", True, "Random translation of a view's positions.")
  flags.DEFINE_boolean("data_rotate", True, "Random rotation (uniform angle).")
  flags.DEFINE_boolean("data_flip", True, "Random +-1 flip per axis.")
  flags.DEFINE_boolean("data_scale", True, "Random per-axis scale in --data_scale_range.")
  flags.DEFINE_list("data_scale_range", ["0.7", "1.3"], "low,high of the per-axis scale.")
  flags.DEFINE_integer(
    "data_prefetch", _D.data_prefetch, "Steps of views prepared ahead in a background thread."
  )
  flags.DEFINE_integer(
    "data_read_threads",
    _D.data_read_threads,
    "Threads reading bank records (when --data_workers=0).",
  )
  flags.DEFINE_integer(
    "data_workers",
    _D.data_workers,
    "Processes reading bank records; 0 = threads of the training "
    "process; -1 = auto (cores - 2, at most 32, on a machine with >= 8 "
    "cores, else 0).",
  )
  flags.DEFINE_list(
    "data_synthetic_shape",
    [str(x) for x in _D.data_synthetic_shape],
    "slides,naug,tiles,dim of the bank made for --data_bank=synthetic.",
  )
  # model
  flags.DEFINE_integer(
    "model_in_features", 0, "Input channels of the pooling net; 0 = the bank's feature dim."
  )
  flags.DEFINE_enum(
    "model_conv_impl",
    "auto",
    impls,
    "Sparse-conv kernel (kernels/sparse_conv); auto = backend default.",
  )
  flags.DEFINE_enum(
    "model_table_builder", _D.model_table_builder, list(tables.BUILDERS), "Neighbour-table builder."
  )
  flags.DEFINE_boolean(
    "model_sync_bn", True, "BN statistics over all devices (False = per device, the reference)."
  )
  flags.DEFINE_enum(
    "model_init",
    "random",
    ["random", "torchvision"],
    "random, or layer4 of a torchvision/MoCo ResNet18 .pth (--model_weights).",
  )
  flags.DEFINE_string("model_weights", "", "ResNet18 .pth for --model_init=torchvision.")
  flags.DEFINE_enum(
    "model_orientation",
    "natural",
    ["natural", "reference"],
    "How 3x3 ImageNet kernels map to sparse taps (see models.py).",
  )
  # loss
  flags.DEFINE_float("loss_temperature", _D.loss_temperature, "NT-Xent temperature tau.")
  flags.DEFINE_enum(
    "loss_negatives",
    "global",
    ["global", "local"],
    "Negatives from all devices and hosts, or this device only (reference).",
  )
  # optim
  flags.DEFINE_float("optim_base_lr", _D.optim_base_lr, "lr = base_lr x batch / 256.")
  flags.DEFINE_float("optim_warmup_epochs", _D.optim_warmup_epochs, "Linear warm-up epochs.")
  flags.DEFINE_float("optim_final_lr", 0.0, "Learning rate at the end of the cosine decay.")
  flags.DEFINE_float("optim_b1", _D.optim_b1, "Adam beta1.")
  flags.DEFINE_float("optim_b2", _D.optim_b2, "Adam beta2.")
  flags.DEFINE_float(
    "optim_eps",
    _D.optim_eps,
    "Adam epsilon (1e-8 = torch and optax default). Adam's first step is\n"
    "lr x g / (|g| + eps): a large eps makes it smooth in g instead of lr x sign(g).",
  )
  flags.DEFINE_float("optim_weight_decay", 0.0, "Decoupled weight decay (AdamW) if > 0.")
  # train
  flags.DEFINE_integer("train_batch_size", _D.train_batch_size, "Slides per step (global).")
  flags.DEFINE_float("train_epochs", _D.train_epochs, "Epochs (passes over the slides).")
  flags.DEFINE_integer("train_steps", 0, "If > 0, total steps (overrides --train_epochs).")
  flags.DEFINE_integer("train_seed", 0, "Seed of initialisation and view sampling.")
  flags.DEFINE_integer("train_log_every", _D.train_log_every, "Steps between metric records.")
  flags.DEFINE_integer("train_ckpt_every", _D.train_ckpt_every, "Steps between checkpoints.")
  flags.DEFINE_integer("train_ckpt_keep", _D.train_ckpt_keep, "Checkpoints kept.")
  flags.DEFINE_boolean("train_progress", True, "Show a progress bar (else log lines).")
  # dist
  flags.DEFINE_enum(
    "dist_init",
    "none",
    ["none", "auto", "explicit"],
    "jax.distributed.initialize: none, auto (TPU/Slurm detection) or "
    "explicit (--dist_coordinator, --dist_num_processes, --dist_process_id).",
  )
  flags.DEFINE_string("dist_coordinator", "", "HOST:PORT of process 0.")
  flags.DEFINE_integer("dist_num_processes", 1, "Number of processes.")
  flags.DEFINE_integer("dist_process_id", 0, "This process's id.")
  flags.DEFINE_enum(
    "dist_cpu_collectives",
    "gloo",
    ["gloo", "mpi", "none"],
    "CPU collectives for multi-process runs on CPU.",
  )


def from_flags() -> Config:
  """Builds the validated Config from the parsed absl flags."""
  fl = flags.FLAGS
  kw = {}
  for f in dataclasses.fields(Config):
    v = fl[f.name].value
    if f.name == "data_scale_range":
      v = tuple(float(x) for x in v)
      if len(v) != 2:
        raise ValueError(f"--data_scale_range needs 2 values, got {v}")
    elif f.name == "data_synthetic_shape":
      v = tuple(int(x) for x in v)
    elif v is None:
      v = getattr(_D, f.name)
    kw[f.name] = v
  return Config(**kw).validate()
