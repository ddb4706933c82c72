"""Linear evaluation of slide representations: `python -m gigassl_jax.evaluate`.

    python -m gigassl_jax.evaluate --reps=giga.npz,mean.npz --labels=labels.csv \
        [--splits=DIR [--splits_fix=drop_leaking]] [--level=slide|patient] \
        [--patient_column=case_id] [--out=DIR] [--workdir=RUN]

The protocol of docs/method.md section 7 (the reference's linear_evaluation.py):
logistic regression (L2, C = 10, class_weight balanced, no feature scaling,
max_iter 1000), ROC-AUC (macro one-vs-rest for > 2 classes), mean +- std over
splits. Splits are either the reference's fixed files (a folder of
`split_K.csv` with columns `train,test`, or a task folder whose subfolders
`full`, `25p`, `100`, `50` each hold such files) or stratified k-fold CV, with
optional data-fraction subsets of each training fold (`--subsets=full,25p,50`).

Patients: when the labels carry a patient column (`case_id`, or
--patient_column), k-fold CV is stratified group k-fold (a patient never on
both sides; subsets count and draw patients), fixed splits that put a patient
on both sides are run as given but reported (one stderr line per split, a row
of the table), and --splits_fix=drop_leaking adds their numbers without the
leaking test slides. --level=patient averages a patient's slide vectors (then
L2) and scores patients. See docs/evaluate.md for why.

Representation files: gigassl_jax.reps (our .npz, and the published .npy
slide embeddings, read without running pickled code).

Several representation files (e.g. Giga-SSL and its baselines) are evaluated
on exactly the same splits. Outputs in --out: results.md, results.csv (one row
per method and subset), per_split.csv (every AUC), pca.png and, with
--workdir, loss.png.

Bad inputs (unknown slide ids, a class missing from a training set, a test set
with one class, NaN vectors) raise EvalError with the file and row; the CLI
prints it without a stack trace and exits with status 2.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pathlib
import sys

import numpy as np

from gigassl_jax import cli
from gigassl_jax import reps as reps_lib
from gigassl_jax import splits as splits_lib
from gigassl_jax.reps import Reps, RepsError, load_reps, save_reps  # noqa: F401  (re-exported)
from gigassl_jax.splits import EvalError

# The reference's probe settings (linear_evaluation.py).
C = 10.0
MAX_ITER = 1000


def probe(x_train, y_train, x_test, y_test, n_classes: int, max_iter: int = MAX_ITER) -> float:
  """Fits the reference's logistic regression and returns the test ROC-AUC.

  Args:
    x_train: float [Ntr, D]; y_train: int [Ntr] in [0, n_classes).
    x_test: float [Nte, D]; y_test: int [Nte].
    n_classes: number of classes (macro one-vs-rest AUC when > 2).
  """
  import warnings  # pylint: disable=import-outside-toplevel

  from sklearn.exceptions import ConvergenceWarning  # pylint: disable=import-outside-toplevel
  from sklearn.linear_model import LogisticRegression  # pylint: disable=import-outside-toplevel
  from sklearn.metrics import roc_auc_score  # pylint: disable=import-outside-toplevel

  # L2 is sklearn's default penalty; features are used as they are (no scaling).
  clf = LogisticRegression(C=C, max_iter=max_iter, class_weight="balanced")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)
    clf.fit(x_train, y_train)
  p = clf.predict_proba(x_test)
  if n_classes == 2:
    return float(roc_auc_score(y_test, p[:, 1]))
  return float(
    roc_auc_score(y_test, p, multi_class="ovr", average="macro", labels=np.arange(n_classes))
  )


def evaluate(
  reps_list: list,
  labels: dict,
  splits: list,
  progress: bool = True,
  leaks: dict | None = None,
  level: str = "slide",
) -> list:
  """Runs the probe for every method on every split.

  Args:
    reps_list: list of Reps (already checked against labels and splits); at
      patient level their ids are patients.
    labels: id -> label.
    splits: list of Split.
    leaks: split name -> patients on both sides (None: patients unknown).
    level: "slide" or "patient" (what the ids, hence the AUC, count).

  Returns:
    per-split records: dict(method, subset, split, level, n_train, n_test,
    leaking_patients, auc); leaking_patients is None when patients are unknown.
  """
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  classes = sorted(set(labels.values()))
  cls = {c: i for i, c in enumerate(classes)}
  records = []
  bar = tqdm(
    total=len(reps_list) * len(splits),
    desc="evaluate",
    unit="fit",
    disable=not progress,
    dynamic_ncols=True,
  )
  for r in reps_list:
    idx = r.index()
    for sp in splits:
      tr = [idx[s] for s in sp.train]
      te = [idx[s] for s in sp.test]
      auc = probe(
        r.vectors[tr],
        np.array([cls[labels[s]] for s in sp.train]),
        r.vectors[te],
        np.array([cls[labels[s]] for s in sp.test]),
        len(classes),
      )
      records.append(
        {
          "method": r.method,
          "subset": sp.subset,
          "split": sp.name,
          "level": level,
          "n_train": len(tr),
          "n_test": len(te),
          "leaking_patients": None if leaks is None else leaks.get(sp.name, 0),
          "auc": auc,
        }
      )
      bar.set_postfix_str(f"{r.method} {sp.name}")
      bar.update()
  bar.close()
  return records


def summarize(records: list) -> list:
  """Mean +- std (population std, as the reference's np.std) per (method, subset)."""
  groups: dict = {}
  for rec in records:
    groups.setdefault((rec["method"], rec["subset"]), []).append(rec)
  rows = []
  for (method, subset), recs in groups.items():
    a = np.array([x["auc"] for x in recs])
    leak = [x.get("leaking_patients") for x in recs]
    known = None not in leak
    rows.append(
      {
        "method": method,
        "subset": subset,
        "level": recs[0].get("level", "slide"),
        "n_splits": len(recs),
        "n_train": int(np.median([x["n_train"] for x in recs])),
        "n_test": int(np.median([x["n_test"] for x in recs])),
        "leaking_patients_min": min(leak) if known else None,
        "leaking_patients_max": max(leak) if known else None,
        "auc_mean": float(a.mean()),
        "auc_std": float(a.std()),
      }
    )
  return rows


def markdown_table(rows: list) -> str:
  """Methods as rows, subsets as columns, cells 'mean +- std'.

  With known patients, a last row gives the patients on both sides of each
  subset's splits (min-max); the note under the table says the level.
  """
  subsets = list(dict.fromkeys(r["subset"] for r in rows))
  methods = list(dict.fromkeys(r["method"] for r in rows))
  cell = {(r["method"], r["subset"]): r for r in rows}
  head = ["method"] + [
    f"{s} (train {cell[next((m, s) for m in methods if (m, s) in cell)]['n_train']})"
    for s in subsets
  ]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for m in methods:
    vals = []
    for s in subsets:
      r = cell.get((m, s))
      vals.append("" if r is None else f"{r['auc_mean']:.3f} +- {r['auc_std']:.3f}")
    lines.append("| " + " | ".join([m] + vals) + " |")
  if rows and all(r.get("leaking_patients_max") is not None for r in rows):
    vals = []
    for s in subsets:
      r = cell[next((m, s) for m in methods if (m, s) in cell)]
      lo, hi = r["leaking_patients_min"], r["leaking_patients_max"]
      vals.append(str(lo) if lo == hi else f"{lo}-{hi}")
    lines.append("| " + " | ".join(["patients on both sides (per split)"] + vals) + " |")
  n = rows[0]["n_splits"] if rows else 0
  level = rows[0].get("level", "slide") if rows else "slide"
  what = (
    "one vector per slide, AUC over test slides"
    if level == "slide"
    else "slide vectors of a patient averaged then L2-normalised, AUC over test patients"
  )
  lines.append(
    f"\nLevel: {level} ({what}). "
    f"ROC-AUC (macro one-vs-rest for > 2 classes), mean +- std over {n} splits; "
    "logistic regression L2, C=10, class_weight balanced, no scaling."
  )
  return "\n".join(lines)


def patient_reps(reps: Reps, patients: dict, keep) -> Reps:
  """One vector per patient: the mean of its slides' vectors, then L2-normalised.

  Args:
    reps: slide vectors.
    patients: slide id -> patient id.
    keep: slide ids to use (labelled slides with a vector), in a fixed order.

  Returns:
    Reps whose ids are patients (first-seen order of `keep`), vectors float32 [P, D].
  """
  idx = reps.index()
  rows: dict = {}
  for s in keep:
    rows.setdefault(patients[s], []).append(idx[s])
  # float64 mean so the result does not depend on the slides' order beyond rounding.
  v = np.stack([reps.vectors[r].astype(np.float64).mean(0) for r in rows.values()])
  v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
  return dataclasses.replace(reps, ids=list(rows), vectors=v.astype(np.float32))


def _slides_of(split, labels: dict, patients: dict):
  """A split of patients as the slides of those patients (labels order)."""
  train, test = set(split.train), set(split.test)
  return dataclasses.replace(
    split,
    train=tuple(x for x in labels if patients[x] in train),
    test=tuple(x for x in labels if patients[x] in test),
  )


def patient_split(split, patients: dict):
  """A slide split as patients (a leaking patient stays on both sides, as given)."""
  return dataclasses.replace(
    split,
    train=tuple(dict.fromkeys(patients[s] for s in split.train)),
    test=tuple(dict.fromkeys(patients[s] for s in split.test)),
  )


def _write_csv(path: pathlib.Path, rows: list):
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  with open(tmp, "w", newline="") as f:
    w = csv.DictWriter(f, list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  os.replace(tmp, path)


def _write_text(path: pathlib.Path, text: str):
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  tmp.write_text(text)
  os.replace(tmp, path)


# --------------------------------------------------------------------------
# Pictures.


def plot_pca(reps_list: list, labels: dict, path) -> pathlib.Path:
  """One panel per method: the first two principal components coloured by label."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  classes = sorted(set(labels.values()))
  fig, axes = plt.subplots(1, len(reps_list), figsize=(4.2 * len(reps_list), 4), squeeze=False)
  for ax, r in zip(axes[0], reps_list):
    keep = [i for i, s in enumerate(r.ids) if s in labels]
    x = r.vectors[keep].astype(np.float64)
    x = x - x.mean(0)
    # PCA by SVD of the centred data: no extra dependency, deterministic up to sign.
    _, sv, vt = np.linalg.svd(x, full_matrices=False)
    z = x @ vt[:2].T
    var = sv**2 / max((sv**2).sum(), 1e-12)
    for k, c in enumerate(classes):
      m = np.array([labels[r.ids[i]] == c for i in keep])
      ax.scatter(
        z[m, 0],
        z[m, 1] if z.shape[1] > 1 else np.zeros(m.sum()),
        s=18,
        label=c,
        color=f"C{k}",
        alpha=0.8,
      )
    ax.set_title(r.method)
    ax.set_xlabel(f"PC1 ({var[0]:.0%})")
    ax.set_ylabel(f"PC2 ({var[1]:.0%})" if len(var) > 1 else "PC2")
    ax.legend(fontsize=8)
  fig.tight_layout()
  return _save_fig(fig, path)


def read_metrics(path) -> list:
  """Records of a metrics.jsonl (one JSON object a line); bad lines raise EvalError."""
  out = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if line.strip():
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise EvalError(f"{path} line {n}: not JSON ({e})") from e
  return out


def plot_loss(metrics_path, path) -> pathlib.Path:
  """Training loss (and learning rate) against the step, from metrics.jsonl."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  recs = [r for r in read_metrics(metrics_path) if "loss" in r and "step" in r]
  if not recs:
    raise EvalError(f"{metrics_path}: no record with 'step' and 'loss'")
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], color="C0", label="NT-Xent loss")
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  if all("lr" in r for r in recs):
    ax2 = ax.twinx()
    ax2.plot(
      [r["step"] for r in recs],
      [r["lr"] for r in recs],
      color="C1",
      alpha=0.5,
      label="learning rate",
    )
    ax2.set_ylabel("learning rate")
  ax.set_title("training loss")
  fig.tight_layout()
  return _save_fig(fig, path)


