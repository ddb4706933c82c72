"""Slide access on the real CC0 slide and synthetic pyramidal TIFFs."""

import numpy as np
import openslide
import pytest
from PIL import Image

from gigassl_jax import slides, synthetic


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
  d = tmp_path_factory.mktemp("syn")
  return {
    # 0.25 mpp (a "40x" scan), levels at 0.25, 1.0, 4.0 mpp.
    "aperio": synthetic.write_slide(d / "a.svs", 2400, 1800, mpp=0.25, app_mag=40, seed=1),
    "generic": synthetic.write_slide(d / "g.tif", 2400, 1800, vendor="generic", mpp=0.5, seed=2),
    "nompp": synthetic.write_slide(d / "n.tif", 2400, 1800, vendor="generic", mpp=None, n_levels=2),
    "blank": synthetic.write_slide(d / "b.svs", 1200, 900, blobs=(), background=(255, 255, 255)),
  }


def test_synthetic_slides_open_as_pyramids(syn):
  a = openslide.OpenSlide(str(syn["aperio"]))
  assert a.properties["openslide.vendor"] == "aperio"
  assert a.level_dimensions == ((2400, 1800), (600, 450), (150, 112))
  assert slides.slide_mpp(a) == pytest.approx(0.25)
  assert a.properties["openslide.objective-power"] == "40"
  g = openslide.OpenSlide(str(syn["generic"]))
  assert g.properties["openslide.vendor"] == "generic-tiff"
  assert slides.slide_mpp(g) == pytest.approx(0.5)
  n = openslide.OpenSlide(str(syn["nompp"]))
  assert slides.slide_mpp(n) is None and n.level_count == 2
  # The pyramid shows the same picture at every level.
  lo = np.asarray(a.read_region((0, 0), 2, (150, 112)))[..., :3].astype(float)
  hi = np.asarray(a.read_region((0, 0), 0, (2400, 1792)).resize((150, 112)))[..., :3].astype(float)
  assert np.abs(lo - hi).mean() < 12


def test_choose_level(syn):
  a = slides.open_slide(syn["aperio"])
  p = slides.choose_level(a, 224)  # 10x = 1.0 mpp = level 1 exactly
  assert (p.level, p.read_size, p.extent, p.tile_mpp) == (1, 224, 896, 1.0)
  p = slides.choose_level(a, 224, magnification=20)  # 0.5 mpp: level 0 read at 448, resized
  assert (p.level, p.read_size, p.extent) == (0, 448, 448) and p.tile_mpp == pytest.approx(0.5)
  p = slides.choose_level(a, 100, mpp=2.0)  # between levels 1 and 2: read level 1 at 200
  assert (p.level, p.read_size, p.extent) == (1, 200, 800)
  g = slides.open_slide(syn["generic"])  # 0.5 mpp, level 1 = 2.0 mpp: read level 0
  p = slides.choose_level(g, 224)
  assert (p.level, p.read_size, p.extent) == (0, 448, 448)
  n = slides.open_slide(syn["nompp"])
  p = slides.choose_level(n, 224, fallback_level=1)
  assert p.level == 1 and p.tile_mpp is None and "missing mpp" in p.warning
  p = slides.choose_level(n, 224, fallback_level=5)  # clamped to the last level
  assert p.level == 1 and "2 levels" in p.warning
  with pytest.raises(slides.SlideError, match="missing mpp"):
    slides.choose_level(n, 224, fallback_level=-1)
  with pytest.raises(slides.SlideError, match="too small"):
    slides.choose_level(a, 1024, magnification=2.5)  # one tile = 16384 level-0 px


def test_tissue_mask_recipe():
  rng = np.random.default_rng(0)
  h, w = 300, 360
  img = np.full((h, w, 3), 235, np.uint8) + rng.integers(0, 6, (h, w, 3), dtype=np.uint8)
  yy, xx = np.mgrid[:h, :w]
  disc = (yy - 150) ** 2 + (xx - 170) ** 2 < 80**2
  img[disc] = (200, 110, 170) + rng.integers(-10, 10, (disc.sum(), 3))
  img[2:6, 100:200] = (120, 60, 120)  # tissue-coloured, inside the 1/30 border band
  img[250, 40] = (120, 60, 120)  # a single dark pixel: removed by the 2 x 2 opening
  img[20:40, 20:40] = 0  # black (gray <= 0.02): never tissue
  mask = slides.tissue_mask_from_rgb(img)
  assert mask.dtype == bool and mask.shape == (h, w)
  iou = (mask & disc).sum() / (mask | disc).sum()
  assert iou > 0.97
  assert not mask[:10].any() and not mask[250, 40] and not mask[20:40, 20:40].any()
  assert not slides.tissue_mask_from_rgb(np.full((50, 60, 3), 255, np.uint8)).any()


