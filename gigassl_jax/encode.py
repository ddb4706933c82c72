"""Slide representations from a trained run: `python -m gigassl_jax.encode`.

    python -m gigassl_jax.encode --workdir=RUN --bank=DIR --out=reps.npz \
        [--method=gigassl] [--mode=ensemble] [--n_views=100] [--tiles=5] [--seed=0]
    python -m gigassl_jax.encode --checkpoint=gigassl-scm-phikon.pth.tar --bank=DIR --out=reps.npz

--checkpoint reads a published Giga-SSL pooling network (gigassl_jax.released)
in place of a training run, in every mode. Its grid cell is the checkpoint's
`downmap` (the bank's rule, bank.grid_cell_for, when it has none), and a
warning is printed when the bank's patches sit a different number of cells
apart than the model was trained with. With --workdir the run's cell is used.

docs/method.md section 6: the representation is the 512-d pooled vector BEFORE the
projector, BatchNorm in eval mode (running statistics), averaged over an
ensemble of R views of T tiles, then L2-normalised.

Ensemble views (--mode=ensemble, default R = 100, T = 5): a bank slide holds
Naug augmented batches of Nt tiles. Each augmentation's Nt tiles are permuted
once and cut into consecutive chunks of T (tiles drawn without replacement,
as the follow-up package does), and views take augmentation r % Naug, chunk
r // Naug, so one view never mixes augmentations (as in training) and the R
views spread over all of them. When the bank has fewer than R chunks
(Naug * (Nt // T)), every chunk is used once. Draws depend only on (seed,
slide id): the same slide gets the same vectors whatever the bank's order.

All tiles (--mode=all_tiles): one sparse map per slide holding every distinct
tile position of the bank (embeddings of a position averaged over its
occurrences), pooled once.

Baselines on the same bank (--method): `mean_tiles`, the mean of all the
slide's tile embeddings (no network); `random_init`, the pooling network at
its random initialisation (the run's config and seed when --workdir is given,
i.e. the very network training started from), encoded like `gigassl`.

Output: FILE (.npz: ids [N], reps float32 [N, D], method, meta JSON) and
FILE_ids.csv, written atomically; read them with gigassl_jax.reps.load_reps.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import sys
import zipfile
import zlib

import numpy as np

from gigassl_jax import cli

METHODS = ("gigassl", "random_init", "mean_tiles")
MODES = ("ensemble", "all_tiles")
F = cli.field


@dataclasses.dataclass(frozen=True)
class EncodeConfig:
  """The flags of `python -m gigassl_jax.encode` (and the defaults of `run`)."""

  workdir: str | None = F(None, "Training run (config.json + checkpoints/); or --checkpoint.")
  checkpoint: str | None = F(
    None,
    "A released Giga-SSL checkpoint (.pth/.pth.tar, read without torch) in place of "
    "--workdir; its grid cell is its downmap.",
  )
  bank: str = F("", "Packed embedding bank (gigassl_jax.embed).", required=True)
  out: str = F("", "Output .npz (an _ids.csv is written beside it).", required=True)
  method: str = F(
    "gigassl",
    "gigassl (trained), random_init (the pooling net before training) or mean_tiles (no network).",
    choices=METHODS,
  )
  mode: str = F(
    "ensemble", "ensemble of R views of T tiles, or one map of all tiles.", choices=MODES
  )
  n_views: int = F(100, "R, views per slide in the ensemble.")
  tiles: int = F(5, "T, tiles per view.")
  seed: int = F(0, "Seed of the ensemble draws (and of random_init without --workdir).")
  batch_slides: int = F(8, "Slides per network call.")
  progress: bool = F(True, "Show a progress bar.")


_D = EncodeConfig()


def slide_rng(seed: int, slide_id: str) -> np.random.Generator:
  """The draws of one slide: a function of (seed, id), not of the bank's order."""
  return np.random.default_rng([seed, zlib.crc32(slide_id.encode())])


