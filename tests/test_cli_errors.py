"""What a user sees at the command line: one-line errors (exit 2), Ctrl-C (exit 130),
quiet logs with an elapsed time, and flagfiles from any folder (gigassl_jax.cli.run).

Every program runs as a user runs it: `python -m gigassl_jax.X` in a subprocess.
"""

import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from gigassl_jax import bank as bank_lib
from gigassl_jax import embed, synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]
# absl's INFO line prefix (e.g. "I1201 18:18:00.304539 1406... dataset_info.py:711]").
ABSL_INFO = re.compile(r"^I\d{4} \d\d:\d\d:\d\d", re.M)


def _env():
  return dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")


def _cli(module, *args, cwd=None, timeout=300):
  return subprocess.run(
    [sys.executable, "-m", f"gigassl_jax.{module}", *args],
    capture_output=True,
    text=True,
    cwd=cwd,
    env=_env(),
    timeout=timeout,
  )


def _one_line(p, *words):
  """Exit 2, exactly one stderr line holding `words`, no traceback."""
  lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
  assert p.returncode == 2, (p.returncode, p.stderr)
  assert "Traceback" not in p.stderr and len(lines) == 1, p.stderr
  for w in words:
    assert w in lines[0], (w, lines[0])
  return lines[0]


@pytest.fixture(scope="module")
def slides_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("slides")
  for i in range(3):
    synthetic.write_slide(d / f"s{i}.svs", 1600, 1400, mpp=0.5, seed=i, n_levels=2)
  return d


@pytest.fixture(scope="module")
def small_bank(tmp_path_factory):
  """A packed bank of 4 slides of random 8-d embeddings (seeded)."""
  d = tmp_path_factory.mktemp("bank")
  rng = np.random.default_rng(0)
  for s in range(4):
    grid = rng.integers(0, 6, size=(2, 5, 2)) * 224
    bank_lib.write_slide(d, f"slide_{s}", rng.normal(size=(2, 5, 8)), grid, {"encoder": "t"})
  bank_lib.pack(d)
  return d


EMBED = ["--n_aug=2", "--n_tiles=4", "--encoder=resnet18", "--tile_size=64", "--seed=3"]


@pytest.mark.parametrize(
  "slides,words",
  [
    (None, "--slides is required"),
    ("", "--slides is required"),
    (" , ", "--slides is empty"),
    ("nowhere", "--slides=nowhere: nowhere is neither a directory nor a file"),
  ],
)
def test_embed_bad_slides_is_one_line_and_makes_no_bank(tmp_path, slides, words):
  args = [f"--bank={tmp_path / 'bank'}", *EMBED]
  if slides is not None:
    args.append(f"--slides={slides}")
  _one_line(_cli("embed", *args, cwd=tmp_path), "embed: error:", words)
  assert not (tmp_path / "bank").exists()


def test_embed_empty_slide_folder_makes_no_bank(tmp_path):
  (tmp_path / "empty").mkdir()
  p = _cli("embed", f"--slides={tmp_path / 'empty'}", f"--bank={tmp_path / 'bank'}", *EMBED)
  _one_line(p, "--slides=", "no slide found")
  assert not (tmp_path / "bank").exists()


