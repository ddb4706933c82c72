"""Labels, train/test splits and their consistency checks for linear evaluation.

Labels: a CSV with columns `ID,label`, and optionally a patient column
(`case_id` in the reference's tables). Several slides of one patient carry
the patient's identity in their vectors, so a patient on both sides of a
split inflates the AUC: with a patient column, k-fold CV groups by patient and
fixed splits are checked for patients on both sides (`leaking_patients`).
Splits: the reference's `split_K.csv` files (columns
`train,test` of slide ids, the shorter column padded with empty cells), either
one folder of them or a task folder with one subfolder per data fraction
(`full`, `25p`, `100`, `50`); or stratified k-fold CV with stratified
data-fraction subsets of each training fold.

Every problem raises EvalError with the file and line it comes from.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import os
import pathlib
import re
import sys
import zlib

import numpy as np

from gigassl_jax import cli


class EvalError(ValueError):
  """Bad evaluation input; the message names the file and row."""


@dataclasses.dataclass(frozen=True)
class Split:
  """One train/test split.

  Attributes:
    subset: data-fraction name ("full", "25p", "50", ...).
    name: e.g. "full/split_3" or "fold_2".
    source: the split file, or a description of the CV draw (for messages).
    train: slide ids.
    test: slide ids.
  """

  subset: str
  name: str
  source: str
  train: tuple
  test: tuple


# --------------------------------------------------------------------------
# Reading labels and split files.


def _names_the_file(fn):
  """A CSV that is not UTF-8 or not CSV becomes an EvalError naming the file (arg 0)."""

  @functools.wraps(fn)
  def wrapped(path, *args, **kwargs):
    try:
      return fn(path, *args, **kwargs)
    except (UnicodeDecodeError, csv.Error) as e:
      raise EvalError(f"{path}: not a readable UTF-8 CSV ({e})") from e

  return wrapped


@_names_the_file
def load_labels(path) -> dict:
  """Reads a labels CSV with columns `ID,label` (extra columns such as case_id ignored).

  Returns:
    {slide id: label string}, in file order.

  Raises:
    EvalError: missing file or columns, empty cells, duplicate ids, < 2 classes.
  """
  path = str(path)
  if not os.path.isfile(path):
    raise EvalError(f"{path}: labels file not found")
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader = csv.DictReader(f)
    cols = reader.fieldnames or []
    if "ID" not in cols or "label" not in cols:
      raise EvalError(f"{path}: needs columns 'ID' and 'label' (found {cols})")
    labels, line_of = {}, {}
    for row in reader:
      line = reader.line_num
      sid, lab = (row.get("ID") or "").strip(), (row.get("label") or "").strip()
      if not sid and not lab:
        continue
      if not sid or not lab:
        raise EvalError(f"{path} line {line}: empty {'ID' if not sid else 'label'}")
      if sid in labels:
        raise EvalError(
          f"{path} line {line}: slide {sid!r} already labelled on line {line_of[sid]}"
        )
      labels[sid], line_of[sid] = lab, line
  classes = sorted(set(labels.values()))
  if len(classes) < 2:
    raise EvalError(f"{path}: needs at least 2 classes, found {classes}")
  return labels


@_names_the_file
def load_patients(path, column: str | None = "case_id", required: bool = False) -> dict | None:
  """Reads the patient of each slide from a labels CSV.

  Args:
    path: the labels CSV (already checked by load_labels).
    column: the patient column; None or "none" means no patients.
    required: fail when the column is absent (the user named it) instead of
      returning None (the default `case_id` is optional).

  Returns:
    {slide id: patient id}, or None without a patient column.

  Raises:
    EvalError: the named column is missing, or a labelled row has no patient.
  """
  if column is None or column.lower() == "none" or not column:
    return None
  path = str(path)
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader = csv.DictReader(f)
    cols = reader.fieldnames or []
    if column not in cols:
      if required:
        raise EvalError(f"{path}: no patient column {column!r} (--patient_column; found {cols})")
      return None
    out = {}
    for row in reader:
      sid = (row.get("ID") or "").strip()
      if not sid:
        continue
      pat = (row.get(column) or "").strip()
      if not pat:
        raise EvalError(f"{path} line {reader.line_num}: slide {sid!r} has an empty {column!r}")
      out[sid] = pat
  return out


def patient_labels(labels: dict, patients: dict, labels_path: str = "labels") -> dict:
  """{patient: label}; a patient whose slides carry different labels is an error."""
  out, first = {}, {}
  for s, lab in labels.items():
    p = patients[s]
    if p in out and out[p] != lab:
      raise EvalError(
        f"{labels_path}: patient {p!r} has slides of two labels ({first[p]!r} is "
        f"{out[p]!r}, {s!r} is {lab!r}): patient-level evaluation needs one label per patient"
      )
    out.setdefault(p, lab)
    first.setdefault(p, s)
  return out


def leaking_patients(split: Split, patients: dict) -> list:
  """Patients with slides on both sides of a split (sorted); slides without a patient ignored."""
  train = {patients[s] for s in split.train if s in patients}
  return sorted({patients[s] for s in split.test if s in patients} & train)


def drop_leaking(split: Split, patients: dict) -> Split:
  """The split without the test slides of patients that also sit in its training set."""
  leak = set(leaking_patients(split, patients))
  return dataclasses.replace(
    split,
    subset=f"{split.subset} drop_leaking",
    name=f"{split.name} drop_leaking",
    test=tuple(s for s in split.test if patients.get(s) not in leak),
  )


def count_leaks(ref_dir) -> list:
  """Leaking patients of every fixed split of the reference's evaluation folder.

  Args:
    ref_dir: a folder with `tables/{task}.csv` (ID,label,case_id) and
      `splitdirs/{task}/{subset}/split_K.csv`.

  Returns:
    one dict per split file: task, subset, split, n_train, n_test (slides in
    the file), leaking_patients, leaking_test_slides (test slides of those
    patients). Split slides absent from the table have no patient and do not count.
  """
  ref = pathlib.Path(ref_dir)
  out = []
  for table in sorted((ref / "tables").glob("*.csv")):
    task = table.stem
    patients = load_patients(table, "case_id", required=True)
    for sp in load_splits(ref / "splitdirs" / task):
      leak = set(leaking_patients(sp, patients))
      out.append(
        {
          "task": task,
          "subset": sp.subset,
          "split": pathlib.Path(sp.source).stem,
          "n_train": len(sp.train),
          "n_test": len(sp.test),
          "leaking_patients": len(leak),
          "leaking_test_slides": sum(patients.get(s) in leak for s in sp.test),
        }
      )
  return out


@_names_the_file
def read_split_file(path, subset: str) -> Split:
  """Reads one `split_K.csv` (columns train,test; shorter column padded with empty cells)."""
  path = str(path)
  train, test, where = [], [], {}
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader = csv.DictReader(f)
    cols = reader.fieldnames or []
    if "train" not in cols or "test" not in cols:
      raise EvalError(f"{path}: needs columns 'train' and 'test' (found {cols})")
    for row in reader:
      for col, out in (("train", train), ("test", test)):
        sid = (row.get(col) or "").strip()
        if not sid:
          continue
        if sid in where:
          raise EvalError(
            f"{path} line {reader.line_num}: slide {sid!r} ({col}) already "
            f"listed on line {where[sid][0]} ({where[sid][1]})"
          )
        where[sid] = (reader.line_num, col)
        out.append(sid)
  if not train or not test:
    raise EvalError(f"{path}: empty {'train' if not train else 'test'} column")
  name = f"{subset}/{pathlib.Path(path).stem}" if subset else pathlib.Path(path).stem
  return Split(
    subset=subset or "fixed", name=name, source=path, train=tuple(train), test=tuple(test)
  )


def _split_files(d: pathlib.Path) -> list:
  files = [p for p in d.glob("split_*.csv") if re.fullmatch(r"split_\d+\.csv", p.name)]
  return sorted(files, key=lambda p: int(p.stem.split("_")[1]))


def load_splits(splits_dir) -> list:
  """Fixed splits from a folder of split_K.csv, or from its subfolders (one subset each).

  The reference's task folder (splitdirs/lung) holds subfolders full, 25p, 100,
  50: each becomes a subset, in that order (others alphabetically after).
  """
  d = pathlib.Path(splits_dir)
  if not d.is_dir():
    raise EvalError(f"{d}: splits folder not found")
  files = _split_files(d)
  if files:
    return [read_split_file(p, d.name) for p in files]
  order = {"full": 0, "25p": 1, "250": 2, "100": 3, "50": 4}
  subs = sorted(
    (p for p in d.iterdir() if p.is_dir() and _split_files(p)),
    key=lambda p: (order.get(p.name, 9), p.name),
  )
  if not subs:
    raise EvalError(f"{d}: no split_K.csv files here or in its subfolders")
  return [read_split_file(p, s.name) for s in subs for p in _split_files(s)]


# --------------------------------------------------------------------------
# Cross-validation splits and data-fraction subsets.


def parse_subset(spec: str):
  """'full' -> None; '25p' or '25%' -> ('fraction', 0.25); '50' -> ('count', 50)."""
  s = spec.strip().lower()
  if s == "full":
    return None
  m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(p|%)", s)
  if m:
    frac = float(m.group(1)) / 100
    if not 0 < frac <= 1:
      raise EvalError(f"subset {spec!r}: a fraction must be in (0, 100] %")
    return ("fraction", frac)
  if s.isdigit() and int(s) > 0:
    return ("count", int(s))
  raise EvalError(
    f"subset {spec!r}: use 'full', a percentage like '25p' or '25%', or a "
    "number of training slides like '50'"
  )


def subsample(
  train: list, labels: dict, spec: str, rng: np.random.Generator, patients: dict | None = None
) -> list:
  """A stratified subset of the training slides (every class kept at least once).

  Args:
    train: training slide ids.
    labels: id -> label.
    spec: subset spec (see parse_subset).
    rng: numpy Generator.
    patients: slide -> patient; when given, the spec counts patients and whole
      patients are drawn (all their training slides), stratified by patient label.

  Returns:
    the chosen ids (all of `train` when the size reaches it), in `train` order.
  """
  if patients is not None:
    units = list(dict.fromkeys(patients[s] for s in train))
    unit_labels = patient_labels({s: labels[s] for s in train}, patients)
    chosen = set(subsample(units, unit_labels, spec, rng))
    return [s for s in train if patients[s] in chosen]
  kind = parse_subset(spec)
  if kind is None:
    return list(train)
  n = kind[1] if kind[0] == "count" else int(round(kind[1] * len(train)))
  if n >= len(train):
    return list(train)
  y = np.array([labels[s] for s in train])
  classes, counts = np.unique(y, return_counts=True)
  if n < len(classes):
    raise EvalError(
      f"subset {spec!r}: {n} training slides (or patients) cannot hold all {len(classes)} classes"
    )
  # Largest-remainder quotas proportional to the class counts, at least 1 each.
  raw = counts * n / len(train)
  quota = np.maximum(1, np.floor(raw)).astype(int)
  for c in np.argsort(-(raw - np.floor(raw))):
    if quota.sum() >= n:
      break
    if quota[c] < counts[c]:
      quota[c] += 1
  while quota.sum() > n:
    quota[np.argmax(quota)] -= 1
  chosen = []
  for c, q in zip(classes, quota):
    members = np.flatnonzero(y == c)
    chosen += list(rng.choice(members, size=q, replace=False))
  return [train[i] for i in sorted(chosen)]


def kfold_splits(
  ids: list,
  labels: dict,
  folds: int = 5,
  subsets=("full",),
  seed: int = 0,
  repeats: int = 1,
  patients: dict | None = None,
) -> list:
  """Stratified k-fold splits of the labelled slides, each fold's training set subsampled.

  With `patients`, the folds are stratified group k-fold over patients (a
  patient's slides all sit in one test fold, never on both sides), and every
  subset counts and draws patients.

  Args:
    ids: slide ids to split (all labelled).
    labels: id -> label.
    folds: k.
    subsets: data-fraction specs applied to each fold's training set.
    seed: seeds both the folds and the subsets.
    repeats: the k-fold partition is drawn this many times (repetition i uses
      seed + i), for more stable means on small cohorts.
    patients: slide id -> patient id, or None for slide-level folds.

  Returns:
    list of Split, subset-major.
  """
  # pylint: disable-next=import-outside-toplevel
  from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

  y = np.array([labels[s] for s in ids])
  if patients is None:
    classes, counts = np.unique(y, return_counts=True)
    unit = "slides"
  else:
    plab = patient_labels({s: labels[s] for s in ids}, patients)
    classes, counts = np.unique(list(plab.values()), return_counts=True)
    unit = "patients"
  if folds < 2:
    raise EvalError(f"--folds must be >= 2, got {folds}")
  if counts.min() < folds:
    c = classes[np.argmin(counts)]
    raise EvalError(
      f"class {str(c)!r} has {counts.min()} {unit}, fewer than --folds={folds}: "
      f"use fewer folds or more {unit}"
    )
  if repeats < 1:
    raise EvalError(f"--repeats must be >= 1, got {repeats}")
  base = []
  for i in range(repeats):
    if patients is None:
      skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed + i)
      base += [(tr, te) for tr, te in skf.split(np.zeros(len(ids)), y)]
    else:
      groups = np.array([patients[s] for s in ids])
      sgkf = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed + i)
      base += [(tr, te) for tr, te in sgkf.split(np.zeros(len(ids)), y, groups)]
  out = []
  for spec in subsets:
    parse_subset(spec)  # fail early on a bad spec
    rng = np.random.default_rng([seed, zlib.crc32(spec.encode())])
    for k, (tr, te) in enumerate(base):
      train = subsample([ids[i] for i in tr], labels, spec, rng, patients)
      rep, fold = divmod(k, folds)
      kind = "stratified" if patients is None else "patient-grouped stratified"
      out.append(
        Split(
          subset=spec,
          name=f"{spec}/rep_{rep}_fold_{fold}",
          source=f"{kind} {folds}-fold CV (seed {seed + rep}), fold {fold}",
          train=tuple(train),
          test=tuple(ids[i] for i in te),
        )
      )
  return out


def check_inputs(
  reps_list: list, labels: dict, labels_path: str, splits: list | None, drop_missing: bool = False
) -> tuple[dict, list]:
  """Validates ids across labels, splits and every representation file.

  Returns:
    (labels restricted to slides every method has, splits restricted likewise).

  Raises:
    EvalError: naming the file and row of the first problem.
  """
  have = set.intersection(*(set(r.ids) for r in reps_list))
  missing = [s for s in labels if s not in have]
  if missing and not drop_missing:
    rows = _label_lines(labels_path)
    s = missing[0]
    who = next(r for r in reps_list if s not in set(r.ids))
    raise EvalError(
      f"{labels_path} line {rows.get(s, '?')}: slide {s!r} has no representation in "
      f"{who.path} ({len(missing)} labelled slides missing in all); pass --drop_missing "
      "to evaluate on the slides that have one (the reference does so)"
    )
  if missing and len(missing) == len(labels):
    first = next(iter(reps_list[0].ids), None)
    raise EvalError(
      f"{labels_path}: none of its {len(labels)} labelled slides has a representation in "
      f"{' and '.join(r.path for r in reps_list)} (first label id {missing[0]!r}, first "
      f"representation id {first!r}): --drop_missing leaves nothing to evaluate"
    )
  if missing:
    print(
      f"evaluate: dropping {len(missing)} labelled slides with no representation", file=sys.stderr
    )
    labels = {s: v for s, v in labels.items() if s in have}
    left = sorted(set(labels.values()))
    if len(left) < 2:
      raise EvalError(
        f"{labels_path}: after --drop_missing only class(es) {left} have representations "
        "(ROC-AUC needs two)"
      )
  if splits is None:
    return labels, None
  out, lines, left_out = [], _label_lines(labels_path), {}
  for sp in splits:
    unknown = []
    for col, part in (("train", sp.train), ("test", sp.test)):
      for s in part:
        if s in labels:
          continue
        if s in lines and drop_missing:
          continue  # labelled but without a representation: dropped above
        if s in lines:
          raise EvalError(
            f"{sp.source} line {_split_line(sp.source, s)}: slide {s!r} "
            f"({col}) has no representation"
          )
        unknown.append((col, s))
    if unknown and len(unknown) == len(sp.train) + len(sp.test):
      raise EvalError(
        f"{sp.source}: none of its slides is in the labels file {labels_path} "
        "(splits and labels of different tasks?)"
      )
    if unknown:
      col, s = unknown[0]
      left_out.setdefault(str(pathlib.Path(sp.source).parent), []).append(
        (sp.source, len(unknown), _split_line(sp.source, s), col, s)
      )
    train = tuple(s for s in sp.train if s in labels)
    test = tuple(s for s in sp.test if s in labels)
    out.append(dataclasses.replace(sp, train=train, test=test))
  # The reference's own kidney/full splits list 7 slides its table lacks; like
  # the reference, such slides are left out, but never silently.
  for folder, items in left_out.items():
    src, n, line, col, s = items[0]
    print(
      f"evaluate: warning: {len(items)} split files in {folder} list slides that are not "
      f"in {labels_path}: left out (first: {src} line {line}, {col} {s!r}; "
      f"{n} in that file)",
      file=sys.stderr,
    )
  classes = sorted(set(labels.values()))
  for sp in out:
    for col, part in (("train", sp.train), ("test", sp.test)):
      present = {labels[s] for s in part}
      lacking = [c for c in classes if c not in present]
      if col == "test" and len(present) < 2:
        raise EvalError(
          f"{sp.source}: the test set has only class {sorted(present)} (ROC-AUC needs both classes)"
        )
      if lacking:
        raise EvalError(
          f"{sp.source}: the {col} set has no slide of class(es) {lacking} "
          f"of the labels file {labels_path}"
        )
  return labels, out


_LINES_CACHE: dict = {}


def _label_lines(path) -> dict:
  """id -> line number in a labels CSV (for messages)."""
  key = str(path)
  if key not in _LINES_CACHE:
    with open(key, newline="", encoding="utf-8-sig") as f:
      r = csv.DictReader(f)
      _LINES_CACHE[key] = {(row.get("ID") or "").strip(): r.line_num for row in r}
  return _LINES_CACHE[key]


def _split_line(path, sid) -> int | str:
  try:
    with open(path, newline="", encoding="utf-8-sig") as f:
      r = csv.DictReader(f)
      for row in r:
        if sid in ((row.get("train") or "").strip(), (row.get("test") or "").strip()):
          return r.line_num
  except OSError:
    pass
  return "?"


# --------------------------------------------------------------------------
# `python -m gigassl_jax.splits --leaks DIR [--out STEM]`: leak counts of fixed splits.


def leak_summary(rows: list) -> list:
  """Per (task, subset): splits, min/max leaking patients, min/max leaking test slides."""
  groups: dict = {}
  for r in rows:
    groups.setdefault((r["task"], r["subset"]), []).append(r)
  return [
    {
      "task": t,
      "subset": s,
      "n_splits": len(g),
      "n_test": int(np.median([r["n_test"] for r in g])),
      "leaking_patients_min": min(r["leaking_patients"] for r in g),
      "leaking_patients_max": max(r["leaking_patients"] for r in g),
      "leaking_test_slides_min": min(r["leaking_test_slides"] for r in g),
      "leaking_test_slides_max": max(r["leaking_test_slides"] for r in g),
    }
    for (t, s), g in groups.items()
  ]


def leak_markdown(summary: list) -> str:
  lines = [
    (
      "| task | subset | splits | test slides (median) | leaking patients (min-max) "
      "| their test slides (min-max) |"
    ),
    "|---|---|---|---|---|---|",
  ]
  for r in summary:
    lines.append(
      f"| {r['task']} | {r['subset']} | {r['n_splits']} | {r['n_test']} | "
      f"{r['leaking_patients_min']}-{r['leaking_patients_max']} | "
      f"{r['leaking_test_slides_min']}-{r['leaking_test_slides_max']} |"
    )
  return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class LeaksConfig:
  """`python -m gigassl_jax.splits --leaks=DIR [--out=OUT]`: the leak count's flags."""

  leaks: str = cli.field(
    "",
    "Folder with tables/{task}.csv (ID,label,case_id) and splitdirs/{task}/...",
    required=True,
  )
  out: str | None = cli.field(None, "Write OUT.json (every split) and OUT.md (summary table).")


def main(argv) -> int:
  """Counts the leaks of the parsed --leaks folder; returns the exit status."""
  import datetime  # pylint: disable=import-outside-toplevel
  import json  # pylint: disable=import-outside-toplevel
  import platform  # pylint: disable=import-outside-toplevel

  del argv  # the flags hold the settings
  args = cli.from_flags(LeaksConfig)
  try:
    rows = count_leaks(args.leaks)
  except EvalError as e:
    print(f"splits: error: {e}", file=sys.stderr)
    return 2
  summary = leak_summary(rows)
  md = leak_markdown(summary)
  if args.out:
    cmd = " ".join(["python -m gigassl_jax.splits", *sys.argv[1:]])
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = (
      f"{platform.node() or 'unknown'} ({platform.machine()}, Python {platform.python_version()})"
    )
    doc = {"command": cmd, "date": when, "machine": machine, "summary": summary, "splits": rows}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in (
      (out.with_suffix(".json"), json.dumps(doc, indent=1) + "\n"),
      (
        out.with_suffix(".md"),
        (
          "# Patients on both sides of the reference's fixed splits\n\n"
          f"Command: `{cmd}`  \nDate: {when}  \nMachine: {machine}\n\n{md}\n"
        ),
      ),
    ):
      tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
      tmp.write_text(text)
      os.replace(tmp, path)
  print(md)
  return 0


if __name__ == "__main__":
  cli.define_flags(LeaksConfig)
  cli.run(main)
