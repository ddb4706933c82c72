r"""Own features end to end on this machine: TRIDENT/CLAM h5 -> import -> train -> encode -> evaluate.

    python benchmarks/bench_import_features.py [--slides=16] [--tiles=3000] [--train_steps=10]
        [--out=experiments/results/import_features_cpu]

Writes synthetic h5 files in the exact TRIDENT (UNI-like 1024-d, 20x 256 px
of a 40x scan, patch_size_level0 512) and CLAM (UNI2-h-like 1536-d, no
attributes, --patch_size_level0) layouts, then times each command of
docs/own-features.md as a user runs it (one subprocess each, on CPU), and
records file sizes. Features are random (gamma-distributed, correlated), so
the evaluation's numbers mean nothing: only sizes and times are reported.
Results: OUT.json (machine, date, commands, seconds, bytes) and OUT.md.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np

from gigassl_jax import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
_TMP = [None]  # the scratch folder, shown as $TMP in the results


def _dir_bytes(p: pathlib.Path) -> int:
  return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def write_h5(folder: pathlib.Path, n_slides, n_tiles, d, seed, trident: bool):
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(d, d)).astype(np.float32) / np.sqrt(d)
  for i in range(n_slides):
    n = int(n_tiles * rng.uniform(0.5, 1.5))  # slides differ in tile count
    cells = rng.choice(200 * 200, n, replace=False)
    coords = np.stack([cells % 200, cells // 200], 1) * 512
    feats = (rng.gamma(2.0, 1.0, (n, d)) @ mix).astype(np.float32)  # float32, as both tools write
    with h5py.File(folder / f"slide_{i:03d}.h5", "w") as f:
      f.create_dataset("features", data=feats)
      c = f.create_dataset("coords", data=coords.astype(np.int64 if trident else np.int32))
      if trident:
        c.attrs.update(
          patch_size=256,
          patch_size_level0=512,
          level0_magnification=40,
          target_magnification=20,
          overlap=0,
        )


def timed(cmd, log):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  t0 = time.time()
  r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
  dt = time.time() - t0
  if r.returncode not in (0,):
    sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
  shown = " ".join(cmd[2:]).replace(str(_TMP[0]), "$TMP")
  log.append({"command": shown, "seconds": round(dt, 1)})
  print(f"{dt:7.1f} s  {shown}", flush=True)
  return dt


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """The benchmark's flags."""

  slides: int = cli.field(16, "Synthetic slides per layout.")
  tiles: int = cli.field(3000, "Mean tiles per slide (0.5x-1.5x).")
  train_steps: int = cli.field(10, "Training steps of the smoke run.")
  out: str = cli.field(
    "experiments/results/import_features_cpu", "Result stem (OUT.json, OUT.md), from the repo root."
  )


def main(argv) -> int:
  """Times the own-features commands; returns the exit status."""
  del argv  # the flags hold the settings
  a = cli.from_flags(BenchConfig)
  py = sys.executable
  log, sizes = [], {}
  with tempfile.TemporaryDirectory() as tmp:
    t = pathlib.Path(tmp)
    _TMP[0] = t
    trident = t / "trident" / "job" / "20x_256px_0px_overlap" / "features_uni_v1"
    clam = t / "clam" / "h5_files"
    write_h5(trident, a.slides, a.tiles, 1024, 0, True)
    write_h5(clam, a.slides, a.tiles, 1536, 1, False)
    sizes["trident_h5_bytes"] = _dir_bytes(trident)
    sizes["clam_h5_bytes"] = _dir_bytes(clam)
    m = "-m"
    timed(
      [
        py,
        m,
        "gigassl_jax.import_features",
        f"--features={trident}",
        f"--bank={t / 'bank_uni'}",
        "--pca_dim=256",
        "--n_tiles=256",
        "--no_progress",
      ],
      log,
    )
    timed([py, m, "gigassl_jax.import_features", f"--features={clam.parent}",
           f"--bank={t / 'bank_uni2'}", "--patch_size_level0=512", "--pca_dim=256",
           "--n_tiles=256", "--no_progress"], log)  # fmt: skip
    sizes["bank_uni_bytes"] = _dir_bytes(t / "bank_uni")
    sizes["bank_uni2_bytes"] = _dir_bytes(t / "bank_uni2")
    timed([py, m, "gigassl_jax.train", "--flagfile=experiments/smoke.flags",
           f"--data_bank={t / 'bank_uni'}", f"--workdir={t / 'run'}",
           f"--train_steps={a.train_steps}", "--data_cell=128"], log)  # fmt: skip
    timed([py, m, "gigassl_jax.encode", f"--workdir={t / 'run'}", f"--bank={t / 'bank_uni'}",
           f"--out={t / 'reps.npz'}", "--noprogress"], log)  # fmt: skip
    labels = t / "labels.csv"
    rng = np.random.default_rng(0)
    labels.write_text(
      "ID,label\n" + "".join(f"slide_{i:03d},{rng.integers(0, 2)}\n" for i in range(a.slides))
    )
    timed([py, m, "gigassl_jax.evaluate", f"--reps={t / 'reps.npz'}", f"--labels={labels}",
           "--folds=2", f"--out={t / 'eval'}"], log)  # fmt: skip
  result = {
    "script": "benchmarks/bench_import_features.py " + " ".join(sys.argv[1:]),
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPU cores, CPU only",
    "slides": a.slides,
    "tiles_per_slide_mean": a.tiles,
    "sizes": sizes,
    "steps": log,
  }
  out = ROOT / a.out
  out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
  lines = [
    "# Own features end to end (CPU)",
    "",
    f"`{result['script']}` on {result['machine']}, {result['date']}.",
    f"{a.slides} slides of ~{a.tiles} tiles (0.5x-1.5x), random features; times include "
    "process start and XLA compilation.",
    "",
    "| step | seconds |",
    "| --- | ---: |",
    *[f"| `{s['command']}` | {s['seconds']} |" for s in log],
    "",
    "| data | MB |",
    "| --- | ---: |",
    *[f"| {k[:-6]} | {v / 1e6:.1f} |" for k, v in sizes.items()],
    "",
  ]
  out.with_suffix(".md").write_text("\n".join(lines))
  return 0


if __name__ == "__main__":
  cli.define_flags(BenchConfig)
  cli.run(main)