def _save_fig(fig, path) -> pathlib.Path:
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)
  return path


# --------------------------------------------------------------------------
# Programmatic entry point and CLI.


def run(
  reps_paths: list,
  labels_path,
  splits_dir=None,
  out_dir=None,
  *,
  folds: int = 5,
  subsets=("full",),
  seed: int = 0,
  repeats: int = 1,
  workdir=None,
  drop_missing: bool = False,
  progress: bool = True,
  patient_column: str | None = "case_id",
  level: str = "slide",
  splits_fix: str | None = None,
) -> dict:
  """Everything the CLI does; returns {"rows", "records", "markdown", "files"}.

  patient_column: the labels' patient column ("case_id" is used when present;
    another name must exist; None or "none": no patients). With patients, k-fold
    CV is patient-grouped and fixed splits are checked for patients on both sides.
  level: "slide" or "patient" (needs patients).
  splits_fix: None, or "drop_leaking": each fixed split is also evaluated
    without the test slides of patients on both sides, next to the as-given one.
  """
  if level not in ("slide", "patient"):
    raise EvalError(f"--level must be 'slide' or 'patient', got {level!r}")
  if splits_fix not in (None, "", "none", "drop_leaking"):
    raise EvalError(f"--splits_fix must be 'drop_leaking' or 'none', got {splits_fix!r}")
  reps_list = []
  for p in reps_paths:
    try:
      reps_list.append(reps_lib.load_reps(p))
    except RepsError as e:
      raise EvalError(str(e)) from e
  names = [r.method for r in reps_list]
  if len(set(names)) != len(names):
    reps_list = [
      dataclasses.replace(r, method=f"{r.method} ({pathlib.Path(r.path).stem})") for r in reps_list
    ]
  labels = splits_lib.load_labels(labels_path)
  patients = splits_lib.load_patients(
    labels_path, patient_column, required=patient_column not in (None, "case_id")
  )
  if level == "patient" and patients is None:
    raise EvalError(
      f"{labels_path}: --level=patient needs a patient column "
      f"({patient_column!r} not found; name it with --patient_column)"
    )
  splits = splits_lib.load_splits(splits_dir) if splits_dir else None
  labels, splits = splits_lib.check_inputs(
    reps_list, labels, str(labels_path), splits, drop_missing
  )
  if patients is not None and level == "patient":
    # Fail early when a patient's slides disagree on the label.
    splits_lib.patient_labels(labels, patients, str(labels_path))
  leaks = None
  if splits is None:
    if level == "patient":
      # CV over patients directly: each patient is one item.
      plabels = splits_lib.patient_labels(labels, patients, str(labels_path))
      splits = splits_lib.kfold_splits(list(plabels), plabels, folds, subsets, seed, repeats)
      splits = [_slides_of(s, labels, patients) for s in splits]
    else:
      splits = splits_lib.kfold_splits(
        list(labels), labels, folds, subsets, seed, repeats, patients
      )
    labels, splits = splits_lib.check_inputs(
      reps_list, labels, str(labels_path), splits, drop_missing
    )
  if patients is not None:
    leaks = {sp.name: len(splits_lib.leaking_patients(sp, patients)) for sp in splits}
    if splits_dir:
      for sp in splits:
        if leaks[sp.name]:
          leak = set(splits_lib.leaking_patients(sp, patients))
          n_slides = sum(patients[s] in leak for s in sp.test)
          print(
            f"evaluate: {sp.source}: {leaks[sp.name]} patients have slides on both sides "
            f"({n_slides} test slides); run as given"
            + ("" if splits_fix == "drop_leaking" else " (--splits_fix=drop_leaking drops them)"),
            file=sys.stderr,
          )
    if splits_fix == "drop_leaking":
      by_subset: dict = {}
      for sp in splits:
        by_subset.setdefault(sp.subset, []).append(sp)
      splits = []
      for group in by_subset.values():
        dropped = [splits_lib.drop_leaking(sp, patients) for sp in group]
        splits += group + dropped
        for sp in dropped:
          leaks[sp.name] = 0
      labels, splits = splits_lib.check_inputs(
        reps_list, labels, str(labels_path), splits, drop_missing
      )
  elif splits_fix == "drop_leaking":
    raise EvalError(
      f"{labels_path}: --splits_fix=drop_leaking needs a patient column "
      f"({patient_column!r} not found; name it with --patient_column)"
    )
  if level == "patient":
    keep = list(labels)
    reps_list = [patient_reps(r, patients, keep) for r in reps_list]
    splits = [patient_split(sp, patients) for sp in splits]
    labels = splits_lib.patient_labels(labels, patients, str(labels_path))
  records = evaluate(reps_list, labels, splits, progress, leaks, level)
  rows = summarize(records)
  md = markdown_table(rows)
  files = []
  if out_dir:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_text(out / "results.md", md + "\n")
    _write_csv(out / "results.csv", rows)
    _write_csv(out / "per_split.csv", records)
    files += [out / "results.md", out / "results.csv", out / "per_split.csv"]
    files.append(plot_pca(reps_list, labels, out / "pca.png"))
    if workdir:
      m = pathlib.Path(workdir) / "metrics.jsonl"
      if not m.is_file():
        raise EvalError(f"{m}: no metrics file (is --workdir a training run?)")
      files.append(plot_loss(m, out / "loss.png"))
  return {"rows": rows, "records": records, "markdown": md, "files": files}


