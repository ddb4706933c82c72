"""The demo cohort (real tissue, synthetic labels) and the demo end to end at --quick size."""

import csv
import json

import numpy as np
import openslide
import pytest
from PIL import Image
from scipy import ndimage

from gigassl_jax import cohort
from gigassl_jax import demo
from gigassl_jax import slides as slides_lib

BLUE, RED = np.array([0, 0, 255], np.uint8), np.array([255, 0, 0], np.uint8)


def _flat_textures():
  """Tumour painted pure blue, stroma pure red: composition readable from the pixels."""
  return {
    "tumour": [np.broadcast_to(BLUE, (200, 200, 3)).copy()],
    "stroma": [np.broadcast_to(RED, (200, 200, 3)).copy()],
  }


def _measure(img):
  """Tumour (blue) and stroma (red) pixels; each slide's stain gain scales the channels."""
  r, g, b = (img[..., i].astype(int) for i in range(3))
  tumour = (b > 150) & (r < 60) & (g < 60)
  stroma = (r > 150) & (b < 60) & (g < 60)
  return tumour, stroma


def test_classes_differ_in_composition_and_arrangement(monkeypatch):
  """Pixels, not the generator's own report: fraction ranges and number of foci."""
  # The slide's own re-staining (tested in test_cohort.py) would recolour the
  # flat blue / red textures; composition and arrangement are tested without it.
  monkeypatch.setattr(cohort, "restain", lambda rgb, ident: np.asarray(rgb, np.float32))
  tex = _flat_textures()
  foci = {c: [] for c in cohort.CLASSES}
  for i in range(8):
    label = cohort.CLASSES[i % 2]
    img, info = cohort.render_slide(np.random.default_rng([11, i]), label, tex, grid=10)
    assert img.shape == (2240, 2240, 3) and img.dtype == np.uint8
    tumour, stroma = _measure(img)
    tissue = tumour | stroma
    glass = ~tissue
    assert 0.3 < tissue.mean() < 0.9
    # Glass is the light background (the tissue mask needs it lighter than tissue).
    assert img[glass].mean() > 230
    frac = tumour.sum() / tissue.sum()
    lo, hi = {"stroma_rich": (0.15, 0.45), "tumour_rich": (0.30, 0.60)}[label]
    assert lo - 0.02 < frac < hi + 0.02
    assert info["tumour_fraction"] == pytest.approx(frac, abs=0.01)
    # Foci per unit of tumour area: many small ones vs a few large nests.
    n = ndimage.label(tumour)[1]
    foci[label].append(n / tumour.sum() * 224**2)
  assert np.median(foci["stroma_rich"]) > 3 * np.median(foci["tumour_rich"])


def test_slides_are_pyramidal_aperio_tiffs_openslide_reads(tmp_path):
  labels = cohort.make_cohort(
    cohort.CohortConfig(out=str(tmp_path), n_per_class=1, grid=4, seed=3), progress=False
  )
  rows = list(csv.DictReader(open(labels)))
  assert [(r["ID"], r["label"]) for r in rows] == [
    ("demo_000", "stroma_rich"),
    ("demo_001", "tumour_rich"),
  ]
  tex = cohort.load_textures()
  for i, r in enumerate(rows):
    s = openslide.OpenSlide(tmp_path / "slides" / f"{r['ID']}.svs")
    assert s.properties["openslide.vendor"] == "aperio"
    assert float(s.properties["openslide.mpp-x"]) == pytest.approx(1.0)
    assert s.level_dimensions[:2] == ((896, 896), (224, 224))
    got = np.asarray(s.read_region((0, 0), 0, (896, 896)).convert("RGB"), np.float32)
    want, _ = cohort.render_slide(np.random.default_rng([3, i]), r["label"], tex, grid=4)
    assert np.abs(got - want).mean() < 6  # JPEG quality 90
    # The embedding's tissue mask finds the tissue on the lowest level.
    rgb, _ = slides_lib.mask_image(s)
    assert 0.2 < slides_lib.tissue_mask_from_rgb(rgb).mean() < 0.95
    s.close()
  with Image.open(tmp_path / "cohort.png") as im:
    assert im.size[0] > 500


