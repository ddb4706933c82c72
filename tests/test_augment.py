"""Shared augmentations against independent references.

References: PIL's own crop + bilinear resize (mode "F", float) for the random
resized crop, colorsys for the hue shift, the torchvision float-tensor formulas
written in numpy for the other jitters, and a direct 2-D convolution of the
outer-product Gaussian for the blur.
"""

import colorsys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from gigassl_jax import augment

GRAY = np.array([0.2989, 0.587, 0.114])


def _pil_crop_resize(img, top, left, h, w, out):
  """img float [H, W, 3] -> PIL crop + BILINEAR resize per channel, float64."""
  chans = []
  for c in range(3):
    im = Image.fromarray(img[..., c].astype(np.float32), mode="F")
    im = im.crop((left, top, left + w, top + h)).resize((out, out), Image.Resampling.BILINEAR)
    chans.append(np.asarray(im, np.float64))
  return np.stack(chans, -1)


def _gray(x):
  return (x * GRAY).sum(-1, keepdims=True)


def _hue_colorsys(x, shift):
  flat = x.reshape(-1, 3)
  out = np.empty_like(flat)
  for i, (r, g, b) in enumerate(flat):
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    out[i] = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
  return out.reshape(x.shape)


def _jitter_ref(x, p):
  ops = {
    0: lambda y: np.clip(y * p["brightness"], 0, 1),
    1: lambda y: np.clip(
      p["contrast"] * y + (1 - p["contrast"]) * _gray(y).mean(axis=(1, 2, 3), keepdims=True), 0, 1
    ),
    2: lambda y: np.clip(p["saturation"] * y + (1 - p["saturation"]) * _gray(y), 0, 1),
    3: lambda y: np.stack([_hue_colorsys(t, float(p["hue"])) for t in y]),
  }
  for i in p["order"]:
    x = ops[int(i)](x)
  return x


def _blur_ref(x, sigma, size=5):
  r = np.arange(size) - size // 2
  k1 = np.exp(-0.5 * (r / sigma) ** 2)
  k1 /= k1.sum()
  k2 = np.outer(k1, k1)
  pad = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
  out = np.zeros_like(x)
  h, w = x.shape[1:3]
  for dy in range(size):
    for dx in range(size):
      out += k2[dy, dx] * pad[:, dy : dy + h, dx : dx + w]
  return out


def _reference(tiles_u8, p, out):
  x = tiles_u8.astype(np.float64) / 255
  top, left, h, w = (int(v) for v in p["crop"])
  x = np.stack([_pil_crop_resize(t, top, left, h, w, out) for t in x])
  if p["jitter"]:
    x = _jitter_ref(x, p)
  if p["gray"]:
    x = np.repeat(_gray(x), 3, -1)
  if p["blur"]:
    x = _blur_ref(x, float(p["sigma"]))
  return x


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("force", [None, "all_on"])
def test_matches_numpy_reference(seed, force):
  rng = np.random.default_rng(seed)
  tiles = rng.integers(0, 256, (3, 20, 20, 3), dtype=np.uint8)
  out = 16
  cfg = augment.AugmentConfig(out_size=out)
  p = augment.params_to_numpy(augment.sample_params(jax.random.key(seed), (20, 20), cfg))
  if force == "all_on":
    p.update(jitter=np.array(True), gray=np.array(True), blur=np.array(True))
    p["order"] = rng.permutation(4).astype(np.int32)
  got = np.asarray(
    augment.apply_params(jnp.asarray(tiles), {k: jnp.asarray(v) for k, v in p.items()}, cfg)
  )
  want = _reference(tiles, p, out)
  assert got.shape == (3, out, out, 3) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_crop_downscale_matches_pil():
  # Crops larger than the output are downscaled: PIL's antialiased triangle filter.
  rng = np.random.default_rng(5)
  x = rng.random((2, 40, 40, 3)).astype(np.float32)
  crop = np.array([3, 5, 31, 27], np.int32)
  got = np.asarray(augment.crop_resize(jnp.asarray(x), jnp.asarray(crop), 12))
  want = np.stack([_pil_crop_resize(t, 3, 5, 31, 27, 12) for t in x])
  np.testing.assert_allclose(got, want, atol=2e-5)


def test_sampler_distribution():
  cfg = augment.AugmentConfig()
  keys = jax.random.split(jax.random.key(42), 4000)
  p = jax.vmap(lambda k: augment.sample_params(k, (224, 224), cfg))(keys)
  p = {k: np.asarray(v) for k, v in p.items()}
  # Bernoulli frequencies within ~4.5 standard errors of p.
  for name, prob in (("jitter", 0.8), ("gray", 0.2), ("blur", 0.5)):
    assert abs(p[name].mean() - prob) < 4.5 * np.sqrt(prob * (1 - prob) / 4000), name
  for name, lo, hi in (("brightness", 0.6, 1.4), ("contrast", 0.6, 1.4),
                         ("saturation", 0.6, 1.4), ("hue", -0.2, 0.2), ("sigma", 0.1, 1.0)):  # fmt: skip
    assert p[name].min() >= lo and p[name].max() <= hi, name
    assert p[name].min() < lo + 0.01 and p[name].max() > hi - 0.01, name  # spans the range
  assert (np.sort(p["order"], 1) == np.arange(4)).all()  # a permutation every time
  top, left, h, w = p["crop"].T
  assert (
    (top >= 0).all() and (left >= 0).all() and (top + h <= 224).all() and (left + w <= 224).all()
  )
  area = h * w / 224**2
  # Rounding of w, h moves the area by at most ~1 % around [0.5, 1].
  assert area.min() > 0.49 and area.max() <= 1.0 and area.min() < 0.52
  aspect = w / h
  assert aspect.min() > 0.74 and aspect.max() < 1.35
  assert len(set(map(tuple, p["crop"]))) > 3000  # offsets really vary


def test_crop_fallback_is_central():
  # A 10 x 200 tile admits no crop of aspect in [3/4, 4/3] with area >= 50 %:
  # torchvision falls back to the central crop of the clamped ratio.
  cfg = augment.AugmentConfig()
  crop = np.asarray(augment.sample_params(jax.random.key(0), (10, 200), cfg)["crop"])
  h = 10
  w = int(round(h * 4 / 3))
  np.testing.assert_array_equal(crop, [0, (200 - w) // 2, h, w])


def test_reproducible_and_shared():
  rng = np.random.default_rng(0)
  tile = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
  other = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
  batch = jnp.asarray(np.stack([tile, other, tile]))
  cfg = augment.AugmentConfig(out_size=24)
  a = np.asarray(augment.augment(jax.random.key(7), batch, cfg))
  b = np.asarray(augment.augment(jax.random.key(7), batch, cfg))
  c = np.asarray(augment.augment(jax.random.key(8), batch, cfg))
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).max() > 1e-3
  # One draw for the whole batch: equal inputs give equal outputs.
  np.testing.assert_array_equal(a[0], a[2])
  assert np.abs(a[0] - a[1]).max() > 1e-3
  assert a.min() >= 0 and a.max() <= 1
