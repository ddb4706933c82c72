"""Embedding bank: atomic per-slide files, TFDS array_record packing, random access."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gigassl_jax import bank

META = {"encoder": "resnet18", "weights_id": "abc", "level": 1, "mpp": 1.0, "tile_size": 224}


def _random_slide(rng, n_aug=3, n_tiles=5, f=7):
  emb = rng.standard_normal((n_aug, n_tiles, f)).astype(np.float16)
  coords = rng.integers(0, 50_000, (n_aug, n_tiles, 2)).astype(np.int32)
  return emb, coords


def test_roundtrip_random_access(tmp_path):
  rng = np.random.default_rng(0)
  data = {}
  for sid in ("slide-b", "slide-a", "TCGA-01.x"):  # written out of order
    data[sid] = _random_slide(rng)
    bank.write_slide(tmp_path, sid, *data[sid], dict(META, note=sid))
  assert bank.finished_slides(tmp_path) == sorted(data)
  packed = bank.pack(tmp_path)
  assert packed == tmp_path / "packed" and (packed / "dataset_info.json").is_file()
  reader = bank.open_bank(tmp_path)
  assert reader.slide_ids == sorted(data) and len(reader) == 3
  assert (reader.n_aug, reader.n_tiles, reader.feature_dim) == (3, 5, 7)
  assert [m["note"] for m in reader.meta["slides"]] == sorted(data)
  # Random order of access.
  for s, k in rng.permutation([(s, k) for s in range(3) for k in range(3)]):
    emb, coords = reader.get(int(s), int(k))
    assert emb.dtype == np.float16 and coords.dtype == np.int32
    want_e, want_c = data[reader.slide_ids[s]]
    np.testing.assert_array_equal(emb, want_e[k])
    np.testing.assert_array_equal(coords, want_c[k])
  with pytest.raises(IndexError):
    reader.get(3, 0)
  with pytest.raises(IndexError):
    reader.get(0, 3)


def test_per_slide_file_contents(tmp_path):
  rng = np.random.default_rng(1)
  emb, coords = _random_slide(rng)
  path = bank.write_slide(tmp_path, "s", emb.astype(np.float32), coords.astype(np.int64), META)
  e, c, meta = bank.read_slide(path)
  assert e.dtype == np.float16 and c.dtype == np.int32
  np.testing.assert_array_equal(e, emb)
  np.testing.assert_array_equal(c, coords)
  assert meta == dict(META, slide_id="s")


def test_repack_replaces_and_adds(tmp_path):
  rng = np.random.default_rng(2)
  bank.write_slide(tmp_path, "a", *_random_slide(rng), META)
  bank.pack(tmp_path)
  assert bank.open_bank(tmp_path).slide_ids == ["a"]
  new = _random_slide(rng)
  bank.write_slide(tmp_path, "b", *new, META)
  bank.pack(tmp_path)
  r = bank.open_bank(tmp_path)
  assert r.slide_ids == ["a", "b"]
  np.testing.assert_array_equal(r.get(1, 2)[0], new[0][2])
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers


def test_half_written_is_never_done(tmp_path):
  rng = np.random.default_rng(3)
  bank.write_slide(tmp_path, "good", *_random_slide(rng), META)
  slides_dir = tmp_path / "slides"
  # A killed writer leaves a temp file; a dead process id marks it stale.
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
  stale = slides_dir / f".half.npz.tmp-{int(dead.stdout)}-0000"
  stale.write_bytes((slides_dir / "good.npz").read_bytes()[:100])
  # A final name holding a truncated archive (e.g. a disk that filled up).
  (slides_dir / "trunc.npz").write_bytes((slides_dir / "good.npz").read_bytes()[:300])
  assert bank.finished_slides(tmp_path) == ["good", "trunc"]
  assert bank.is_finished(tmp_path, "good")
  assert not bank.is_finished(tmp_path, "half")
  assert not bank.is_finished(tmp_path, "trunc")
  assert bank.remove_stale_temps(tmp_path) == 1 and not stale.exists()


def test_errors(tmp_path):
  rng = np.random.default_rng(4)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    bank.open_bank(tmp_path / "nope")
  with pytest.raises(ValueError, match="no finished slide"):
    bank.pack(tmp_path)
  e, c = _random_slide(rng)
  with pytest.raises(ValueError, match="coords"):
    bank.write_slide(tmp_path, "x", e, c[:, :2], META)
  with pytest.raises(ValueError, match="NaN"):
    bank.write_slide(tmp_path, "x", np.full_like(e, np.nan), c, META)
  with pytest.raises(ValueError, match="invalid slide id"):
    bank.write_slide(tmp_path, "../x", e, c, META)
  bank.write_slide(tmp_path, "a", e, c, META)
  with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*not packed"):
    bank.open_bank(tmp_path)
  bank.write_slide(tmp_path, "b", *_random_slide(rng, n_tiles=6), META)
  with pytest.raises(ValueError, match="b.npz.*differ"):
    bank.pack(tmp_path)
  bank.write_slide(tmp_path, "b", e, c, dict(META, weights_id="other"))
  with pytest.raises(ValueError, match="weights_id"):
    bank.pack(tmp_path)


def test_no_tensorflow_needed(tmp_path):
  # Packing and reading must not import TensorFlow (not a dependency).
  code = textwrap.dedent(f"""
        import sys, numpy as np
        from gigassl_jax import bank
        e = np.ones((2, 3, 4), np.float16); c = np.zeros((2, 3, 2), np.int32)
        bank.write_slide({str(tmp_path)!r}, "s", e, c, {{"encoder": "x", "weights_id": "y"}})
        bank.pack({str(tmp_path)!r})
        print(float(bank.open_bank({str(tmp_path)!r}).get(0, 1)[0].sum()))
        print("tensorflow" in sys.modules)
    """)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().splitlines()[-2:] == ["12.0", "False"]
  info = json.loads((tmp_path / "packed" / "dataset_info.json").read_text())
  assert info["fileFormat"] == "array_record"


def test_patch_size_level0_from_new_and_old_meta(tmp_path):
  rng = np.random.default_rng(3)
  # An old bank (META has no patch size and no extent) still reads; its cell is the reference's.
  old = tmp_path / "old"
  bank.write_slide(old, "a", *_random_slide(rng), META)
  bank.pack(old)
  r = bank.open_bank(old)
  assert bank.bank_patch_size_level0(r) is None and r.n_tiles == 5
  assert bank.grid_cell_for(bank.bank_patch_size_level0(r)) == bank.REFERENCE_CELL
  # embed's banks record `extent` (level-0 px per tile); imported ones patch_size_level0.
  new = tmp_path / "new"
  bank.write_slide(new, "a", *_random_slide(rng), dict(META, extent=896))
  bank.write_slide(new, "b", *_random_slide(rng), dict(META, patch_size_level0=1024))
  bank.write_slide(new, "c", *_random_slide(rng), dict(META, patch_size_level0=1024))
  bank.pack(new)
  r = bank.open_bank(new)
  assert [bank.slide_patch_size_level0(m) for m in r.meta["slides"]] == [896, 1024, 1024]
  assert bank.bank_patch_size_level0(r) == 1024  # the median
  assert bank.grid_cell_for(1024) == 256


def test_spacing_warning():
  assert bank.spacing_warning(896, 224) is None  # the reference: 4 cells apart
  assert bank.spacing_warning(None, 224) is None
  assert bank.spacing_warning(1000, 224) is None  # 4.46: within 25 %
  msg = bank.spacing_warning(512, 224)  # TRIDENT 20x patches under a 224 downmap: 2.29 apart
  assert msg is not None and "2.29" in msg and "cell 128" in msg, msg
