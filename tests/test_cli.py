"""One config source: absl flags generated from a dataclass (gigassl_jax.cli), and --help."""

import dataclasses
import subprocess
import sys

import pytest
from absl import flags

from gigassl_jax import cli


@dataclasses.dataclass(frozen=True)
class _Cfg:
  name: str = cli.field("", "A required name.", required=True)
  count: int = cli.field(3, "A count.")
  rate: float | None = cli.field(None, "An optional rate.")
  on: bool = cli.field(True, "A switch.")
  kind: str = cli.field("a", "One of a, b.", choices=["a", "b"])
  pair: tuple[float, float] = cli.field((0.5, 2.0), "Two floats.")
  words: tuple[str, ...] = cli.field(("x",), "Any number of words.")


def _parse(argv, base=None):
  fv = flags.FlagValues()
  cli.define_flags(_Cfg, flag_values=fv)
  fv(["prog", *argv])
  return cli.from_flags(_Cfg, base=base, flag_values=fv)


def test_flags_take_the_dataclass_defaults_types_and_choices():
  got = _parse(["--name=n"])
  assert got == _Cfg(name="n")
  got = _parse(
    ["--name=m", "--count=7", "--rate=0.25", "--noon", "--kind=b", "--pair=1,3", "--words=p,q,r"]
  )
  assert got == _Cfg("m", 7, 0.25, False, "b", (1.0, 3.0), ("p", "q", "r"))
  with pytest.raises(flags.IllegalFlagValueError):
    _parse(["--name=n", "--kind=c"])
  with pytest.raises(flags.IllegalFlagValueError):
    _parse([])  # --name is required
  with pytest.raises(ValueError, match="--pair needs 2 values, got 3"):
    _parse(["--name=n", "--pair=1,2,3"])
  with pytest.raises(ValueError, match="--pair"):
    _parse(["--name=n", "--pair=1,x"])


def test_a_base_stands_for_the_flags_not_given():
  base = _Cfg(name="base", count=9, kind="b")
  got = _parse(["--name=n", "--kind=a"], base=base)
  assert got == dataclasses.replace(base, name="n", kind="a")


@pytest.mark.parametrize(
  "module", ["gigassl_jax.train", "gigassl_jax.embed", "gigassl_jax.encode", "gigassl_jax.demo"]
)
def test_help_exits_0_and_lists_the_flags(module):
  res = subprocess.run(
    [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=300
  )
  assert res.returncode == 0, res.stderr[-2000:]
  assert "--seed" in res.stdout or "--train_seed" in res.stdout, res.stdout[-2000:]


def test_a_bad_or_missing_flag_is_one_line_and_exit_2():
  for args, want in (
    (["--bank=b", "--out=o", "--n_views=many"], "--n_views=many"),
    (["--out=o"], "--bank"),
  ):
    res = subprocess.run(
      [sys.executable, "-m", "gigassl_jax.encode", *args],
      capture_output=True,
      text=True,
      timeout=300,
    )
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert res.returncode == 2 and len(lines) == 1 and want in lines[0], res.stderr[-2000:]
