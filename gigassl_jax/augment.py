"""Shared tile augmentations (docs/method.md section 2), jitted and batched.

One random draw is shared by every tile of a batch (Giga-SSL's "shared
augmentation": a batch of tiles of one slide stands for one augmented view of the
slide). In order, as the reference's torchvision pipeline:

1. random resized crop back to the output size (scale 0.5-1 of the area, aspect
   3/4-4/3, torchvision's 10-attempt sampler with its central-crop fallback;
   bilinear resampling with PIL's antialiased triangle filter, sampling only
   inside the crop, as PIL's crop + resize);
2. colour jitter with p = 0.8: brightness, contrast, saturation factors in
   [0.6, 1.4] and a hue shift in +-0.2 turn, applied in a random order
   (torchvision's ColorJitter), with torchvision's float-tensor formulas;
3. grayscale with p = 0.2 (ITU-R 601-2 weights as torchvision);
4. Gaussian blur 5 x 5, sigma in [0.1, 1.0], p = 0.5, reflect padding.

Output: float32 RGB in [0, 1], NOT normalised (the encoder normalises).
Randomness comes only from the key, so a (key, tiles) pair always gives the
same result.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision rgb_to_grayscale
_CROP_ATTEMPTS = 10  # torchvision RandomResizedCrop.get_params


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Augmentation hyper-parameters; defaults are docs/method.md section 2."""

  out_size: int = 224
  crop_scale: tuple[float, float] = (0.5, 1.0)
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  jitter_p: float = 0.8
  brightness: float = 0.4  # factor uniform in [1 - b, 1 + b]
  contrast: float = 0.4
  saturation: float = 0.4
  hue: float = 0.2  # shift uniform in [-hue, hue] turns
  gray_p: float = 0.2
  blur_p: float = 0.5
  blur_kernel: int = 5
  blur_sigma: tuple[float, float] = (0.1, 1.0)


def sample_params(key: jax.Array, in_hw: tuple[int, int], cfg: AugmentConfig = AugmentConfig()):
  """Draws one augmentation (shared by a batch of tiles of size in_hw).

  Args:
    key: a jax PRNG key.
    in_hw: (height, width) of the input tiles (static).
    cfg: the hyper-parameters.

  Returns:
    dict of scalars: crop (int32 [4]: top, left, height, width), jitter (bool),
    order (int32 [4]: permutation of brightness 0, contrast 1, saturation 2,
    hue 3), brightness, contrast, saturation, hue (float32), gray (bool),
    blur (bool), sigma (float32).
  """
  k = jax.random.split(key, 10)
  b, c, s = cfg.brightness, cfg.contrast, cfg.saturation
  return {
    "crop": _sample_crop(k[0], in_hw, cfg),
    "jitter": jax.random.uniform(k[1]) < cfg.jitter_p,
    "order": jax.random.permutation(k[2], 4).astype(jnp.int32),
    "brightness": _uniform(k[3], (1 - b, 1 + b)),
    "contrast": _uniform(k[4], (1 - c, 1 + c)),
    "saturation": _uniform(k[5], (1 - s, 1 + s)),
    "hue": _uniform(k[6], (-cfg.hue, cfg.hue)),
    "gray": jax.random.uniform(k[7]) < cfg.gray_p,
    "blur": jax.random.uniform(k[8]) < cfg.blur_p,
    "sigma": _uniform(k[9], cfg.blur_sigma),
  }


def _uniform(key, bounds):
  return jax.random.uniform(key, (), jnp.float32, minval=bounds[0], maxval=bounds[1])


