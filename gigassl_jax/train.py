r"""Trains the Giga-SSL pooling network on an embedding bank (docs/method.md section 5).

    python -m gigassl_jax.train --flagfile=experiments/base.flags \
        --data_bank=BANK --workdir=RUN

Data parallel over every device of every process: `jax.shard_map` over a 1-D
`data` mesh; each device gets batch / n_devices slides (2 views each); BN
statistics and NT-Xent negatives span all devices by default (flags turn either
off). Killed at any moment and started again with the same command, a run
continues from its last checkpoint and reaches the same parameters as an
uninterrupted run (the view sampling is a pure function of the step).

Workdir: config.json + flags.txt (resolved flags), checkpoints/ (orbax),
metrics.jsonl (step, loss, lr, views_per_s, collapse, grad_norm, top1 = the
batch view retrieval, and the chance levels of the loss and of top1), tb/
(TensorBoard), loss_curve.png (loss with its chance line, lr, retrieval).
"""

from __future__ import annotations

import functools
import json
import logging as pylogging
import math
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging as absl_logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gigassl_jax import bank as bank_lib
from gigassl_jax import checkpoint as ckpt_lib
from gigassl_jax import cli
from gigassl_jax import config as config_lib
from gigassl_jax import resident as resident_lib
from gigassl_jax import views as views_lib
from gigassl_jax import losses, retrieval, sampling, synthetic
from gigassl_jax.sparse import coord_augment

AXIS = "data"
METRICS = "metrics.jsonl"
log = pylogging.getLogger("gigassl_jax.train")


class NonFiniteLossError(RuntimeError):
  """The loss (or the gradient norm) became NaN or inf."""


class ChangedFlagsError(ValueError):
  """A resume asked for flags that change the run (see config.changed_flags)."""


