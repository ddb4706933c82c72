r"""Input pipeline throughput: views/s the host prepares, per number of reading workers.

    python benchmarks/bench_input.py [--workers=0,2,auto] [--batch=256] [--tiles=5]
        [--bank=DIR | --synthetic=1024,8,256,256] [--repeats=7]

Times `views.ViewSampler.local_batch` (slide shuffle, per-slide draws, record
reads and tile gathers: everything the host does per step) on a packed bank,
median of --repeats steps after one warm-up step, for each --workers value
(0 = reading threads of this process; auto = sampling.auto_workers). The
training step itself is not included: compare this with bench_train.py's
device views/s to see which side bounds training.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from gigassl_jax import bank as bank_lib
from gigassl_jax import views as views_lib
from gigassl_jax import sampling, synthetic
from gigassl_jax.machine import cpu_name


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workers", default="0,auto", help="comma list of ints or 'auto'")
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--tiles", type=int, default=5)
  p.add_argument("--bank", default="", help="a bank directory (default: a synthetic one)")
  p.add_argument(
    "--synthetic",
    default="1024,8,256,256",
    help="slides,naug,tiles,dim of the synthetic bank (256 x 256 float16 "
    "= the reference's 128 KB records)",
  )
  p.add_argument("--repeats", type=int, default=7)
  a = p.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    bank_dir = a.bank
    if not bank_dir:
      shape = [int(x) for x in a.synthetic.split(",")]
      t = time.perf_counter()
      bank_dir = synthetic.make_synthetic_bank(os.path.join(tmp, "bank"), *shape)
      print(f"# synthetic bank {shape} made in {time.perf_counter() - t:.0f}s", flush=True)
    reader = bank_lib.open_bank(bank_dir)
    rows = []
    for w in a.workers.split(","):
      n = sampling.auto_workers(-1 if w == "auto" else int(w))
      s = views_lib.ViewSampler(reader, batch_size=a.batch, tiles=a.tiles, seed=0, workers=n)
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
      rows.append((w, n, med))
      print(f"# workers={w} ({n}): {1e3 * med:.1f} ms/step", flush=True)
  base = rows[0][2]
  print(
    f"host: {cpu_name()}, {os.cpu_count()} cpus; bank {bank_dir}: {len(reader)} slides x "
    f"{reader.n_aug} augs x {reader.n_tiles} tiles x {reader.feature_dim}; batch "
    f"{a.batch} slides x 2 views x T = {a.tiles}; median of {a.repeats} steps"
  )
  print("| --data_workers | processes | ms/step | views/s | vs first row |")
  print("|---|---:|---:|---:|---:|")
  for w, n, med in rows:
    print(f"| {w} | {n} | {1e3 * med:.1f} | {2 * a.batch / med:.0f} | {base / med:.2f}x |")


if __name__ == "__main__":
  main()