def test_tile_grid_against_brute_force():
  rng = np.random.default_rng(1)
  mask = rng.random((37, 53)) < 0.08
  mask[10:25, 5:30] = True
  ds, extent = 16.0, 100  # level-0 px per mask px, tile side
  dims = (53 * 16 + 7, 37 * 16 + 3)
  coords, frac = slides.tile_grid(dims, extent, mask, ds, tolerance=0.1)
  want = []
  for y in range(0, dims[1] - extent + 1, extent):
    for x in range(0, dims[0] - extent + 1, extent):
      x0, y0 = int(np.floor(x / ds)), int(np.floor(y / ds))
      x1, y1 = int(np.ceil((x + extent) / ds)), int(np.ceil((y + extent) / ds))
      f = mask[y0:y1, x0:x1].mean()
      if f > 0.1:
        want.append((x, y, f))
  assert coords.dtype == np.int32 and coords.shape == (len(want), 2)
  np.testing.assert_array_equal(coords, [(x, y) for x, y, _ in want])
  np.testing.assert_allclose(frac, [f for *_, f in want], rtol=1e-6)
  assert len(want) > 3


def test_real_slide_tiles(fixtures_dir):
  path = fixtures_dir / "cmu_small_region.svs"
  s = slides.open_slide(path)
  p = slides.choose_level(s, 224)  # 0.499 mpp: 1.0 mpp is 449 px at level 0
  assert (p.level, p.read_size, p.extent) == (0, 449, 449)
  rgb, ds = slides.mask_image(s)
  assert rgb.shape == (2967, 2220, 3) and ds == 1.0
  mask = slides.tissue_mask_from_rgb(rgb)
  assert 0.1 < mask.mean() < 0.6  # H&E skin on glass
  coords, _ = slides.tile_grid(s.dimensions, p.extent, mask, ds)
  assert 5 <= len(coords) < (2220 // 449) * (2967 // 449)
  with slides.TileReader(s, p, threads=4) as reader:
    tiles = reader.read(coords)
  assert tiles.shape == (len(coords), 224, 224, 3) and tiles.dtype == np.uint8
  for i in (0, len(coords) - 1):  # threads give what a plain read + resize gives
    x, y = (int(v) for v in coords[i])
    ref = (
      s.read_region((x, y), 0, (449, 449))
      .convert("RGB")
      .resize((224, 224), Image.Resampling.BILINEAR)
    )
    np.testing.assert_array_equal(tiles[i], np.asarray(ref))
  # Tiles on tissue are darker than the glass.
  assert tiles.mean() < np.asarray(s.read_region((0, 0), 0, (100, 100)))[..., :3].mean()


def test_bad_files(tmp_path, fixtures_dir, syn):
  junk = tmp_path / "junk.svs"
  junk.write_bytes(b"definitely not a slide" * 50)
  with pytest.raises(slides.SlideError, match="junk.svs"):
    slides.open_slide(junk)
  with pytest.raises(slides.SlideError, match="not a file"):
    slides.open_slide(tmp_path / "missing.svs")
  data = bytearray((fixtures_dir / "cmu_small_region.svs").read_bytes())
  data[600_000:800_000] = (
    np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes()
  )
  garbled = tmp_path / "garbled.svs"
  garbled.write_bytes(bytes(data))
  s = slides.open_slide(garbled)  # the header is intact ...
  with pytest.raises(slides.SlideError, match="corrupt"):  # ... the tiles are not
    slides.mask_image(s)
  b = slides.open_slide(syn["blank"])
  rgb, _ = slides.mask_image(b)
  assert not slides.tissue_mask_from_rgb(rgb).any()
