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

import dataclasses
import os
import sys
import types
import typing
from collections.abc import Callable, Sequence

from absl import app, flags

_HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull")


def field(
  default,
  help: str,  # noqa: A002  (the flag's help text)
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


def run(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> None:
  """absl.app.run(main), except that --help / -h / --helpfull print and exit 0.

  absl's own help flag exits with status 1 (asking for help is not an error),
  and its flag errors too (bad input exits 2 here, as every error of these
  programs does).
  """
  argv = sys.argv if argv is None else argv
  asked = [a for a in argv[1:] if a in _HELP_FLAGS]
  if asked:
    app.usage(shorthelp="--helpfull" not in asked, writeto_stdout=True)
    sys.exit(0)
  app.run(main, argv=argv, flags_parser=_parse_or_exit_2)


def _parse_or_exit_2(argv: list[str]) -> list[str]:
  """Parses the flags; a bad or missing flag is one line on stderr and exit status 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"{os.path.basename(argv[0])}: error: {e}", file=sys.stderr)
    sys.exit(2)
