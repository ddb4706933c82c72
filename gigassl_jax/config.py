"""Training flags (absl, grouped by prefix) -> one frozen `Config`.

`Config` is the one source of every flag: each field carries its default and
help, and `define_flags` / `from_flags` generate the absl flags from it
(gigassl_jax.cli). Everything else takes a `Config` (or plain arguments), so
the model and the training step can be used without absl.

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

from gigassl_jax import cli

from gigassl_jax.kernels.sparse_conv import api as conv_api
from gigassl_jax.sparse import tables

CONFIG_JSON = "config.json"
FLAGS_TXT = "flags.txt"
# Bank spec meaning "make a small random bank in <workdir>/synthetic_bank".
SYNTHETIC = "synthetic"
# Matmul precisions of --model_precision (names of jax.lax.Precision).
PRECISIONS = ("default", "high", "highest")
# Flags that do not change what a run computes: a resume may change them freely.
RESUME_FREE = frozenset({
  "workdir", "data_prefetch", "data_read_threads", "data_workers", "data_resident",
  "data_resident_fraction", "model_conv_impl",
  "model_table_builder", "train_log_every", "train_ckpt_every", "train_ckpt_keep",
  "train_progress", "train_allow_changed_flags", "dist_init", "dist_coordinator",
  "dist_num_processes", "dist_process_id", "dist_cpu_collectives",
})  # fmt: skip
F = cli.field


@dataclasses.dataclass(frozen=True)
class Config:
  """Every training setting; field names are the flag names."""

  workdir: str = F("", "Run directory: checkpoints, metrics, config.", required=True)
  # data
  data_bank: str = F(
    "",
    "Embedding bank directory, or 'synthetic' for a small random bank "
    "made in <workdir>/synthetic_bank (shape from --data_synthetic_shape).",
    required=True,
  )
  data_tiles: int = F(5, "T: tiles per view (with replacement).")
  data_cell: int = F(
    0,
    "Level-0 pixels per grid cell; 0 = from the bank's patch size (bank.grid_cell_for: "
    "neighbouring tiles 4 cells apart, 224 for 224-px tiles read at level 1 of a 40x scan, "
    "as the reference).",
  )
  data_translate: bool = F(True, "Random translation of a view's positions.")
  data_rotate: bool = F(True, "Random rotation (uniform angle).")
  data_flip: bool = F(True, "Random +-1 flip per axis.")
  data_scale: bool = F(True, "Random per-axis scale in --data_scale_range.")
  data_scale_range: tuple[float, float] = F((0.7, 1.3), "low,high of the per-axis scale.")
  data_prefetch: int = F(2, "Steps of views prepared ahead in a background thread.")
  data_read_threads: int = F(8, "Threads reading bank records (when --data_workers=0).")
  data_workers: int = F(
    -1,
    "Processes reading bank records; 0 = threads of the training process; -1 = auto "
    "(cores - 2, at most 32, on a machine with >= 8 cores, else 0).",
  )
  data_resident: str = F(
    "auto",
    "Where training keeps the bank: device = loaded once onto the devices, views gathered "
    "inside the jitted step; stream = records read on the host every step; auto = device "
    "when this process's shard fits --data_resident_fraction of its devices' memory "
    "(host RAM on CPU). Same views, same result either way.",
    choices=["auto", "device", "stream"],
  )
  data_resident_fraction: float = F(
    0.75, "Share of the devices' memory (host RAM on CPU) a resident bank may take (auto)."
  )
  data_synthetic_shape: tuple[int, int, int, int] = F(
    (64, 4, 32, 32), "slides,naug,tiles,dim of the bank made for --data_bank=synthetic."
  )
  # model
  model_in_features: int = F(0, "Input channels of the pooling net; 0 = the bank's feature dim.")
  model_conv_impl: str = F(
    "auto",
    "Sparse-conv kernel (kernels/sparse_conv); auto = backend default.",
    choices=["auto"] + sorted(conv_api.IMPLEMENTATIONS),
  )
  model_table_builder: str = F(
    tables.DEFAULT_BUILDER, "Neighbour-table builder.", choices=list(tables.BUILDERS)
  )
  model_sync_bn: bool = F(
    True, "BN statistics over all devices (False = per device, the reference)."
  )
  model_init: str = F(
    "random",
    "random, or layer4 of a torchvision/MoCo ResNet18 .pth (--model_weights).",
    choices=["random", "torchvision"],
  )
  model_weights: str = F("", "ResNet18 .pth for --model_init=torchvision.")
  model_orientation: str = F(
    "natural",
    "How 3x3 ImageNet kernels map to sparse taps (see models.py).",
    choices=["natural", "reference"],
  )
  model_precision: str = F(
    "default",
    "Matmul precision of the pooling net and projector (jax.lax.Precision): default "
    "(TF32 on recent GPUs, bfloat16 passes on TPU; exact float32 on CPU), high, highest.",
    choices=PRECISIONS,
  )
  # loss
  loss_temperature: float = F(0.05, "NT-Xent temperature tau.")
  loss_negatives: str = F(
    "global",
    "Negatives from all devices and hosts, or this device only (reference).",
    choices=["global", "local"],
  )
  # optimiser
  optim_base_lr: float = F(0.03, "Peak learning rate = base_lr x batch / 256.")
  optim_warmup_epochs: float = F(10.0, "Linear warm-up epochs.")
  optim_final_lr: float = F(
    0.0,
    "Learning rate at the end of the cosine decay, as given (not scaled by batch / 256 "
    "like --optim_base_lr).",
  )
  optim_b1: float = F(0.9, "Adam beta1.")
  optim_b2: float = F(0.999, "Adam beta2.")
  optim_eps: float = F(
    1e-8,
    "Adam epsilon (1e-8 = torch and optax default). Adam's first step is\n"
    "lr x g / (|g| + eps): a large eps makes it smooth in g instead of lr x sign(g).",
  )
  optim_weight_decay: float = F(0.0, "Decoupled weight decay (AdamW) if > 0.")
  # loop
  train_batch_size: int = F(256, "Slides per step (global).")
  train_epochs: float = F(3000.0, "Epochs (passes over the slides).")
  train_steps: int = F(0, "If > 0, total steps (overrides --train_epochs).")
  train_seed: int = F(
    0,
    "Seed of initialisation, view sampling and augmentation (each its own stream).",
  )
  train_log_every: int = F(10, "Steps between metric records.")
  train_ckpt_every: int = F(500, "Steps between checkpoints.")
  train_ckpt_keep: int = F(3, "Checkpoints kept.")
  train_progress: bool = F(True, "Show a progress bar (else log lines).")
  train_allow_changed_flags: tuple[str, ...] = F(
    (),
    "Flags a resumed run may change from its saved config.json (comma list); "
    "any other change is refused.",
  )
  # multi-host
  dist_init: str = F(
    "none",
    "jax.distributed.initialize: none, auto (TPU/Slurm detection) or "
    "explicit (--dist_coordinator, --dist_num_processes, --dist_process_id).",
    choices=["none", "auto", "explicit"],
  )
  dist_coordinator: str = F("", "HOST:PORT of process 0.")
  dist_num_processes: int = F(1, "Number of processes.")
  dist_process_id: int = F(0, "This process's id.")
  dist_cpu_collectives: str = F(
    "gloo", "CPU collectives for multi-process runs on CPU.", choices=["gloo", "mpi", "none"]
  )

  @property
  def conv_impl(self) -> str | None:
    """The kernel name for models.GigaSSL (None = the backend's default)."""
    return None if self.model_conv_impl == "auto" else self.model_conv_impl

  @property
  def cell(self) -> int:
    """The grid cell in level-0 px: data_cell, or before train.run resolved 0 from the
    bank, the reference's 224 (what grid_cell_for gives a bank of unknown patch size)."""
    return self.data_cell or 224

  @property
  def lr(self) -> float:
    """Peak learning rate: base_lr x batch / 256 (docs/method.md section 5)."""
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
    need(self.data_cell >= 0, f"--data_cell must be >= 0 (0 = from the bank), got {self.data_cell}")
    lo, hi = self.data_scale_range
    need(0 < lo <= hi, f"--data_scale_range must be 0 < low <= high, got {self.data_scale_range}")
    need(
      len(self.data_synthetic_shape) == 4 and min(self.data_synthetic_shape) >= 1,
      f"--data_synthetic_shape must be 4 positive ints (slides, naug, tiles, dim), "
      f"got {self.data_synthetic_shape}",
    )
    need(
      0 < self.data_resident_fraction <= 1,
      f"--data_resident_fraction must be in (0, 1], got {self.data_resident_fraction}",
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
    names = {f.name for f in dataclasses.fields(self)}
    unknown = sorted(set(self.train_allow_changed_flags) - names)
    need(not unknown, f"--train_allow_changed_flags names unknown flags {unknown}")
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


def changed_flags(saved: Config, cfg: Config) -> list[str]:
  """Flags whose value differs between a run's saved config and `cfg`, that change the run.

  Harmless flags (RESUME_FREE: logging, checkpoint cadence, readers,
  processes, kernel choice) and those named by cfg.train_allow_changed_flags
  are left out.
  """
  allowed = RESUME_FREE | set(cfg.train_allow_changed_flags)
  if saved.data_cell == 0:  # written before train.run resolved it from the bank
    allowed = allowed | {"data_cell"}
  return [
    f.name
    for f in dataclasses.fields(Config)
    if f.name not in allowed and getattr(saved, f.name) != getattr(cfg, f.name)
  ]


# ------------------------------------------------------------------ flags ---


def define_flags() -> None:
  """Defines every training flag (idempotent), generated from `Config`."""
  cli.define_flags(Config)


def from_flags() -> Config:
  """Builds the validated Config from the parsed absl flags."""
  return cli.from_flags(Config).validate()
