"""Host-side view sampling (docs/method.md section 3): numpy only, besides Grain's workers.

Every random draw is a pure function of (seed, step, position in the global
batch): which slides a step holds (an epoch-wise shuffle of the bank), and per
slide and view an augmentation index k and T tile indices drawn with
replacement. `read_views` turns the draws into tile embeddings and positions;
`ThreadReader` runs it in threads of this process, and `GrainReader` in Grain
worker processes (one step's batch per element, shared memory back), each with
its own bank reader. Grain imports JAX, so it is imported only when workers
are asked for.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import pathlib

import numpy as np

from gigassl_jax import bank as bank_lib

# Streams of the sampling seed, so the draws of different purposes never overlap.
SHUFFLE, VIEWS = 1, 2


def slide_order(seed: int, epoch: int, n_slides: int) -> np.ndarray:
  """int64 [n_slides]: the shuffled slide order of an epoch."""
  return np.random.default_rng([seed, SHUFFLE, epoch]).permutation(n_slides)


def step_slides(seed: int, step: int, batch_size: int, n_slides: int) -> np.ndarray:
  """int64 [batch_size]: slide indices of the global batch of `step`.

  Epoch e holds steps [e * spe, (e + 1) * spe) with spe = n_slides // batch_size
  (the last partial batch of an epoch is dropped: static shapes under jit).
  """
  epoch, i = divmod(step, n_slides // batch_size)
  return slide_order(seed, epoch, n_slides)[i * batch_size : (i + 1) * batch_size]


def draws(seed: int, step: int, position: int, n_aug: int, n_tiles: int, tiles: int):
  """(aug int64 [2], tile indices int64 [2, tiles]) of the slide at `position` of `step`."""
  rng = np.random.default_rng([seed, VIEWS, step, position])
  aug = rng.integers(0, n_aug, size=2)
  idx = rng.integers(0, n_tiles, size=(2, tiles))
  return aug, idx


def read_views(reader, seed: int, step: int, positions, slides, tiles: int):
  """Both views of each (position, slide): feats float16 [b, 2, T, F], xy int32 [b, 2, T, 2]."""
  b = len(positions)
  feats = np.empty((b, 2, tiles, reader.feature_dim), np.float16)
  xy = np.empty((b, 2, tiles, 2), np.int32)
  for i, (p, s) in enumerate(zip(positions, slides)):
    aug, idx = draws(seed, step, int(p), reader.n_aug, reader.n_tiles, tiles)
    for v in range(2):
      f, c = reader.get(int(s), int(aug[v]))
      feats[i, v] = f[idx[v]]
      xy[i, v] = c[idx[v]]
  return feats, xy


def local_batch(read, seed: int, step: int, batch_size: int, n_slides: int, start: int, size: int):
  """The share [start, start + size) of the global batch of `step`.

  Args:
    read: read(seed, step, positions, slides) -> (feats, xy): `read_views`
      or `ThreadReader.read` with the bank reader and the tiles T bound.

  Returns:
    dict with feats float16 [b, 2, T, F], xy int32 [b, 2, T, 2] (level-0
    positions), position int32 [b] (place in the global batch, which keys the
    on-device augmentation), slide int32 [b].
  """
  slides = step_slides(seed, step, batch_size, n_slides)
  pos = np.arange(start, start + size)
  feats, xy = read(seed, step, pos, slides[pos])
  return {
    "feats": feats,
    "xy": xy,
    "position": pos.astype(np.int32),
    "slide": slides[pos].astype(np.int32),
  }


class StepBatch:
  """step -> `local_batch` of that step, with a bank reader opened on first use.

  Pickled into each Grain worker process, which opens its own reader (a
  reader holds open files, so it is never pickled).
  """

  def __init__(self, packed_dir, *, seed, batch_size, n_slides, tiles, start, size):
    self.packed_dir = str(packed_dir)
    self.args = {
      "seed": seed,
      "batch_size": batch_size,
      "n_slides": n_slides,
      "start": start,
      "size": size,
    }
    self.tiles = tiles
    self._reader = None

  def __getstate__(self):
    return dict(self.__dict__, _reader=None)

  def __call__(self, step) -> dict:
    if self._reader is None:
      self._reader = bank_lib.BankReader(pathlib.Path(self.packed_dir))

    def read(seed, step, positions, slides):
      return read_views(self._reader, seed, step, positions, slides, self.tiles)

    return local_batch(read, step=int(step), **self.args)


# How far a Grain iterator's steps run: past any training run (it is stopped
# by close(), and reads at most workers x (buffer + 1) steps beyond the last
# one asked for).
_NO_END = 2**62


class GrainReader:
  """`StepBatch` in Grain worker processes: one step's whole batch per element.

  A MapDataset over the steps [start, ...) maps each step to its batch;
  `mp_prefetch` gives worker i the steps start + i, start + i + workers, ...
  and interleaves their outputs back in step order, the arrays coming back
  through shared memory. Each batch is a pure function of (seed, step,
  positions), so the workers change only the speed: the batches are bitwise
  those of `read_views`, and the pipeline's whole state is the next step, so a
  resumed run restarts the dataset at its step and is exact.

  Decoding a record is Python work under the GIL (TFDS's example parsing is
  about two thirds of a ~130 us read on the dev CPU), so reading threads do not
  scale with cores; processes do. Grain spawns its workers (forking the
  training process, whose JAX runtime already runs threads, is unsafe).
  """

  def __init__(self, step_batch: StepBatch, workers: int, buffer: int = 1):
    if workers < 1:
      raise ValueError(f"Grain reading needs >= 1 worker process, got {workers}")
    self.workers, self.buffer = workers, buffer
    self._make = step_batch
    self._it, self._next = None, None

  def _open(self, start: int):
    import grain  # pylint: disable=g-import-not-at-top  (imports jax: only when used)

    _grain_flags_at_defaults()
    self.close()
    ds = grain.MapDataset.range(start, _NO_END).map(self._make)
    # No reading threads inside a worker: the processes are the parallelism
    # (threads would contend for the worker's GIL), and a 1-step read-ahead.
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=1))
    opts = grain.MultiprocessingOptions(
      num_workers=self.workers, per_worker_buffer_size=self.buffer
    )
    self._it, self._next = iter(ds.mp_prefetch(opts)), start

  def batch(self, step: int) -> dict:
    """`local_batch` of `step`; consecutive steps stream, any other restarts the workers."""
    if step != self._next:
      self._open(step)
    try:
      out = next(self._it)
    except Exception as e:
      if "terminated unexpectedly" in str(e):  # Grain's words for a worker that died
        raise RuntimeError(
          "a bank-reading worker process died: out of memory, or a script that starts "
          "workers outside `if __name__ == '__main__':` (spawned workers import the main "
          "module). Rerun with fewer --data_workers, or 0 for reading threads"
        ) from e
      raise
    self._next = step + 1
    # Copies out of shared memory (a memcpy of one batch, small next to the
    # reads), so the block is freed now and not when the caller drops the
    # arrays, possibly at interpreter exit, after Grain's cleanup ran.
    return {k: np.array(v) for k, v in out.items()}

  def close(self):
    if self._it is not None:
      self._it.close()
    self._it, self._next = None, None


def _grain_flags_at_defaults():
  """Makes Grain's profiling flag readable (at its default) when no flags were parsed.

  A library caller (train.run from Python, the tests) never parses flags, and
  Grain 0.2.18 reads --grain_enable_multiprocess_worker_profiling without its
  fallback to the default, raising UnparsedFlagAccessError. Parsing the flag's
  own default is what an empty command line would have given it.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top

  name = "grain_enable_multiprocess_worker_profiling"
  if not flags.FLAGS.is_parsed() and name in flags.FLAGS and not flags.FLAGS[name].present:
    flags.FLAGS[name].parse(flags.FLAGS[name].default)


