"""Host-side view sampling (docs/method.md section 3), free of JAX so worker processes stay light.

Every random draw is a pure function of (seed, step, position in the global
batch): which slides a step holds (an epoch-wise shuffle of the bank), and per
slide and view an augmentation index k and T tile indices drawn with
replacement. `read_views` turns the draws into tile embeddings and positions;
`ReaderPool` runs it in worker processes, each with its own bank reader, and
`ThreadReader` in threads of this process.
"""

from __future__ import annotations

import concurrent.futures
import functools
import multiprocessing
import os
import pathlib

import numpy as np

from gigassl_jax import bank as bank_lib

# Streams of the sampling seed, so the draws of different purposes never overlap.
SHUFFLE, VIEWS = 1, 2


def slide_order(seed: int, epoch: int, n_slides: int) -> np.ndarray:
  """int64 [n_slides]: the shuffled slide order of an epoch."""
  return np.random.default_rng([seed, SHUFFLE, epoch]).permutation(n_slides)


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


_WORKER_READER = None


def _worker_open(packed_dir: str) -> None:
  global _WORKER_READER
  _WORKER_READER = bank_lib.BankReader(pathlib.Path(packed_dir))


def _worker_read(seed, step, positions, slides, tiles):
  return read_views(_WORKER_READER, seed, step, positions, slides, tiles)


class ReaderPool:
  """`read_views` split over worker processes, each with its own bank reader.

  Decoding a record is Python work under the GIL (TFDS's example parsing is
  about two thirds of a ~130 us read on the dev CPU), so reading threads do not
  scale with cores; processes do. Workers come from a fork server (or are
  spawned): forking the training process, whose JAX runtime already runs
  threads, is unsafe. Each opens the bank once and draws its own views, so the
  training process only splits the batch and joins the parts.
  """

  def __init__(self, packed_dir: str | os.PathLike, workers: int):
    if workers < 1:
      raise ValueError(f"a reader pool needs >= 1 worker, got {workers}")
    self.workers = workers
    methods = multiprocessing.get_all_start_methods()
    self._pool = concurrent.futures.ProcessPoolExecutor(
      workers,
      mp_context=multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn"),
      initializer=_worker_open,
      initargs=(str(packed_dir),),
    )

  def read(self, seed: int, step: int, positions, slides, tiles: int):
    """Same result as read_views(reader, seed, step, positions, slides, tiles)."""
    try:
      return _split_read(
        self._pool, _worker_read, self.workers, seed, step, positions, slides, tiles
      )
    except concurrent.futures.process.BrokenProcessPool as e:
      raise RuntimeError(
        "a bank-reading worker process died: out of memory, or a script that starts "
        "workers outside `if __name__ == '__main__':` (spawned workers import the main "
        "module). Rerun with fewer --data_workers, or 0 for reading threads"
      ) from e

  def close(self):
    # Waits for the workers to exit: one still starting would otherwise open
    # the bank after the caller may have removed it.
    self._pool.shutdown(wait=True, cancel_futures=True)


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
