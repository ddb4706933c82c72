"""What machine a benchmark ran on, for the tables it prints; its result file, written atomically."""

import json
import os
import pathlib
import platform


def cpu_name() -> str:
  """The CPU's model name (from /proc/cpuinfo where there is one)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "cpu"


def write_result(path, record: dict) -> None:
  """Writes a benchmark's result as JSON: to a temp name in the folder, then renamed."""
  out = pathlib.Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
  tmp.write_text(json.dumps(record, indent=2) + "\n")
  os.replace(tmp, out)
