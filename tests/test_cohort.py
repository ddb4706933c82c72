"""The demo cohort's slide identity: drawn per slide, independent of the label, measurable."""

import numpy as np
import pytest

from gigassl_jax import bank as bank_lib
from gigassl_jax import cohort


@pytest.fixture(scope="module")
def textures():
  return cohort.load_textures()


@pytest.mark.parametrize("seed", [0, 7])
def test_identity_is_drawn_before_and_independent_of_the_label(textures, seed):
  # Same slide rng, two labels: the identity (drawn first) is the same; only
  # the composition differs.
  infos = [
    cohort.render_slide(np.random.default_rng([seed, 1]), label, textures, grid=3)[1]
    for label in cohort.CLASSES
  ]
  for k in ("zoom", "h_gain", "e_gain"):
    assert infos[0][k] == infos[1][k], f"seed {seed}: {k} depends on the label"
  lo, hi = cohort.IDENTITY["zoom"]
  assert lo <= infos[0]["zoom"] <= hi, f"seed {seed}"


@pytest.mark.parametrize("seed", [0, 3])
def test_render_is_deterministic_and_slides_differ(textures, seed):
  a, _ = cohort.render_slide(np.random.default_rng([seed, 0]), "tumour_rich", textures, grid=3)
  b, _ = cohort.render_slide(np.random.default_rng([seed, 0]), "tumour_rich", textures, grid=3)
  c, _ = cohort.render_slide(np.random.default_rng([seed, 1]), "tumour_rich", textures, grid=3)
  assert a.shape == (672, 672, 3) and a.dtype == np.uint8, f"seed {seed}"
  assert np.array_equal(a, b), f"seed {seed}: same rng, different slide"
  assert not np.array_equal(a, c), f"seed {seed}: two slides are the same"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_restain_matches_skimage_colour_deconvolution(textures, seed):
  from skimage.color import combine_stains, rgb2hed

  ident = cohort.draw_identity(np.random.default_rng(seed), textures)
  img = textures["tumour"][0][:64, :64]
  hed = rgb2hed(img / 255.0)  # float64 reference
  hed[..., 0] *= ident.h_gain
  hed[..., 1] *= ident.e_gain
  want = combine_stains(hed, ident.rgb_from_hed) * 255.0
  got = cohort.restain(img, ident)
  # float32 vs float64: the exponent (up to |log 1e-6| = 13.8) carries ~10
  # rounding steps of 6e-8 relative each -> ~1e-5 relative on exp, x 255 ->
  # 3e-3 at worst; 5e-3 is that bound rounded up.
  np.testing.assert_allclose(got, want, atol=5e-3, err_msg=f"seed {seed}")
  # The slide's stain vectors are unit rows, perturbed from the standard ones.
  np.testing.assert_allclose(np.linalg.norm(ident.rgb_from_hed, axis=1), 1, rtol=1e-12)


def _bank(tmp_path, rng, signal: float):
  """A bank of 12 slides x 2 files: tiles = signal x slide vector + file shift + noise."""
  ident = rng.normal(size=(12, 16))
  shift = 3 * rng.normal(size=(2, 16))  # the shared augmentation moves every slide alike
  for i in range(12):
    emb = signal * ident[i] + shift[:, None, :] + rng.normal(size=(2, 8, 16))
    coords = rng.integers(0, 5, size=(2, 8, 2)) * 224
    bank_lib.write_slide(tmp_path, f"s{i:02d}", emb, coords, {"encoder": "test"})
  return tmp_path


def test_identity_retrieval_finds_slides_with_an_identity(tmp_path):
  # Identity signal 3 (per-dim std) vs tile noise 1 averaged over 8 tiles
  # (std 0.35): every slide's two means are far nearer each other than others.
  res = cohort.identity_retrieval(_bank(tmp_path, np.random.default_rng(21), 3.0))
  assert res["top1"] == 1.0 and res["chance"] == 1 / 12, f"seed 21: {res}"


def test_identity_retrieval_is_at_chance_without_identity(tmp_path):
  # No identity: each query's hit is a 1/12 coin; 24 queries (both
  # directions); var <= 2 x 24 p (1 - p) (pairs of directions correlated);
  # 5 sigma -> hits < 2 + 5 x 1.35 = 8.8, i.e. top1 < 0.37.
  res = cohort.identity_retrieval(_bank(tmp_path, np.random.default_rng(22), 0.0))
  assert res["top1"] < 0.37, f"seed 22: {res}"


def test_identity_retrieval_rejects_a_one_slide_bank(tmp_path):
  rng = np.random.default_rng(0)
  bank_lib.write_slide(tmp_path, "a", rng.normal(size=(2, 4, 8)), np.zeros((2, 4, 2), int), {})
  with pytest.raises(ValueError, match="at least 2 slides"):
    cohort.identity_retrieval(tmp_path)
