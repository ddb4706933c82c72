r"""End-to-end training rate vs the device-only step rate, at the same batch, in one run.

    python benchmarks/bench_e2e.py [--batch=64] [--steps=40] [--warmup=5] [--log_every=5]
        [--bank_shape=256,4,32,256] [--workers=-1] [--paths=device,stream] [--out=FILE.json]

1. e2e: `python -m gigassl_jax.train --flagfile=experiments/base.flags` on a
   synthetic bank (made once in a temporary directory), as a child process,
   once per input path of --paths (`device`: the bank resident on the
   devices, views gathered in the step; `stream`: records read on the host;
   --data_resident), a metrics record every `log_every` steps (writing a
   record every step would time the logging too); each record's views/s
   covers the wall time since the previous record, waiting for the input
   included. The first `warmup` steps (compilation, the prefetch queue
   filling) are excluded; the rate is views / total time of the rest.
2. device: in this process, the same run's config (read from its config.json),
   the same jitted training step (train.make_train_step) on batches of the same
   bank already on the device, timed step by step with block_until_ready after
   `warmup` steps; the rate is views / total time, as bench_train's jax arm.

Prints a table and, with --out, writes {"device", "batch", "device_views_per_s",
"e2e_views_per_s", "ratio", "input_views_per_s", "command", "date", "threads",
"paths": {path: {"e2e_views_per_s", "ratio"}}, ...} as JSON; e2e_views_per_s
and ratio are those of the first of --paths (the default path first). 3. input only: reading 8 batches on the host (sampler.local_batch,
the training program's reader), timed, shows whether the input or the device
bounds the end-to-end rate.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import jax

from gigassl_jax import bank as bank_lib
from gigassl_jax import checkpoint, cli, synthetic, train
from gigassl_jax import config as config_lib
from gigassl_jax import views as views_lib
from gigassl_jax.machine import cpu_name, write_result

REPO = pathlib.Path(__file__).resolve().parents[1]


def e2e_run(
  bank, workdir, batch: int, steps: int, workers: int, log_every: int, extra
) -> list[dict]:
  """Runs the training program to `steps`; returns its metrics records (one per step)."""
  cmd = [
    sys.executable,
    "-m",
    "gigassl_jax.train",
    f"--flagfile={REPO / 'experiments/base.flags'}",
    f"--data_bank={bank}",
    f"--workdir={workdir}",
    f"--train_batch_size={batch}",
    f"--train_steps={steps}",
    f"--train_log_every={log_every}",
    f"--train_ckpt_every={steps + 1}",  # the final checkpoint only, after the timed steps
    f"--data_workers={workers}",
    "--notrain_progress",
    *extra,
  ]
  res = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True)
  if res.returncode:
    sys.exit(f"bench_e2e: the training run failed (rc {res.returncode}):\n{res.stderr[-3000:]}")
  lines = (pathlib.Path(workdir) / train.METRICS).read_text().splitlines()
  return [json.loads(l) for l in lines]


def e2e_rate(recs: list[dict], batch: int, warmup: int, log_every: int) -> tuple[float, int]:
  """(views/s over the steps after `warmup`, steps timed) from the run's metrics.

  A record's views_per_s is 2 * batch * log_every / (the wall time of its
  log_every steps), so the total time is the sum of 2 * batch * log_every /
  views_per_s.
  """
  timed = [r["views_per_s"] for r in recs if r["step"] > warmup and r["views_per_s"]]
  if not timed:
    sys.exit(f"bench_e2e: no timed steps after --warmup={warmup}; raise --steps")
  n = len(timed) * log_every
  return n * 2 * batch / sum(2 * batch * log_every / v for v in timed), n


def device_rate(workdir, steps: int, warmup: int) -> tuple[float, float]:
  """(views/s of the run's training step on batches already on the device,
  views/s of reading batches from the bank on the host alone)."""
  cfg = config_lib.read(workdir)
  reader = bank_lib.open_bank(cfg.data_bank)
  sampler = views_lib.ViewSampler(
    reader, batch_size=cfg.train_batch_size, tiles=cfg.data_tiles, seed=cfg.train_seed
  )
  mesh = train.make_mesh()
  model = checkpoint.build_model(
    cfg, reader.feature_dim, bn_axis_name=train.AXIS if cfg.model_sync_bn else None
  )
  tx = checkpoint.make_optimizer(cfg, checkpoint.make_schedule(cfg, steps, 1))
  graphdef, state = checkpoint.init_state(model, tx)
  step = train.make_train_step(graphdef, cfg, tx, mesh)
  state = train.put_replicated(state, mesh)
  # A few distinct batches, read and placed before timing (the input is free
  # here); reading them alone, timed, is the input arm (host only, no device).
  t = time.perf_counter()
  host = [sampler.local_batch(i) for i in range(8)]
  input_rate = len(host) * 2 * cfg.train_batch_size / (time.perf_counter() - t)
  batches = [train.put_batch(b, mesh) for b in host[:4]]
  sampler.close()
  times = []
  for i in range(warmup + steps):
    t = time.perf_counter()
    state, m = step(state, batches[i % len(batches)])
    jax.block_until_ready(m["loss"])
    times.append(time.perf_counter() - t)
  return steps * 2 * cfg.train_batch_size / sum(times[warmup:]), input_rate


@dataclasses.dataclass(frozen=True)
class BenchE2EConfig:
  """The flags of this script."""

  batch: int = cli.field(64, "Slides per step (2 views each).")
  steps: int = cli.field(40, "Timed steps (after the warm-up).")
  warmup: int = cli.field(5, "Untimed first steps (a multiple of --log_every).")
  log_every: int = cli.field(5, "Steps per metrics record of the e2e run (divides both).")
  bank_shape: tuple[int, int, int, int] = cli.field(
    (256, 4, 32, 256), "Synthetic bank: slides,naug,tiles,dim."
  )
  workers: int = cli.field(-1, "--data_workers of the end-to-end run.")
  paths: tuple[str, ...] = cli.field(
    ("device", "stream"), "Input paths timed end to end (--data_resident values), comma list."
  )
  train_flag: tuple[str, ...] = cli.field((), "Extra train flags (comma list).")
  out: str = cli.field("", "Also write the result as JSON here.")


def main(argv):
  del argv
  try:
    a = cli.from_flags(BenchE2EConfig)
  except ValueError as e:
    print(f"bench_e2e: error: {e}", file=sys.stderr)
    return 2
  shape = list(a.bank_shape)
  if min(shape) < 1:
    print(f"bench_e2e: error: --bank_shape={a.bank_shape} must be 4 positive ints", file=sys.stderr)
    return 2
  if a.log_every < 1 or a.warmup % a.log_every or a.steps % a.log_every:
    print(
      f"bench_e2e: error: --log_every={a.log_every} must divide --warmup={a.warmup} and "
      f"--steps={a.steps}",
      file=sys.stderr,
    )
    return 2
  bad = sorted(set(a.paths) - {"device", "stream"})
  if bad or not a.paths:
    print(
      f"bench_e2e: error: --paths={','.join(a.paths)}: use device and/or stream", file=sys.stderr
    )
    return 2
  if a.batch > shape[0]:
    print(
      f"bench_e2e: error: --batch={a.batch} exceeds the {shape[0]} slides of --bank_shape",
      file=sys.stderr,
    )
    return 2

  with tempfile.TemporaryDirectory() as tmp:
    bank = synthetic.make_synthetic_bank(pathlib.Path(tmp) / "bank", *shape, seed=0)
    e2e = {}
    for path in a.paths:
      wd = pathlib.Path(tmp) / f"run_{path}"
      t0 = time.perf_counter()
      extra = [f"--data_resident={path}", *a.train_flag]
      recs = e2e_run(bank, wd, a.batch, a.warmup + a.steps, a.workers, a.log_every, extra)
      e2e[path] = (*e2e_rate(recs, a.batch, a.warmup, a.log_every), time.perf_counter() - t0)
    dev, inp = device_rate(wd, a.steps, a.warmup)

  device = str(jax.devices()[0].device_kind)
  if jax.default_backend() == "cpu":
    device += f" ({cpu_name()})"
  threads = (
    f"{os.cpu_count()} cores; XLA host threads: all; e2e --data_workers={a.workers} "
    f"(auto: {'threads' if (os.cpu_count() or 1) < 8 else 'processes'}); "
    f"load average at the end {os.getloadavg()[0]:.1f}"
  )
  print(f"# bench_e2e: {device}, {jax.device_count()} device(s), batch {a.batch}; {threads}")
  print(f"{'arm':<14} {'views/s':>10} {'steps':>6} {'/ device':>9}")
  print(f"{'device':<14} {dev:>10.0f} {a.steps:>6} {1:>9.2f}  (the jitted step alone)")
  for path, (rate, n, wall) in e2e.items():
    what = "bank on the devices" if path == "device" else "records read on the host"
    print(
      f"{'e2e ' + path:<14} {rate:>10.0f} {n:>6} {rate / dev:>9.2f}  "
      f"(train program, --data_resident={path}: {what}; {wall:.0f} s incl. compile)"
    )
  print(f"{'input only':<14} {inp:>10.0f} {8:>6} {inp / dev:>9.2f}  (reading on the host alone)")
  first = a.paths[0]
  if a.out:
    rec = {
      "device": device,
      "devices": jax.device_count(),
      "batch": a.batch,
      "device_views_per_s": dev,
      "e2e_views_per_s": e2e[first][0],
      "ratio": e2e[first][0] / dev,
      "e2e_path": first,
      "paths": {
        p: {"e2e_views_per_s": r, "ratio": r / dev, "steps_timed": n}
        for p, (r, n, _) in e2e.items()
      },
      "input_views_per_s": inp,
      "steps_timed": a.steps,
      "warmup": a.warmup,
      "log_every": a.log_every,
      "bank_shape": shape,
      "command": " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
      "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
      "threads": threads,
    }
    write_result(a.out, rec)
  return 0


if __name__ == "__main__":
  cli.define_flags(BenchE2EConfig)
  cli.run(main)
