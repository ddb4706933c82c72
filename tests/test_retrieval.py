"""View-retrieval metrics: exact on constructed cases, chance on random views, devices = one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from gigassl_jax import retrieval


def _mesh(n):
  return jax.sharding.Mesh(np.array(jax.devices()[:n]), ("data",))


def _numpy_top1(z1, z2):
  """Independent reference: loop over the 2B anchors, cosine, self excluded."""
  z = np.concatenate([z1, z2]).astype(np.float64)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  b = len(z1)
  hits = 0
  for i in range(2 * b):
    s = z @ z[i]
    s[i] = -np.inf
    hits += int(np.argmax(s) == (i + b) % (2 * b))
  return hits / (2 * b)


@pytest.mark.parametrize("seed", [0, 1])
def test_identical_views_are_perfect(seed):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(16, 32)).astype(np.float32)
  # Each anchor's twin has cosine 1, every other view < 1 (random directions).
  got = float(retrieval.batch_retrieval_top1(z, z))
  assert got == 1.0, f"seed {seed}: {got}"
  assert retrieval.pair_retrieval_top1(z, z) == 1.0, f"seed {seed}"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_loop_reference_on_noisy_views(seed):
  rng = np.random.default_rng(seed)
  base = rng.normal(size=(12, 16))
  # Noise of the same size as the signal: some anchors hit, some miss.
  z1 = (base + rng.normal(size=base.shape)).astype(np.float32)
  z2 = (base + rng.normal(size=base.shape)).astype(np.float32)
  want = _numpy_top1(z1, z2)
  assert 0 < want < 1, f"seed {seed}: constructed case not mixed ({want})"
  got = float(retrieval.batch_retrieval_top1(z1, z2))
  # A count of hits over 24 anchors, averaged in float32: equal counts differ by
  # ~1e-7, different counts by >= 1/24, so compare the counts.
  assert round(got * 24) == round(want * 24), f"seed {seed}: {got} != {want}"


def test_random_views_are_at_chance():
  # B = 32: chance p = 1/63 per anchor. 40 independent batches x 64 anchors =
  # 2560 anchors. The two anchors of a slide are correlated (both hit when the
  # pair happens to be close), so the variance is at most that of 1280
  # independent pairs of perfectly correlated trials: var(hits) <= 2 n p (1-p)
  # with n = 2560; a 5-sigma bound on the total fails by chance < 1e-6.
  b, trials, p = 32, 40, retrieval.batch_chance(32)
  assert p == 1 / 63
  rng = np.random.default_rng(1234)
  hits = 0.0
  for _ in range(trials):
    z1, z2 = rng.normal(size=(2, b, 64)).astype(np.float32)
    hits += float(retrieval.batch_retrieval_top1(z1, z2)) * 2 * b
  n = trials * 2 * b
  bound = 5 * np.sqrt(2 * n * p * (1 - p))
  assert abs(hits - n * p) < bound, f"seed 1234: {hits} hits, expected {n * p:.1f} +- {bound:.1f}"


def test_pair_retrieval_random_is_at_chance():
  # N = 50 slides, chance 1/50 per direction; 40 trials x 2 directions x 50
  # queries = 4000 queries; same correlation argument as above (the two
  # directions of a slide), 5-sigma bound.
  n_slides, trials = 50, 40
  rng = np.random.default_rng(99)
  hits = 0.0
  for _ in range(trials):
    a, b = rng.normal(size=(2, n_slides, 32))
    hits += retrieval.pair_retrieval_top1(a, b) * 2 * n_slides
  n, p = trials * 2 * n_slides, 1 / n_slides
  bound = 5 * np.sqrt(2 * n * p * (1 - p))
  assert abs(hits - n * p) < bound, f"seed 99: {hits} hits, expected {n * p:.1f} +- {bound:.1f}"


def test_pair_retrieval_centring_removes_a_shared_offset():
  rng = np.random.default_rng(5)
  ident = rng.normal(size=(20, 16))
  # A shared offset 100x the identity signal makes every uncentred cosine ~1;
  # per-file offsets too (as augmentation files shift all slides alike).
  off = 100 * rng.normal(size=16)
  a = ident + off + 0.5 * rng.normal(size=16)
  b = ident + off + 0.5 * rng.normal(size=16)
  assert retrieval.pair_retrieval_top1(a, b, centre=True) == 1.0, "seed 5"


@pytest.mark.parametrize("n_dev", [2, 8])
def test_global_candidates_over_devices_equal_single_device(n_dev):
  rng = np.random.default_rng(7 + n_dev)
  base = rng.normal(size=(16, 8))
  z1 = (base + rng.normal(size=base.shape)).astype(np.float32)
  z2 = (base + rng.normal(size=base.shape)).astype(np.float32)

  def body(a, b):
    return jax.lax.pmean(retrieval.batch_retrieval_top1(a, b, axis_name="data"), "data")

  f = jax.shard_map(
    body, mesh=_mesh(n_dev), in_specs=(P("data"), P("data")), out_specs=P(), check_vma=False
  )
  got, want = float(jax.jit(f)(z1, z2)), _numpy_top1(z1, z2)
  # Hits over 32 anchors: compare counts (float32 rounding is ~1e-7, counts differ by 1/32).
  assert round(got * 32) == round(want * 32), f"seed {7 + n_dev}: {got} != {want}"


def test_split_pairs_disjoint_and_from_their_files():
  rng = np.random.default_rng(3)
  coords = rng.integers(0, 6, size=(4, 24, 2)) * 224
  ia, ib = retrieval.split_pairs(coords, 0, 2, seed=11)
  pa = {tuple(p) for p in coords[0][ia]}
  pb = {tuple(p) for p in coords[2][ib]}
  assert pa and pb and not pa & pb, "seed 3: tile sets overlap or are empty"
  # Every tile of the two files lands in exactly one set.
  assert len(ia) + len(ib) == sum(tuple(p) in pa for p in coords[0]) + sum(
    tuple(p) in pb for p in coords[2]
  )
  with pytest.raises(ValueError, match="two different"):
    retrieval.split_pairs(coords, 1, 1)


def test_ensemble_mean_of_tiles_is_the_tile_mean():
  rng = np.random.default_rng(4)
  feats = rng.normal(size=(10, 6))
  xy = np.zeros((10, 2), int)
  # 10 tiles, T = 5: two full chunks, the mean of chunk means = the mean.
  got = retrieval.ensemble(feats, xy, retrieval.mean_of_tiles, 5)
  np.testing.assert_allclose(got, feats.mean(0), rtol=1e-12, err_msg="seed 4")


def test_batch_chance_rejects_one_slide():
  with pytest.raises(ValueError, match="at least 2"):
    retrieval.batch_chance(1)
  with pytest.raises(ValueError, match="must both be"):
    retrieval.batch_retrieval_top1(jnp.ones((4, 8)), jnp.ones((5, 8)))
