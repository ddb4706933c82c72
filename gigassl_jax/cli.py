"""One config source for every command line: absl flags generated from a frozen dataclass.

A program writes its settings once, as a frozen dataclass whose fields carry
their help (and, where the value is one of a few names, their choices):

    @dataclasses.dataclass(frozen=True)
    class EncodeConfig:
      bank: str = cli.field("", "Packed embedding bank.", required=True)
      n_views: int = cli.field(100, "R, views per slide.")

    cli.define_flags(EncodeConfig)        # one absl flag per field, same name
    cfg = cli.from_flags(EncodeConfig)    # after parsing: the dataclass
    cli.run(main)                         # app.run, with --help exiting 0

The flag type follows the field's annotation: bool, int, float, str (an enum
when `choices` is given), `X | None` (flag default None), and tuple[X, ...] or
tuple[X, X] (a comma list, its length checked). The default is the field's, so
no default is ever written twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pathlib
import signal
import sys
import time
import types
import typing
from collections.abc import Callable, Sequence

from absl import app, flags

_HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull")


def field(
  default,
  help: str,  # the flag's help text (shadows a builtin, by design)
  *,
  choices: Sequence[str] | None = None,
  required: bool = False,
):
  """A dataclass field that is also a flag: its default, help and choices.

  Args:
    default: the field's (and the flag's) default; dataclasses.MISSING for a
      field the caller must give (its flag then defaults to None).
    help: the flag's help text.
    choices: allowed values of a str field (an absl enum flag).
    required: the flag must be given on the command line (the field keeps
      `default` for programmatic use).
  """
  meta = {"help": help, "choices": None if choices is None else tuple(choices)}
  meta["required"] = required
  return dataclasses.field(default=default, metadata=meta)


def _kind(tp) -> tuple[type, bool, int | None]:
  """(element type, optional, tuple length or -1 for tuple[X, ...] / None for a scalar)."""
  optional = False
  args = typing.get_args(tp)
  if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
    rest = [a for a in args if a is not type(None)]
    optional, tp = True, rest[0]
    args = typing.get_args(tp)
  if typing.get_origin(tp) is tuple:
    if len(args) == 2 and args[1] is Ellipsis:
      return args[0], optional, -1
    return args[0], optional, len(args)
  return tp, optional, None


def _hints(cls) -> dict:
  return typing.get_type_hints(cls)


def define_flags(cls, flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines one absl flag per field of the dataclass `cls` (idempotent)."""
  hints = _hints(cls)
  required = []
  for f in dataclasses.fields(cls):
    if f.name in flag_values:
      continue
    meta = f.metadata
    help_text = meta.get("help", "")
    if meta.get("required"):
      help_text += " (required)"
    tp, _, length = _kind(hints[f.name])
    default = None if meta.get("required") or f.default is dataclasses.MISSING else f.default
    # Owned by the program being run, so absl's short --help lists them.
    kw = {"flag_values": flag_values, "module_name": sys.argv[0]}
    if length is not None:
      d = None if default is None else [str(x) for x in default]
      flags.DEFINE_list(f.name, d, help_text, **kw)
    elif tp is bool:
      flags.DEFINE_boolean(f.name, default, help_text, **kw)
    elif tp is int:
      flags.DEFINE_integer(f.name, default, help_text, **kw)
    elif tp is float:
      flags.DEFINE_float(f.name, default, help_text, **kw)
    elif meta.get("choices"):
      flags.DEFINE_enum(f.name, default, list(meta["choices"]), help_text, **kw)
    else:
      flags.DEFINE_string(f.name, default, help_text, **kw)
    if meta.get("required"):
      required.append(f.name)
  for name in required:
    flags.mark_flag_as_required(name, flag_values=flag_values)


def from_flags(cls, base=None, flag_values: flags.FlagValues = flags.FLAGS):
  """The dataclass `cls` from the parsed flags.

  Args:
    cls: the dataclass whose fields define_flags turned into flags.
    base: an instance whose values stand for the flags not given on the
      command line (default: the field defaults).
    flag_values: the parsed flags.

  Raises:
    ValueError: naming the flag of a list with the wrong length or element.
  """
  hints = _hints(cls)
  kw = {}
  for f in dataclasses.fields(cls):
    flag = flag_values[f.name]
    if base is not None and not flag.present:
      kw[f.name] = getattr(base, f.name)
      continue
    v = flag.value
    tp, _, length = _kind(hints[f.name])
    if v is None:
      v = None if flag.present or f.default is dataclasses.MISSING else f.default
    elif length is not None:
      try:
        v = tuple(tp(x) for x in v)
      except ValueError as e:
        raise ValueError(f"--{f.name}: {e}") from e
      if length > 0 and len(v) != length:
        raise ValueError(f"--{f.name} needs {length} values, got {len(v)}: {','.join(flag.value)}")
    kw[f.name] = v
  return cls(**kw)


