"""A/B of `python -m gigassl_jax.embed` end to end: this checkout against another one.

    python benchmarks/bench_embed_ab.py --baseline=DIR [--encoders=resnet18,efficientnet_lite0]
        [--n_aug=8] [--n_tiles=256] [--slides=2] [--repeats=2]
        [--slide=/tmp/bench_40k.svs] [--out=FILE.json]

DIR is another checkout of the repository that imports its own package when run
with `PYTHONPATH=DIR` (a `git worktree add DIR <commit>`, plus the link
`DIR/gigassl_jax/kernels -> ../kernels` that an editable install would otherwise
provide). Both checkouts run the same embed command, as a fresh process each time,
on `--slides` names of the synthetic 40k x 40k slide that bench_embed.py writes,
alternating baseline and candidate `--repeats` times (B A B A ...), so that a load
that drifts on a shared machine hits both alike. The table gives the median wall
time of each (process start, compilation, mask, reads, augment, encode and writes
all included), the tiles/s that makes, and the ratio candidate / baseline; it also
says whether the two banks hold the same bytes (they must, for the same seed).

`--out=FILE.json` writes the numbers with the command, the date (UTC), both
commits and the machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from gigassl_jax import cli
from gigassl_jax.machine import cpu_name, write_result

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_embed import _load, _slide  # load average; the synthetic slide, written once


@dataclasses.dataclass(frozen=True)
class BenchEmbedABConfig:
  """The flags of this script."""

  baseline: str = cli.field(None, "The other checkout (runs with PYTHONPATH=DIR).", required=True)
  encoders: tuple[str, ...] = cli.field(
    ("resnet18", "efficientnet_lite0"), "Tile encoders timed (comma list)."
  )
  n_aug: int = cli.field(8, "Batches per slide (embed's default: 50).")
  n_tiles: int = cli.field(256, "Tiles per batch (embed's default: 256).")
  slides: int = cli.field(2, "Slides embedded per run (names of the one slide).")
  repeats: int = cli.field(2, "Runs of each checkout, alternating (median).")
  slide: str = cli.field(
    "/tmp/bench_40k.svs", "The synthetic 40k x 40k slide (written if missing)."
  )
  out: str = cli.field("", "Also write the numbers, command, date and machine to this JSON.")


def _commit(checkout: pathlib.Path) -> str:
  res = subprocess.run(
    ["git", "-C", str(checkout), "describe", "--always", "--dirty"],
    capture_output=True, text=True, check=False,
  )  # fmt: skip
  return res.stdout.strip() or "unknown"


def _bank_digest(bank: pathlib.Path) -> str:
  """sha256 over the embeddings (every file but the manifest, status and thumbnails)."""
  h = hashlib.sha256()
  for f in sorted(bank.rglob("*")):
    if f.is_file() and f.suffix not in (".json", ".csv", ".png"):
      h.update(str(f.relative_to(bank)).encode())
      h.update(f.read_bytes())
  return h.hexdigest()


def _run_embed(checkout: pathlib.Path, slides_dir, bank, encoder, args) -> float:
  """Wall seconds of one embed process run from `checkout`."""
  if bank.exists():
    shutil.rmtree(bank)
  cmd = [
    sys.executable, "-m", "gigassl_jax.embed", f"--slides={slides_dir}", f"--bank={bank}",
    f"--encoder={encoder}", f"--n_aug={args.n_aug}", f"--n_tiles={args.n_tiles}",
    "--noprogress", "--nothumbnails", "--nopack",
  ]  # fmt: skip
  env = dict(os.environ, PYTHONPATH=str(checkout))
  t = time.perf_counter()
  res = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, check=False)
  wall = time.perf_counter() - t
  if res.returncode != 0:
    print(
      f"embed from {checkout} failed ({res.returncode}):\n{res.stderr[-2000:]}", file=sys.stderr
    )
    raise SystemExit(1)
  return wall


def main(argv):
  del argv
  args = cli.from_flags(BenchEmbedABConfig)
  base = pathlib.Path(args.baseline).resolve()
  if not (base / "gigassl_jax" / "embed.py").is_file():
    print(f"bench_embed_ab: error: --baseline={args.baseline}: not a checkout of gigassl_jax "
          "(no gigassl_jax/embed.py)", file=sys.stderr)  # fmt: skip
    return 2
  load_start = _load()
  path = _slide(pathlib.Path(args.slide))
  checkouts = {"baseline": base, "candidate": REPO}
  commits = {k: _commit(v) for k, v in checkouts.items()}
  tiles = args.slides * args.n_aug * args.n_tiles
  print(
    f"embed A/B on cpu ({cpu_name()}), {os.cpu_count()} cores, load {load_start}; "
    f"baseline {base} @ {commits['baseline']}, candidate {REPO} @ {commits['candidate']}; "
    f"{args.slides} slides x {args.n_aug} x {args.n_tiles} = {tiles} tiles a run",
    flush=True,
  )
  results = {}
  with tempfile.TemporaryDirectory(prefix="bench_embed_ab_") as tmp:
    work = pathlib.Path(tmp)
    slides_dir = work / "slides"
    slides_dir.mkdir()
    for i in range(args.slides):
      (slides_dir / f"bench{i}{path.suffix}").symlink_to(path.resolve())
    for enc in args.encoders:
      walls = {"baseline": [], "candidate": []}
      digests = {}
      for r in range(args.repeats):
        for side in ("baseline", "candidate"):
          bank = work / f"bank_{side}"
          w = _run_embed(checkouts[side], slides_dir, bank, enc, args)
          walls[side].append(w)
          digests[side] = _bank_digest(bank)
          print(f"  {enc} run {r + 1} {side}: {w:.1f} s (load {_load()})", flush=True)
      med = {k: statistics.median(v) for k, v in walls.items()}
      results[enc] = {
        "baseline_wall_s": walls["baseline"],
        "candidate_wall_s": walls["candidate"],
        "baseline_tiles_per_s": tiles / med["baseline"],
        "candidate_tiles_per_s": tiles / med["candidate"],
        "ratio": med["baseline"] / med["candidate"],
        "same_bank": digests["baseline"] == digests["candidate"],
      }
  load_end = _load()
  print()
  print("| encoder | baseline s (median) | candidate s (median) | baseline tiles/s "
        "| candidate tiles/s | candidate / baseline | same bank bytes |")  # fmt: skip
  print("|---|---|---|---|---|---|---|")
  for enc, r in results.items():
    print(
      f"| {enc} | {statistics.median(r['baseline_wall_s']):.1f} "
      f"| {statistics.median(r['candidate_wall_s']):.1f} | {r['baseline_tiles_per_s']:.1f} "
      f"| {r['candidate_tiles_per_s']:.1f} | {r['ratio']:.2f} | {r['same_bank']} |"
    )
  print(f"\nload average at start {load_start}, at end {load_end}")
  if args.out:
    write_result(
      args.out,
      {
        "baseline": str(base),
        "baseline_commit": commits["baseline"],
        "candidate_commit": commits["candidate"],
        "slides": args.slides,
        "n_aug": args.n_aug,
        "n_tiles": args.n_tiles,
        "repeats": args.repeats,
        "encoders": results,
        "load_start": load_start,
        "load_end": load_end,
        "command": " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count()},
      },
    )
  if not all(r["same_bank"] for r in results.values()):
    print("the two banks differ: same seed, same slides, so one checkout changed the output")
    return 1
  return 0


if __name__ == "__main__":
  cli.define_flags(BenchEmbedABConfig)
  cli.run(main)
