"""`python -m gigassl_jax.embed`: bad inputs, resumption after a kill, sharding.

Uses the random-init resnet18 at 64 x 64 tiles to keep the encoder cheap: what is
tested here is the plumbing, not the encoder.
"""

import csv
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from gigassl_jax import (
  augment,
  bank,
  embed,
  embed_device,
  embed_listing,
  encoders,
  slides,
  synthetic,
)

FIXTURES = pathlib.Path(__file__).parent / "fixtures"

TILE = 64
FLAGS = dict(n_aug=3, n_tiles=8, encoder="resnet18", tile_size=TILE, seed=3, progress=False)


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory):
  """Good slides of every flavour and one of each kind of bad input."""
  d = tmp_path_factory.mktemp("mixed")
  synthetic.write_slide(d / "aperio.svs", 2000, 1600, mpp=0.5, seed=1)
  synthetic.write_slide(d / "generic.tif", 2000, 1600, vendor="generic", mpp=0.5, seed=2)
  synthetic.write_slide(d / "nompp.tif", 2000, 1600, vendor="generic", mpp=None, n_levels=2, seed=3)
  shutil.copy(FIXTURES / "cmu_small_region.svs", d / "cmu.svs")
  synthetic.write_slide(d / "blank.svs", 1200, 900, blobs=(), background=(255, 255, 255))
  synthetic.write_slide(d / "small.svs", 100, 80, n_levels=1)
  (d / "junk.svs").write_bytes(b"this is a text file, not a slide\n" * 40)
  data = bytearray((FIXTURES / "cmu_small_region.svs").read_bytes())
  data[600_000:800_000] = (
    np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes()
  )
  (d / "garbled.svs").write_bytes(bytes(data))
  (d / "notes.md").write_text("not listed: unknown extension")
  return d


def _bank_contents(bank_dir):
  r = bank.open_bank(bank_dir)
  return r.slide_ids, [[r.get(s, k) for k in range(r.n_aug)] for s in range(len(r))]


def _assert_same_bank(a, b):
  ids_a, recs_a = _bank_contents(a)
  ids_b, recs_b = _bank_contents(b)
  assert ids_a == ids_b
  for sa, sb in zip(recs_a, recs_b):
    for (ea, ca), (eb, cb) in zip(sa, sb):
      np.testing.assert_array_equal(ea, eb)
      np.testing.assert_array_equal(ca, cb)


def test_bad_inputs_recorded_and_bank_correct(mixed_dir, tmp_path):
  out = tmp_path / "bank"
  cfg = embed.EmbedConfig(slides=str(mixed_dir), bank=str(out), **FLAGS)
  res = embed.run(cfg)
  reasons = res["failed"]
  assert set(reasons) == {"blank", "small", "junk", "garbled"}
  assert "no tissue" in reasons["blank"]
  assert "too small" in reasons["small"]
  assert "not a slide format" in reasons["junk"] and "junk.svs" in reasons["junk"]
  assert "corrupt" in reasons["garbled"]
  assert sorted(res["done"]) == ["aperio", "cmu", "generic", "nompp"]
  # The manifest lists every slide (notes.md is not a slide extension).
  rows = list(csv.DictReader(open(out / "manifest.csv")))
  assert {r["slide_id"]: r["status"] for r in rows} == {
        "aperio": "done", "cmu": "done", "generic": "done", "nompp": "done",
        "blank": "failed", "small": "failed", "junk": "failed", "garbled": "failed",
    }  # fmt: skip
  by_id = {r["slide_id"]: r for r in json.loads((out / "manifest.json").read_text())}
  assert "missing mpp" in by_id["nompp"]["warnings"]
  # Thumbnails: one per slide whose mask was computed, tissue tinted green.
  for sid in ("aperio", "cmu", "generic", "nompp", "blank"):
    im = np.asarray(Image.open(out / "thumbnails" / f"{sid}.png"))
    assert im.ndim == 3 and min(im.shape[:2]) > 20
  th = np.asarray(Image.open(out / "thumbnails" / "aperio.png")).astype(int)
  assert ((th[..., 1] > th[..., 0] + 20) & (th[..., 1] > th[..., 2])).mean() > 0.05  # green tissue
  assert ((th[..., 2] > 200) & (th[..., 0] < 60)).any()  # blue tile outlines

  # The packed bank: coords on the tile grid, embeddings = encoder(augment(tiles)).
  r = bank.open_bank(out)
  assert r.slide_ids == ["aperio", "cmu", "generic", "nompp"]
  assert (r.n_aug, r.n_tiles, r.feature_dim) == (3, 8, 256)
  meta = r.meta["slides"][0]
  assert meta["encoder"] == "resnet18" and meta["weights_id"] == "random-init-seed3"
  extent = meta["extent"]
  assert extent == 128 and meta["level"] == 0 and meta["mpp"] == 1.0
  enc = encoders.get_encoder("resnet18", seed=3)
  slide = slides.open_slide(mixed_dir / "aperio.svs")
  cfg_aug = augment.AugmentConfig(out_size=TILE)
  for k in range(3):
    emb, coords = r.get(0, k)
    assert (coords % extent == 0).all() and (coords + extent <= [2000, 1600]).all()
    tiles = np.stack([
            np.asarray(slide.read_region((int(x), int(y)), 0, (128, 128)).convert("RGB")
                       .resize((TILE, TILE), Image.Resampling.BILINEAR))
            for x, y in coords
        ])  # fmt: skip
    assert tiles.mean() < 235  # tissue, not glass
    key = jax.random.fold_in(
      jax.random.fold_in(jax.random.key(3), embed_device.slide_seed("aperio")), k
    )
    want = np.asarray(enc.apply(enc.params, augment.augment(key, tiles, cfg_aug)))
    np.testing.assert_allclose(
      emb.astype(np.float32), want, rtol=2e-2, atol=2e-2 * np.abs(want).max()
    )
  assert np.abs(r.get(0, 0)[0].astype(np.float32) - r.get(0, 1)[0]).max() > 1e-2

  # Rerun: nothing redone, the bad ones retried and reported again.
  res2 = embed.run(cfg)
  assert sorted(res2["skipped"]) == ["aperio", "cmu", "generic", "nompp"] and not res2["done"]
  assert set(res2["failed"]) == set(reasons)
  # Resuming with other settings is refused before any work.
  with pytest.raises(ValueError, match=r"aperio.npz was made with other settings.*n_aug"):
    embed.run(embed.EmbedConfig(slides=str(mixed_dir), bank=str(out), **dict(FLAGS, n_aug=2)))


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("good")
  for i in range(6):
    synthetic.write_slide(d / f"s{i}.svs", 1600, 1400, mpp=0.5, seed=i, n_levels=2)
  (d / "junk.tif").write_bytes(b"\x00" * 5000)
  return d


