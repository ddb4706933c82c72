"""Embedding throughput: read, augment, encode alone, and end to end, in tiles/s and slides/hour.

    python benchmarks/bench_embed.py [--encoders=resnet18,efficientnet_lite0]
        [--n_aug=50] [--n_tiles=256] [--e2e_slides=2] [--repeats=3]
        [--read_threads=N] [--read_cache_mb=2048] [--slide=/tmp/bench_40k.svs] [--out=FILE.json]

Writes (once, cached) a synthetic 40k x 40k pyramidal Aperio slide at 0.25 mpp
("40x", levels 0.25 / 1.0 / 4.0 mpp) to /tmp, never into the repository, then
prints one markdown table: the stage, what it does, tiles/s (median of `repeats`
timed runs after a warm-up; the encoder's of `repeats` before and `repeats` after the
end-to-end run; end to end a single run) and slides/hour at embed's
default 50 x 256 = 12,800 tiles a slide (from the tiles/s, whatever `n_aug` the
end-to-end run used). Stages:

* read: random tissue tiles, one batch at a time, 10x (level 1 as is) and 20x
  (level 0, 448 px resized);
* read one slide's draws: what embed's reader (gigassl_jax/embed_reading.py) hands
  the device for one slide at the DEFAULT 50 x 256 draws (each distinct tile read
  once): mask + grid + draws + reads, in tiles handed out per second;
* augment; encode (encoder only, batches of `n_tiles`); device only (what embed
  runs on the device per batch: host-to-device put + augment + encode + fetch; on
  CPU the augmentation shares the cores with the encoder, so end to end cannot
  beat this);
* end to end: `embed.run` over `e2e_slides` names of the slide (each its own draws,
  so the next slide's reading overlaps this one's encoding) at `n_aug` x `n_tiles`,
  after a 1-batch warm-up run (compilation), and the ratio end to end / encoder only
  (near 1.0: reading, augmenting and writing are hidden behind the encoder; the
  first slide's mask and reads are not, so a run of few slides understates it).

`--out=FILE.json` also writes the numbers with the command, the date (UTC) and the
machine (CPU model, cores, load average at start and end).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time
import warnings

import jax
import numpy as np

from gigassl_jax import augment, cli, embed, embed_device, embed_reading, encoders, slides
from gigassl_jax import synthetic
from gigassl_jax.machine import cpu_name, write_result

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_DRAWS = 50 * 256  # embed's default n_aug x n_tiles: what slides/hour is quoted at


def _times(fn, repeats: int) -> list[float]:
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return times


def _median_rate(fn, n_items: int, repeats: int) -> float:
  fn()  # warm-up (compilation, caches)
  return n_items / statistics.median(_times(fn, repeats))


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
  n_aug: int = cli.field(50, "Batches per slide in the end-to-end run (embed's default: 50).")
  n_tiles: int = cli.field(256, "Tiles per batch (embed's default: 256).")
  e2e_slides: int = cli.field(2, "Slides in the end-to-end run (names of the one slide).")
  repeats: int = cli.field(3, "Timed rounds per read/augment/encode stage (median).")
  slide: str = cli.field(
    "/tmp/bench_40k.svs", "The synthetic 40k x 40k slide (written if missing)."
  )
  read_threads: int | None = cli.field(None, "Tile-reading threads (default: embed's).")
  read_cache_mb: float = cli.field(2048, "embed's --read_cache_mb.")
  out: str = cli.field("", "Also write the numbers, command, date and machine to this JSON.")


def _load() -> str:
  return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def _read_one_slide(path, work, args) -> tuple[float, int]:
  """(tiles handed out per second, distinct tiles read) for one slide at 50 x 256 draws."""
  cfg = embed.EmbedConfig(
    slides=str(path), bank=str(work), n_aug=50, n_tiles=256, thumbnails=False, progress=False
  )
  t = time.perf_counter()
  with embed_reading.SlideStream(
    [path], lambda p: embed.prepare_slide(p, cfg), 224 * 224 * 3,
    int(args.read_cache_mb * 2**20), args.read_threads,
  ) as stream:  # fmt: skip
    for item in stream:
      if item.error is not None:
        raise item.error
      try:
        for chunk in stream.chunks(item):
          for k in range(chunk.k0, chunk.k1):
            chunk.tiles(k)
      finally:
        stream.finish(item)
  return DEFAULT_DRAWS / (time.perf_counter() - t), stream.reads


def main(argv):
  del argv
  args = cli.from_flags(BenchEmbedConfig)
  warnings.simplefilter("ignore")  # the random-init resnet18 warning, once per build
  load_start = _load()
  path = _slide(pathlib.Path(args.slide))
  device = jax.devices()[0]
  dev_name = str(getattr(device, "device_kind", device.platform))
  if jax.default_backend() == "cpu":
    dev_name = f"cpu ({cpu_name()})"
  threads = args.read_threads or slides.default_read_threads()
  n = args.n_tiles
  per_slide = args.n_aug * n  # tiles a slide in the end-to-end run
  rows = []  # (stage, what, tiles/s or ratio, slides/hour or None)

  # Reading: random tissue tiles of the 40k slide, two plans, one batch at a time.
  s = slides.open_slide(path)
  rgb, ds = slides.mask_image(s)
  mask = slides.tissue_mask_from_rgb(rgb)
  rng = np.random.default_rng(0)
  for label, kw in (("10x: level 1 direct", dict(magnification=10)),
                      ("20x: level 0 read 448 px, resized", dict(mpp=0.5))):  # fmt: skip
    plan = slides.choose_level(s, 224, **kw)
    grid, _ = slides.tile_grid(s.dimensions, plan.extent, mask, ds)
    with slides.TileReader(s, plan, threads) as reader:
      # Fresh random tiles each repeat, so the OS page cache is not all we measure.
      rate = _median_rate(lambda: reader.read(grid[rng.integers(0, len(grid), n)]), n, args.repeats)
    rows.append((f"read ({threads} threads)", f"{label}, batches of {n}", rate, None))

  # What embed's reader hands the device for one slide at the default draws.
  work = pathlib.Path(tempfile.mkdtemp(prefix="bench_embed_"))
  try:
    rate, distinct = _read_one_slide(path, work / "read", args)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  rows.append((
        f"read one slide's draws ({threads} threads)",
        f"10x, 50 x 256 = {DEFAULT_DRAWS} draws, {distinct} distinct tiles read once; "
        "incl. mask + grid", rate, 3600 * rate / DEFAULT_DRAWS,
    ))  # fmt: skip

  # Augmentation alone.
  plan = slides.choose_level(s, 224, magnification=10)
  grid, _ = slides.tile_grid(s.dimensions, plan.extent, mask, ds)
  with slides.TileReader(s, plan, threads) as reader:
    host_tiles = reader.read(grid[rng.integers(0, len(grid), n)])
  tiles = jax.device_put(host_tiles)
  s.close()
  keys = iter(jax.random.split(jax.random.key(0), 1000))
  rate = _median_rate(
    lambda: augment.augment(next(keys), tiles).block_until_ready(), n, args.repeats
  )
  rows.append(("augment", f"{n} tiles, one shared draw", rate, None))
  images = augment.augment(jax.random.key(1), tiles)

  # Encoders alone, then end to end.
  results = {}
  for name in args.encoders:
    enc = encoders.get_encoder(name)

    def encode(enc=enc):
      enc.apply(enc.params, images).block_until_ready()

    # What embed runs on the device per batch: put + augment + encode + fetch.
    dev = embed_device.TileEncoderDevice(enc, encode_batch=n, n_tiles=n, tile_size=224, seed=0)
    batch_index = iter(range(10**6))

    def on_device(dev=dev):
      np.asarray(dev.embed(host_tiles, "bench", next(batch_index)))

    encode()  # warm-ups
    on_device()
    # Timed before and after the end-to-end run: a load change on a shared machine
    # then weighs on both sides of the ratio alike.
    enc_times = _times(encode, args.repeats)
    dev_times = _times(on_device, args.repeats)
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_embed_"))
    try:
      (work / "slides").mkdir()
      for i in range(args.e2e_slides):  # one file, several ids: each slide its own draws
        (work / "slides" / f"bench{i}{path.suffix}").symlink_to(path.resolve())
      cfg = dict(encoder=name, n_tiles=n, progress=False, thumbnails=False, pack=False,
                       read_threads=args.read_threads, read_cache_mb=args.read_cache_mb)  # fmt: skip
      embed.run(embed.EmbedConfig(slides=str(work / "slides" / f"bench0{path.suffix}"),
                                        bank=str(work / "warm"), n_aug=1, **cfg))  # fmt: skip
      t = time.perf_counter()  # the warm-up (1 slide, 1 batch) compiled the device part
      res = embed.run(embed.EmbedConfig(slides=str(work / "slides"), bank=str(work / "timed"),
                                              n_aug=args.n_aug, **cfg))  # fmt: skip
      e2e = args.e2e_slides * per_slide / (time.perf_counter() - t)
      if len(res["done"]) != args.e2e_slides:
        raise RuntimeError(f"end-to-end run failed: {res['failed']}")
    finally:
      shutil.rmtree(work, ignore_errors=True)
    enc_rate = n / statistics.median(enc_times + _times(encode, args.repeats))
    dev_rate = n / statistics.median(dev_times + _times(on_device, args.repeats))
    rows.append((f"encode {name}", f"batch {n}, F={enc.feature_dim}", enc_rate,
                     3600 * enc_rate / DEFAULT_DRAWS))  # fmt: skip
    rows.append((f"device only {name}", f"embed's device part: put + augment + encode, batch {n}",
                     dev_rate, 3600 * dev_rate / DEFAULT_DRAWS))  # fmt: skip
    rows.append((
            f"end to end {name}",
            f"{args.e2e_slides} slides x {args.n_aug} x {n} tiles: mask + read + augment + "
            "encode + write", e2e, 3600 * e2e / DEFAULT_DRAWS,
        ))  # fmt: skip
    rows.append(("", f"end to end / encoder only ({name})", e2e / enc_rate, None))
    rows.append(("", f"end to end / device only ({name})", e2e / dev_rate, None))
    results[name] = {
      "encoder_tiles_per_s": enc_rate,
      "e2e_tiles_per_s": e2e,
      "ratio": e2e / enc_rate,
      "device_tiles_per_s": dev_rate,
      "ratio_to_device": e2e / dev_rate,
      "encoder_slides_per_hour": 3600 * enc_rate / DEFAULT_DRAWS,
      "e2e_slides_per_hour": 3600 * e2e / DEFAULT_DRAWS,
    }

  load_end = _load()
  header = (
    f"device: {dev_name} ({jax.device_count()} device(s), backend {jax.default_backend()}), "
    f"{os.cpu_count()} CPU cores, {threads} read threads, XLA host threads: all cores, "
    f"jax {jax.__version__}; load average {load_start} at start, {load_end} at the end; "
    f"slide 40000 x 40000 @ 0.25 mpp, {len(grid)} tissue tiles at 10x; "
    f"slides/hour at embed's default 50 x 256 = {DEFAULT_DRAWS} tiles a slide; end to end "
    f"over {args.e2e_slides} slides of {args.n_aug} x {n} tiles"
  )
  if per_slide != DEFAULT_DRAWS:
    header += " (fewer than the default, to keep the run short)"
  print(f"\n{header}\n")
  print(f"| stage | what | tiles/s | slides/hour |")
  print("|---|---|---|---|")
  for stage, what, v, sph in rows:
    if stage:
      print(f"| {stage} | {what} | {v:.1f} | {'' if sph is None else f'{sph:.1f}'} |")
    else:
      print(f"| | {what} | ratio {v:.2f} | |")

  if args.out:
    rec = {
      "device": dev_name,
      "devices": jax.device_count(),
      "backend": jax.default_backend(),
      "n_aug": args.n_aug,
      "slides_per_hour_at_tiles_a_slide": DEFAULT_DRAWS,
      "n_tiles": n,
      "e2e_slides": args.e2e_slides,
      "read_threads": threads,
      "read_cache_mb": args.read_cache_mb,
      "encoders": results,
      "rows": [
        {"stage": st, "what": w, "value": v, "slides_per_hour": sph} for st, w, v, sph in rows
      ],
      "command": " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
      "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
      "machine": {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "load_average_start": load_start,
        "load_average_end": load_end,
        "jax": jax.__version__,
      },
    }
    write_result(args.out, rec)


if __name__ == "__main__":
  cli.define_flags(BenchEmbedConfig)
  cli.run(main)
