"""A training run's state on disk: build it, save it, restore it (orbax).

The train state is a pytree {params, batch_stats, opt_state, step}; its
structure is fixed by the model (`build_model`) and the optimiser
(`make_optimizer`), so both live here, where a program that only restores a
run (encode) can rebuild that structure without importing train.

Layout of a workdir: config.json (config.write), checkpoints/<step>/{state,
meta} (orbax CheckpointManager; meta = {"step", "epoch", "seed"}).
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gigassl_jax import config as config_lib
from gigassl_jax import models

CKPT_DIR = "checkpoints"
# PRNG streams of a run, each its own fold_in of --train_seed's key, so no two
# uses share a key (parameter init, and the on-device view augmentation keyed
# by step; the host-side view sampling has its own numpy streams in sampling).
INIT_STREAM, AUGMENT_STREAM = 1, 2


def stream_key(seed: int, stream: int) -> jax.Array:
  """The key of one PRNG stream of a run: fold_in(key(seed), stream)."""
  return jax.random.fold_in(jax.random.key(seed), stream)


def build_model(
  cfg: config_lib.Config, in_features: int, *, bn_axis_name=None, seed: int | None = None
) -> models.GigaSSL:
  """The GigaSSL model of a config (random init from the init stream, or torchvision layer4)."""
  model = models.GigaSSL(
    in_features,
    conv_impl=cfg.conv_impl,
    table_builder=cfg.model_table_builder,
    bn_axis_name=bn_axis_name,
    rngs=nnx.Rngs(stream_key(cfg.train_seed if seed is None else seed, INIT_STREAM)),
    precision=cfg.model_precision,
  )
  if cfg.model_init == "torchvision":
    from gigassl_jax import pth  # pylint: disable=g-import-not-at-top

    path = pathlib.Path(cfg.model_weights)
    if not path.is_file():
      raise FileNotFoundError(f"--model_weights={path} does not exist")
    models.load_torchvision_layer4(
      model.pool, pth.load_state_dict(path), orientation=cfg.model_orientation
    )
  return model


def make_schedule(cfg: config_lib.Config, total_steps: int, steps_per_epoch: int):
  """Linear warm-up from 0 over optim_warmup_epochs, then cosine decay to final_lr."""
  warmup = min(round(cfg.optim_warmup_epochs * steps_per_epoch), max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=cfg.lr,
    warmup_steps=warmup,
    decay_steps=max(total_steps, warmup + 1),
    end_value=cfg.optim_final_lr,  # as given: only the peak scales with the batch
  )


def make_optimizer(cfg: config_lib.Config, schedule) -> optax.GradientTransformation:
  """Adam (AdamW when --optim_weight_decay > 0) on `schedule`."""
  if cfg.optim_weight_decay > 0:
    return optax.adamw(
      schedule,
      b1=cfg.optim_b1,
      b2=cfg.optim_b2,
      eps=cfg.optim_eps,
      weight_decay=cfg.optim_weight_decay,
    )
  return optax.adam(schedule, b1=cfg.optim_b1, b2=cfg.optim_b2, eps=cfg.optim_eps)


def init_state(model: models.GigaSSL, tx) -> tuple[nnx.GraphDef, dict]:
  """Splits the model into (graphdef, train state pytree).

  State: params, batch_stats (BN running statistics), opt_state, step (int32,
  the number of finished steps).
  """
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  state = {
    "params": params,
    "batch_stats": stats,
    "opt_state": tx.init(params),
    "step": jnp.zeros((), jnp.int32),
  }
  return graphdef, state


def checkpoint_manager(workdir, keep: int = 3) -> ocp.CheckpointManager:
  """The orbax manager of <workdir>/checkpoints (created if missing)."""
  opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(
    pathlib.Path(workdir).absolute() / CKPT_DIR, options=opts, item_names=("state", "meta")
  )


def save_state(mgr: ocp.CheckpointManager, step: int, state: dict, meta: dict) -> None:
  """Saves checkpoint `step` (asynchronous: mgr.wait_until_finished() before exit)."""
  mgr.save(
    step,
    args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
  )


def _abstract(tree, sharding=None):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def restore_state(mgr, state, mesh, step=None):
  """(state, meta) of checkpoint `step` (default latest), replicated on `mesh`."""
  step = mgr.latest_step() if step is None else step
  target = _abstract(state, NamedSharding(mesh, P()))
  got = mgr.restore(
    step,
    args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()),
  )
  return got["state"], got["meta"]


def restore_model(workdir, step: int | None = None):
  """Rebuilds a trained model from a workdir, for encoding.

  Args:
    workdir: a training run's directory (config.json + checkpoints/).
    step: checkpoint step (default: the latest).

  Returns:
    (model GigaSSL in eval mode, with the checkpoint's parameters and BN running
    statistics, on the default device; the run's Config).
  """
  cfg = config_lib.read(workdir)
  model = build_model(cfg.replace(model_init="random"), cfg.model_in_features)
  tx = make_optimizer(cfg, make_schedule(cfg, 1, 1))  # same state structure
  graphdef, state = init_state(model, tx)
  mgr = checkpoint_manager(workdir, cfg.train_ckpt_keep)
  if mgr.latest_step() is None:
    raise FileNotFoundError(f"no checkpoint in {pathlib.Path(workdir) / CKPT_DIR}")
  device = jax.local_devices()[:1]
  mesh = jax.sharding.Mesh(np.array(device), ("data",))
  got, _ = restore_state(mgr, state, mesh, step)
  mgr.close()
  model = nnx.merge(graphdef, got["params"], got["batch_stats"])
  model.eval()
  return model, cfg
