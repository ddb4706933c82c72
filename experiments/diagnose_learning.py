"""Why does the demo's NT-Xent loss start above chance and rise? A small lr x tau x batch table.

    python experiments/diagnose_learning.py --bank=DIR --out=RESULT.json \\
        [--steps=30] [--lrs=0.03,0.003,0.0003] [--taus=0.05,0.2] [--batches=16] [--seed=0]
    python experiments/diagnose_learning.py summarise RESULT.json ...   # markdown table

For every (batch, temperature, base lr) it trains the reference model
(checkpoint.build_model, make_optimizer/make_schedule with a warm-up over the
first tenth of the steps, as the demo) from the same initialisation on the
same view stream, one CPU device, and records per step: the NT-Xent loss, the
top-1 batch view retrieval of the projections (retrieval.batch_retrieval_top1),
the gradient norm and the collapse level. At step 1 (before any update) it also
records, from the same projections:

* chance = log(2B - 1), the loss when all 2B - 1 similarities are equal;
* the no-signal loss of these projections: the loss with the positives
  replaced by another slide's view (z2 rolled by one), and the Gaussian
  prediction log(2B - 1) + s^2 / (2 tau^2), s = std of the cosine similarities
  (E[logsumexp] of 2B - 1 Gaussian logits of std s / tau);
* the loss at other temperatures (loss_at_tau);
* the batch retrieval of the views' plain tile means (centred): how much slide
  identity the INPUT views carry, before any network.

Writes one JSON file (command, date, machine, bank, rows). A scratch tool:
the numbers go to experiments/results/learning/ and docs/train.md.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gigassl_jax import bank as bank_lib
from gigassl_jax import checkpoint as ckpt_lib
from gigassl_jax import cli, losses, retrieval, train
from gigassl_jax import config as config_lib
from gigassl_jax import views as views_lib


def _make_step(graphdef, cfg, unit_schedule):
  """One jitted step for every (tau, peak lr) of a batch size: both are traced.

  The update is optax.adam(peak_lr x unit_schedule) (= scale_by_adam, then
  -lr), so one compilation serves the whole lr x tau table.
  """
  aug = train.coord_config(cfg)
  adam = optax.scale_by_adam(b1=cfg.optim_b1, b2=cfg.optim_b2, eps=cfg.optim_eps)

  def loss_fn(params, stats, views, tau):
    model = nnx.merge(graphdef, params, jax.tree.map(jnp.asarray, stats))
    _, z1 = model(views[0])
    _, z2 = model(views[1])
    loss = losses.nt_xent(z1, z2, tau)
    return loss, (nnx.state(model, nnx.BatchStat), z1, z2)

  @jax.jit
  def step(params, stats, opt_state, i, batch, tau, peak_lr):
    key = jax.random.fold_in(jax.random.key(cfg.train_seed), i)
    views = [
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
    (loss, (stats, z1, z2)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, stats, views, tau
    )
    updates, opt_state = adam.update(grads, opt_state, params)
    lr = peak_lr * unit_schedule(i)
    params = optax.apply_updates(params, jax.tree.map(lambda u: -lr * u, updates))
    a1, a2 = losses._normalize(z1), losses._normalize(z2)
    cos = jnp.concatenate([a1, a2]) @ jnp.concatenate([a1, a2]).T
    off = ~jnp.eye(cos.shape[0], dtype=bool)
    s = jnp.sqrt(
      jnp.sum(jnp.where(off, (cos - jnp.sum(cos * off) / off.sum()) ** 2, 0)) / off.sum()
    )
    m = batch["feats"].astype(jnp.float32).mean(axis=2)  # [B, 2, F] tile means of each view
    m = m - m.mean(axis=(0, 1))
    metrics = {
      "loss": loss,
      "top1": retrieval.batch_retrieval_top1(z1, z2),
      "grad_norm": optax.global_norm(grads),
      "collapse": losses.collapse_level(z1),
      "cos_std": s,
      "loss_rolled": losses.nt_xent(z1, jnp.roll(z2, 1, axis=0), tau),
      "loss_at_tau": {str(t): losses.nt_xent(z1, z2, t) for t in TAUS},
      "tile_mean_top1": retrieval.batch_retrieval_top1(m[:, 0], m[:, 1]),
    }
    return params, stats, opt_state, metrics

  return step


TAUS = (0.05, 0.1, 0.2, 0.5, 1.0)
_STEPS = {}  # batch -> (graphdef, initial state, step fn): one compilation per batch size


def run_one(bank_dir, batch, tau, base_lr, steps, seed):
  cfg = config_lib.Config(
    workdir="/nonexistent",
    data_bank=str(bank_dir),
    train_batch_size=batch,
    train_steps=steps,
    loss_temperature=tau,
    optim_base_lr=base_lr,
    train_seed=seed,
  )
  reader = bank_lib.open_bank(bank_dir)
  sampler = views_lib.ViewSampler(
    reader, batch_size=batch, tiles=cfg.data_tiles, seed=seed, read_threads=1, workers=0
  )
  spe = sampler.steps_per_epoch
  cfg = cfg.replace(optim_warmup_epochs=max(steps / 10, 1) / spe)
  schedule = ckpt_lib.make_schedule(cfg, steps, spe)
  if batch not in _STEPS:
    unit = ckpt_lib.make_schedule(cfg.replace(optim_base_lr=256.0 / batch), steps, spe)
    model = ckpt_lib.build_model(cfg, reader.feature_dim)
    graphdef, state = ckpt_lib.init_state(model, optax.scale_by_adam())
    _STEPS[batch] = (state, _make_step(graphdef, cfg, unit))
  state, step = _STEPS[batch]
  params, stats, opt = state["params"], state["batch_stats"], state["opt_state"]
  rows = []
  for i in range(steps):
    b = sampler.local_batch(i)
    b = {k: jnp.asarray(b[k]) for k in ("feats", "xy", "position")}
    params, stats, opt, m = step(
      params, stats, opt, jnp.int32(i), b, jnp.float32(tau), jnp.float32(cfg.lr)
    )
    m = jax.tree.map(float, m)
    m["step"], m["lr"] = i + 1, float(schedule(i))
    if i:
      m.pop("loss_at_tau")
    rows.append(m)
  sampler.close()
  first, last5 = rows[0], rows[-5:]
  chance = float(np.log(2 * batch - 1))
  return {
    "batch": batch,
    "temperature": tau,
    "base_lr": base_lr,
    "peak_lr": cfg.lr,
    "steps": steps,
    "chance_loss": chance,
    "chance_top1": retrieval.batch_chance(batch),
    "init": {
      "loss": first["loss"],
      "gaussian_no_signal_loss": chance + first["cos_std"] ** 2 / (2 * tau**2),
      "rolled_positives_loss": first["loss_rolled"],
      "cos_std": first["cos_std"],
      "collapse": first["collapse"],
      "grad_norm": first["grad_norm"],
      "top1": first["top1"],
      "loss_at_tau": first["loss_at_tau"],
    },
    "max_loss": max(r["loss"] for r in rows),
    "final_loss_mean5": float(np.mean([r["loss"] for r in last5])),
    "final_top1_mean5": float(np.mean([r["top1"] for r in last5])),
    "tile_mean_top1_mean": float(np.mean([r["tile_mean_top1"] for r in rows])),
    "per_step": rows,
  }


def summarise(paths) -> str:
  """A markdown table of result files: per-step numbers averaged over the first 5 / last 10 steps.

  Single steps are noisy (16 slides, 5-tile views: the batch-to-batch spread of
  the loss is ~0.5-1 at tau 0.05), hence the window means.
  """
  lines = [
    (
      "| bank | B | tau | base lr (peak) | chance loss | init loss | no-signal loss at init | "
      "loss steps 1-5 | loss last 10 | top1 steps 1-5 | top1 last 10 | top1 chance | "
      "cos std init -> last |"
    ),
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for p in paths:
    d = json.loads(pathlib.Path(p).read_text())
    for r in d["rows"]:
      st = r["per_step"]

      def mean(k, sl, st=st):
        return float(np.mean([x[k] for x in st[sl]]))

      lines.append(
        f"| {pathlib.Path(p).stem} | {r['batch']} | {r['temperature']} | {r['base_lr']} "
        f"({r['peak_lr']:.2g}) | {r['chance_loss']:.2f} | {r['init']['loss']:.2f} | "
        f"{r['init']['rolled_positives_loss']:.2f} | {mean('loss', slice(0, 5)):.2f} | "
        f"{mean('loss', slice(-10, None)):.2f} | {mean('top1', slice(0, 5)):.3f} | "
        f"{mean('top1', slice(-10, None)):.3f} | {r['chance_top1']:.3f} | "
        f"{st[0]['cos_std']:.3f} -> {mean('cos_std', slice(-5, None)):.3f} |"
      )
  return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class DiagnoseConfig:
  """The table's flags (comma lists of batches, temperatures and base lrs)."""

  bank: str = cli.field("", "Packed embedding bank.", required=True)
  out: str = cli.field("", "Result JSON (resumable: finished rows are kept).", required=True)
  steps: int = cli.field(30, "Training steps per row.")
  lrs: str = cli.field("0.03,0.003,0.0003", "Comma list of base learning rates.")
  taus: str = cli.field("0.05,0.2", "Comma list of NT-Xent temperatures.")
  batches: str = cli.field("16", "Comma list of batch sizes.")
  seed: int = cli.field(0, "Initialisation and view-stream seed.")