GENERIC_RESUME = "finished work is kept: re-run the same command to resume"
PACKAGED_PREFIX = "gigassl:"


def experiments_dir() -> pathlib.Path:
  """The experiment flagfiles: installed as gigassl_jax/experiments, or the checkout's experiments/."""
  here = pathlib.Path(__file__).resolve().parent
  installed = here / "experiments"
  return installed if installed.is_dir() else here.parent / "experiments"


def _resolve_flagfile(name: str, containing: pathlib.Path | None) -> pathlib.Path:
  """Where `--flagfile=name` points.

  `gigassl:NAME` is the packaged flagfile NAME(.flags). Otherwise the path as
  given (relative to the working folder, as absl reads it), then relative to
  the flagfile that names it, and last, for `experiments/NAME.flags`, the
  packaged copy: so `--flagfile=experiments/base.flags` (and the nested
  reference in every experiment flagfile) works from any folder and after a
  non-editable install.

  Raises:
    FileNotFoundError: naming the flagfile and where it was looked for.
  """
  if name.startswith(PACKAGED_PREFIX):
    stem = name[len(PACKAGED_PREFIX) :]
    path = experiments_dir() / (stem if stem.endswith(".flags") else stem + ".flags")
    if path.is_file():
      return path
    have = sorted(p.stem for p in experiments_dir().glob("*.flags"))
    raise FileNotFoundError(f"--flagfile={name}: no packaged flagfile {stem!r} (have: {have})")
  tried = [pathlib.Path(name).expanduser()]
  if containing is not None and not tried[0].is_absolute():
    tried.append(containing.parent / name)
  parts = pathlib.PurePath(name).parts
  if len(parts) == 2 and parts[0] == "experiments":
    tried.append(experiments_dir() / parts[1])
  for path in tried:
    if path.is_file():
      return path
  raise FileNotFoundError(
    f"--flagfile={name}: no such file (looked for {', '.join(map(str, tried))})"
  )


def expand_flagfiles(args: Sequence[str], containing: pathlib.Path | None = None, depth=0):
  """argv with every --flagfile=FILE replaced by the flags it holds (nested ones too).

  Lines are read as absl reads them: blank lines and lines starting with # or
  // are comments. Flags keep their order, so later ones override earlier.
  """
  if depth > 20:
    raise FileNotFoundError(f"--flagfile nesting deeper than 20 in {containing} (a cycle?)")
  out, it = [], iter(args)
  for a in it:
    name = None
    if a.startswith(("--flagfile=", "-flagfile=")):
      name = a.split("=", 1)[1]
    elif a in ("--flagfile", "-flagfile"):
      name = next(it, "")
    if name is None:
      out.append(a)
      continue
    path = _resolve_flagfile(name, containing)
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(("#", "//"))]
    out += expand_flagfiles(lines, path, depth + 1)
  return out


def quiet_logs(verbose: bool = False) -> None:
  """Library INFO chatter off (jax's TPU probe, TFDS, orbax) unless `verbose`.

  Our own progress goes to stderr by print/tqdm and is unaffected.
  """
  if verbose:
    return
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel

  absl_logging.set_verbosity(absl_logging.WARNING)
  for name in ("jax", "orbax", "tensorflow_datasets", "absl"):
    logging.getLogger(name).setLevel(logging.WARNING)


def supervise(
  prog: str,
  main: Callable[[], int | None],
  resume_hint: str | Callable[[], str] | None = None,
) -> int:
  """Runs main(); Ctrl-C becomes one line and status 130; success prints the elapsed time.

  Args:
    prog: the program's name in messages.
    main: the work; returns an exit status (None = 0).
    resume_hint: what finished and how to resume, or a function giving it
      (called after the interrupt); default GENERIC_RESUME.

  Returns:
    main's status, or 130 after Ctrl-C.
  """
  t0 = time.monotonic()
  interrupted = False
  rc = 0
  try:
    with _interrupt_recorded() as was_interrupted:
      rc = main() or 0
      # Ctrl-C landing inside a finalizer (a weakref or GC callback) is swallowed
      # by Python and the work ran on: it still counts as an interrupt.
      interrupted = was_interrupted()
  except KeyboardInterrupt:
    interrupted = True
  if interrupted:
    hint = resume_hint() if callable(resume_hint) else resume_hint
    print(
      f"\n{prog}: interrupted after {time.monotonic() - t0:.0f} s; {hint or GENERIC_RESUME}",
      file=sys.stderr,
    )
    return 130
  if rc == 0:
    print(f"{prog}: done in {time.monotonic() - t0:.1f} s", file=sys.stderr)
  return rc


