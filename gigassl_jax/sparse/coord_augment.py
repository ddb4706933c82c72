"""Augmentation of a view's tile positions, in level-0 pixels, before quantisation.

As the reference's LocationsAugmentation: subtract a random integer translation
t in [0, max(extent, 1)) per axis (extent = max - min of the view's positions),
then multiply the row vectors by M = R F S (R a rotation by an angle uniform on
the circle, F independent +-1 flips per axis, S an independent per-axis scale
uniform in `scale_range`), then truncate to integers toward zero as the
reference's `.long()` does. The result is then quantised relative to the view's
minimum, so the translation matters only through rounding.

The reference draws the angle in degrees and uses it as radians; the effect is
an angle uniform on the circle, which is what this draws directly.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class CoordAugment:
  """Which coordinate augmentations are on, and the scale range."""

  translate: bool = True
  rotate: bool = True
  flip: bool = True
  scale: bool = True
  scale_range: tuple[float, float] = (0.7, 1.3)

  def __post_init__(self):
    lo, hi = self.scale_range
    if not 0 < lo <= hi:
      raise ValueError(f"scale_range must satisfy 0 < low <= high, got {self.scale_range}")


def view_matrix(key, cfg: CoordAugment) -> jax.Array:
  """float32 [2, 2] M = R F S for one view (identity for what is off)."""
  kr, kf, ks = jax.random.split(key, 3)
  m = jnp.eye(2, dtype=jnp.float32)
  if cfg.rotate:
    th = jax.random.uniform(kr, (), jnp.float32, -jnp.pi, jnp.pi)
    c, s = jnp.cos(th), jnp.sin(th)
    m = jnp.array([[c, -s], [s, c]])
  if cfg.flip:
    f = jnp.where(jax.random.bernoulli(kf, 0.5, (2,)), -1.0, 1.0)
    m = m @ jnp.diag(f)
  if cfg.scale:
    lo, hi = cfg.scale_range
    m = m @ jnp.diag(jax.random.uniform(ks, (2,), jnp.float32, lo, hi))
  return m


def augment_view(key, xy, valid, cfg: CoordAugment):
  """Augments one view's positions.

  Args:
    key: PRNG key.
    xy: int32 [T, 2] level-0 (x, y) positions.
    valid: bool [T].
    cfg: which augmentations to apply.

  Returns:
    int32 [T, 2] augmented positions (unchanged where invalid).
  """
  kt, km = jax.random.split(key)
  big = jnp.iinfo(jnp.int32).max
  mx = jnp.max(jnp.where(valid[:, None], xy, -big), axis=0)
  mn = jnp.min(jnp.where(valid[:, None], xy, big), axis=0)
  p = xy.astype(jnp.float32)
  if cfg.translate:
    extent = jnp.maximum(mx - mn, 1)
    t = jax.random.randint(kt, (2,), 0, extent)
    p = p - t.astype(jnp.float32)
  p = p @ view_matrix(km, cfg)
  out = jnp.trunc(p).astype(jnp.int32)
  return jnp.where(valid[:, None], out, xy)


def augment_views(key, xy, valid=None, cfg: CoordAugment = CoordAugment()):
  """Independent augmentation of every view: int32 [V, T, 2] -> int32 [V, T, 2]."""
  xy = jnp.asarray(xy, jnp.int32)
  if valid is None:
    valid = jnp.ones(xy.shape[:2], bool)
  keys = jax.random.split(key, xy.shape[0])
  return jax.vmap(lambda k, p, m: augment_view(k, p, m, cfg))(keys, xy, valid)
