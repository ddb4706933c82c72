"""Encoding: ensemble draws, eval-mode pooling, all-tiles maps, baselines, the run contract."""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gigassl_jax import bank as bank_lib
from gigassl_jax import checkpoint
from gigassl_jax import encode
from gigassl_jax import models
from gigassl_jax.sparse import maps

N_SLIDES, N_AUG, N_TILES, DIM = 8, 3, 12, 16


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
  """A packed bank of random embeddings on random level-0 tile grids (pitch 224)."""
  d = tmp_path_factory.mktemp("bank")
  rng = np.random.default_rng(0)
  for s in range(N_SLIDES):
    cells = rng.choice(36, size=10, replace=False)  # 10 tissue tiles on a 6 x 6 grid
    grid = np.stack([cells % 6, cells // 6], -1) * 224 + rng.integers(0, 3, 2) * 224
    pick = rng.integers(0, 10, size=(N_AUG, N_TILES))  # with replacement, as embed
    emb = rng.normal(size=(N_AUG, N_TILES, DIM)) + rng.normal(size=DIM)
    bank_lib.write_slide(d, f"slide_{s}", emb, grid[pick], {"encoder": "test", "weights_id": "x"})
  bank_lib.pack(d)
  return d


@pytest.fixture(scope="module")
def pool():
  net = models.GigaSSL(DIM, rngs=nnx.Rngs(3)).pool
  # Non-trivial running statistics, so eval-mode BN is really exercised.
  rng = np.random.default_rng(1)
  for name in ("b0_norm1", "b0_norm2", "b0_normd", "b1_norm1", "b1_norm2"):
    bn = getattr(net, name)
    bn.mean.set_value(jnp.asarray(rng.normal(size=512) * 0.1, jnp.float32))
    bn.var.set_value(jnp.asarray(rng.uniform(0.5, 2.0, 512), jnp.float32))
  net.eval()
  return net


@pytest.mark.parametrize(
  "n_tiles,n_views,tiles", [(12, 100, 5), (12, 3, 5), (4, 10, 5), (20, 7, 3)]
)
def test_ensemble_draws_chunks_without_replacement(n_tiles, n_views, tiles):
  n_aug = 3
  aug, tile, valid = encode.ensemble_draws(n_aug, n_tiles, n_views, tiles, np.random.default_rng(9))
  per_aug = max(1, n_tiles // tiles)
  assert len(aug) == min(n_views, n_aug * per_aug)
  assert tile.shape == valid.shape == (len(aug), tiles)
  # Views cycle through the augmentations.
  np.testing.assert_array_equal(aug, np.arange(len(aug)) % n_aug)
  for k in range(n_aug):
    used = tile[aug == k][valid[aug == k]]
    # Within an augmentation no bank entry is used twice (without replacement).
    assert len(np.unique(used)) == len(used)
    assert used.min() >= 0 and used.max() < n_tiles
  assert valid.all() == (n_tiles >= tiles)


def _direct(pool, emb, coords, aug, tile, valid):
  """The mean of eval-mode pooled views, via build_views (a separate path from encode's)."""
  xy = coords[aug[:, None], tile]
  f = emb[aug[:, None], tile].astype(np.float32)
  reps = np.asarray(pool(maps.build_views(xy, f, valid)))
  m = reps.mean(0)
  return m / np.linalg.norm(m)


def test_ensemble_equals_direct_computation_and_ignores_batch(bank, pool):
  reader = bank_lib.open_bank(bank)
  a = encode.encode_ensemble(pool, reader, n_views=7, tiles=5, seed=4, batch_slides=3)
  b = encode.encode_ensemble(pool, reader, n_views=7, tiles=5, seed=4, batch_slides=1)
  # Eval-mode BN: a slide's vector does not depend on the other slides of its batch.
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
  for s in (5,):
    emb, coords = [np.stack(x) for x in zip(*(reader.get(s, k) for k in range(N_AUG)))]
    draws = encode.ensemble_draws(N_AUG, N_TILES, 7, 5, encode.slide_rng(4, reader.slide_ids[s]))
    np.testing.assert_allclose(a[s], _direct(pool, emb, coords, *draws), rtol=1e-4, atol=1e-5)
  c = encode.encode_ensemble(pool, reader, n_views=7, tiles=5, seed=5, batch_slides=3)
  assert not np.allclose(a, c)


def test_all_tiles_is_one_map_of_every_distinct_tile(bank, pool):
  reader = bank_lib.open_bank(bank)
  got = encode.encode_all_tiles(pool, reader)
  for s in (6,):
    emb, coords = [np.stack(x) for x in zip(*(reader.get(s, k) for k in range(N_AUG)))]
    # build_views averages the embeddings of tiles that land on one cell.
    smap = maps.build_views(coords.reshape(1, -1, 2), emb.reshape(1, -1, DIM).astype(np.float32))
    want = np.asarray(pool(smap))[0]
    np.testing.assert_allclose(got[s], want / np.linalg.norm(want), rtol=1e-4, atol=1e-5)


def test_mean_tiles(bank):
  reader = bank_lib.open_bank(bank)
  got = encode.mean_tiles(reader)
  for s in range(N_SLIDES):
    z = np.load(bank_lib.slide_path(bank, reader.slide_ids[s]))
    m = z["embeddings"].astype(np.float64).reshape(-1, DIM).mean(0)
    np.testing.assert_allclose(got[s], m / np.linalg.norm(m), rtol=1e-4, atol=1e-6)


def test_vectors_follow_slide_ids_not_bank_order(bank, pool, tmp_path):
  """A bank holding a subset of the slides gives the same vectors for the shared ids."""
  for sid in ("slide_2", "slide_7", "slide_4"):
    e, c, meta = bank_lib.read_slide(bank_lib.slide_path(bank, sid))
    bank_lib.write_slide(tmp_path, sid, e, c, meta)
  bank_lib.pack(tmp_path)
  full, part = bank_lib.open_bank(bank), bank_lib.open_bank(tmp_path)
  a = encode.encode_ensemble(pool, full, n_views=5, tiles=5, seed=1, batch_slides=2)
  b = encode.encode_ensemble(pool, part, n_views=5, tiles=5, seed=1, batch_slides=2)
  for i, sid in enumerate(part.slide_ids):
    np.testing.assert_allclose(b[i], a[full.slide_ids.index(sid)], rtol=1e-5, atol=1e-6)


def test_run_writes_npz_and_ids_csv_reproducibly(bank, tmp_path):
  ids, reps = encode.run(
    str(bank),
    str(tmp_path / "r.npz"),
    method="random_init",
    n_views=6,
    tiles=5,
    seed=2,
    show_progress=False,
  )
  z = np.load(tmp_path / "r.npz")
  assert list(z["ids"]) == ids == [f"slide_{i}" for i in range(N_SLIDES)]
  assert z["reps"].shape == (N_SLIDES, 512) and str(z["method"]) == "random_init"
  meta = json.loads(str(z["meta"]))
  assert meta["n_views"] == 6 and meta["tiles"] == 5 and meta["seed"] == 2
  lines = (tmp_path / "r_ids.csv").read_text().splitlines()
  assert lines[0] == "row,ID" and lines[3] == "2,slide_2"
  again = encode.run(
    str(bank),
    str(tmp_path / "s.npz"),
    method="random_init",
    n_views=6,
    tiles=5,
    seed=2,
    show_progress=False,
  )[1]
  np.testing.assert_array_equal(reps, again)
  mean = encode.run(str(bank), str(tmp_path / "m.npz"), method="mean_tiles", show_progress=False)[1]
  assert mean.shape == (N_SLIDES, DIM)


def test_run_rejects_bad_requests(bank, tmp_path):
  with pytest.raises(ValueError, match="needs --workdir"):
    encode.run(str(bank), str(tmp_path / "x.npz"), method="gigassl")
  with pytest.raises(ValueError, match="valid modes"):
    encode.run(str(bank), str(tmp_path / "x.npz"), method="random_init", mode="some")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    encode.run(str(tmp_path / "nothing"), str(tmp_path / "x.npz"), method="mean_tiles")


def test_gigassl_method_uses_the_restored_run(bank, pool, tmp_path, monkeypatch):
  """--method=gigassl encodes with checkpoint.restore_model's pooling net and the run's cell."""
  from gigassl_jax import config as config_lib

  cfg = config_lib.Config(
    workdir=str(tmp_path), data_bank=str(bank), model_in_features=DIM, data_cell=448
  )
  model = models.GigaSSL(DIM, rngs=nnx.Rngs(3))
  model.pool = pool
  seen = []

  def restore(workdir):
    seen.append(workdir)
    return model, cfg

  monkeypatch.setattr(checkpoint, "restore_model", restore)
  _, g = encode.run(
    str(bank), str(tmp_path / "g.npz"), workdir=str(tmp_path), n_views=4, show_progress=False
  )
  assert seen == [str(tmp_path)]
  want = encode.encode_ensemble(
    pool, bank_lib.open_bank(bank), n_views=4, tiles=5, seed=0, cell=448
  )
  np.testing.assert_allclose(g, want, rtol=1e-6, atol=1e-7)
  meta = json.loads(str(np.load(tmp_path / "g.npz")["meta"]))
  assert meta["cell"] == 448 and meta["workdir"] == str(tmp_path)
  # A run trained on other features is refused.
  monkeypatch.setattr(
    checkpoint, "restore_model", lambda w: (model, cfg.replace(model_in_features=DIM + 1))
  )
  with pytest.raises(ValueError, match=f"trained on {DIM + 1}-d"):
    encode.run(str(bank), str(tmp_path / "h.npz"), workdir=str(tmp_path), show_progress=False)


def _encode_cli(*args, cwd=None):
  """Runs `python -m gigassl_jax.encode ARGS` (the real command line)."""
  import os
  import subprocess
  import sys

  env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).parents[1]))
  return subprocess.run(
    [sys.executable, "-m", "gigassl_jax.encode", *args, "--noprogress"],
    capture_output=True,
    text=True,
    cwd=cwd,
    env=env,
    timeout=300,
  )


