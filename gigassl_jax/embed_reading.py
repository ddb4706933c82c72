"""The host half of embed: the tiles of the slides, each distinct tile of a slide read once.

A slide's Naug x Nt draws repeat tiles: with a grid of G tissue tiles the default
50 x 256 = 12,800 draws hit at most min(G, 12,800) distinct ones. `SlideStream`
cuts a slide's batches into consecutive chunks whose distinct tiles fit half the
read budget (`--read_cache_mb`; one chunk = the whole slide unless the slide has
more distinct tiles than that), reads each distinct tile of a chunk once on a
shared thread pool (OpenSlide releases the GIL), in the order the batches first
need them, so batch k is ready as soon as its own tiles are in. A producer thread
prepares the next slide (level, mask, grid, draws: the caller's `prepare`) and
submits its reads while the device encodes this one. A chunk's reads start only
when its tiles fit in the budget beside those held (the chunk being encoded and
the ones read ahead; half the budget each, so the next chunk is always read while
one is encoded), or when nothing is held (a single batch larger than the budget);
at most two slides are prepared at once (this one and the next).

The tiles handed out are the very arrays a per-batch read gives, in the same
order, so the bank does not depend on the budget, the threads or the chunking.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import queue
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from gigassl_jax import slides as slides_lib

# Slides prepared and not yet finished by the consumer: this one + the next.
SLIDES_AHEAD = 2


@dataclasses.dataclass
class Prepared:
  """A slide ready to be read.

  Attributes:
    slide: the open slide (closed by `SlideStream.finish`).
    plan: how its tiles are read.
    grid: int32 [G, 2] level-0 (x, y) of its tissue tiles.
    idx: int64 [Naug, Nt] the draws, indices into `grid`.
    info: whatever the caller's `prepare` attaches (kept as is).
  """

  slide: Any
  plan: slides_lib.ReadPlan
  grid: np.ndarray
  idx: np.ndarray
  info: dict = dataclasses.field(default_factory=dict)


def chunk_batches(idx: np.ndarray, max_tiles: int) -> list[tuple[int, int]]:
  """Cuts batches into consecutive ranges [k0, k1) of at most `max_tiles` distinct tiles.

  Args:
    idx: int [Naug, Nt] draws.
    max_tiles: distinct tiles a range may hold; a single batch with more is a range alone.

  Returns:
    The ranges, covering 0..Naug in order.
  """
  chunks, start, seen = [], 0, set()
  for k in range(len(idx)):
    batch = set(idx[k].tolist())
    if k > start and len(seen) + len(batch - seen) > max_tiles:
      chunks.append((start, k))
      start, seen = k, batch
    else:
      seen |= batch
  chunks.append((start, len(idx)))
  return chunks


def distinct_in_order(draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The distinct values of `draws` in order of first appearance.

  Args:
    draws: int [N].

  Returns:
    (uniq [U], inv int64 [N]) with uniq[inv] == draws.
  """
  u, first, inv = np.unique(draws, return_index=True, return_inverse=True)
  order = np.argsort(first, kind="stable")
  rank = np.empty_like(order)
  rank[order] = np.arange(len(order))
  return u[order], rank[inv.reshape(-1)]


class Chunk:
  """Batches k0..k1-1 of a slide, whose distinct tiles are being read (one future each)."""

  def __init__(self, k0: int, k1: int, futures: list, inv: np.ndarray, nbytes: int):
    self.k0, self.k1 = k0, k1
    self.futures = futures
    self.inv = inv  # int64 [k1 - k0, Nt]: rows of `futures` per draw
    self.nbytes = nbytes

  def tiles(self, k: int) -> np.ndarray:
    """Batch k's tiles, uint8 [Nt, T, T, 3], waiting for its reads only (raises SlideError)."""
    return np.stack([self.futures[j].result() for j in self.inv[k - self.k0]])

  def drop(self):
    """Cancels the reads not started, waits for the running ones, frees the tiles."""
    for f in self.futures:
      f.cancel()
    concurrent.futures.wait(self.futures)
    self.futures = []


class SlideItem:
  """One slide of the stream: `prepared` (or the `error` its preparation raised) and chunks."""

  def __init__(self, path):
    self.path = path
    self.prepared: Prepared | None = None
    self.error: BaseException | None = None
    self.traceback = ""
    self.t0 = time.time()  # when its preparation began
    self._chunks: queue.Queue = queue.Queue()
    self._current: Chunk | None = None
    self._abandoned = False
    self._ended = False


