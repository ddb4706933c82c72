"""import_features on h5 files written here in the exact TRIDENT and CLAM layouts."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from gigassl_jax import bank as bank_lib
from gigassl_jax import import_features, pca

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _slide(rng, n, d):
  """Distinct level-0 coordinates on a 512-px grid and n x d non-negative features."""
  cells = rng.choice(40 * 40, n, replace=False)
  coords = np.stack([cells % 40, cells // 40], 1) * 512
  feats = rng.gamma(2.0, 1.0, (n, d)) @ rng.normal(size=(d, d)) * 0.1
  return feats.astype(np.float32), coords


def write_trident(root, slides, d, seed):
  """TRIDENT: {job}/{mag}x_{ps}px_{ov}px_overlap/features_{encoder}/{slide}.h5."""
  rng = np.random.default_rng(seed)
  out = root / "job" / "20x_256px_0px_overlap" / "features_uni_v1"
  out.mkdir(parents=True)
  data = {}
  for sid, n in slides.items():
    feats, coords = _slide(rng, n, d)
    with h5py.File(out / f"{sid}.h5", "w") as f:
      f.create_dataset("features", data=feats)
      c = f.create_dataset("coords", data=coords.astype(np.int64))
      c.attrs.update(
        patch_size=256,
        patch_size_level0=512,
        level0_magnification=40,
        target_magnification=20,
        overlap=0,
        name=sid,
      )
    data[sid] = (feats, coords)
  return out, data


def write_clam(root, slides, d, seed):
  """CLAM: h5_files/{slide}.h5 without attributes, and the patching h5 with the patch size."""
  rng = np.random.default_rng(seed)
  out = root / "clam_feats"
  (out / "h5_files").mkdir(parents=True)
  (out / "pt_files").mkdir()
  patches = root / "clam_patches" / "patches"
  patches.mkdir(parents=True)
  data = {}
  for sid, n in slides.items():
    feats, coords = _slide(rng, n, d)
    with h5py.File(out / "h5_files" / f"{sid}.h5", "w") as f:
      f.create_dataset("features", data=feats)
      f.create_dataset("coords", data=coords.astype(np.int32))
    with h5py.File(patches / f"{sid}.h5", "w") as f:
      c = f.create_dataset("coords", data=coords.astype(np.int64))
      c.attrs.update(patch_size=256, patch_level=1, downsample=np.array([2.0, 2.0]))
    torch.save(torch.from_numpy(feats), out / "pt_files" / f"{sid}.pt")
    data[sid] = (feats, coords)
  return out, patches, data


def write_broken(folder, d):
  """One file per failure the manifest must name; returns slide -> expected reason."""
  with h5py.File(folder / "no_coords.h5", "w") as f:
    f.create_dataset("features", data=np.ones((4, d), np.float32))
  with h5py.File(folder / "bad_shape.h5", "w") as f:
    f.create_dataset("features", data=np.ones((4, d), np.float32))
    f.create_dataset("coords", data=np.zeros((4, 3), np.int64))
  with h5py.File(folder / "nan_rows.h5", "w") as f:
    x = np.ones((9000, d), np.float32)  # NaN in the second read chunk
    x[8500, 3] = np.nan
    f.create_dataset("features", data=x)
    f.create_dataset("coords", data=np.zeros((9000, 2), np.int64)).attrs["patch_size_level0"] = 512
  with h5py.File(folder / "empty.h5", "w") as f:
    f.create_dataset("features", data=np.zeros((0, d), np.float32))
    f.create_dataset("coords", data=np.zeros((0, 2), np.int64)).attrs["patch_size_level0"] = 512
  (folder / "garbage.h5").write_bytes(b"not an hdf5 file at all")
  return {
    "no_coords": "missing dataset 'coords'",
    "bad_shape": "wrong shape",
    "nan_rows": "NaN/inf in feature row 8500",
    "empty": "no tiles",
    "garbage": "unreadable h5",
  }


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", "gigassl_jax.import_features", "--no_progress", *map(str, args)],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=env,
    timeout=600,
  )


def _check_rows(reader, data, transform=lambda x: x, atol_rel=2.0**-10):
  """Every bank tile is the h5 row at its coordinates (through `transform`), as float16."""
  for s, sid in enumerate(reader.slide_ids):
    feats, coords = data[sid]
    row_of = {tuple(c): i for i, c in enumerate(coords)}
    for k in range(reader.n_aug):
      emb, xy = reader.get(s, k)
      rows = np.array([row_of[tuple(c)] for c in xy])
      want = transform(feats[rows])
      # float16 storage: relative rounding 2^-11, plus 2^-24 absolute near 0.
      tol = atol_rel * np.abs(want).max() + 2.0**-24
      err = np.abs(emb.astype(np.float64) - want).max()
      assert err <= tol, f"{sid} aug {k}: {err} > {tol}"


@pytest.mark.parametrize("seed", [0, 1])
def test_trident_with_broken_files(tmp_path, seed):
  d = 64
  folder, data = write_trident(tmp_path, {"s1": 30, "s2": 300, "s3": 7}, d, seed)
  reasons = write_broken(folder, d)
  bank = tmp_path / "bank"
  r = _run("--features", folder, "--bank", bank, "--pca_dim=0", "--n_tiles=16", f"--seed={seed}")
  assert r.returncode == 1, f"seed {seed}: {r.stderr}"
  manifest = json.loads((bank / import_features.MANIFEST).read_text())
  got = {f["slide"]: f["reason"] for f in manifest["failed"]}
  assert set(got) == set(reasons), f"seed {seed}: {got}"
  for sid, why in reasons.items():
    assert why in got[sid], f"seed {seed}: {sid}: {got[sid]!r} lacks {why!r}"
  reader = bank_lib.open_bank(bank)
  assert reader.slide_ids == ["s1", "s2", "s3"]
  assert (reader.n_aug, reader.n_tiles, reader.feature_dim) == (1, 16, d)
  _check_rows(reader, data)
  for m in reader.meta["slides"]:
    assert m["patch_size_level0"] == 512 and m["source_format"] == "trident", m
    assert m["augmentations"][0]["target_magnification"] == 20
  assert bank_lib.bank_patch_size_level0(reader) == 512
  # Same seed, same bank (bitwise): a second import into a new bank.
  bank2 = tmp_path / "bank2"
  _run("--features", folder, "--bank", bank2, "--pca_dim=0", "--n_tiles=16", f"--seed={seed}")
  for sid in reader.slide_ids:
    a, b = (bank_lib.read_slide(bank_lib.slide_path(x, sid)) for x in (bank, bank2))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]), f"seed {seed}: {sid}"


def test_clam_two_augmentations_given_pca_and_resume(tmp_path):
  seed, d = 3, 48
  rng = np.random.default_rng(seed)
  slides = {"a": 20, "b": 50, "c": 11}
  f1, patches, data1 = write_clam(tmp_path / "aug0", slides, d, seed)
  f2, _, data2 = write_clam(tmp_path / "aug1", slides, d, seed + 1)
  # A published PCA may hold more components than kept: the first --pca_dim are used.
  ref = PCA(16, random_state=seed).fit(rng.normal(size=(500, d)) * rng.uniform(0.5, 2, d))
  pca_file = tmp_path / "pca-test.pth"
  torch.save(ref, pca_file)
  bank = tmp_path / "bank"
  args = ["--features", f"{f1},{f2}", "--bank", bank, "--patches", patches, "--pca", pca_file,
          "--pca_dim=8"]  # fmt: skip
  r = _run(*args, "--n_tiles=12")
  assert r.returncode == 0, f"seed {seed}: {r.stderr}"
  reader = bank_lib.open_bank(bank)
  assert (reader.n_aug, reader.n_tiles, reader.feature_dim) == (2, 12, 8)
  for k, data in enumerate((data1, data2)):
    one = _OneAug(reader, k)
    _check_rows(one, data, lambda x: ref.transform(x.astype(np.float64))[:, :8])
  m = reader.meta["slides"][0]
  # CLAM patching h5: patch_size 256 at a level with downsample 2 -> 512 level-0 px.
  assert m["patch_size_level0"] == 512 and m["pca"]["out_dim"] == 8, m
  # Resume: a finished slide is kept as is, a missing one is re-made identically.
  before = {s: bank_lib.read_slide(bank_lib.slide_path(bank, s)) for s in slides}
  mtime_a = bank_lib.slide_path(bank, "a").stat().st_mtime_ns
  bank_lib.slide_path(bank, "b").unlink()
  r = _run(*args, "--n_tiles=12")
  assert r.returncode == 0, r.stderr
  assert bank_lib.slide_path(bank, "a").stat().st_mtime_ns == mtime_a
  after = bank_lib.read_slide(bank_lib.slide_path(bank, "b"))
  assert np.array_equal(after[0], before["b"][0]) and np.array_equal(after[1], before["b"][1])
  # Resuming with other settings would mix two kinds of slides: refused, bank untouched.
  r = _run(*args, "--n_tiles=13")
  assert r.returncode == 2 and "n_tiles" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
  assert bank_lib.slide_path(bank, "a").stat().st_mtime_ns == mtime_a


class _OneAug:
  def __init__(self, reader, k):
    self.r, self.k = reader, k
    self.slide_ids, self.n_aug = reader.slide_ids, 1

  def get(self, s, k):
    del k
    return self.r.get(s, self.k)


def test_fitted_pca_matches_sklearn_on_the_same_sample():
  seed = 5
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(3000, 40)) @ rng.normal(size=(40, 40)) + rng.normal(size=40)
  acc = pca.CovAccumulator()
  for part in np.array_split(x, 7):  # streamed in uneven chunks
    acc.add(part)
  ours = acc.fit(10, "test")
  ref = PCA(10, svd_solver="full").fit(x)
  y, want = ours.transform(x), ref.transform(x)
  # Covariance in float64 from 3000 rows, eigh vs SVD: ~1e-12 relative; the
  # float32 output cast (2^-24 relative) dominates; 2^-20 leaves room for
  # the eigenvector error of the closest eigenvalue pair.
  tol = 2.0**-20 * np.abs(want).max()
  assert np.abs(y - want).max() <= tol, f"seed {seed}: {np.abs(y - want).max()} > {tol}"


def test_refusals_are_one_line_exit_2(tmp_path):
  folder, _, _ = write_clam(tmp_path, {"a": 5}, 8, 0)
  r = _run("--features", folder / "pt_files", "--bank", tmp_path / "b")
  assert r.returncode == 2 and "h5_files" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
  r = _run("--features", folder, "--bank", tmp_path / "b", "--n_tiles=0")
  assert r.returncode == 2 and "--n_tiles" in r.stderr and len(r.stderr.splitlines()) == 1
  r = _run("--features", folder, "--bank", tmp_path / "b", "--format=hdf")
  assert r.returncode == 2 and "--format" in r.stderr and len(r.stderr.splitlines()) == 1
  evil = tmp_path / "pca-evil.pth"
  torch.save({"x": _Evil()}, evil)
  r = _run("--features", folder, "--bank", tmp_path / "b", "--pca", evil)
  assert r.returncode == 2 and "refusing" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr


class _Evil:
  def __reduce__(self):
    return (os.getcwd, ())


def test_clam_without_patch_size_goes_to_manifest(tmp_path):
  folder, _, _ = write_clam(tmp_path, {"a": 5, "b": 6}, 8, 0)
  r = _run("--features", folder, "--bank", tmp_path / "b", "--pca_dim=0")
  assert r.returncode == 1, r.stderr
  failed = json.loads((tmp_path / "b" / import_features.MANIFEST).read_text())["failed"]
  assert [f["slide"] for f in failed] == ["a", "b"] and "--patch_size_level0" in failed[0]["reason"]
  r = _run("--features", folder, "--bank", tmp_path / "c", "--pca_dim=0", "--patch_size_level0=448")
  assert r.returncode == 0, r.stderr
  assert bank_lib.bank_patch_size_level0(bank_lib.open_bank(tmp_path / "c")) == 448


def test_grid_cell_rule():
  # The reference: 224-px tiles at level 1 (4x) = 896 level-0 px, cell 224: 4 cells apart.
  assert bank_lib.grid_cell_for(896) == 224
  assert bank_lib.grid_cell_for(512) == 128  # TRIDENT 20x 256 px on a 40x scan
  assert bank_lib.grid_cell_for(None) == 224
  assert bank_lib.grid_cell_for(3) == 1
  with pytest.raises(ValueError):
    bank_lib.grid_cell_for(0)


def test_smoke_train_on_imported_1024d_bank_with_pca(tmp_path):
  seed = 7
  folder, _ = write_trident(tmp_path, {f"s{i}": 40 + 10 * i for i in range(8)}, 1024, seed)
  bank = tmp_path / "bank"
  r = _run("--features", folder, "--bank", bank, "--pca_dim=256", "--pca_sample=300",
           "--n_tiles=16", f"--seed={seed}")  # fmt: skip
  assert r.returncode == 0, f"seed {seed}: {r.stderr}"
  reader = bank_lib.open_bank(bank)
  assert reader.feature_dim == 256 and reader.meta["slides"][0]["pca"]["in_dim"] == 1024
  cell = bank_lib.grid_cell_for(bank_lib.bank_patch_size_level0(reader))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  t = subprocess.run(
    [sys.executable, "-m", "gigassl_jax.train", "--flagfile=experiments/smoke.flags",
     f"--data_bank={bank}", f"--workdir={tmp_path / 'run'}", "--train_steps=2",
     f"--data_cell={cell}"],
    capture_output=True, text=True, cwd=ROOT, env=env, timeout=600,
  )  # fmt: skip
  assert t.returncode == 0, f"seed {seed}: {t.stderr[-3000:]}"


def test_ctrl_c_keeps_finished_slides_and_resumes(tmp_path):
  seed = 9
  folder, _ = write_trident(tmp_path, {f"s{i:03d}": 1500 for i in range(150)}, 32, seed)
  bank = tmp_path / "bank"
  cmd = [sys.executable, "-m", "gigassl_jax.import_features", "--no_progress",
         f"--features={folder}", f"--bank={bank}", "--pca_dim=0", "--n_tiles=8"]  # fmt: skip
  p = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
  slides = bank / bank_lib.SLIDES_DIR
  deadline = time.time() + 300
  while not (slides.is_dir() and any(slides.glob("*.npz"))) and time.time() < deadline:
    time.sleep(0.02)
  # Stopped while the interrupt is queued: it lands the moment the run goes on,
  # a few milliseconds after the first finished slide was seen.
  p.send_signal(signal.SIGSTOP)
  p.send_signal(signal.SIGINT)
  p.send_signal(signal.SIGCONT)
  _, err = p.communicate(timeout=300)
  n = len(bank_lib.finished_slides(bank))
  assert p.returncode == 130 and "Traceback" not in err, f"seed {seed}: {err}"
  assert f"{n} slides finished in {bank} (kept); re-run the same command" in err, (
    f"seed {seed}: {err}"
  )
  assert 1 <= n < 150, f"seed {seed}: {n} finished; {err}"
  assert not list(slides.glob(".*.tmp-*")), "a half-written temp file was left"
  r = _run("--features", folder, "--bank", bank, "--pca_dim=0", "--n_tiles=8")
  assert r.returncode == 0 and len(bank_lib.open_bank(bank)) == 150, r.stderr
