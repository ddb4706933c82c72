"""Embed's reading (gigassl_jax/embed_reading.py): each distinct tile of a slide read once,
within the memory budget, and a bank bitwise equal to reading and encoding batch by batch.

Random-init resnet18 at 64 x 64 tiles keeps the encoder cheap; what is tested is which
tiles reach the device, in which order, with which keys.
"""

import collections
import pathlib
import shutil
import threading

import numpy as np
import pytest

from gigassl_jax import bank, embed, embed_device, embed_reading, encoders, slides, synthetic

TILE = 64
TILE_BYTES = TILE * TILE * 3
FLAGS = dict(n_aug=5, n_tiles=16, encoder="resnet18", tile_size=TILE, progress=False)
FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunks_cover_the_batches_within_the_budget(seed):
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, rng.integers(5, 200), size=(rng.integers(1, 30), rng.integers(1, 40)))
  max_tiles = int(rng.integers(1, 80))
  chunks = embed_reading.chunk_batches(idx, max_tiles)
  assert chunks[0][0] == 0 and chunks[-1][1] == len(idx), f"seed {seed}: {chunks}"
  for (a0, a1), (b0, _) in zip(chunks, chunks[1:]):
    assert a1 == b0 and a0 < a1, f"seed {seed}: {chunks}"
  for k0, k1 in chunks:
    n = len(np.unique(idx[k0:k1]))
    # Within the budget unless one batch alone is larger; and greedy: one more batch
    # would not fit.
    assert n <= max_tiles or k1 - k0 == 1, f"seed {seed}: chunk {k0, k1} holds {n}"
    if k1 < len(idx):
      assert len(np.unique(idx[k0 : k1 + 1])) > max_tiles, f"seed {seed}: {k0, k1} not greedy"


@pytest.mark.parametrize("seed", [0, 1])
def test_distinct_in_order(seed):
  draws = np.random.default_rng(seed).integers(0, 50, 300)
  uniq, inv = embed_reading.distinct_in_order(draws)
  np.testing.assert_array_equal(uniq[inv], draws, err_msg=f"seed {seed}")
  assert len(set(uniq.tolist())) == len(uniq) == len(np.unique(draws)), f"seed {seed}"
  firsts = [int(np.flatnonzero(draws == u)[0]) for u in uniq]
  assert firsts == sorted(firsts), f"seed {seed}: not in order of first appearance"


@pytest.fixture(scope="module")
def slide_dir(tmp_path_factory):
  """Slides of several grid sizes (some with fewer tissue tiles than draws, so draws repeat)."""
  d = tmp_path_factory.mktemp("slides")
  synthetic.write_slide(d / "a.svs", 2000, 1600, mpp=0.5, seed=1)
  synthetic.write_slide(d / "b.tif", 1600, 1400, vendor="generic", mpp=0.5, seed=2, n_levels=2)
  synthetic.write_slide(d / "c.svs", 3000, 2400, mpp=0.25, seed=3)
  shutil.copy(FIXTURES / "cmu_small_region.svs", d / "cmu.svs")
  return d


class _CountingReads:
  """Wraps TileReader.read_one: records (slide file, x, y) of every read; can fail one tile."""

  def __init__(self, monkeypatch, fail_at=None):
    self.reads = collections.Counter()
    self.lock = threading.Lock()
    self.fail_at = fail_at  # (file name, nth read of that file) that raises SlideError
    self.per_file = collections.Counter()
    orig = slides.TileReader.read_one

    def read_one(reader, xy):
      name = pathlib.Path(str(reader.slide._filename)).name
      with self.lock:
        self.reads[(name, int(xy[0]), int(xy[1]))] += 1
        self.per_file[name] += 1
        nth = self.per_file[name]
      if self.fail_at == (name, nth):
        raise slides.SlideError(f"{name}: planted read failure")
      return orig(reader, xy)

    monkeypatch.setattr(slides.TileReader, "read_one", read_one)


class _Streams:
  """Records the SlideStreams embed.run makes (to read their peak memory)."""

  def __init__(self, monkeypatch):
    self.made = []
    orig = embed_reading.SlideStream
    made = self.made

    class Recorded(orig):
      def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        made.append(self)

    monkeypatch.setattr(embed_reading, "SlideStream", Recorded)


def _per_batch_reference(path, cfg):
  """The bank of one slide made the plain way: every batch's 16 tiles read one by one
  (no deduplication at all), then augmented and encoded with the batch's key."""
  prep = embed.prepare_slide(path, cfg)
  try:
    enc = encoders.get_encoder(cfg.encoder, seed=cfg.seed)
    device = embed_device.TileEncoderDevice(
            enc, encode_batch=cfg.encode_batch, n_tiles=cfg.n_tiles, tile_size=cfg.tile_size,
            seed=cfg.seed,
        )  # fmt: skip
    sid = prep.info["sid"]
    with slides.TileReader(prep.slide, prep.plan, threads=2) as reader:
      emb = np.stack([
                np.asarray(device.embed(reader.read(prep.grid[prep.idx[k]]), sid, k))
                for k in range(cfg.n_aug)
            ])  # fmt: skip
    return emb, prep.grid[prep.idx], prep.idx, prep.grid
  finally:
    prep.slide.close()