def main(argv) -> int:
  """Trains every (batch, tau, lr) row of the parsed flags; returns the exit status."""
  del argv  # the flags hold the settings
  a = cli.from_flags(DiagnoseConfig)
  if not (pathlib.Path(a.bank) / bank_lib.PACKED_DIR).is_dir():
    print(f"diagnose_learning: error: --bank={a.bank}: no packed bank there", file=sys.stderr)
    return 2
  out = pathlib.Path(a.out)
  res = {
    "command": " ".join(["python", *sys.argv]),
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, "
    f"jax {jax.__version__} {jax.default_backend()}",
    "bank": str(a.bank),
    "rows": [],
  }
  if out.is_file():  # resumable: keep finished rows
    res["rows"] = json.loads(out.read_text())["rows"]
  done = {(r["batch"], r["temperature"], r["base_lr"]) for r in res["rows"]}
  for batch in [int(x) for x in a.batches.split(",")]:
    for tau in [float(x) for x in a.taus.split(",")]:
      for lr in [float(x) for x in a.lrs.split(",")]:
        if (batch, tau, lr) in done:
          continue
        t = time.perf_counter()
        r = run_one(a.bank, batch, tau, lr, a.steps, a.seed)
        r["seconds"] = round(time.perf_counter() - t, 1)
        res["rows"].append(r)
        print(
          f"B={batch} tau={tau} lr={lr}: init loss {r['init']['loss']:.3f} (chance "
          f"{r['chance_loss']:.3f}, no-signal {r['init']['rolled_positives_loss']:.3f}) "
          f"max {r['max_loss']:.3f} final {r['final_loss_mean5']:.3f}; top1 "
          f"{r['init']['top1']:.3f} -> {r['final_top1_mean5']:.3f} (chance "
          f"{r['chance_top1']:.3f}); tile-mean top1 {r['tile_mean_top1_mean']:.3f}; "
          f"grad norm {r['init']['grad_norm']:.1f}; {r['seconds']} s",
          flush=True,
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(res, indent=1))
        os.replace(tmp, out)
  return 0


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "summarise":  # a subcommand with no flags
    print(summarise(sys.argv[2:]))
  else:
    cli.define_flags(DiagnoseConfig)
    cli.run(main)
