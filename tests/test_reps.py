"""Slide-vector files: our .npz, the published pickled-dict .npy, embeddings.npy + ids.npy."""

import csv
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from gigassl_jax import reps


@pytest.mark.parametrize("seed", [0, 1])
def test_npz_round_trip(tmp_path, seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(5, 7))
  ids = [f"s{i}" for i in range(5)]
  reps.save_reps(tmp_path / "a.npz", ids, x, "m", {"k": 1})
  r = reps.load_reps(tmp_path / "a.npz")
  assert r.ids == ids and r.method == "m", f"seed {seed}"
  # float64 -> float32 storage: rounding only, so equal to the float32 cast.
  np.testing.assert_array_equal(r.vectors, x.astype(np.float32), err_msg=f"seed {seed}")


@pytest.mark.parametrize("seed", [2, 3])
def test_pickled_dict_npy_as_published(tmp_path, seed):
  """TCGA-gigassl_{encoder}.npy: np.save of a dict {slide_id: vector}."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(4, 6)).astype(np.float32)
  # Keys as str and np.str_, values 1-d and [1, D], float32 and float64 (big-endian too).
  d = {
    "TCGA-AA-0001-01Z-00-DX1": x[0],
    np.str_("TCGA-AA-0002-01Z-00-DX1"): x[1].astype(np.float64),
    "TCGA-AA-0003-01Z-00-DX1": x[2][None, :],
    "TCGA-AA-0004-01Z-00-DX1": x[3].astype(">f4"),
  }
  path = tmp_path / "TCGA-gigassl_phikon.npy"
  np.save(path, d, allow_pickle=True)
  r = reps.load_reps(path)
  assert r.method == "TCGA-gigassl_phikon", f"seed {seed}"
  assert r.ids == [f"TCGA-AA-000{i}-01Z-00-DX1" for i in range(1, 5)], f"seed {seed}"
  assert all(type(s) is str for s in r.ids), f"seed {seed}: {r.ids}"
  # Every value is x's float32 row, exactly (float32 -> float64 -> float32 is exact).
  np.testing.assert_array_equal(r.vectors, x, err_msg=f"seed {seed}")


@pytest.mark.parametrize("seed", [4])
@pytest.mark.parametrize("ids_kind", ["unicode", "object"])
@pytest.mark.parametrize("point_at", ["folder", "embeddings.npy", "ids.npy"])
def test_embeddings_and_ids_npy(tmp_path, seed, ids_kind, point_at):
  """The gigassl repository's layout: embeddings.npy [N, D] + ids.npy [N] in one folder."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(3, 5)).astype(np.float32)
  names = ["slide_a", "slide_b", "slide_c"]
  d = tmp_path / "gigassl_out"
  d.mkdir()
  np.save(d / "embeddings.npy", x)
  ids = np.array(names) if ids_kind == "unicode" else np.array(names, dtype=object)
  np.save(d / "ids.npy", ids, allow_pickle=True)
  r = reps.load_reps(d if point_at == "folder" else d / point_at)
  assert r.ids == names and r.method == "gigassl_out", f"seed {seed}"
  np.testing.assert_array_equal(r.vectors, x, err_msg=f"seed {seed}")


class _Evil:
  """Unpickling this runs `os.system(cmd)`."""

  def __init__(self, cmd):
    self.cmd = cmd

  def __reduce__(self):
    return (os.system, (self.cmd,))


class _EvalEvil:
  def __reduce__(self):
    return (eval, ("__import__('os').system('true')",))


def _evil_file(tmp_path, payload) -> pathlib.Path:
  path = tmp_path / "TCGA-gigassl_evil.npy"
  np.save(path, {"TCGA-AA-0001": np.zeros(3), "x": payload}, allow_pickle=True)
  return path


@pytest.mark.parametrize("kind", ["os.system", "eval"])
def test_a_pickle_that_runs_code_is_refused(tmp_path, kind):
  marker = tmp_path / "pwned"
  payload = _Evil(f"touch {marker}") if kind == "os.system" else _EvalEvil()
  path = _evil_file(tmp_path, payload)
  # The payload really would run under a plain np.load (so the test can fail).
  if kind == "os.system":
    np.load(path, allow_pickle=True)
    assert marker.exists()
    marker.unlink()
  want = r"refusing to unpickle (posix|nt|os)\.system" if kind == "os.system" else "builtins.eval"
  with pytest.raises(reps.RepsError, match=want):
    reps.load_reps(path)
  assert not marker.exists()


def test_cli_refuses_a_malicious_pickle_with_one_line(tmp_path):
  marker = tmp_path / "pwned"
  path = _evil_file(tmp_path, _Evil(f"touch {marker}"))
  with open(tmp_path / "labels.csv", "w", newline="") as f:
    csv.writer(f).writerows([["ID", "label"], ["TCGA-AA-0001", "a"], ["x", "b"]])
  p = subprocess.run(
    [
      sys.executable,
      "-m",
      "gigassl_jax.evaluate",
      f"--reps={path}",
      f"--labels={tmp_path / 'labels.csv'}",
    ],
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert p.returncode == 2, p.stderr
  lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
  assert len(lines) == 1 and lines[0].startswith("evaluate: error: "), p.stderr
  assert "refusing to unpickle" in lines[0] and "Traceback" not in p.stderr
  assert not marker.exists()


def test_bad_npy_files_name_the_file(tmp_path):
  np.save(tmp_path / "m.npy", np.zeros((3, 4)))
  with pytest.raises(reps.RepsError, match=r"m\.npy: holds array \(3, 4\).*ids\.npy"):
    reps.load_reps(tmp_path / "m.npy")
  np.save(tmp_path / "v.npy", {"a": np.zeros(3), "b": np.zeros(4)}, allow_pickle=True)
  with pytest.raises(reps.RepsError, match=r"v\.npy: slide 'b' has 4 values, slide 'a' 3"):
    reps.load_reps(tmp_path / "v.npy")
  np.save(tmp_path / "s.npy", {"a": "text"}, allow_pickle=True)
  with pytest.raises(reps.RepsError, match=r"s\.npy: slide 'a'.* is not a vector"):
    reps.load_reps(tmp_path / "s.npy")
  (tmp_path / "t.npy").write_bytes(b"not numpy")
  with pytest.raises(reps.RepsError, match=r"t\.npy: cannot read"):
    reps.load_reps(tmp_path / "t.npy")
  (tmp_path / "only").mkdir()
  np.save(tmp_path / "only" / "embeddings.npy", np.zeros((2, 2)))
  with pytest.raises(reps.RepsError, match=r"ids\.npy: not found"):
    reps.load_reps(tmp_path / "only")