# ------------------------------------------------------------ building ------


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """1-D `data` mesh over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.sharding.Mesh(np.array(devices), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def coord_config(cfg: config_lib.Config) -> coord_augment.CoordAugment:
  return coord_augment.CoordAugment(
    translate=cfg.data_translate,
    rotate=cfg.data_rotate,
    flip=cfg.data_flip,
    scale=cfg.data_scale,
    scale_range=tuple(cfg.data_scale_range),
  )


def step_views(cfg: config_lib.Config, step, batch) -> list:
  """The two augmented, quantised views a training step makes of `batch` at `step`.

  Keys: fold_in(augmentation stream, step), then the view index (0, 1). A pure
  function of the seed, the step and the batch, so tests can rebuild the views.
  """
  key = jax.random.fold_in(ckpt_lib.stream_key(cfg.train_seed, ckpt_lib.AUGMENT_STREAM), step)
  aug = coord_config(cfg)
  return [
    views_lib.make_views(
      jax.random.fold_in(key, v),
      batch["xy"][:, v],
      batch["feats"][:, v],
      batch["position"],
      aug,
      cfg.cell,
    )
    for v in range(2)
  ]


def chance_levels(batch: int) -> dict:
  """What the step's loss and batch retrieval read with no slide identity, global batch `batch`.

  loss_chance = log(2B - 1): NT-Xent when all 2B - 1 similarities of an anchor
  are equal (projections that carry no identity score about this at a
  temperature large enough for their cosine spread; see docs/train.md);
  top1_chance = 1 / (2B - 1): the other view is one of the 2B - 1 candidates.
  """
  return {"loss_chance": math.log(2 * batch - 1), "top1_chance": retrieval.batch_chance(batch)}


def _grads_body(graphdef, cfg: config_lib.Config):
  """Per-device `(params, stats, step, batch) -> (loss, grads, stats, aux)`.

  aux: {"collapse", "top1"}; top1 = the batch view retrieval of the projections
  (retrieval.batch_retrieval_top1) over the GLOBAL batch (2B - 1 candidates)
  whatever --loss_negatives says, so its chance level is always 1 / (2B - 1).
  Runs inside shard_map over AXIS; every output is the global (replicated) value.
  """
  global_neg = cfg.loss_negatives == "global"

  def body(params, stats, step, batch):
    views = step_views(cfg, step, batch)

    def loss_fn(params, stats):
      # Fresh Variables at this trace level (BN writes its running statistics).
      model = nnx.merge(graphdef, params, jax.tree.map(jnp.asarray, stats))
      # Two forward passes, as the reference: BN statistics per view batch.
      _, z1 = model(views[0])
      _, z2 = model(views[1])
      loss = losses.nt_xent(z1, z2, cfg.loss_temperature, axis_name=AXIS if global_neg else None)
      return loss, (nnx.state(model, nnx.BatchStat), z1, z2)

    (loss, (stats, z1, z2)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats)
    # Each device's loss is the mean over its own anchors: the global loss is
    # their mean, and (collectives transpose to collectives under
    # check_vma=False) the mean of the per-device gradients is its gradient.
    grads = jax.lax.pmean(grads, AXIS)
    loss = jax.lax.pmean(loss, AXIS)
    # Synced BN statistics are already equal on all devices (pmean is then a
    # no-op); unsynced ones are averaged so the replicated state stays one.
    stats = jax.lax.pmean(stats, AXIS)
    collapse = losses.collapse_level(jax.lax.all_gather(z1, AXIS, tiled=True))
    # Mean over this device's anchors, candidates from every device: the pmean
    # is the global top-1 (every device holds the same number of anchors).
    top1 = jax.lax.pmean(retrieval.batch_retrieval_top1(z1, z2, axis_name=AXIS), AXIS)
    return loss, grads, stats, {"collapse": collapse, "top1": top1}

  return body


def make_grad_step(graphdef, cfg: config_lib.Config, mesh):
  """Jitted `(params, stats, step, batch) -> (loss, grads, new_stats, {"collapse", "top1"})`.

  The training step without the optimiser (for tests and benchmarks).
  """
  body = _grads_body(graphdef, cfg)
  return jax.jit(
    jax.shard_map(
      body, mesh=mesh, in_specs=(P(), P(), P(), P(AXIS)), out_specs=P(), check_vma=False
    )
  )


def make_train_step(graphdef, cfg: config_lib.Config, tx, mesh, resident: bool = False):
  """The jitted data-parallel training step `(state, batch) -> (state, metrics)`.

  batch (global arrays sharded over `data`): feats [B, 2, T, F], xy int32
  [B, 2, T, 2], position int32 [B] (see views.ViewSampler.local_batch).
  resident=True: `(state, bank, idx) -> (state, metrics)` instead, the bank
  on the devices (resident.load, sharded over `data`) and idx the replicated
  draws of the global batch (resident.step_indices); the step gathers its
  views (resident.gather_views), the same batch the streaming path reads.
  metrics: loss (global mean over the 2B anchors), collapse (of the first
  views' projections, whole batch), top1 (batch view retrieval of the
  projections, global batch), grad_norm; all replicated scalars.
  """
  grads_body = _grads_body(graphdef, cfg)

  def body(state, batch):
    loss, grads, stats, aux = grads_body(
      state["params"], state["batch_stats"], state["step"], batch
    )
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = {
      "params": params,
      "batch_stats": stats,
      "opt_state": opt_state,
      "step": state["step"] + 1,
    }
    return new, {"loss": loss, **aux, "grad_norm": _tree_norm(grads)}

  if resident:

    def resident_body(state, bank, idx):
      return body(state, resident_lib.gather_views(bank, idx, AXIS))

    sharded = jax.shard_map(
      resident_body,
      mesh=mesh,
      in_specs=(P(), P(AXIS), P()),
      out_specs=(P(), P()),
      check_vma=False,
    )
  else:
    sharded = jax.shard_map(
      body, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()), check_vma=False
    )
  return jax.jit(sharded, donate_argnums=0)


def _tree_norm(tree):
  """Global L2 norm of a pytree (optax.tree.norm; global_norm on older optax)."""
  tree_mod = getattr(optax, "tree", None)
  return tree_mod.norm(tree) if hasattr(tree_mod, "norm") else optax.global_norm(tree)


def put_replicated(tree, mesh):
  """Same host values on every process -> global arrays replicated over the mesh."""
  rep = NamedSharding(mesh, P())
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(rep, np.asarray(x)), tree)


def put_batch(local: dict, mesh) -> dict:
  """This process's share of a batch -> global arrays sharded over `data`."""
  sh = NamedSharding(mesh, P(AXIS))
  return {
    k: jax.make_array_from_process_local_data(sh, local[k]) for k in ("feats", "xy", "position")
  }


def to_host(x) -> np.ndarray:
  """A replicated (possibly multi-process) array -> numpy."""
  return np.asarray(x.addressable_shards[0].data)


# -------------------------------------------------------------- metrics -----


