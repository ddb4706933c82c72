"""Which slides an embed run takes: listing a directory / list file, and sharding.

Slide ids are file stems; process i of n takes slides i, i + n, ... of the
sorted listing.
"""

from __future__ import annotations

import pathlib

# Extensions taken from a directory listing (OpenSlide's formats); files listed
# explicitly are always tried.
SLIDE_EXTENSIONS = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs",
    ".svslide", ".bif", ".czi", ".dcm",
)  # fmt: skip
LIST_EXTENSIONS = (".txt", ".lst", ".csv")


def list_slides(spec: str) -> list[pathlib.Path]:
  """Slide paths from a directory (recursive, by extension), a list file, or a comma list.

  Raises:
    FileNotFoundError: the directory / list file does not exist.
    ValueError: two slides with the same id (file stem).
  """
  paths: list[pathlib.Path] = []
  for part in [p for p in spec.split(",") if p.strip()]:
    p = pathlib.Path(part.strip()).expanduser()
    if p.is_dir():
      paths += sorted(
        q
        for q in p.rglob("*")
        if q.is_file() and q.suffix.lower() in SLIDE_EXTENSIONS and not q.name.startswith(".")
      )
    elif p.is_file() and p.suffix.lower() in LIST_EXTENSIONS:
      for line in p.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
          q = pathlib.Path(line).expanduser()
          paths.append(q if q.is_absolute() else p.parent / q)
    elif p.exists() or spec.count(",") > 0:
      paths.append(p)  # a single slide (missing ones fail in the manifest)
    else:
      raise FileNotFoundError(f"--slides={spec}: {p} is neither a directory nor a file")
  seen: dict[str, pathlib.Path] = {}
  for p in paths:
    sid = slide_id(p)
    if sid in seen and seen[sid] != p:
      raise ValueError(f"two slides share the id {sid!r}: {seen[sid]} and {p}; rename one")
    seen[sid] = p
  return [seen[k] for k in sorted(seen)]


def slide_id(path: pathlib.Path) -> str:
  """The id of a slide in the bank: its file name without extension."""
  return path.stem


def default_shards() -> tuple[int, int]:
  """(num_shards, shard_index) = (JAX process count, JAX process index)."""
  import jax  # pylint: disable=import-outside-toplevel

  return jax.process_count(), jax.process_index()


def shard(paths: list, num_shards: int, shard_index: int) -> list:
  if not 0 <= shard_index < num_shards:
    raise ValueError(f"--shard_index={shard_index} not in [0, --num_shards={num_shards})")
  return paths[shard_index::num_shards]
