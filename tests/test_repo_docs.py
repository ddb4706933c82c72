"""The repository speaks for itself: no file cites material users do not have.

Users get this repository, not the workspace it was developed in: a citation of
the workspace's shared folder (or of a method page by its bare name) points them
at a file they lack.
"""

import pathlib
import re
import subprocess

REPO = pathlib.Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".flags", ".sh", ".txt", ".toml", ".cfg", ""}


def _tracked_text_files():
  out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
  for name in out.stdout.splitlines():
    path = REPO / name
    if name == "tests/test_repo_docs.py":  # names the patterns it looks for
      continue
    if path.suffix in TEXT_SUFFIXES and path.is_file() and "fixtures" not in path.parts:
      yield name, path.read_text(encoding="utf-8", errors="replace")


def test_no_file_cites_the_development_workspace():
  # Built from pieces so that this file does not match itself.
  pattern = re.compile(r"\.\./" + "shared|(?<![\\w/])" + r"shared/(golden|method|data|design)")
  hits = [
    f"{name}:{i + 1}: {line.strip()}"
    for name, text in _tracked_text_files()
    for i, line in enumerate(text.splitlines())
    if pattern.search(line)
  ]
  assert not hits, "files cite the development workspace:\n" + "\n".join(hits)


def test_method_citations_point_to_the_shipped_method_page():
  # "method.md section N" must be docs/method.md, which ships with the repo.
  assert (REPO / "docs" / "method.md").is_file()
  bare = re.compile(r"(?<![\w/\[])method\.md")  # a link [method.md](...) names the file
  hits = [
    f"{name}:{i + 1}: {line.strip()}"
    for name, text in _tracked_text_files()
    for i, line in enumerate(text.splitlines())
    if bare.search(line) and not name.startswith("docs/")  # docs/ link it relatively
  ]
  assert not hits, "cite docs/method.md, not a bare method.md:\n" + "\n".join(hits)


NUMBER = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?")
LINK = re.compile(r"\]\(([^)]+)\)")


def _results_rows(readme: str):
  """(row text, result cell, evidence file) of every row of README's results tables.

  A results table is one whose header row names the columns `result` and `file`;
  `same` in the file column means the row above's file.
  """
  rows, cols, last_file = [], None, None
  for line in readme.splitlines():
    if not line.startswith("|"):
      cols = None
      continue
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if cols is None:
      lowered = [c.lower() for c in cells]
      cols = lowered if {"result", "file"} <= set(lowered) else []
      continue
    if not cols or set(line) <= set("|-: "):
      continue
    row = dict(zip(cols, cells))
    link = LINK.search(row["file"])
    if link:
      last_file = link.group(1)
    elif row["file"].lower() != "same":
      last_file = None
    rows.append((line, row["result"], last_file))
  return rows


def test_every_readme_result_number_is_in_its_committed_result_file():
  readme = (REPO / "README.md").read_text(encoding="utf-8")
  rows = _results_rows(readme)
  assert rows, "README.md has no results table (columns `result` and `file`)"
  tracked = set(
    subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
  )
  missing = []
  for line, result, path in rows:
    if path is None:
      missing.append(f"no evidence file linked: {line}")
      continue
    if path not in tracked:
      missing.append(f"{path} is not a committed file: {line}")
      continue
    text = (REPO / path).read_text(encoding="utf-8").replace(",", "")
    for num in NUMBER.findall(result):
      if num.replace(",", "") not in text:
        missing.append(f"{num} not in {path}: {line}")
  assert not missing, "README results without evidence:\n" + "\n".join(missing)