@pytest.fixture(scope="module")
def reference_bank(good_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("ref") / "bank"
  embed.run(embed.EmbedConfig(slides=str(good_dir), bank=str(out), **FLAGS))
  return out


def _cli(good_dir, out):
  args = [f"--{k}={v}" for k, v in FLAGS.items() if k != "progress"]
  return [sys.executable, "-m", "gigassl_jax.embed", f"--slides={good_dir}", f"--bank={out}", *args]


def test_kill_and_resume_equals_uninterrupted(good_dir, reference_bank, tmp_path):
  out = tmp_path / "bank"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(
    _cli(good_dir, out), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
  )
  deadline = time.time() + 120
  while time.time() < deadline and not list((out / "slides").glob("*.npz")):
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done_at_kill = bank.finished_slides(out)
  assert 1 <= len(done_at_kill) < 6, f"kill came too late or too early: {done_at_kill}"
  assert not (out / "packed").exists()
  # Plant what a kill in the middle of a write leaves behind.
  (out / "slides" / ".s5.npz.tmp-999999999-0").write_bytes(b"PK\x03\x04 half")
  rerun = subprocess.run(_cli(good_dir, out), env=env, capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 1, rerun.stderr[-3000:]  # junk.tif failed
  assert "FAILED" in rerun.stderr and "junk" in rerun.stderr
  assert f"{len(done_at_kill)} already done" in rerun.stderr
  _assert_same_bank(out, reference_bank)
  assert not list((out / "slides").glob(".*"))  # the stale temp was cleaned


def test_shards_pack_when_all_done(good_dir, reference_bank, tmp_path):
  out = tmp_path / "bank"
  r0 = embed.run(
    embed.EmbedConfig(slides=str(good_dir), bank=str(out), num_shards=2, shard_index=0, **FLAGS)
  )
  # Sorted listing junk, s0, ..., s5: shard 0 takes junk, s1, s3, s5.
  assert sorted(r0["done"]) == ["s1", "s3", "s5"] and set(r0["failed"]) == {"junk"}
  assert r0["packed"] is None
  assert r0["pending_elsewhere"] == 3
  r1 = embed.run(
    embed.EmbedConfig(slides=str(good_dir), bank=str(out), num_shards=2, shard_index=1, **FLAGS)
  )
  assert sorted(r1["done"]) == ["s0", "s2", "s4"] and not r1["failed"]
  assert r1["packed"] == out / "packed"
  _assert_same_bank(out, reference_bank)


def test_listing(good_dir, tmp_path):
  lst = tmp_path / "list.txt"
  lst.write_text(f"# two slides\n{good_dir / 's1.svs'}\n\n{good_dir / 's0.svs'}\n")
  assert [p.name for p in embed_listing.list_slides(str(lst))] == ["s0.svs", "s1.svs"]
  assert [
    p.name for p in embed_listing.list_slides(f"{good_dir / 's2.svs'},{good_dir / 's3.svs'}")
  ] == [
    "s2.svs",
    "s3.svs",
  ]
  (tmp_path / "sub").mkdir()
  shutil.copy(good_dir / "s0.svs", tmp_path / "sub" / "s0.tif")
  with pytest.raises(ValueError, match="share the id 's0'"):
    embed_listing.list_slides(f"{good_dir},{tmp_path / 'sub'}")
  with pytest.raises(FileNotFoundError, match="nowhere"):
    embed_listing.list_slides(str(tmp_path / "nowhere"))