F = cli.field


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """The flags of `python -m gigassl_jax.evaluate` (run's keyword defaults are the same)."""

  reps: tuple[str, ...] = F(
    (),
    "Representation files, comma separated, all evaluated on the same splits: .npz from "
    "gigassl_jax.encode, a .npy dict {slide_id: vector} (TCGA-gigassl_{encoder}.npy), or "
    "embeddings.npy with ids.npy beside it.",
    required=True,
  )
  labels: str = F(
    "", "CSV with columns ID,label and optionally a patient column (case_id).", required=True
  )
  splits: str | None = F(
    None,
    "Folder of split_K.csv (train,test columns), or a task "
    "folder with one subfolder per subset. Default: stratified k-fold CV.",
  )
  folds: int = F(5, "k of the stratified k-fold CV (without --splits).")
  subsets: tuple[str, ...] = F(("full",), "Training-set sizes for CV: full, 25p (or 25%), 100, 50.")
  seed: int = F(0, "Seed of the CV folds and subsets.")
  repeats: int = F(1, "Repetitions of the k-fold CV (seeds seed, seed + 1, ...).")
  out: str | None = F(None, "Output folder: results.md/csv, per_split.csv, pca.png.")
  workdir: str | None = F(None, "Training run folder; its metrics.jsonl gives loss.png.")
  patient_column: str = F(
    "case_id",
    "Labels column naming each slide's patient (used when present; 'none' ignores it). "
    "With it, k-fold CV groups by patient and fixed splits are checked for leaking patients.",
  )
  level: str = F(
    "slide",
    "slide: one vector and one AUC item per slide; patient: a patient's slide vectors "
    "averaged then L2-normalised, AUC over patients.",
    choices=("slide", "patient"),
  )
  splits_fix: str = F(
    "none",
    "drop_leaking: also evaluate each fixed split without the test slides of patients "
    "that sit on both sides, reported next to the as-given numbers.",
    choices=("none", "drop_leaking"),
  )
  drop_missing: bool = F(
    False,
    "Drop labelled slides without a representation (the reference's behaviour) instead of failing.",
  )


def main(argv):
  if len(argv) > 1:
    print(f"evaluate: error: unexpected arguments {argv[1:]}", file=sys.stderr)
    return 2
  fl = cli.from_flags(EvalConfig)
  try:
    res = run(
      list(fl.reps),
      fl.labels,
      fl.splits,
      fl.out,
      folds=fl.folds,
      subsets=list(fl.subsets),
      seed=fl.seed,
      repeats=fl.repeats,
      workdir=fl.workdir,
      drop_missing=fl.drop_missing,
      patient_column=fl.patient_column,
      level=fl.level,
      splits_fix=fl.splits_fix,
    )
  except EvalError as e:
    print(f"evaluate: error: {e}", file=sys.stderr)
    return 2
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    # Unreadable files or folders (permissions, not UTF-8, broken CSV): one line, no traceback.
    where = getattr(e, "filename", None)
    print(f"evaluate: error: {where + ': ' if where else ''}{e}", file=sys.stderr)
    return 2
  print(res["markdown"])
  for p in res["files"]:
    print(f"wrote {p}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  cli.define_flags(EvalConfig)
  cli.run(
    main, resume_hint="nothing was written (--out is written at the end); re-run the same command"
  )
