r"""Times the own-slides recipe (docs/quickstart-own-slides.md) stage by stage.

    python benchmarks/bench_own_slides.py [--slides=4] [--n_aug=8] [--n_tiles=64]
        [--steps=20] [--batch=4] [--out=FILE.json]

Runs the real command lines a user runs (embed, train, encode) on copies of the
bundled CC0 H&E slide (tests/fixtures/cmu_small_region.svs, a 2220 x 2967 region
at 0.499 mpp), times each one, and prints per-slide and per-step costs with the
extrapolation to 10 and 50 slides that the recipe quotes. Times include process
start-up and compilation, which a user pays too; on a 2-core CPU shared with
other jobs they are upper bounds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

from gigassl_jax import cli

REPO = pathlib.Path(__file__).resolve().parents[1]
SLIDE = REPO / "tests" / "fixtures" / "cmu_small_region.svs"


def _run(cmd: list[str]) -> float:
  t = time.perf_counter()
  r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  if r.returncode != 0:
    raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
  return time.perf_counter() - t


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """The benchmark's flags."""

  slides: int = cli.field(4, "Copies of the CC0 slide.")
  n_aug: int = cli.field(8, "Augmentations embedded per slide.")
  n_tiles: int = cli.field(64, "Tiles per slide and augmentation.")
  encoder: str = cli.field("efficientnet_lite0", "Tile encoder.")
  steps: int = cli.field(20, "Training steps (second run: +steps).")
  batch: int = cli.field(4, "Training batch size.")
  n_views: int = cli.field(20, "Encode ensemble size.")
  out: str = cli.field("", "JSON file for the record (none when empty).")


def main(argv) -> int:
  """Times the recipe's commands; returns the exit status."""
  del argv  # the flags hold the settings
  a = cli.from_flags(BenchConfig)
  py = sys.executable
  with tempfile.TemporaryDirectory() as d:
    d = pathlib.Path(d)
    (d / "slides").mkdir()
    for i in range(a.slides):
      shutil.copy(SLIDE, d / "slides" / f"slide_{i:02d}.svs")
    t_embed = _run([
      py, "-m", "gigassl_jax.embed", f"--slides={d / 'slides'}", f"--bank={d / 'bank'}",
      f"--encoder={a.encoder}", f"--n_aug={a.n_aug}", f"--n_tiles={a.n_tiles}", "--noprogress",
    ])  # fmt: skip
    train = [
      py, "-m", "gigassl_jax.train", "--flagfile=experiments/small_cohort.flags",
      f"--data_bank={d / 'bank'}", f"--train_batch_size={a.batch}", "--train_log_every=1",
      "--notrain_progress", "--optim_warmup_epochs=0",
    ]  # fmt: skip
    # The whole run (start-up and compilation included), and the steady step
    # time from the run's own log (views/s of the steps after the first two).
    t_train = _run(train + [f"--workdir={d / 'run_b'}", f"--train_steps={a.steps}"])
    recs = [json.loads(x) for x in (d / "run_b" / "metrics.jsonl").read_text().splitlines()]
    rates = sorted(r["views_per_s"] for r in recs[2:] if r.get("views_per_s"))
    per_step = 2 * a.batch / rates[len(rates) // 2] if rates else float("nan")
    t_encode = _run([
      py, "-m", "gigassl_jax.encode", f"--workdir={d / 'run_b'}", f"--bank={d / 'bank'}",
      f"--out={d / 'reps.npz'}", f"--n_views={a.n_views}",
    ])  # fmt: skip
  from gigassl_jax.machine import cpu_name  # pylint: disable=import-outside-toplevel

  per_slide_embed = t_embed / a.slides
  rows = {
    "embed_s_per_slide": per_slide_embed,
    "train_s_total": t_train,
    "train_steps": a.steps,
    "train_s_per_step": per_step,
    "encode_s_total": t_encode,
    "encode_s_per_slide": t_encode / a.slides,
  }
  print(
    f"machine: {cpu_name()} ({os.cpu_count()} cores); {a.slides} copies of the CC0 slide; "
    f"{a.encoder}, n_aug {a.n_aug} x n_tiles {a.n_tiles}; batch {a.batch}"
  )
  print("| stage | measured | 10 slides | 50 slides |")
  print("|---|---|---|---|")
  print(
    f"| embed | {per_slide_embed:.1f} s/slide | {10 * per_slide_embed / 60:.1f} min "
    f"| {50 * per_slide_embed / 60:.1f} min |"
  )
  print(
    f"| train ({a.steps} steps) | {t_train:.0f} s in all, {per_step:.2f} s/step steady | - | - |"
  )
  print(
    f"| encode ({a.n_views} views) | {t_encode / a.slides:.1f} s/slide (incl. start) "
    f"| {10 * t_encode / a.slides / 60:.1f} min | {50 * t_encode / a.slides / 60:.1f} min |"
  )
  if a.out:
    rec = {
      "command": " ".join(["python"] + sys.argv),
      "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
      "machine": f"{cpu_name()} ({os.cpu_count()} cores)",
      "settings": dataclasses.asdict(a),
      **rows,
    }
    tmp = a.out + ".tmp"
    pathlib.Path(tmp).write_text(json.dumps(rec, indent=2))
    os.replace(tmp, a.out)
  return 0


if __name__ == "__main__":
  cli.define_flags(BenchConfig)
  cli.run(main)