class SlideStream:
  """Prepares slides and reads their tiles ahead of the consumer; see the module docstring.

  Usage:
    with SlideStream(paths, prepare, tile_bytes, budget_bytes, threads) as stream:
      for item in stream:  # in the order of `paths`
        try:
          for chunk in stream.chunks(item):
            for k in range(chunk.k0, chunk.k1):
              tiles = chunk.tiles(k)
        finally:
          stream.finish(item)  # closes the slide, frees its tiles, lets the next one in
  """

  def __init__(
    self,
    paths: Sequence,
    prepare: Callable[[Any], Prepared],
    tile_bytes: int,
    budget_bytes: int,
    threads: int | None = None,
  ):
    self.threads = threads or slides_lib.default_read_threads()
    self.max_tiles = max(1, budget_bytes // 2 // tile_bytes)
    self.budget_bytes = budget_bytes
    self._paths = list(paths)
    self._prepare = prepare
    self._tile_bytes = tile_bytes
    self._pool = concurrent.futures.ThreadPoolExecutor(self.threads, "tile-read")
    self._cv = threading.Condition()
    self._used = 0  # bytes of the chunks submitted and not dropped
    self._ahead = 0  # slides prepared (or being prepared) and not finished
    self._stop = False
    self._items: queue.Queue = queue.Queue()
    self._fatal: BaseException | None = None
    self.peak_bytes = 0  # most bytes of tiles held at once (for tests and benchmarks)
    self.reads = 0  # tiles submitted for reading
    self._thread = threading.Thread(target=self._produce, name="slide-prepare", daemon=True)
    self._thread.start()

  # -- producer (its own thread)

  def _wait(self, ready: Callable[[], bool]) -> bool:
    """Waits under the lock until ready() or stop; False on stop."""
    with self._cv:
      self._cv.wait_for(lambda: self._stop or ready())
      return not self._stop

  def _produce(self):
    try:
      for path in self._paths:
        if not self._wait(lambda: self._ahead < SLIDES_AHEAD):
          return
        with self._cv:
          self._ahead += 1
        item = SlideItem(path)
        try:
          item.prepared = self._prepare(path)
        except Exception as e:  # noqa: BLE001 - the consumer records it as the slide's failure
          item.error, item.traceback = e, traceback.format_exc()
        self._items.put(item)
        if item.prepared is not None:
          self._submit_reads(item)
        item._chunks.put(None)  # pylint: disable=protected-access
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
      self._fatal = e
    finally:
      self._items.put(None)

  def _submit_reads(self, item: SlideItem):
    prep = item.prepared
    reader = slides_lib.TileReader(prep.slide, prep.plan, self.threads, pool=self._pool)
    for k0, k1 in chunk_batches(prep.idx, self.max_tiles):
      uniq, inv = distinct_in_order(prep.idx[k0:k1].ravel())
      nbytes = len(uniq) * self._tile_bytes
      # Room for it, or nothing held (a batch larger than the budget still goes, alone).
      ok = self._wait(
        lambda n=nbytes: item._abandoned or self._used == 0 or self._used + n <= self.budget_bytes
      )
      with self._cv:
        if not ok or item._abandoned:
          return
        self._used += nbytes
        self.peak_bytes = max(self.peak_bytes, self._used)
        self.reads += len(uniq)
      futures = [self._pool.submit(reader.read_one, xy) for xy in prep.grid[uniq]]
      item._chunks.put(Chunk(k0, k1, futures, inv.reshape(k1 - k0, -1), nbytes))

  # -- consumer (the caller's thread)

  def __iter__(self) -> Iterator[SlideItem]:
    while True:
      item = self._items.get()
      if item is None:
        if self._fatal is not None:
          raise self._fatal
        return
      yield item

  def _drop(self, chunk: Chunk):
    chunk.drop()
    with self._cv:
      self._used -= chunk.nbytes
      self._cv.notify_all()

  def chunks(self, item: SlideItem) -> Iterator[Chunk]:
    """The item's chunks in order; each is dropped when the next is asked for."""
    while True:
      if item._current is not None:
        self._drop(item._current)
        item._current = None
      chunk = item._chunks.get()
      if chunk is None:
        item._ended = True
        return
      item._current = chunk
      yield chunk

  def finish(self, item: SlideItem):
    """Done with the item (embedded or failed): its reads stop, its slide closes."""
    with self._cv:
      item._abandoned = True
      self._cv.notify_all()
    if item._current is not None:
      self._drop(item._current)
      item._current = None
    while not item._ended:  # the chunks already submitted: cancelled and waited for
      chunk = item._chunks.get()
      if chunk is None:
        item._ended = True
      else:
        self._drop(chunk)
    if item.prepared is not None:
      item.prepared.slide.close()  # no read of it is running now
    with self._cv:
      self._ahead -= 1
      self._cv.notify_all()

  def close(self, wait: bool = True):
    """Stops the producer; waits for it and the reads unless `wait` is False (an interrupt)."""
    with self._cv:
      self._stop = True
      self._cv.notify_all()
    if wait:
      self._thread.join()
    self._pool.shutdown(wait=wait, cancel_futures=True)

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *_):
    self.close(wait=exc_type is None)