@pytest.mark.parametrize("mode", ["all_tiles", "ensemble"])
def test_cli_encodes_with_a_released_checkpoint(bank, pool, tmp_path, mode):
  """--checkpoint FILE (released layout) encodes with its weights and its downmap as the cell."""
  from gigassl_jax import released

  ckpt = tmp_path / "gigassl-scm-test.pth.tar"
  # downmap 448, not the default 224: the output only matches when the cell is the checkpoint's.
  released.export(pool, ckpt, downmap=448)
  out = tmp_path / "c.npz"
  r = _encode_cli(
    f"--checkpoint={ckpt}", f"--bank={bank}", f"--out={out}", f"--mode={mode}", "--n_views=4"
  )
  assert r.returncode == 0, r.stderr
  assert "grid cell 448 level-0 px, from the checkpoint" in r.stderr, r.stderr
  got = np.load(out)["reps"]
  reader = bank_lib.open_bank(bank)
  if mode == "all_tiles":
    want = encode.encode_all_tiles(pool, reader, cell=448)
    other = encode.encode_all_tiles(pool, reader, cell=224)
  else:
    want = encode.encode_ensemble(pool, reader, n_views=4, tiles=5, seed=0, cell=448)
    other = encode.encode_ensemble(pool, reader, n_views=4, tiles=5, seed=0, cell=224)
  # float32 through the same ops after a float32 round trip of the weights: only XLA's
  # batch-shape-dependent reduction order differs (~1e-7 relative on unit vectors).
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert np.abs(got - other).max() > 1e-3, "the cell made no difference: the test cannot fail"
  meta = json.loads(str(np.load(out)["meta"]))
  assert meta["checkpoint"] == str(ckpt) and meta["cell"] == 448
  assert meta["cell_source"] == "checkpoint" and meta["mode"] == mode


def test_cli_refuses_wrong_width_and_unsafe_checkpoints(bank, pool, tmp_path):
  import os

  from gigassl_jax import released

  wide = tmp_path / "wide.pth"
  released.export(models.GigaSSL(DIM + 8, rngs=nnx.Rngs(0)).pool, wide, downmap=224)
  evil = tmp_path / "evil.pth"
  marker = tmp_path / "pwned"
  evil.write_bytes(
    b"\x80\x02cos\nmkdir\nq\x00X"
    + len(str(marker)).to_bytes(4, "little")
    + str(marker).encode()
    + b"q\x01\x85q\x02Rq\x03."
  )
  junk = tmp_path / "junk.pth"
  junk.write_bytes(b"not a checkpoint")
  cases = {
    wide: f"takes {DIM + 8}-d tile features",
    evil: "mkdir",
    junk: "junk.pth",
    tmp_path / "absent.pth": "absent.pth: no such file",
  }
  for path, words in cases.items():
    r = _encode_cli(f"--checkpoint={path}", f"--bank={bank}", f"--out={tmp_path / 'x.npz'}")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (path, r.stderr)
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in r.stderr, (path, r.stderr)
  assert not os.path.exists(marker)
