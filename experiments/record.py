r"""Runs a command and records its output as a result file with command, date and machine.

    python experiments/record.py OUT.log -- python -m gigassl_jax.conformance tests/fixtures/golden_scn

OUT.log starts with `# command:`, `# date:`, `# machine:` (CPU model, cores,
load average at the start, Python and jax versions) lines, then the command's
stdout and stderr as they came. Written atomically (a temp file, then renamed);
exits with the command's status. README.md and docs/ quote numbers from files
like these (tests/test_repo_docs.py checks that they do).
"""

from __future__ import annotations

import os
import pathlib
import platform
import shlex
import subprocess
import sys
import time


def machine() -> str:
  from gigassl_jax.machine import cpu_name  # pylint: disable=import-outside-toplevel

  try:
    import jax  # pylint: disable=import-outside-toplevel

    jax_version = jax.__version__
  except ImportError:  # pragma: no cover
    jax_version = "absent"
  load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
  return (
    f"{cpu_name()}, {os.cpu_count()} cores, load average {load} at start; "
    f"Python {platform.python_version()}, jax {jax_version}"
  )


def main(argv: list[str]) -> int:
  if len(argv) < 3 or argv[1] != "--":
    print("usage: python experiments/record.py OUT.log -- COMMAND [ARGS...]", file=sys.stderr)
    return 2
  out, cmd = pathlib.Path(argv[0]), argv[2:]
  header = (
    f"# command: {shlex.join(cmd)}\n"
    f"# date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n"
    f"# machine: {machine()}\n"
  )
  t = time.perf_counter()
  r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  footer = f"# exit status {r.returncode} after {time.perf_counter() - t:.1f} s\n"
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(out.name + ".tmp")
  tmp.write_text(header + r.stdout + footer, encoding="utf-8")
  os.replace(tmp, out)
  sys.stdout.write(r.stdout)
  return r.returncode


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