def test_embed_missing_or_bad_weights(tmp_path, slides_dir):
  bank = tmp_path / "bank"
  p = _cli("embed", f"--slides={slides_dir}", f"--bank={bank}", "--weights=nope.pth", *EMBED)
  _one_line(p, "--weights=nope.pth: no such file")
  assert not bank.exists()
  (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
  p = _cli(
    "embed", f"--slides={slides_dir}", f"--bank={bank}", f"--weights={tmp_path / 'junk.pth'}",
    *EMBED, "--noprogress",
  )  # fmt: skip
  _one_line(p, "--weights: not a usable resnet18 checkpoint", "junk.pth")
  assert not bank.exists()


def test_embed_into_a_bank_made_with_other_settings(tmp_path, slides_dir):
  """A finished slide made with --seed=9: a run with --seed=3 is refused before any work."""
  bank = tmp_path / "bank"
  cfg = embed.EmbedConfig(slides=str(slides_dir), bank=str(bank), n_aug=2, n_tiles=4,
                          encoder="resnet18", tile_size=64, seed=9)  # fmt: skip
  meta = embed._run_settings(cfg)  # what embed stores in each finished slide's meta
  bank_lib.write_slide(bank, "old", np.zeros((2, 4, 256)), np.zeros((2, 4, 2), int), meta)
  p = _cli("embed", f"--slides={slides_dir}", f"--bank={bank}", *EMBED)
  _one_line(p, "old.npz was made with other settings", "'seed': (9, 3)", "use a new --bank")
  assert bank_lib.finished_slides(bank) == ["old"]


def test_encode_evaluate_import_bad_inputs(tmp_path, small_bank):
  _one_line(
    _cli("encode", f"--bank={tmp_path / 'nobank'}", f"--out={tmp_path / 'r.npz'}",
         "--method=mean_tiles"),
    "encode: error:", "nobank does not exist",
  )  # fmt: skip
  _one_line(
    _cli("encode", f"--bank={small_bank}", f"--out={tmp_path / 'r.npz'}"),
    "--method=gigassl needs --workdir=RUN",
  )
  _one_line(_cli("encode", f"--bank={small_bank}"), "--out")  # a required flag
  (tmp_path / "afile").write_text("x")
  _one_line(
    _cli("encode", f"--bank={small_bank}", f"--out={tmp_path / 'afile' / 'r.npz'}",
         "--method=mean_tiles", "--noprogress"),
    "encode: error:", "afile",
  )  # fmt: skip
  _one_line(
    _cli("evaluate", f"--reps={tmp_path / 'r.npz'}", f"--labels={tmp_path / 'l.csv'}"),
    "evaluate: error:",
    "r.npz",
  )
  _one_line(
    _cli("import_features", f"--features={tmp_path / 'nofeat'}", f"--bank={tmp_path / 'b'}"),
    "nofeat",
  )
  _one_line(_cli("train", "--flagfile=gigassl:nosuch", f"--workdir={tmp_path / 'w'}"), "nosuch")


@pytest.mark.parametrize("module", ["evaluate", "import_features", "train", "embed", "encode"])
def test_help_exits_0_and_marks_required_flags(module):
  p = _cli(module, "--help")
  assert p.returncode == 0, p.stderr
  if module != "train":  # train's flags all have defaults
    assert "(required)" in p.stdout, p.stdout[-2000:]


def test_ctrl_c_in_embed_exits_130_and_says_how_to_resume(tmp_path, slides_dir):
  bank = tmp_path / "bank"
  proc = subprocess.Popen(
    [sys.executable, "-m", "gigassl_jax.embed", f"--slides={slides_dir}", f"--bank={bank}",
     *EMBED, "--noprogress", "--nothumbnails"],
    env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
  )  # fmt: skip
  deadline = time.time() + 240
  while time.time() < deadline and not bank_lib.finished_slides(bank):
    time.sleep(0.02)
  # Stopped while the interrupt is queued: it lands the moment the run goes on,
  # a few milliseconds after the first finished slide was seen.
  proc.send_signal(signal.SIGSTOP)
  proc.send_signal(signal.SIGINT)
  proc.send_signal(signal.SIGCONT)
  _, err = proc.communicate(timeout=120)
  n = len(bank_lib.finished_slides(bank))
  assert proc.returncode == 130, err
  assert "Traceback" not in err, err
  last = err.strip().splitlines()[-1]
  assert re.match(r"embed: interrupted after \d+ s; ", last), last
  assert f"{n} slides finished in {bank} (kept); re-run the same command" in last, last
  assert 1 <= n < 3, f"the interrupt came too late or too early ({n} slides finished)"


def test_quiet_train_from_another_folder_with_a_packaged_flagfile(tmp_path):
  """The smoke flagfile (which nests experiments/base.flags) from a folder that has no
  experiments/, in both spellings; no library INFO lines; an elapsed time at the end."""
  for i, spelling in enumerate(["gigassl:smoke", "experiments/smoke.flags"]):
    p = _cli(
      "train", f"--flagfile={spelling}", f"--workdir=run{i}", "--train_steps=1", cwd=tmp_path
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / f"run{i}" / "metrics.jsonl").is_file()
    assert "Unable to initialize backend" not in p.stderr, p.stderr[-3000:]
    assert not ABSL_INFO.search(p.stderr) and "orbax" not in p.stderr, p.stderr[-3000:]
    assert re.search(r"train: done in [\d.]+ s\s*$", p.stderr), p.stderr[-500:]


def test_quiet_encode_and_verbosity_brings_logs_back(tmp_path, small_bank):
  args = [f"--bank={small_bank}", "--method=random_init", "--n_views=2", "--noprogress"]
  p = _cli("encode", *args, f"--out={tmp_path / 'q.npz'}")
  assert p.returncode == 0, p.stderr
  assert "Unable to initialize backend" not in p.stderr and not ABSL_INFO.search(p.stderr), p.stderr
  assert re.search(r"encode: done in [\d.]+ s\s*$", p.stderr), p.stderr
  # -v 0 (absl's INFO) asks for the library logs: the bank's dataset-info line is one.
  p = _cli("encode", *args, f"--out={tmp_path / 'v.npz'}", "-v", "0")
  assert p.returncode == 0 and ABSL_INFO.search(p.stderr), p.stderr