class ThreadReader:
  """`read_views` split over threads of this process, sharing one bank reader.

  Enough on a small CPU, where worker processes would compete with XLA; record
  decoding holds the GIL, so more threads do not mean proportionally more speed.
  """

  def __init__(self, reader, threads: int):
    self.threads = max(1, threads)
    self._reader = reader
    self._pool = concurrent.futures.ThreadPoolExecutor(self.threads)

  def read(self, seed: int, step: int, positions, slides, tiles: int):
    """Same result as read_views(reader, seed, step, positions, slides, tiles)."""
    return _split_read(
      self._pool,
      functools.partial(read_views, self._reader),
      self.threads,
      seed,
      step,
      positions,
      slides,
      tiles,
    )

  def close(self):
    self._pool.shutdown(wait=False)


def _split_read(pool, read, parts, seed, step, positions, slides, tiles):
  """read(seed, step, positions, slides, tiles) on `parts` chunks in `pool`, joined in order."""
  positions, slides = np.asarray(positions), np.asarray(slides)
  chunks = [c for c in np.array_split(np.arange(len(positions)), parts) if len(c)]
  futures = [pool.submit(read, seed, step, positions[c], slides[c], tiles) for c in chunks]
  out = [f.result() for f in futures]
  return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])


def auto_workers(requested: int = -1) -> int:
  """Reading processes for --data_workers (-1 = auto).

  Auto: cores - 2 (the training loop and the prefetch thread keep two), at most
  32, on machines with >= 8 cores; 0 (threads) on small CPUs, where worker
  processes would only compete with XLA for the same cores.
  """
  if requested >= 0:
    return requested
  n = os.cpu_count() or 1
  return min(32, n - 2) if n >= 8 else 0