class Metrics:
  """JSONL + TensorBoard writer (process 0 only), resumable."""

  def __init__(self, workdir, start_step: int, enabled: bool):
    self.enabled = enabled
    self.path = pathlib.Path(workdir) / METRICS
    self._tb = None
    if not enabled:
      return
    # A resumed run rewrites what came after its checkpoint.
    if self.path.exists():
      keep = [
        l
        for l in self.path.read_text().splitlines()
        if l.strip() and json.loads(l)["step"] <= start_step
      ]
      tmp = self.path.with_name(f".{METRICS}.tmp-{os.getpid()}")
      tmp.write_text("".join(l + "\n" for l in keep))
      os.replace(tmp, self.path)
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

      self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tb"), purge_step=start_step + 1)
    except ImportError:
      log.warning("tensorboardX not installed: no TensorBoard events")

  def write(self, rec: dict):
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(rec) + "\n")
    if self._tb is not None:
      for k, v in rec.items():
        if k != "step" and v is not None:
          self._tb.add_scalar(f"train/{k}", v, rec["step"])

  def close(self):
    if self._tb is not None:
      self._tb.close()


def plot_training(recs: list, path, title: str = "") -> pathlib.Path:
  """Loss (with its chance line and the lr), batch retrieval and collapse vs step -> PNG (atomic).

  Args:
    recs: metrics.jsonl records (step, loss, lr; top1, loss_chance,
      top1_chance, collapse where present: runs written before they were
      logged still plot).
    path: the PNG written.
    title: a line above the panels (e.g. the run's settings).
  """
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  steps = [r["step"] for r in recs]
  panels = ["loss"] + [k for k in ("top1", "collapse") if all(k in r for r in recs)]
  fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
  axes = axes[0]
  ax = axes[0]
  handles = ax.plot(steps, [r["loss"] for r in recs], color="C0", label="NT-Xent loss (training)")
  if "loss_chance" in recs[-1]:
    c = recs[-1]["loss_chance"]
    handles.append(ax.axhline(c, color="k", ls="--", lw=1, label=f"chance log(2B-1) = {c:.2f}"))
  ax.set(xlabel="step", ylabel="NT-Xent loss", title="loss")
  if all("lr" in r for r in recs):
    ax2 = ax.twinx()
    handles += ax2.plot(
      steps, [r["lr"] for r in recs], color="C1", alpha=0.6, lw=1, label="learning rate (right)"
    )
    ax2.set_ylabel("learning rate")
  ax.legend(handles=handles, fontsize=8, loc="best")
  for ax, key in zip(axes[1:], panels[1:]):
    if key == "top1":
      ax.plot(steps, [r["top1"] for r in recs], color="C2", label="batch view retrieval, top-1")
      if "top1_chance" in recs[-1]:
        c = recs[-1]["top1_chance"]
        ax.axhline(c, color="k", ls="--", lw=1, label=f"chance 1/(2B-1) = {c:.3f}")
      ax.set(xlabel="step", ylabel="top-1 (other view nearest)", ylim=(0, 1))
      ax.set_title("does a view find its slide's other view?")
      ax.legend(fontsize=8, loc="best")
    else:
      ax.plot(steps, [r["collapse"] for r in recs], color="C4")
      ax.set(xlabel="step", ylabel="collapse (std x sqrt(dim); 0 = collapsed)", title="spread")
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  out = pathlib.Path(path)
  tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}.png")
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, out)
  return out


def plot_loss_curve(workdir) -> pathlib.Path | None:
  """metrics.jsonl of a run -> loss_curve.png in it (plot_training); None without records."""
  path = pathlib.Path(workdir) / METRICS
  if not path.exists():
    return None
  recs = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
  if not recs:
    return None
  return plot_training(recs, pathlib.Path(workdir) / "loss_curve.png")


# ----------------------------------------------------------------- run ------


def init_distributed(cfg: config_lib.Config) -> None:
  """jax.distributed.initialize as asked (must run before any jax computation)."""
  if cfg.dist_init == "none":
    return
  if cfg.dist_cpu_collectives != "none" and (
    jax.config.jax_platforms == "cpu" or os.environ.get("JAX_PLATFORMS") == "cpu"
  ):
    jax.config.update("jax_cpu_collectives_implementation", cfg.dist_cpu_collectives)
  if cfg.dist_init == "auto":
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(
      coordinator_address=cfg.dist_coordinator,
      num_processes=cfg.dist_num_processes,
      process_id=cfg.dist_process_id,
    )