def ensemble_draws(
  n_aug: int, n_tiles: int, n_views: int, tiles: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Which bank entries make each view of the ensemble.

  Args:
    n_aug: Naug; n_tiles: Nt of the bank.
    n_views: R, the ensemble size asked for.
    tiles: T, tiles per view.
    rng: the slide's generator.

  Returns:
    aug int32 [V], tile int32 [V, T], valid bool [V, T] with V = min(R, number
    of chunks); valid is False only when Nt < T (one short chunk per augmentation).
  """
  per_aug = max(1, n_tiles // tiles)
  v = min(n_views, n_aug * per_aug)
  perms = np.stack([rng.permutation(n_tiles) for _ in range(n_aug)])  # [Naug, Nt]
  r = np.arange(v)
  aug, chunk = r % n_aug, r // n_aug
  width = min(tiles, n_tiles)
  cols = chunk[:, None] * width + np.arange(width)[None, :]
  tile = perms[aug[:, None], cols]
  valid = np.ones((v, tiles), bool)
  if width < tiles:
    tile = np.concatenate([tile, np.zeros((v, tiles - width), tile.dtype)], axis=1)
    valid[:, width:] = False
  return aug.astype(np.int32), tile.astype(np.int32), valid


def _load_slide(reader, s: int) -> tuple[np.ndarray, np.ndarray]:
  """All bank entries of slide s: (float32 [Naug, Nt, F], int32 [Naug, Nt, 2])."""
  f, c = zip(*(reader.get(s, k) for k in range(reader.n_aug)))
  return np.stack(f).astype(np.float32), np.stack(c)


def _pool_fn(pool, cell: int):
  """A jitted (xy [V, T, 2], feats [V, T, F], valid [V, T]) -> [V, 512] of the pooling net."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  pool.eval()  # BN with running statistics: a slide's vector never depends on its batch
  graphdef, state = nnx.split(pool)
  state = jax.device_put(state)
  return lambda xy, feats, valid: np.asarray(
    _apply(graphdef, state, xy, feats, valid, cell), np.float32
  )


def _apply_impl(graphdef, state, xy, feats, valid, cell):
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from gigassl_jax.sparse import maps  # pylint: disable=import-outside-toplevel

  net = nnx.merge(graphdef, state)
  smap = maps.from_grid(maps.quantize(xy, valid, cell), feats, valid)
  return net(smap)


_APPLY = None


def _apply(graphdef, state, xy, feats, valid, cell):
  """One jitted function for every encode call: same architecture and shapes compile once."""
  global _APPLY
  if _APPLY is None:
    import jax  # pylint: disable=import-outside-toplevel

    _APPLY = jax.jit(_apply_impl, static_argnames=("graphdef", "cell"))
  return _APPLY(graphdef, state, xy, feats, valid, cell=cell)


def l2_normalize(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def encode_ensemble(
  pool,
  reader,
  *,
  n_views: int = 100,
  tiles: int = 5,
  seed: int = 0,
  cell: int = 224,
  batch_slides: int = 8,
  progress=None,
) -> np.ndarray:
  """float32 [N, 512]: mean over each slide's ensemble of views, L2-normalised.

  Slides go through the network `batch_slides` at a time (B * V views of
  capacity T, V = min(R, Naug * (Nt // T))); the last batch is padded with
  repeats so shapes never change.
  """
  f = _pool_fn(pool, cell)
  n = len(reader)
  out = np.zeros((n, pool.features), np.float32)
  for start in range(0, n, batch_slides):
    cli.check_interrupt()
    idx = list(range(start, min(n, start + batch_slides)))
    xs, fs, vs = [], [], []
    for s in idx + [idx[-1]] * (batch_slides - len(idx)):
      emb, coords = _load_slide(reader, s)
      # Every slide of a bank has the same (Naug, Nt), hence the same V.
      aug, tile, valid = ensemble_draws(
        reader.n_aug, reader.n_tiles, n_views, tiles, slide_rng(seed, reader.slide_ids[s])
      )
      xs.append(coords[aug[:, None], tile])
      fs.append(emb[aug[:, None], tile])
      vs.append(valid)
    v = len(vs[0])
    reps = f(np.concatenate(xs), np.concatenate(fs), np.concatenate(vs))
    out[idx] = l2_normalize(reps.reshape(batch_slides, v, -1).mean(1)[: len(idx)])
    if progress is not None:
      progress.update(len(idx))
  return out


def encode_all_tiles(pool, reader, *, cell: int = 224, progress=None) -> np.ndarray:
  """float32 [N, 512]: each slide pooled once from all its distinct tiles, L2-normalised.

  Capacities are rounded up to powers of two so few shapes get compiled.
  """
  f = _pool_fn(pool, cell)
  out = np.zeros((len(reader), pool.features), np.float32)
  for s in range(len(reader)):
    emb, coords = _load_slide(reader, s)
    c = coords.reshape(-1, 2)
    uniq, inv = np.unique(c, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    feats = np.zeros((len(uniq), emb.shape[-1]), np.float64)
    np.add.at(feats, inv, emb.reshape(-1, emb.shape[-1]))
    feats /= np.bincount(inv, minlength=len(uniq))[:, None]
    cap = 1 << int(np.ceil(np.log2(max(len(uniq), 1))))
    xy = np.zeros((1, cap, 2), np.int32)
    ft = np.zeros((1, cap, emb.shape[-1]), np.float32)
    valid = np.zeros((1, cap), bool)
    xy[0, : len(uniq)], ft[0, : len(uniq)], valid[0, : len(uniq)] = uniq, feats, True
    out[s] = l2_normalize(f(xy, ft, valid)[0])
    if progress is not None:
      progress.update(1)
  return out


def mean_tiles(reader, progress=None) -> np.ndarray:
  """float32 [N, F]: the mean of all the slide's tile embeddings, L2-normalised."""
  out = np.zeros((len(reader), reader.feature_dim), np.float32)
  for s in range(len(reader)):
    emb, _ = _load_slide(reader, s)
    out[s] = l2_normalize(emb.reshape(-1, emb.shape[-1]).mean(0))
    if progress is not None:
      progress.update(1)
  return out


def random_pool(in_features: int, seed: int = 0, cfg=None):
  """The pooling network at random init (the run's architecture when cfg is given)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from gigassl_jax import models  # pylint: disable=import-outside-toplevel

  if cfg is not None:
    from gigassl_jax import checkpoint  # pylint: disable=import-outside-toplevel

    return checkpoint.build_model(
      cfg.replace(model_init="random"), in_features, seed=cfg.train_seed
    ).pool
  return models.GigaSSL(in_features, rngs=nnx.Rngs(seed)).pool


def _released_pool(path, reader, bank, meta, method, seed):
  """(pool, cell) of a released checkpoint; records them in `meta`, notes on stderr.

  random_init gets a fresh network of the checkpoint's widths (seed `seed`).
  """
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from gigassl_jax import bank as bank_lib  # pylint: disable=import-outside-toplevel
  from gigassl_jax import (
    models,  # pylint: disable=import-outside-toplevel
    released,  # pylint: disable=import-outside-toplevel
  )

  try:
    rel = released.load(path)
  except (pickle.UnpicklingError, zipfile.BadZipFile) as e:
    # pth names the file in its messages; unsafe pickles are refused before anything runs.
    msg = str(e) if str(path) in str(e) else f"{path}: {e}"
    raise ValueError(f"--checkpoint: {msg}") from e
  if rel.in_features != reader.feature_dim:
    raise ValueError(
      f"--checkpoint={path} takes {rel.in_features}-d tile features, the bank {bank} "
      f"holds {reader.feature_dim}-d ones"
    )
  size = bank_lib.bank_patch_size_level0(reader)
  if rel.downmap is not None:
    cell, source = rel.downmap, "checkpoint"
    print(
      f"encode: grid cell {cell} level-0 px, from the checkpoint (its downmap)", file=sys.stderr
    )
  else:
    cell, source = bank_lib.grid_cell_for(size), "bank"
    print(
      f"encode: the checkpoint has no downmap; grid cell {cell} level-0 px from the bank's "
      f"patch size ({'unknown' if size is None else f'{size:g} level-0 px'})",
      file=sys.stderr,
    )
  warning = bank_lib.spacing_warning(size, cell)
  if warning is not None:
    print(f"encode: warning: {warning}", file=sys.stderr)
  meta.update(checkpoint=os.path.abspath(path), cell_source=source)
  if method == "random_init":
    meta["init_seed"] = seed
    return models.PoolingNet(rel.in_features, rel.features, rngs=nnx.Rngs(seed)), cell
  return rel.pool, cell


def run(
  bank: str,
  out: str,
  *,
  workdir: str | None = _D.workdir,
  checkpoint: str | None = _D.checkpoint,
  method: str = _D.method,
  mode: str = _D.mode,
  n_views: int = _D.n_views,
  tiles: int = _D.tiles,
  seed: int = _D.seed,
  batch_slides: int = _D.batch_slides,
  show_progress: bool = _D.progress,
):
  """Encodes every slide of the bank; writes `out`; returns (ids, reps).

  Notes (where the grid cell comes from, spacing warnings) go to stderr.

  Raises:
    FileNotFoundError: the bank, run or checkpoint is missing.
    ValueError: a bad request, a network trained on other features, or an
      unsafe or unreadable checkpoint file.
  """
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  from gigassl_jax import bank as bank_lib  # pylint: disable=import-outside-toplevel
  from gigassl_jax import reps as reps_lib  # pylint: disable=import-outside-toplevel

  if method not in METHODS:
    raise ValueError(f"--method={method!r}: valid methods are {METHODS}")
  if mode not in MODES:
    raise ValueError(f"--mode={mode!r}: valid modes are {MODES}")
  if n_views < 1 or tiles < 1 or batch_slides < 1:
    raise ValueError(
      f"--n_views, --tiles and --batch_slides must be >= 1, got {n_views}, {tiles}, {batch_slides}"
    )
  if workdir and checkpoint:
    raise ValueError("give --workdir (a training run) or --checkpoint (a released model), not both")
  if method == "gigassl" and not (workdir or checkpoint):
    raise ValueError(
      "--method=gigassl needs --workdir=RUN (a training run) or --checkpoint=FILE (a released model)"
    )
  if checkpoint and not os.path.isfile(checkpoint):
    raise FileNotFoundError(f"--checkpoint={checkpoint}: no such file")
  reader = bank_lib.open_bank(bank)
  meta = {
    "bank": str(bank),
    "method": method,
    "n_slides": len(reader),
    "bank_n_aug": reader.n_aug,
    "bank_n_tiles": reader.n_tiles,
  }
  cfg, cell = None, 224
  pool = None
  if checkpoint and method != "mean_tiles":
    pool, cell = _released_pool(checkpoint, reader, bank, meta, method, seed)
  elif method == "gigassl":
    from gigassl_jax import checkpoint  # pylint: disable=import-outside-toplevel

    model, cfg = checkpoint.restore_model(workdir)
    pool = model.pool
    meta["workdir"] = str(workdir)
  elif method == "random_init":
    if workdir:
      from gigassl_jax import config as config_lib  # pylint: disable=import-outside-toplevel

      cfg = config_lib.read(workdir)
      meta["workdir"] = str(workdir)
    pool = random_pool(reader.feature_dim, seed, cfg)
    meta["init_seed"] = cfg.train_seed if cfg is not None else seed
  if cfg is not None:
    cell = cfg.cell
    if cfg.model_in_features and cfg.model_in_features != reader.feature_dim:
      raise ValueError(
        f"the run {workdir} was trained on {cfg.model_in_features}-d tile "
        f"embeddings, the bank {bank} holds {reader.feature_dim}-d ones"
      )
  bar = tqdm(
    total=len(reader),
    desc=f"encode {method}",
    unit="slide",
    disable=not show_progress,
    dynamic_ncols=True,
  )
  if pool is None:
    reps = mean_tiles(reader, bar)
  elif mode == "ensemble":
    reps = encode_ensemble(
      pool,
      reader,
      n_views=n_views,
      tiles=tiles,
      seed=seed,
      cell=cell,
      batch_slides=min(batch_slides, len(reader)),
      progress=bar,
    )
    meta.update(mode=mode, n_views=n_views, tiles=tiles, seed=seed, cell=cell)
  else:
    reps = encode_all_tiles(pool, reader, cell=cell, progress=bar)
    meta.update(mode=mode, cell=cell)
  if pool is not None:
    meta.setdefault("cell_source", "run" if cfg is not None else "default")
  bar.close()
  bad = ~np.isfinite(reps).all(1)
  if bad.any():
    s = int(np.argmax(bad))
    raise ValueError(
      f"slide {reader.slide_ids[s]!r} (bank {bank}, index {s}) got a "
      f"non-finite representation ({int(bad.sum())} slides)"
    )
  name = method if method == "mean_tiles" or mode == "ensemble" else f"{method} (all tiles)"
  reps_lib.save_reps(out, reader.slide_ids, reps, name, meta)
  return list(reader.slide_ids), reps


def main(argv):
  if len(argv) > 1:
    print(f"encode: error: unexpected arguments {argv[1:]}", file=sys.stderr)
    return 2
  cfg = cli.from_flags(EncodeConfig)
  try:
    ids, reps = run(
      cfg.bank,
      cfg.out,
      workdir=cfg.workdir,
      checkpoint=cfg.checkpoint,
      method=cfg.method,
      mode=cfg.mode,
      n_views=cfg.n_views,
      tiles=cfg.tiles,
      seed=cfg.seed,
      batch_slides=cfg.batch_slides,
      show_progress=cfg.progress,
    )
  except (OSError, ValueError) as e:  # missing or unwritable files too: one line, exit 2
    print(f"encode: error: {e}", file=sys.stderr)
    return 2
  print(f"encode: {len(ids)} slides -> {reps.shape[1]}-d vectors in {cfg.out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  cli.define_flags(EncodeConfig)
  cli.run(
    main, resume_hint="nothing was written (--out is written at the end); re-run the same command"
  )
