r"""Input pipeline throughput: views/s the host prepares, per reader and number of workers.

    python benchmarks/bench_input.py [--workers=0,2,auto] [--batch=256] [--tiles=5]
        [--bank=DIR | --synthetic=1024,8,256,256] [--repeats=7]

Times one step's local batch (slide shuffle, per-slide draws, record reads and
tile gathers: everything the host does per step) on a packed bank, median of
--repeats consecutive steps after one warm-up step (which starts the workers),
for each --workers value: 0 = reading threads of this process
(sampling.ThreadReader); > 0 (auto = sampling.auto_workers) = that many Grain
worker processes, each reading whole steps ahead (sampling.GrainReader). The
hand-written process pool Grain replaced (each step split over its workers) was
timed by this script at commit dc0bf19, before its removal
(experiments/results/scale/bench_input_grain_cpu.log). The training step is not
included: compare this with bench_train.py's device views/s to see which side
bounds training.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile
import time

from gigassl_jax import bank as bank_lib
from gigassl_jax import cli, sampling, synthetic
from gigassl_jax import views as views_lib
from gigassl_jax.machine import cpu_name


@dataclasses.dataclass(frozen=True)
class BenchInputConfig:
  """The flags of this script."""

  workers: tuple[str, ...] = cli.field(("0", "auto"), "Comma list of --data_workers: ints or auto.")
  batch: int = cli.field(256, "Slides per step (2 views each).")
  tiles: int = cli.field(5, "T, tiles per view.")
  bank: str = cli.field("", "A bank directory (default: a synthetic one).")
  synthetic: tuple[int, int, int, int] = cli.field(
    (1024, 8, 256, 256),
    "slides,naug,tiles,dim of the synthetic bank (256 x 256 float16 = the reference's 128 KB "
    "records).",
  )
  repeats: int = cli.field(7, "Timed steps per row (median).")


def main(argv):
  del argv
  a = cli.from_flags(BenchInputConfig)
  with tempfile.TemporaryDirectory() as tmp:
    bank_dir = a.bank
    if not bank_dir:
      shape = list(a.synthetic)
      t = time.perf_counter()
      bank_dir = synthetic.make_synthetic_bank(os.path.join(tmp, "bank"), *shape)
      print(f"# synthetic bank {shape} made in {time.perf_counter() - t:.0f}s", flush=True)
    reader = bank_lib.open_bank(bank_dir)
    rows = []
    for w in a.workers:
      n = sampling.auto_workers(-1 if w == "auto" else int(w))
      s = views_lib.ViewSampler(reader, batch_size=a.batch, tiles=a.tiles, seed=0, workers=n)
      name = "threads" if n == 0 else "grain"
      try:
        s.local_batch(0)  # starts the workers
        times = []
        for step in range(1, a.repeats + 1):
          t = time.perf_counter()
          s.local_batch(step)
          times.append(time.perf_counter() - t)
      finally:
        s.close()
      med = statistics.median(times)
      rows.append((w, n, name, med))
      print(f"# workers={w} ({n}) {name}: {1e3 * med:.1f} ms/step", flush=True)
  base = rows[0][3]
  print(
    f"host: {cpu_name()}, {os.cpu_count()} cpus; bank {bank_dir}: {len(reader)} slides x "
    f"{reader.n_aug} augs x {reader.n_tiles} tiles x {reader.feature_dim}; batch "
    f"{a.batch} slides x 2 views x T = {a.tiles}; median of {a.repeats} steps"
  )
  print("| --data_workers | processes | reader | ms/step | views/s | vs first row |")
  print("|---|---:|---|---:|---:|---:|")
  for w, n, name, med in rows:
    print(f"| {w} | {n} | {name} | {1e3 * med:.1f} | {2 * a.batch / med:.0f} | {base / med:.2f}x |")


if __name__ == "__main__":
  cli.define_flags(BenchInputConfig)
  cli.run(main)