def open_bank(cfg: config_lib.Config):
  """The BankReader of --data_bank (making the synthetic bank if asked)."""
  if cfg.data_bank == config_lib.SYNTHETIC:
    bank_dir = pathlib.Path(cfg.workdir) / "synthetic_bank"
    if jax.process_index() == 0:
      s, k, t, f = cfg.data_synthetic_shape
      synthetic.make_synthetic_bank(bank_dir, s, k, t, f, seed=cfg.train_seed)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      multihost_utils.sync_global_devices("synthetic_bank")
    return bank_lib.open_bank(bank_dir)
  return bank_lib.open_bank(cfg.data_bank)


def run(cfg: config_lib.Config) -> dict:
  """Trains to the end (or resumes); returns the final metrics record."""
  cfg.validate()
  workdir = pathlib.Path(cfg.workdir)
  is_main = jax.process_index() == 0

  # --- data: the bank, the sampler, the resolved config -------------------
  reader = open_bank(cfg)
  if cfg.model_in_features and cfg.model_in_features != reader.feature_dim:
    raise ValueError(
      f"--model_in_features={cfg.model_in_features} but the bank "
      f"{reader.path} holds {reader.feature_dim}-d embeddings"
    )
  cfg = cfg.replace(model_in_features=reader.feature_dim)
  if cfg.data_cell == 0:  # a resumed run keeps its cell; a new one takes the bank's
    saved_cell = (
      config_lib.read(workdir).data_cell if (workdir / config_lib.CONFIG_JSON).exists() else 0
    )
    cfg = cfg.replace(
      data_cell=saved_cell
      or bank_lib.grid_cell_for(bank_lib.bank_patch_size_level0(reader))  # docs/own-features.md
    )
  n_dev = jax.device_count()
  if cfg.train_batch_size % n_dev:
    raise ValueError(
      f"--train_batch_size={cfg.train_batch_size} is not divisible by the {n_dev} devices"
    )
  mesh = make_mesh()
  where = resident_lib.decide(reader, mesh, cfg.data_resident, cfg.data_resident_fraction)
  if is_main:
    print(f"train: bank {reader.path}: {where.reason}", file=sys.stderr)
  sampler = views_lib.ViewSampler(
    reader,
    batch_size=cfg.train_batch_size,
    tiles=cfg.data_tiles,
    seed=cfg.train_seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    read_threads=cfg.data_read_threads,
    workers=sampling.auto_workers(cfg.data_workers),
    stream=not where.resident,
  )
  spe = sampler.steps_per_epoch
  total = cfg.train_steps if cfg.train_steps > 0 else max(1, round(cfg.train_epochs * spe))
  if (workdir / config_lib.CONFIG_JSON).exists():
    saved = config_lib.read(workdir)
    changed = config_lib.changed_flags(saved, cfg)
    if changed:
      diff = ", ".join(f"--{n} ({getattr(saved, n)!r} -> {getattr(cfg, n)!r})" for n in changed)
      raise ChangedFlagsError(
        f"{workdir / config_lib.CONFIG_JSON}: resuming with changed flags {diff}; use the "
        f"run's flags, a new --workdir, or --train_allow_changed_flags={','.join(changed)}"
      )
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
    config_lib.write(cfg, workdir)

  # --- model, optimiser, state (restored if a checkpoint exists) ----------
  model = ckpt_lib.build_model(
    cfg, reader.feature_dim, bn_axis_name=AXIS if cfg.model_sync_bn else None
  )
  schedule = ckpt_lib.make_schedule(cfg, total, spe)
  tx = ckpt_lib.make_optimizer(cfg, schedule)
  graphdef, state = ckpt_lib.init_state(model, tx)
  mgr = ckpt_lib.checkpoint_manager(workdir, cfg.train_ckpt_keep)
  start = 0
  if mgr.latest_step() is not None:
    state, meta = ckpt_lib.restore_state(mgr, state, mesh)
    start = int(meta["step"])
    log.info("resumed from the checkpoint of step %d", start)
  else:
    state = put_replicated(state, mesh)
  train_step = make_train_step(graphdef, cfg, tx, mesh, resident=where.resident)
  if where.resident:
    bank = resident_lib.load(reader, mesh, AXIS, progress=is_main and cfg.train_progress)
    step_fn = train_step
    train_step = lambda state, idx: step_fn(state, bank, idx)  # noqa: E731
    make_batch = functools.partial(resident_lib.step_indices, sampler)
    put = functools.partial(put_replicated, mesh=mesh)
  else:
    make_batch = sampler.local_batch
    put = functools.partial(put_batch, mesh=mesh)

  # --- loop: prefetch, step, metrics one step behind, checkpoints ---------
  prefetch = views_lib.Prefetcher(make_batch, start, total, cfg.data_prefetch, put=put)
  metrics = Metrics(workdir, start, is_main)
  views_per_step = 2 * cfg.train_batch_size
  chance = chance_levels(cfg.train_batch_size)
  bar = None
  if is_main and cfg.train_progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top

    desc = f"train (chance: loss {chance['loss_chance']:.2f}, top1 {chance['top1_chance']:.3f})"
    bar = tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True)
  t_log, n_log, t_start = None, 0, time.perf_counter()
  last = {}

  def check(step, m):
    """Fetches step `step`'s metrics (blocks on it); stops on a non-finite loss."""
    nonlocal t_log, n_log, last
    vals = {k: float(to_host(v)) for k, v in m.items()}
    if not (math.isfinite(vals["loss"]) and math.isfinite(vals["grad_norm"])):
      raise NonFiniteLossError(
        f"non-finite loss {vals['loss']} (gradient norm {vals['grad_norm']}) at step "
        f"{step + 1}; the last good checkpoint (step {mgr.latest_step()}) is kept in "
        f"{workdir / ckpt_lib.CKPT_DIR}. Lower --optim_base_lr or check the bank."
      )
    now = time.perf_counter()
    if t_log is None:  # the first step includes compilation: not timed
      t_log, n_log = now, 0
    else:
      n_log += 1
    done = step + 1
    if done % cfg.train_log_every == 0 or done == total:
      vps = n_log * views_per_step / (now - t_log) if n_log else None  # JSON null
      last = {
        "step": done,
        "loss": vals["loss"],
        "lr": float(schedule(step)),
        "views_per_s": vps,
        "collapse": vals["collapse"],
        "grad_norm": vals["grad_norm"],
        "epoch": done / spe,
        "top1": vals["top1"],
        **chance,
      }
      metrics.write(last)
      if bar is None and is_main:
        eta = (total - done) * (now - t_log) / max(n_log, 1)
        log.info(
          "step %d/%d loss %.4f (chance %.2f) top1 %.3f (chance %.3f) lr %.3g collapse %.3f "
          "%s views/s ETA %.0fs",
          done,
          total,
          vals["loss"],
          chance["loss_chance"],
          vals["top1"],
          chance["top1_chance"],
          last["lr"],
          vals["collapse"],
          "-" if vps is None else f"{vps:.0f}",
          eta,
        )
      t_log, n_log = now, 0
    if bar is not None:
      bar.update(1)
      bar.set_postfix(
        loss=f"{vals['loss']:.3f}",
        top1=f"{vals['top1']:.3f}",
        collapse=f"{vals['collapse']:.2f}",
      )

  pending = None
  try:
    for step in range(start, total):
      cli.check_interrupt()
      batch = prefetch.get(step)
      state, m = train_step(state, batch)
      if pending is not None:
        check(*pending)
      pending = (step, m)
      if (step + 1) % cfg.train_ckpt_every == 0 or step + 1 == total:
        check(*pending)  # never checkpoint a state after a non-finite step
        pending = None
        ckpt_lib.save_state(
          mgr,
          step + 1,
          state,
          {"step": step + 1, "epoch": (step + 1) / spe, "seed": cfg.train_seed},
        )
    if pending is not None:
      check(*pending)
  finally:
    prefetch.close()
    sampler.close()
    mgr.wait_until_finished()
    mgr.close()
    metrics.close()
    if bar is not None:
      bar.close()
  if is_main:
    plot_loss_curve(workdir)
    log.info(
      "done: %d steps in %.1fs; workdir %s", total - start, time.perf_counter() - t_start, workdir
    )
  return last


def main(argv):
  if len(argv) > 1:
    print(f"train: error: unexpected arguments {argv[1:]}", file=sys.stderr)
    return 2
  # --- config --------------------------------------------------------------
  try:
    cfg = config_lib.from_flags()
  except ValueError as e:
    print(f"train: error: {e}", file=sys.stderr)
    return 2
  init_distributed(cfg)
  # Our progress on stderr; orbax's and TFDS's INFO chatter stays quiet.
  absl_logging.set_verbosity(absl_logging.WARNING)
  handler = pylogging.StreamHandler()
  handler.setFormatter(pylogging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
  log.addHandler(handler)
  log.setLevel(pylogging.INFO)
  log.propagate = False
  # --- train ---------------------------------------------------------------
  try:
    run(cfg)
  except NonFiniteLossError as e:
    log.error("train: error: %s", e)
    return 1
  except (FileNotFoundError, ValueError) as e:
    print(f"train: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  config_lib.define_flags()
  cli.run(main)