def _sample_crop(key, in_hw, cfg):
  """torchvision RandomResizedCrop.get_params, vectorised over its 10 attempts."""
  height, width = in_hw
  area = height * width
  k1, k2, k3, k4 = jax.random.split(key, 4)
  target_area = area * jax.random.uniform(
    k1, (_CROP_ATTEMPTS,), minval=cfg.crop_scale[0], maxval=cfg.crop_scale[1]
  )
  log_r = (math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]))
  aspect = jnp.exp(jax.random.uniform(k2, (_CROP_ATTEMPTS,), minval=log_r[0], maxval=log_r[1]))
  # jnp.round rounds half to even, like Python's round() in torchvision.
  w = jnp.round(jnp.sqrt(target_area * aspect)).astype(jnp.int32)
  h = jnp.round(jnp.sqrt(target_area / aspect)).astype(jnp.int32)
  ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = jnp.argmax(ok)  # the first attempt that fits
  # Central-crop fallback when no attempt fits (static arithmetic).
  in_ratio = width / height
  if in_ratio < cfg.crop_ratio[0]:
    fw, fh = width, int(round(width / cfg.crop_ratio[0]))
  elif in_ratio > cfg.crop_ratio[1]:
    fw, fh = int(round(height * cfg.crop_ratio[1])), height
  else:
    fw, fh = width, height
  any_ok = ok.any()
  ch = jnp.where(any_ok, h[first], fh)
  cw = jnp.where(any_ok, w[first], fw)
  # randint(0, H - h + 1): floor of a uniform draw over the admissible offsets.
  top = jnp.floor(jax.random.uniform(k3) * (height - ch + 1)).astype(jnp.int32)
  left = jnp.floor(jax.random.uniform(k4) * (width - cw + 1)).astype(jnp.int32)
  top = jnp.where(any_ok, jnp.minimum(top, height - ch), (height - fh) // 2)
  left = jnp.where(any_ok, jnp.minimum(left, width - cw), (width - fw) // 2)
  return jnp.stack([top, left, ch, cw]).astype(jnp.int32)


def resize_weights(start, length, in_size: int, out_size: int) -> jax.Array:
  """Resampling matrix of PIL's bilinear resize of the crop [start, start + length).

  Output pixel o has its centre at input coordinate start + (o + 0.5) * s,
  s = length / out_size; input pixel k (centre k + 0.5) gets the triangle
  weight max(0, 1 - |k + 0.5 - centre| / max(s, 1)) (the support widens when
  downscaling: antialiasing), only inside the crop, rows normalised to 1.

  Args:
    start, length: int32 scalars (traced), the crop along this axis.
    in_size, out_size: static sizes.

  Returns:
    float32 [out_size, in_size].
  """
  start = jnp.asarray(start, jnp.float32)
  length = jnp.asarray(length, jnp.float32)
  s = length / out_size
  support = jnp.maximum(s, 1.0)
  centre = start + (jnp.arange(out_size, dtype=jnp.float32)[:, None] + 0.5) * s
  k = jnp.arange(in_size, dtype=jnp.float32)[None, :]
  w = jnp.maximum(0.0, 1.0 - jnp.abs(k + 0.5 - centre) / support)
  w = jnp.where((k >= start) & (k < start + length), w, 0.0)
  return w / jnp.sum(w, axis=1, keepdims=True)


def crop_resize(images: jax.Array, crop: jax.Array, out_size: int) -> jax.Array:
  """Crops [top, left, h, w] of every image and resizes to out_size.

  Args:
    images: float32 [B, H, W, C].
    crop: int32 [4] (top, left, height, width), shared by the batch.
    out_size: output side.

  Returns:
    float32 [B, out_size, out_size, C].
  """
  _, h, w, _ = images.shape
  wy = resize_weights(crop[0], crop[2], h, out_size)
  wx = resize_weights(crop[1], crop[3], w, out_size)
  hi = jax.lax.Precision.HIGHEST  # no TF32 on GPUs: exact resampling
  out = jnp.einsum("oh,bhwc->bowc", wy, images, precision=hi)
  return jnp.einsum("pw,bowc->bopc", wx, out, precision=hi)


def grayscale(images: jax.Array) -> jax.Array:
  """[..., 3] -> [..., 1] luma with torchvision's weights."""
  wr, wg, wb = GRAY_WEIGHTS
  return (wr * images[..., 0:1] + wg * images[..., 1:2] + wb * images[..., 2:3]).astype(
    images.dtype
  )


def _blend(a, b, ratio):
  return jnp.clip(ratio * a + (1.0 - ratio) * b, 0.0, 1.0)


def adjust_brightness(x, f):
  return jnp.clip(x * f, 0.0, 1.0)


def adjust_contrast(x, f):
  # The mean gray level of each image (torchvision: mean over C, H, W of the gray image).
  mean = jnp.mean(grayscale(x), axis=(-3, -2, -1), keepdims=True)
  return _blend(x, mean, f)


def adjust_saturation(x, f):
  return _blend(x, grayscale(x), f)


def rgb_to_hsv(x):
  """torchvision's _rgb2hsv on [..., 3] floats in [0, 1]."""
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  maxc = jnp.max(x, axis=-1)
  minc = jnp.min(x, axis=-1)
  eqc = maxc == minc
  cr = maxc - minc
  s = cr / jnp.where(eqc, 1.0, maxc)
  crd = jnp.where(eqc, 1.0, cr)
  rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
  hr = jnp.where(maxc == r, bc - gc, 0.0)
  hg = jnp.where((maxc == g) & (maxc != r), 2.0 + rc - bc, 0.0)
  hb = jnp.where((maxc != g) & (maxc != r), 4.0 + gc - rc, 0.0)
  h = jnp.mod((hr + hg + hb) / 6.0 + 1.0, 1.0)
  return jnp.stack([h, s, maxc], axis=-1)


def hsv_to_rgb(x):
  """torchvision's _hsv2rgb on [..., 3] (h in [0, 1))."""
  h, s, v = x[..., 0], x[..., 1], x[..., 2]
  i = jnp.floor(h * 6.0)
  f = h * 6.0 - i
  i = i.astype(jnp.int32) % 6
  p = jnp.clip(v * (1.0 - s), 0.0, 1.0)
  q = jnp.clip(v * (1.0 - s * f), 0.0, 1.0)
  t = jnp.clip(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
  r = jnp.select([i == 0, i == 1, i == 2, i == 3, i == 4], [v, q, p, p, t], v)
  g = jnp.select([i == 0, i == 1, i == 2, i == 3, i == 4], [t, v, v, q, p], p)
  b = jnp.select([i == 0, i == 1, i == 2, i == 3, i == 4], [p, p, t, v, v], q)
  return jnp.stack([r, g, b], axis=-1)


def adjust_hue(x, shift):
  hsv = rgb_to_hsv(x)
  h = jnp.mod(hsv[..., 0] + shift, 1.0)
  return hsv_to_rgb(jnp.stack([h, hsv[..., 1], hsv[..., 2]], axis=-1))


def color_jitter(images, params):
  """torchvision ColorJitter: the four adjustments in the drawn order."""
  fns = (
    lambda x: adjust_brightness(x, params["brightness"]),
    lambda x: adjust_contrast(x, params["contrast"]),
    lambda x: adjust_saturation(x, params["saturation"]),
    lambda x: adjust_hue(x, params["hue"]),
  )
  for step in range(4):
    images = jax.lax.switch(params["order"][step], fns, images)
  return images


def gaussian_kernel1d(sigma, size: int = 5) -> jax.Array:
  """torchvision's _get_gaussian_kernel1d: float32 [size], sums to 1."""
  half = (size - 1) * 0.5
  x = jnp.linspace(-half, half, size)
  pdf = jnp.exp(-0.5 * (x / sigma) ** 2)
  return pdf / jnp.sum(pdf)


def gaussian_blur(images, sigma, size: int = 5):
  """Separable Gaussian blur of [B, H, W, C] with reflect padding."""
  k = gaussian_kernel1d(sigma, size)
  r = size // 2
  _, h, w, _ = images.shape
  x = jnp.pad(images, ((0, 0), (r, r), (0, 0), (0, 0)), mode="reflect")
  x = sum(k[i] * x[:, i : i + h] for i in range(size))
  x = jnp.pad(x, ((0, 0), (0, 0), (r, r), (0, 0)), mode="reflect")
  return sum(k[i] * x[:, :, i : i + w] for i in range(size))


def apply_params(images: jax.Array, params, cfg: AugmentConfig = AugmentConfig()) -> jax.Array:
  """Applies one drawn augmentation to every image of a batch.

  Args:
    images: uint8 [B, H, W, 3] (0-255) or float [B, H, W, 3] in [0, 1].
    params: from sample_params.
    cfg: the hyper-parameters (out_size, blur kernel size).

  Returns:
    float32 [B, out_size, out_size, 3] in [0, 1].
  """
  if images.dtype == jnp.uint8:
    x = images.astype(jnp.float32) / 255.0
  else:
    x = images.astype(jnp.float32)
  x = crop_resize(x, params["crop"], cfg.out_size)
  x = jax.lax.cond(params["jitter"], lambda y: color_jitter(y, params), lambda y: y, x)
  x = jax.lax.cond(
    params["gray"], lambda y: jnp.broadcast_to(grayscale(y), y.shape), lambda y: y, x
  )
  x = jax.lax.cond(
    params["blur"], lambda y: gaussian_blur(y, params["sigma"], cfg.blur_kernel), lambda y: y, x
  )
  return x


@functools.partial(jax.jit, static_argnames="cfg")
def augment(key: jax.Array, images: jax.Array, cfg: AugmentConfig = AugmentConfig()) -> jax.Array:
  """Draws one augmentation from `key` and applies it to the whole batch.

  Args:
    key: jax PRNG key.
    images: uint8 [B, H, W, 3] or float [B, H, W, 3] in [0, 1].
    cfg: the hyper-parameters (static).

  Returns:
    float32 [B, cfg.out_size, cfg.out_size, 3] in [0, 1].
  """
  params = sample_params(key, images.shape[1:3], cfg)
  return apply_params(images, params, cfg)


def params_to_numpy(params) -> dict:
  """The drawn parameters as plain numpy/python values (for logs and tests)."""
  return {k: np.asarray(v) for k, v in params.items()}