@pytest.fixture(scope="module")
def reference(slide_dir, tmp_path_factory):
  cfg = embed.EmbedConfig(
    slides=str(slide_dir), bank=str(tmp_path_factory.mktemp("ref")), seed=11, **FLAGS
  )
  return {p.stem: _per_batch_reference(p, cfg) for p in sorted(slide_dir.iterdir()) if p.is_file()}


def _assert_slide_equals_reference(out, sid, ref, seed):
  emb, coords, _, _ = ref
  with np.load(bank.slide_path(out, sid)) as z:
    # Bitwise: the same tiles, in the same order, with the same keys, on the same device.
    np.testing.assert_array_equal(z["embeddings"], emb, err_msg=f"seed {seed}, slide {sid}")
    np.testing.assert_array_equal(z["coords"], coords, err_msg=f"seed {seed}, slide {sid}")


# Budgets: the default (each slide's distinct tiles at once), a few batches a chunk,
# and less than one batch (every chunk alone, one batch each).
@pytest.mark.parametrize("read_cache_mb", [2048, 60 * TILE_BYTES / 2**20, 0.01])
def test_bank_bitwise_equal_to_per_batch_reads(
  slide_dir, reference, tmp_path, monkeypatch, read_cache_mb
):
  seed = 11
  counting, streams = _CountingReads(monkeypatch), _Streams(monkeypatch)
  out = tmp_path / "bank"
  cfg = embed.EmbedConfig(
    slides=str(slide_dir), bank=str(out), seed=seed, read_cache_mb=read_cache_mb,
    read_threads=3, **FLAGS,
  )  # fmt: skip
  res = embed.run(cfg)
  assert sorted(res["done"]) == sorted(reference) and not res["failed"], f"seed {seed}: {res}"
  for sid, ref in reference.items():
    _assert_slide_equals_reference(out, sid, ref, seed)
  (stream,) = streams.made
  budget = read_cache_mb * 2**20
  one_batch = FLAGS["n_tiles"] * TILE_BYTES
  if budget >= one_batch:
    assert stream.peak_bytes <= budget, f"seed {seed}: {stream.peak_bytes} > {budget}"
  else:  # a chunk is one batch's distinct tiles, held alone
    assert stream.peak_bytes <= one_batch, f"seed {seed}: {stream.peak_bytes}"
  names = {p.stem: p.name for p in slide_dir.iterdir()}
  n_draws = FLAGS["n_aug"] * FLAGS["n_tiles"]
  for sid, (_, coords, idx, grid) in reference.items():
    got = {(x, y): n for (name, x, y), n in counting.reads.items() if name == names[sid]}
    want = {tuple(map(int, c)) for c in coords.reshape(-1, 2)}
    assert set(got) == want, f"seed {seed}, slide {sid}: other tiles read than drawn"
    assert len(np.unique(idx)) < n_draws, f"seed {seed}, slide {sid}: no repeated draw"
    # A tile is read at most once per batch it is drawn in (what reading batch by batch
    # with per-batch deduplication costs).
    per_batch = collections.Counter(
      tuple(map(int, c)) for k in range(len(idx)) for c in grid[np.unique(idx[k])]
    )
    assert all(n <= per_batch[xy] for xy, n in got.items()), f"seed {seed}, slide {sid}"
    if read_cache_mb == 2048:
      # Each distinct tile once: the draws repeat, the reads do not.
      assert max(got.values()) == 1, f"seed {seed}, slide {sid}: {max(got.values())} reads"
    elif budget < one_batch:  # one batch a chunk: exactly the per-batch reads
      assert got == dict(per_batch), f"seed {seed}, slide {sid}"
    else:  # several batches a chunk: fewer reads than batch by batch
      assert sum(got.values()) < sum(per_batch.values()), f"seed {seed}, slide {sid}"
  assert stream.reads == sum(counting.reads.values()), f"seed {seed}"


@pytest.mark.parametrize("read_cache_mb", [2048, 0.01])
def test_a_read_failure_fails_its_slide_only(slide_dir, reference, tmp_path, monkeypatch,
                                             read_cache_mb):  # fmt: skip
  """A tile read failing in the middle of slide a (while the next slide is read ahead)
  fails a alone, cleanly; the other slides are still bitwise the per-batch bank."""
  seed = 11
  _CountingReads(monkeypatch, fail_at=("a.svs", 7))
  out = tmp_path / "bank"
  cfg = embed.EmbedConfig(
    slides=str(slide_dir), bank=str(out), seed=seed, read_cache_mb=read_cache_mb, **FLAGS
  )
  res = embed.run(cfg)
  assert set(res["failed"]) == {"a"}, f"seed {seed}: {res}"
  assert "planted read failure" in res["failed"]["a"], res["failed"]
  assert not bank.slide_path(out, "a").exists()
  for sid, ref in reference.items():
    if sid != "a":
      _assert_slide_equals_reference(out, sid, ref, seed)
  # The rerun embeds a (reads work again) to the same bytes.
  monkeypatch.undo()
  res2 = embed.run(cfg)
  assert res2["done"] == ["a"] and not res2["failed"], f"seed {seed}: {res2}"
  _assert_slide_equals_reference(out, "a", reference["a"], seed)


def test_budget_must_be_positive(slide_dir, tmp_path):
  cfg = embed.EmbedConfig(slides=str(slide_dir), bank=str(tmp_path / "b"), read_cache_mb=0)
  with pytest.raises(ValueError, match="--read_cache_mb=0"):
    embed.run(cfg)
  assert not (tmp_path / "b").exists()
