"""Embedding throughput: read, augment, encode alone, and end to end, in tiles/s.

    python benchmarks/bench_embed.py [--encoders=resnet18,efficientnet_lite0]
        [--n_tiles=256] [--repeats=3] [--e2e_aug=4] [--slide=/tmp/bench_40k.svs]

Writes (once, cached) a synthetic 40k x 40k pyramidal Aperio slide at 0.25 mpp
("40x", levels 0.25 / 1.0 / 4.0 mpp) to /tmp, never into the repository, then
prints one markdown table: the stage, what it does, median tiles/s over
`repeats` runs, and the ratio to the encoder-only rate measured in the same run
(end to end / encoder-only near 1.0 means reading and augmenting are hidden
behind the encoder; read-only far above encoder-only means reading is not the
bottleneck). All rates use batches of `n_tiles` tiles of 224 x 224.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import statistics
import tempfile
import time
import warnings

import jax
import numpy as np

from gigassl_jax import augment, cli, embed, encoders, slides, synthetic


def _median_rate(fn, n_items: int, repeats: int) -> float:
  fn()  # warm-up (compilation, caches)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return n_items / statistics.median(times)


def _slide(path: pathlib.Path) -> pathlib.Path:
  if not path.exists():
    print(f"writing the synthetic 40k x 40k slide to {path} (once) ...", flush=True)
    t = time.time()
    synthetic.write_slide(path, 40_000, 40_000, mpp=0.25, app_mag=40, n_levels=3, seed=0)
    print(f"  {time.time() - t:.0f} s, {path.stat().st_size / 2**20:.0f} MiB", flush=True)
  return path


@dataclasses.dataclass(frozen=True)
class BenchEmbedConfig:
  """The flags of this script."""

  encoders: tuple[str, ...] = cli.field(
    ("resnet18", "efficientnet_lite0"), "Tile encoders timed (comma list)."
  )
  n_tiles: int = cli.field(256, "Tiles per timed batch.")
  repeats: int = cli.field(3, "Timed rounds per stage (median).")
  e2e_aug: int = cli.field(4, "Augmentations in the end-to-end run.")
  slide: str = cli.field(
    "/tmp/bench_40k.svs", "The synthetic 40k x 40k slide (written if missing)."
  )
  read_threads: int | None = cli.field(None, "Tile-reading threads (default: slides.TileReader's).")


def main(argv):
  del argv
  args = cli.from_flags(BenchEmbedConfig)
  warnings.simplefilter("ignore")  # the random-init resnet18 warning, once per build

  path = _slide(pathlib.Path(args.slide))
  device = jax.devices()[0]
  dev_name = f"{device.platform}:{getattr(device, 'device_kind', '')}"
  n = args.n_tiles
  rows = []

  # Reading: random tissue tiles of the 40k slide, two plans.
  s = slides.open_slide(path)
  rgb, ds = slides.mask_image(s)
  mask = slides.tissue_mask_from_rgb(rgb)
  rng = np.random.default_rng(0)
  read_rates = {}
  for label, kw in (("10x: level 1 direct", dict(magnification=10)),
                      ("20x: level 0 read 448 px, resized", dict(mpp=0.5))):  # fmt: skip
    plan = slides.choose_level(s, 224, **kw)
    grid, _ = slides.tile_grid(s.dimensions, plan.extent, mask, ds)
    with slides.TileReader(s, plan, args.read_threads) as reader:
      # Fresh random tiles each repeat, so the OS page cache is not all we measure.
      rate = _median_rate(lambda: reader.read(grid[rng.integers(0, len(grid), n)]), n, args.repeats)
    read_rates[label] = rate
    rows.append((f"read ({reader.threads} threads)", label, rate))

  # Augmentation alone.
  plan = slides.choose_level(s, 224, magnification=10)
  grid, _ = slides.tile_grid(s.dimensions, plan.extent, mask, ds)
  with slides.TileReader(s, plan, args.read_threads) as reader:
    tiles = jax.device_put(reader.read(grid[rng.integers(0, len(grid), n)]))
  keys = iter(jax.random.split(jax.random.key(0), 1000))
  rate = _median_rate(
    lambda: augment.augment(next(keys), tiles).block_until_ready(), n, args.repeats
  )
  rows.append(("augment", f"{n} tiles, one shared draw", rate))
  images = augment.augment(jax.random.key(1), tiles)

  # Encoders alone, then end to end.
  for name in args.encoders:
    enc = encoders.get_encoder(name)
    enc_rate = _median_rate(
      lambda: enc.apply(enc.params, images).block_until_ready(), n, args.repeats
    )
    rows.append((f"encode {name}", f"batch {n}, F={enc.feature_dim}", enc_rate))
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_embed_"))
    try:
      cfg = dict(slides=str(path), encoder=name, n_tiles=n, progress=False, thumbnails=False, pack=False,
                       read_threads=args.read_threads)  # fmt: skip
      embed.run(embed.EmbedConfig(bank=str(work / "warm"), n_aug=1, **cfg))  # compile
      t = time.perf_counter()
      embed.run(embed.EmbedConfig(bank=str(work / "timed"), n_aug=args.e2e_aug, **cfg))
      e2e = args.e2e_aug * n / (time.perf_counter() - t)
    finally:
      shutil.rmtree(work, ignore_errors=True)
    rows.append(
      (
        f"end to end {name}",
        f"1 slide, {args.e2e_aug} x {n} tiles, mask + read + augment + encode",
        e2e,
      )
    )
    rows.append(("", f"end to end / encode-only ({name})", e2e / enc_rate))

  print(f"\ndevice: {dev_name} ({jax.device_count()} device(s)), {os.cpu_count()} CPU cores, "
          f"load average {os.getloadavg()[0]:.1f} at the end, jax {jax.__version__}, "
          f"slide 40000 x 40000 @ 0.25 mpp, {len(grid)} tissue tiles at 10x\n")  # fmt: skip
  print("| stage | what | tiles/s (median of %d) |" % args.repeats)
  print("|---|---|---|")
  for stage, what, v in rows:
    if stage:
      print(f"| {stage} | {what} | {v:.1f} |")
    else:
      print(f"| | {what} | ratio {v:.2f} |")


if __name__ == "__main__":
  cli.define_flags(BenchEmbedConfig)
  cli.run(main)
