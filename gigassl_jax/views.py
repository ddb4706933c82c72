"""Views of slides for training (docs/method.md section 3): sampling, prefetch, sparse maps.

Two halves:
  host (numpy): for each step, which slides (an epoch-wise shuffle of the whole
    bank), and for each slide and view an augmentation index k and T tile
    indices drawn with replacement; the records are read from the bank.
  device (jax, inside the training step): coordinate augmentation and
    quantisation into a SparseMap (`make_views`).

Every random draw is a pure function of (seed, step, position in the global
batch), never of the process or device that makes it. So a resumed run
reproduces the same views from its step counter alone (the sampling state is
just the step), and 1 process x 8 devices sees exactly the views that 2
processes x 4 devices see. Each process reads only the records of its share
of every global batch.
"""

from __future__ import annotations

import queue
import threading

import jax
import jax.numpy as jnp
import numpy as np

from gigassl_jax import sampling
from gigassl_jax.sparse import coord_augment, maps


class ViewSampler:
  """Draws the 2 views of every slide of a step's global batch.

  Reading uses `workers` Grain worker processes (sampling.GrainReader; the
  same views as threads, faster on many-core hosts) or, with workers=0,
  `read_threads` threads of this process; with stream=False (a bank resident
  on the devices) it reads nothing and only draws (`slides`, `draws`).

  Attributes:
    steps_per_epoch: len(bank) // batch_size (the last partial batch of an
      epoch is dropped: static shapes under jit).
  """

  def __init__(
    self,
    reader,
    *,
    batch_size: int,
    tiles: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    read_threads: int = 8,
    workers: int = 0,
    stream: bool = True,
  ):
    n = len(reader)
    if batch_size > n:
      raise ValueError(
        f"--train_batch_size={batch_size} exceeds the {n} slides of the bank {reader.path}"
      )
    if batch_size % process_count:
      raise ValueError(
        f"--train_batch_size={batch_size} is not divisible by the {process_count} processes"
      )
    self.reader = reader
    self.batch_size = batch_size
    self.tiles = tiles
    self.seed = seed
    self.steps_per_epoch = n // batch_size
    self.local_size = batch_size // process_count
    self.local_start = process_index * self.local_size
    self._threads = self._grain = None  # stream=False: the bank is on the devices (resident.py)
    if stream and workers > 0:
      self._grain = sampling.GrainReader(
        sampling.StepBatch(
          reader.path,
          seed=seed,
          batch_size=batch_size,
          n_slides=n,
          tiles=tiles,
          start=self.local_start,
          size=self.local_size,
        ),
        workers,
      )
    elif stream:
      self._threads = sampling.ThreadReader(reader, read_threads)

  def slides(self, step: int) -> np.ndarray:
    """int64 [B]: slide indices of the global batch of `step`."""
    return sampling.step_slides(self.seed, step, self.batch_size, len(self.reader))

  def draws(self, step: int, position: int):
    """(aug [2], tiles [2, T]) of the slide at `position` in the global batch."""
    return sampling.draws(
      self.seed, step, position, self.reader.n_aug, self.reader.n_tiles, self.tiles
    )

  def local_batch(self, step: int) -> dict:
    """This process's share of the views of `step` (sampling.local_batch)."""
    if self._grain is not None:
      return self._grain.batch(step)
    return sampling.local_batch(
      lambda seed, step, pos, slides: self._threads.read(seed, step, pos, slides, self.tiles),
      self.seed,
      step,
      self.batch_size,
      len(self.reader),
      self.local_start,
      self.local_size,
    )

  def close(self):
    for r in (self._threads, self._grain):
      if r is not None:
        r.close()


class Prefetcher:
  """Prepares the batches of the next steps in a background thread.

  `put` (e.g. a host-to-device transfer) also runs in the thread, so the
  training loop only waits when the input is slower than the device.
  """

  def __init__(self, make, start_step: int, end_step: int, depth: int = 2, put=None):
    self._make, self._put = make, put or (lambda x: x)
    self._q = queue.Queue(maxsize=max(1, depth))
    self._stop = threading.Event()
    self._next = start_step
    self._thread = threading.Thread(target=self._run, args=(start_step, end_step), daemon=True)
    self._thread.start()

  def _run(self, start, end):
    for step in range(start, end):
      if self._stop.is_set():
        return
      try:
        item = (step, self._put(self._make(step)), None)
      except BaseException as e:  # noqa: BLE001  (re-raised in the consumer's thread)
        item = (step, None, e)
      while not self._stop.is_set():
        try:
          self._q.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if item[2] is not None:
        return

  def get(self, step: int):
    """The batch of `step` (steps must be requested in order)."""
    if step != self._next:
      raise RuntimeError(f"prefetcher asked for step {step}, expected {self._next}")
    got, batch, err = self._q.get()
    if err is not None:
      raise RuntimeError(f"preparing the views of step {got} failed: {err}") from err
    self._next += 1
    return batch

  def close(self):
    self._stop.set()
    self._thread.join(timeout=5)


# ---------------------------------------------------------------- device ----


def make_views(key, xy, feats, position, cfg: coord_augment.CoordAugment, cell: int = 224):
  """Coordinate augmentation + quantisation of one view per slide, on device.

  Args:
    key: PRNG key of this step and view (0 or 1).
    xy: int32 [b, T, 2] level-0 positions.
    feats: [b, T, F] tile embeddings.
    position: int32 [b] place of each slide in the global batch; each view's
      augmentation key is fold_in(key, position), so it does not depend on the
      device that computes it.
    cfg: which coordinate augmentations are on.
    cell: level-0 pixels per grid cell.

  Returns:
    SparseMap with capacity T, features float32 [b, T, F].
  """
  valid = jnp.ones(xy.shape[:2], bool)
  keys = jax.vmap(lambda p: jax.random.fold_in(key, p))(position)
  aug = jax.vmap(lambda k, p, m: coord_augment.augment_view(k, p, m, cfg))(keys, xy, valid)
  grid = maps.quantize(aug, valid, cell)
  return maps.from_grid(grid, feats.astype(jnp.float32), valid)
