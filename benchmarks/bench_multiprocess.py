r"""Step time of 2 processes x D/2 CPU devices (gloo) vs 1 process x D devices, same run.

    python benchmarks/bench_multiprocess.py [--devices=8] [--batch=16] [--steps=8]
        [--warmup=2] [--bank_shape=16,3,12,32] [--out=FILE.json]

Runs `python -m gigassl_jax.train --flagfile=experiments/smoke.flags` with the
default configuration (synced BN, global negatives) on a synthetic bank,
--train_log_every=1, first as one process with `devices` CPU devices, then as
two processes (127.0.0.1 coordinator, gloo collectives) with devices / 2 each,
the same global batch and devices in all. Each step's wall time comes from
process 0's metrics.jsonl (2 x batch / views_per_s); the first `warmup` steps
(compilation) are left out; a row's time is the median over the timed steps.
Prints a table with the ratio (2 processes / 1 process; the issue's target:
within 2x) and, with --out, writes it as JSON with command, date and machine.
On one host both layouts share the same cores, so the ratio measures the cost
of crossing processes (gloo over loopback), not a speed-up.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from gigassl_jax import cli, synthetic, train
from gigassl_jax.machine import cpu_name, write_result

REPO = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class BenchMultiprocessConfig:
  """The flags of this script."""

  devices: int = cli.field(8, "CPU devices in all (split over 2 processes in the second run).")
  batch: int = cli.field(16, "Global batch (slides per step).")
  steps: int = cli.field(8, "Timed steps (after the warm-up).")
  warmup: int = cli.field(2, "Untimed first steps.")
  bank_shape: tuple[int, int, int, int] = cli.field(
    (16, 3, 12, 32), "Synthetic bank: slides,naug,tiles,dim."
  )
  train_flag: tuple[str, ...] = cli.field((), "Extra train flags (comma list).")
  timeout: int = cli.field(1800, "Seconds before a run is abandoned.")
  out: str = cli.field("", "Also write the result as JSON here.")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run(a, bank, workdir, processes: int) -> list[float]:
  """Seconds per step after the warm-up, from process 0's metrics."""
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={a.devices // processes}",
  )
  base = [
    sys.executable, "-m", "gigassl_jax.train", f"--flagfile={REPO / 'experiments/smoke.flags'}",
    f"--data_bank={bank}", f"--workdir={workdir}", f"--train_batch_size={a.batch}",
    f"--train_steps={a.warmup + a.steps}", "--train_log_every=1",
    f"--train_ckpt_every={a.warmup + a.steps + 1}", "--notrain_progress", *a.train_flag,
  ]  # fmt: skip
  port = _free_port()
  dist = [] if processes == 1 else [
    "--dist_init=explicit", f"--dist_coordinator=127.0.0.1:{port}",
    f"--dist_num_processes={processes}",
  ]  # fmt: skip
  procs = [
    subprocess.Popen(
      base + dist + ([f"--dist_process_id={pid}"] if processes > 1 else []),
      env=env,
      cwd=REPO,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
    )  # fmt: skip
    for pid in range(processes)
  ]
  for p in procs:
    _, err = p.communicate(timeout=a.timeout)
    if p.returncode:
      sys.exit(f"bench_multiprocess: a {processes}-process run failed:\n{err[-3000:]}")
  recs = [json.loads(l) for l in (pathlib.Path(workdir) / train.METRICS).read_text().splitlines()]
  return [2 * a.batch / r["views_per_s"] for r in recs if r["step"] > a.warmup and r["views_per_s"]]


def main(argv):
  del argv
  a = cli.from_flags(BenchMultiprocessConfig)
  if a.devices < 2 or a.devices % 2 or a.batch % a.devices:
    print(
      f"bench_multiprocess: error: --devices={a.devices} must be even and divide --batch={a.batch}",
      file=sys.stderr,
    )
    return 2
  with tempfile.TemporaryDirectory() as tmp:
    bank = synthetic.make_synthetic_bank(pathlib.Path(tmp) / "bank", *a.bank_shape, seed=0)
    one = _run(a, bank, pathlib.Path(tmp) / "one", 1)
    two = _run(a, bank, pathlib.Path(tmp) / "two", 2)
  t1, t2 = statistics.median(one), statistics.median(two)
  load = os.getloadavg()[0]
  print(
    f"# bench_multiprocess: {cpu_name()}, {os.cpu_count()} cores, {a.devices} CPU devices in "
    f"all, batch {a.batch}, synced BN + global negatives; load average at the end {load:.1f}"
  )
  print(f"{'layout':<28} {'s/step (median)':>16} {'steps':>6}")
  print(f"{f'1 process x {a.devices} devices':<28} {t1:>16.3f} {len(one):>6}")
  print(f"{f'2 processes x {a.devices // 2} devices':<28} {t2:>16.3f} {len(two):>6}")
  print(f"{'ratio (2 processes / 1)':<28} {t2 / t1:>16.2f}")
  if a.out:
    rec = {
      "machine": f"{cpu_name()}, {os.cpu_count()} cores",
      "devices": a.devices,
      "batch": a.batch,
      "one_process_s_per_step": t1,
      "two_processes_s_per_step": t2,
      "ratio": t2 / t1,
      "steps_timed": [len(one), len(two)],
      "bank_shape": list(a.bank_shape),
      "command": " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
      "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
      "load_average_end": load,
    }
    write_result(a.out, rec)
  return 0


if __name__ == "__main__":
  cli.define_flags(BenchMultiprocessConfig)
  cli.run(main)
