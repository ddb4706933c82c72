"""The tools' and benchmarks' command lines run through gigassl_jax.cli like the programs.

Each runs as a user runs it (a subprocess): --help exits 0 and lists the
program's own flags; a missing required flag or positional is one line on
stderr and exit status 2.
"""

import pathlib
import subprocess
import sys

import pytest

from gigassl_jax import import_features

ROOT = pathlib.Path(__file__).resolve().parents[1]

# (command after the interpreter, a flag its --help must list)
TOOLS = [
  (["-m", "gigassl_jax.import_features"], "--features"),
  (["-m", "gigassl_jax.conformance"], "--implementation"),
  (["-m", "gigassl_jax.splits"], "--leaks"),
  (["-m", "gigassl_jax.released"], "--workdir"),
  (["-m", "gigassl_jax.cohort"], "--identity_of"),
  (["-m", "gigassl_jax.kernels.sparse_conv.bench"], "--spconv_device"),
  (["benchmarks/bench_igemm.py"], "--[no]tune"),
  (["benchmarks/bench_embed_ab.py"], "--baseline"),
  (["benchmarks/bench_import_features.py"], "--train_steps"),
  (["benchmarks/bench_own_slides.py"], "--n_views"),
  (["experiments/diagnose_learning.py"], "--batches"),
]


def _run(*args):
  return subprocess.run(
    [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
  )


@pytest.mark.parametrize("cmd,flag", TOOLS, ids=[c[-1] for c, _ in TOOLS])
def test_help_exits_0_and_lists_the_flags(cmd, flag):
  p = _run(*cmd, "--help")
  assert p.returncode == 0, p.stderr[-2000:]
  assert flag in p.stdout, p.stdout[-2000:]


@pytest.mark.parametrize(
  "cmd,needle",
  [
    (["-m", "gigassl_jax.conformance"], "golden folder"),
    (["-m", "gigassl_jax.splits"], "--leaks"),
    (["-m", "gigassl_jax.released", "--out=x.pth"], "--workdir"),
    (["-m", "gigassl_jax.cohort"], "--out"),
    (["benchmarks/bench_embed_ab.py"], "--baseline"),
    (["benchmarks/bench_embed_ab.py", "--baseline=tests"], "--baseline=tests"),
  ],
  ids=["conformance", "splits", "released", "cohort", "embed_ab", "embed_ab_not_a_checkout"],
)
def test_missing_input_is_one_line_and_exit_2(cmd, needle):
  p = _run(*cmd)
  assert p.returncode == 2, p.stderr[-2000:]
  lines = p.stderr.strip().splitlines()
  assert len(lines) == 1 and needle in lines[0] and "Traceback" not in p.stderr, p.stderr


def test_repeated_features_flags_become_one_comma_list():
  """absl keeps only the last of a repeated list flag; import_features keeps them all."""
  argv = ["prog", "--features=a,b", "--bank=B", "--features", "c"]
  got = import_features.merge_repeated(argv, "features")
  assert got == ["prog", "--bank=B", "--features=a,b,c"], got
  assert import_features.merge_repeated(argv[:3], "features") == argv[:3]