def test_render_rejects_unknown_class():
  with pytest.raises(ValueError, match="unknown class"):
    cohort.render_slide(np.random.default_rng(0), "benign", _flat_textures(), grid=4)


def test_quick_demo_end_to_end(tmp_path):
  """All five stages at tiny size; the folder holds what the demo promises."""
  res = demo.run(demo.DemoConfig.quick_sizes(out=str(tmp_path / "demo"), progress=False))
  out = tmp_path / "demo"
  assert res["out"] == out
  for name in (
    "README.md",
    "results.md",
    "results.csv",
    "per_split.csv",
    "cohort.png",
    "pca.png",
    "loss.png",
  ):
    assert (out / name).is_file(), name
  assert len(list((out / "thumbnails").glob("demo_*.png"))) == 8
  rows = {r["method"]: r for r in res["rows"]}
  assert set(rows) == {"gigassl", "mean_tiles", "random_init", "gigassl (all tiles)"}
  for r in rows.values():
    assert r["n_splits"] == 2 and 0.0 <= r["auc_mean"] <= 1.0
  for m in ("gigassl", "mean_tiles", "random_init", "gigassl_all_tiles"):
    z = np.load(out / "reps" / f"{m}.npz")
    assert len(z["ids"]) == 8 and np.isfinite(z["reps"]).all()
  assert set(res["times"]) == {"cohort", "embed", "train", "encode", "evaluate"}
  readme = (out / "README.md").read_text()
  assert "| gigassl |" in readme
  # --quick says it is a plumbing check, in the summary and in the reading.
  assert "plumbing check" in readme.lower() and "not a result" in res["reading"][0]
  # Written once: the contact sheet only at the top, thumbnails only in thumbnails/.
  assert not (out / "cohort" / "cohort.png").exists()
  assert not (out / "bank" / "thumbnails").exists()
  with Image.open(out / "thumbnails" / "demo_000.png") as im:
    assert min(im.size) >= 512, im.size
  # What the run shows, with its chance levels (8 slides: 1/8; batch 8: log 15, 1/15).
  assert res["identity"]["chance"] == 1 / 8 and 0 <= res["identity"]["top1"] <= 1
  assert res["training"]["loss_chance"] == pytest.approx(np.log(15), rel=1e-12)
  assert res["training"]["top1_chance"] == pytest.approx(1 / 15, rel=1e-12)
  assert set(res["heldout"]["top1"]) == {"gigassl", "random_init", "mean_tiles"}
  rec = json.loads((out / "run.json").read_text())
  assert {"command", "date", "machine", "elapsed_s", "identity", "training", "heldout"} <= set(rec)


def test_reading_compares_paired_splits():
  """Constructed AUCs: the reading's numbers are the paired differences, its verdicts follow."""
  recs = []
  for k, (g, r, m) in enumerate([(0.9, 0.7, 0.9), (0.8, 0.6, 0.7), (0.7, 0.5, 0.8)]):
    for method, auc in (("gigassl", g), ("random_init", r), ("mean_tiles", m)):
      recs.append({"subset": "full", "method": method, "split": f"s{k}", "auc": auc, "n_train": 24})
  (line,) = demo.read_table(recs)
  # gigassl - random_init = +0.2 on every split (std 0): better.
  assert "vs random init: +0.200 AUC (paired std 0.000, better)" in line, line
  # gigassl - mean_tiles = 0, +0.1, -0.1: mean 0, std 0.082: within one std.
  assert "vs mean of tiles: +0.000 AUC (paired std 0.082, within one std)" in line, line
  assert line.startswith("trained net, 24 training slides"), line
  assert "not a result" in demo.read_table(recs, quick=True)[0]
