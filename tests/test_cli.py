"""One config source: absl flags generated from a dataclass (gigassl_jax.cli), and --help."""

import dataclasses
import os
import re
import signal
import subprocess
import sys
import weakref

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


def test_flagfiles_nest_relative_to_their_file_and_from_the_package(tmp_path, monkeypatch):
  """Nested --flagfile: as given, then beside the naming file, then packaged experiments/."""
  monkeypatch.chdir(tmp_path)  # a folder with no experiments/ in it
  sub = tmp_path / "mine"
  sub.mkdir()
  (sub / "inner.flags").write_text("# a comment\n\n--count=4\n// another\n--kind=b\n")
  (sub / "outer.flags").write_text("--flagfile=experiments/base.flags\n--flagfile=inner.flags\n")
  got = cli.expand_flagfiles(["--name=x", f"--flagfile={sub / 'outer.flags'}", "--count=5"])
  base = [
    ln.strip()
    for ln in (cli.experiments_dir() / "base.flags").read_text().splitlines()
    if ln.strip() and not ln.startswith("#")
  ]
  assert got == ["--name=x", *base, "--count=4", "--kind=b", "--count=5"]
  assert cli.expand_flagfiles(["--flagfile=gigassl:base"]) == base
  assert cli.expand_flagfiles(["--flagfile", "gigassl:base.flags"]) == base
  with pytest.raises(FileNotFoundError, match="no packaged flagfile 'nosuch'"):
    cli.expand_flagfiles(["--flagfile=gigassl:nosuch"])
  with pytest.raises(FileNotFoundError, match="--flagfile=gone.flags: no such file"):
    cli.expand_flagfiles(["--flagfile=gone.flags"])
  (sub / "loop.flags").write_text("--flagfile=loop.flags\n")
  with pytest.raises(FileNotFoundError, match="deeper than 20"):
    cli.expand_flagfiles([f"--flagfile={sub / 'loop.flags'}"])


def test_supervise_turns_ctrl_c_into_130_and_times_success(capsys):
  def interrupted():
    raise KeyboardInterrupt

  assert cli.supervise("prog", interrupted) == 130
  err = capsys.readouterr().err.strip()
  assert err.startswith("prog: interrupted after 0 s; ") and err.endswith(cli.GENERIC_RESUME), err
  assert cli.supervise("prog", interrupted, lambda: "3 slides kept") == 130
  assert capsys.readouterr().err.strip().endswith("; 3 slides kept")
  assert cli.supervise("prog", lambda: None) == 0
  assert re.fullmatch(r"prog: done in \d+\.\d s", capsys.readouterr().err.strip())
  assert cli.supervise("prog", lambda: 1) == 1  # a failure prints no "done"
  assert capsys.readouterr().err == ""


def test_ctrl_c_swallowed_by_a_finalizer_still_counts_as_an_interrupt(capsys):
  """Python drops a KeyboardInterrupt raised inside a weakref callback ("Exception
  ignored") and the work runs on; supervise must still report the interrupt, quietly."""

  class Thing:
    pass

  def main():
    def callback(_):
      os.kill(os.getpid(), signal.SIGINT)  # the handler runs at the next bytecode: in here
      for _ in range(10_000):
        pass

    thing = Thing()
    ref = weakref.ref(thing, callback)
    del thing  # the callback runs now (CPython refcounting)
    assert ref() is None
    for item in range(3):  # a long loop checks at every item: the dropped Ctrl-C stops it
      cli.check_interrupt()
      done.append(item)
    return 0

  done = []
  before = signal.getsignal(signal.SIGINT)  # SIG_IGN in a pytest-xdist worker
  assert cli.supervise("prog", main) == 130
  assert done == [], f"the loop went on after the interrupt: {done}"
  cli.check_interrupt()  # nothing left pending after supervise
  err = capsys.readouterr().err
  assert "Exception ignored" not in err and "Traceback" not in err, err
  assert err.strip().startswith("prog: interrupted after 0 s; "), err
  # The handler and hook are restored afterwards.
  assert signal.getsignal(signal.SIGINT) == before


def test_required_flags_are_marked_in_the_help():
  fv = flags.FlagValues()
  cli.define_flags(_Cfg, flag_values=fv)
  assert fv["name"].help.endswith("(required)") and "required" not in fv["count"].help