# Interrupts that Python dropped in a finalizer and no check_interrupt() raised yet.
_SWALLOWED: list[int] = []


def check_interrupt() -> None:
  """Raises KeyboardInterrupt if a Ctrl-C was swallowed by a finalizer since the last call.

  Long loops call it at every item boundary (a slide, a step), so such a
  Ctrl-C stops the work there instead of being lost.
  """
  if _SWALLOWED:
    _SWALLOWED.clear()
    raise KeyboardInterrupt


@contextlib.contextmanager
def _interrupt_recorded():
  """Records every SIGINT (raised as KeyboardInterrupt as usual) and yields `was_interrupted()`.

  Python cannot raise into a finalizer: a KeyboardInterrupt that lands in a
  weakref or GC callback is printed as "Exception ignored" and dropped. Inside
  this context such a dropped interrupt is silent and remembered instead: the
  next `check_interrupt()` raises it, and `was_interrupted()` stays true.
  Outside the main thread (no signal handlers there) it records nothing.
  """
  seen = []
  _SWALLOWED.clear()

  def on_sigint(signum, frame):
    seen.append(signum)
    raise KeyboardInterrupt

  def on_unraisable(u):
    if seen and isinstance(u.exc_value, KeyboardInterrupt):
      _SWALLOWED.append(1)
    else:
      old_hook(u)

  try:
    old_handler = signal.signal(signal.SIGINT, on_sigint)
  except ValueError:  # not the main thread
    yield lambda: False
    return
  old_hook = sys.unraisablehook
  sys.unraisablehook = on_unraisable
  try:
    yield lambda: bool(seen)
  finally:
    signal.signal(signal.SIGINT, old_handler)
    sys.unraisablehook = old_hook
    _SWALLOWED.clear()


def run(
  main: Callable[[list[str]], int | None],
  argv: list[str] | None = None,
  *,
  resume_hint: str | Callable[[], str] | None = None,
) -> None:
  """absl.app.run(main) the way every program of the package runs.

  - --help / -h / --helpfull print and exit 0 (absl exits 1), required flags
    marked; a bad or missing flag is one line on stderr and exit 2.
  - --flagfile=FILE is found from any folder (expand_flagfiles): as given,
    beside the flagfile naming it, or packaged (`gigassl:NAME` or
    `experiments/NAME.flags`).
  - Library INFO logs (TPU probe, TFDS, orbax) stay off unless --verbosity
    (-v) is given, e.g. -v 0 for INFO.
  - Ctrl-C prints how long it ran and how to resume (`resume_hint`, default
    GENERIC_RESUME) and exits 130; success ends with "<prog>: done in X s".
  """
  argv = list(sys.argv if argv is None else argv)
  # `python -m gigassl_jax.encode` has argv[0] = .../gigassl_jax/encode.py: "encode".
  prog = os.path.basename(argv[0]).removesuffix(".py")
  try:
    argv = argv[:1] + expand_flagfiles(argv[1:])
  except (OSError, UnicodeDecodeError) as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    sys.exit(2)
  asked = [a for a in argv[1:] if a in _HELP_FLAGS]
  if asked:
    app.usage(shorthelp="--helpfull" not in asked, writeto_stdout=True)
    sys.exit(0)

  def wrapped(args):
    # --verbosity (-v) given explicitly asks for the library logs.
    quiet_logs("verbosity" in flags.FLAGS and flags.FLAGS["verbosity"].present)
    rc = supervise(prog, lambda: main(args), resume_hint)
    if rc == 130:
      # Interrupted: finished work is already on disk (atomic writes). Leave
      # without running finalizers: an OpenSlide handle destroyed while a reader
      # thread still holds a tile aborts the process (openslide tiffcache assert).
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(130)
    return rc

  app.run(wrapped, argv=argv, flags_parser=_parse_or_exit_2)


def _parse_or_exit_2(argv: list[str]) -> list[str]:
  """Parses the flags; a bad or missing flag is one line on stderr and exit status 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"{os.path.basename(argv[0])}: error: {e}", file=sys.stderr)
    sys.exit(2)
