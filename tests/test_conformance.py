"""The SparseConvNet golden vectors, through the conformance runner CLI."""

import pathlib
import shutil
import subprocess
import sys

import numpy as np

GOLDEN = pathlib.Path(__file__).parent / "fixtures" / "golden_scn"


def _run(directory, *args):
  return subprocess.run(
    [sys.executable, "-m", "gigassl_jax.conformance", str(directory), *args],
    capture_output=True,
    text=True,
    timeout=600,
  )


def test_conformance_runner_passes_every_golden_file():
  p = _run(GOLDEN)
  assert p.returncode == 0, p.stdout + p.stderr
  rows = [l for l in p.stdout.splitlines() if l.endswith("PASS")]
  assert len(rows) == len(list(GOLDEN.glob("*.npz"))) == 11, p.stdout


def test_conformance_runner_fails_on_a_perturbed_file(tmp_path):
  # The runner must be able to fail: perturb one reference output slightly
  # beyond float32 tolerance and one site coordinate.
  with np.load(GOLDEN / "subm3x3.npz") as d:
    data = {k: d[k] for k in d.files}
  data["out_features"] = data["out_features"].copy()
  data["out_features"][5, 3] += 1e-2 * np.abs(data["out_features"]).max()
  np.savez(tmp_path / "subm3x3.npz", **data)
  shutil.copy(GOLDEN / "bn_eval.npz", tmp_path)
  np.savez(tmp_path / "mystery.npz", a=np.zeros(3))
  p = _run(tmp_path)
  assert p.returncode == 1, p.stdout + p.stderr
  lines = {
    l.split()[0]: l for l in p.stdout.splitlines() if l.endswith(("PASS", "FAIL")) or "FAIL" in l
  }
  assert "FAIL" in lines["subm3x3.npz"] and lines["bn_eval.npz"].endswith("PASS")
  assert "FAIL" in lines["mystery.npz"]


def test_conformance_runner_reports_an_empty_directory(tmp_path):
  p = _run(tmp_path)
  assert p.returncode == 2 and "no golden" in p.stderr


def test_conformance_runner_rejects_an_unusable_implementation(tmp_path):
  """A Pallas kernel off its backend is refused in one line (no silent interpret mode)."""
  import jax

  impl = "pallas_tpu" if jax.default_backend() != "tpu" else "pallas_gpu"
  p = _run(tmp_path, f"--implementation={impl}")
  assert p.returncode == 2, p.stdout + p.stderr
  assert p.stderr.count("\n") == 1 and "--implementation" in p.stderr, p.stderr
  assert "Traceback" not in p.stderr
