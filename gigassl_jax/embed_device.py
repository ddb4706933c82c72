"""The device half of embed: tile draws, and shared augmentation + frozen encoder on device.

Every draw depends only on (seed, slide id, augmentation index), never on the
order or the process that embeds a slide.
"""

from __future__ import annotations

import hashlib

import numpy as np

from gigassl_jax import augment as augment_lib


def slide_seed(sid: str) -> int:
  """A stable 32-bit hash of the id: draws depend on the slide, not the order."""
  return int.from_bytes(hashlib.sha256(sid.encode()).digest()[:4], "little")


def sample_tiles(n_grid: int, n_aug: int, n_tiles: int, seed: int, sid: str) -> np.ndarray:
  """Indices into the tissue tile grid, uniform with replacement: int64 [Naug, Nt]."""
  rng = np.random.default_rng([seed, slide_seed(sid)])
  return rng.integers(0, n_grid, size=(n_aug, n_tiles))


class TileEncoderDevice:
  """Places batches on the local devices and runs augment + encode (jitted)."""

  def __init__(self, encoder, *, encode_batch: int, n_tiles: int, tile_size: int, seed: int):
    import jax  # pylint: disable=import-outside-toplevel
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel

    self.jax = jax
    devices = jax.local_devices()
    # Split each batch over all local devices (GSPMD), when it divides evenly.
    if encode_batch % len(devices) or n_tiles % len(devices):
      devices = devices[:1]
    mesh = Mesh(np.array(devices), ("data",))
    self.batch_sharding = NamedSharding(mesh, P("data"))
    self.params = jax.device_put(encoder.params, NamedSharding(mesh, P()))
    self.encoder = encoder
    self.aug_cfg = augment_lib.AugmentConfig(out_size=tile_size)
    self.encode_batch = encode_batch
    self.base_key = jax.random.key(seed)
    self.n_devices = len(devices)

  def embed(self, tiles: np.ndarray, sid: str, k: int):
    """uint8 [Nt, T, T, 3] -> float16 device array [Nt, F] (asynchronous)."""
    jax = self.jax
    key = jax.random.fold_in(jax.random.fold_in(self.base_key, slide_seed(sid)), k)
    x = jax.device_put(tiles, self.batch_sharding)
    x = augment_lib.augment(key, x, self.aug_cfg)
    outs = [
      self.encoder.apply(self.params, x[i : i + self.encode_batch])
      for i in range(0, x.shape[0], self.encode_batch)
    ]
    feats = outs[0] if len(outs) == 1 else jax.numpy.concatenate(outs)
    return feats.astype(jax.numpy.float16)
