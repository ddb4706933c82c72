"""Linear evaluation: the reference's probe, its split files, CV, tables, plots, bad inputs."""

import csv
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression

from gigassl_jax import evaluate as ev
from gigassl_jax import splits as sp

REF = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "reference_eval"


def _rank_auc(y, score):
  """Mann-Whitney AUC (ties count one half), written out independently of sklearn."""
  pos, neg = score[y == 1], score[y == 0]
  diff = pos[:, None] - neg[None, :]
  return ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / (len(pos) * len(neg))


def _table(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _write_labels(path, ids, labels):
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["ID", "label"])
    w.writerows(zip(ids, labels))
  return path


def _signal_reps(ids, labels, dim, rng, strength=1.5):
  """Vectors whose first dims carry the class (one-hot x strength) plus unit noise."""
  classes = sorted(set(labels))
  x = rng.normal(size=(len(ids), dim))
  for i, lab in enumerate(labels):
    x[i, classes.index(lab)] += strength
  return x


def test_probe_is_the_reference_logistic_regression():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(60, 8)) + np.r_[np.zeros(45), np.ones(15)][:, None] * 0.7
  y = np.r_[np.zeros(45, int), np.ones(15, int)]
  idx = rng.permutation(60)
  tr, te = idx[:40], idx[40:]
  got = ev.probe(x[tr], y[tr], x[te], y[te], 2)
  ref = LogisticRegression(C=10, class_weight="balanced", max_iter=1000).fit(x[tr], y[tr])
  want = _rank_auc(y[te], ref.predict_proba(x[te])[:, 1])
  assert got == pytest.approx(want, abs=1e-12)
  # Class weights matter on unbalanced data: an unweighted fit ranks differently.
  plain = LogisticRegression(C=10, max_iter=1000).fit(x[tr], y[tr])
  assert not np.allclose(plain.coef_, ref.coef_)


def test_reference_layout_lung_all_subsets(tmp_path):
  """The real lung table and its 40 split files, with vectors that carry the label."""
  rows = _table(REF / "tables" / "lung.csv")
  ids, labels = [r["ID"] for r in rows], [r["label"] for r in rows]
  rng = np.random.default_rng(2)
  ev.save_reps(tmp_path / "signal.npz", ids, _signal_reps(ids, labels, 6, rng), "signal")
  ev.save_reps(tmp_path / "noise.npz", ids[::-1], rng.normal(size=(len(ids), 6)), "noise")
  res = ev.run(
    [tmp_path / "signal.npz", tmp_path / "noise.npz"],
    REF / "tables" / "lung.csv",
    REF / "splitdirs" / "lung",
    tmp_path / "out",
    progress=False,
  )
  by = {(r["method"], r["subset"]): r for r in res["rows"]}
  assert [s for m, s in by if m == "signal"] == ["full", "25p", "100", "50"]
  for subset in ("full", "25p", "100", "50"):
    # Training-set sizes straight from the split files.
    n_train = [
      sum(1 for r in _table(f) if r["train"])
      for f in sorted((REF / "splitdirs" / "lung" / subset).glob("split_*.csv"))
    ]
    assert by[("signal", subset)]["n_splits"] == 10
    assert by[("signal", subset)]["n_train"] == int(np.median(n_train))
    assert by[("signal", subset)]["auc_mean"] > 0.8
    assert 0.35 < by[("noise", subset)]["auc_mean"] < 0.65
  # One split recomputed by hand: ids -> rows, the probe, the AUC.
  split = _table(REF / "splitdirs" / "lung" / "50" / "split_3.csv")
  z = np.load(tmp_path / "signal.npz")
  row = {s: i for i, s in enumerate(z["ids"])}
  lab = dict(zip(ids, labels))
  tr = [r["train"] for r in split if r["train"]]
  te = [r["test"] for r in split if r["test"]]
  y = lambda s: np.array([lab[i] == "TCGA-LUSC" for i in s], int)  # noqa: E731
  clf = LogisticRegression(C=10, class_weight="balanced", max_iter=1000)
  clf.fit(z["reps"][[row[i] for i in tr]], y(tr))
  want = _rank_auc(y(te), clf.predict_proba(z["reps"][[row[i] for i in te]])[:, 1])
  got = [r for r in res["records"] if r["method"] == "signal" and r["split"] == "50/split_3"]
  assert got[0]["auc"] == pytest.approx(want, abs=1e-9)
  # Outputs: table files and a real PNG.
  md = (tmp_path / "out" / "results.md").read_text()
  assert "| signal |" in md and "25p (train" in md
  assert len(_table(tmp_path / "out" / "per_split.csv")) == 80
  with Image.open(tmp_path / "out" / "pca.png") as im:
    assert im.size[0] > 300 and im.size[1] > 200


def test_reference_layout_kidney_three_classes_and_missing_ids(tmp_path, capsys):
  """kidney/full lists 7 slides its own table lacks: left out with a warning, as the reference."""
  rows = _table(REF / "tables" / "kidney.csv")
  ids, labels = [r["ID"] for r in rows], [r["label"] for r in rows]
  rng = np.random.default_rng(3)
  ev.save_reps(tmp_path / "k.npz", ids, _signal_reps(ids, labels, 5, rng, 2.0), "k")
  res = ev.run(
    [tmp_path / "k.npz"],
    REF / "tables" / "kidney.csv",
    REF / "splitdirs" / "kidney" / "full",
    progress=False,
  )
  assert "7 in that file" in capsys.readouterr().err
  (row,) = res["rows"]
  assert row["n_splits"] == 10 and row["auc_mean"] > 0.85
  # Test sets shrink by exactly the unknown slides of each file.
  known = set(ids)
  for rec in res["records"]:
    f = REF / "splitdirs" / "kidney" / "full" / (rec["split"].split("/")[1] + ".csv")
    assert rec["n_test"] == sum(1 for r in _table(f) if r["test"] in known)
    assert rec["n_train"] == sum(1 for r in _table(f) if r["train"] in known)


def test_kfold_splits_are_stratified_partitions_with_subsets():
  rng = np.random.default_rng(4)
  ids = [f"s{i}" for i in range(90)]
  labels = dict(zip(ids, rng.choice(["a", "b", "c"], size=90, p=[0.5, 0.3, 0.2])))
  splits = sp.kfold_splits(ids, labels, folds=5, subsets=("full", "25p", "12"), seed=7, repeats=2)
  assert len(splits) == 3 * 10
  full = [s for s in splits if s.subset == "full"]
  for rep in range(2):
    folds = full[rep * 5 : (rep + 1) * 5]
    tests = [set(s.test) for s in folds]
    assert set().union(*tests) == set(ids) and sum(map(len, tests)) == 90
    for s in folds:
      assert not set(s.train) & set(s.test)
      for c in "abc":  # stratified: each test fold holds ~1/5 of every class
        n_c = sum(labels[i] == c for i in ids)
        assert abs(sum(labels[i] == c for i in s.test) - n_c / 5) <= 1
  for s in splits:
    base = next(f for f in full if f.test == s.test)
    assert set(s.train) <= set(base.train)
    if s.subset == "12":
      assert len(s.train) == 12 and {labels[i] for i in s.train} == {"a", "b", "c"}
    if s.subset == "25p":
      assert len(s.train) == round(0.25 * len(base.train))
  again = sp.kfold_splits(ids, labels, folds=5, subsets=("full", "25p", "12"), seed=7, repeats=2)
  assert [s.train for s in again] == [s.train for s in splits]


@pytest.mark.parametrize(
  "spec,want",
  [("full", None), ("25p", ("fraction", 0.25)), ("25%", ("fraction", 0.25)), ("50", ("count", 50))],
)
def test_parse_subset(spec, want):
  assert sp.parse_subset(spec) == want


def test_parse_subset_rejects_nonsense():
  with pytest.raises(ev.EvalError, match="percentage"):
    sp.parse_subset("half")


# ---------------------------------------------------------------- bad inputs


@pytest.fixture
def small(tmp_path):
  """12 labelled slides (6 per class), their vectors and one split file."""
  rng = np.random.default_rng(5)
  ids = [f"slide_{i:02d}" for i in range(12)]
  labels = ["pos" if i % 2 else "neg" for i in range(12)]
  _write_labels(tmp_path / "labels.csv", ids, labels)
  ev.save_reps(tmp_path / "reps.npz", ids, _signal_reps(ids, labels, 4, rng), "m")
  (tmp_path / "splits").mkdir()
  _write_split(tmp_path / "splits" / "split_0.csv", ids[:8], ids[8:])
  return tmp_path, ids, labels


def _write_split(path, train, test):
  n = max(len(train), len(test))
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["train", "test"])
    for i in range(n):
      w.writerow([train[i] if i < len(train) else "", test[i] if i < len(test) else ""])


def test_labelled_slide_without_vector_names_labels_file_and_line(small):
  d, ids, labels = small
  _write_labels(d / "labels.csv", ids + ["ghost"], labels + ["pos"])
  with pytest.raises(
    ev.EvalError,
    match=r"labels\.csv line 14: slide 'ghost' has no "
    r"representation in .*reps\.npz",
  ):
    ev.run([d / "reps.npz"], d / "labels.csv", d / "splits", progress=False)
  # --drop_missing evaluates the others, as the reference does.
  res = ev.run([d / "reps.npz"], d / "labels.csv", d / "splits", drop_missing=True, progress=False)
  assert res["rows"][0]["n_test"] == 4


def test_nan_vector_names_file_and_row(small):
  d, ids, labels = small
  x = np.random.default_rng(6).normal(size=(12, 4))
  x[7, 2] = np.nan
  ev.save_reps(d / "nan.npz", ids, x, "m")
  with pytest.raises(ev.EvalError, match=r"nan\.npz: row 7 \(slide 'slide_07'\) has NaN"):
    ev.run([d / "nan.npz"], d / "labels.csv", d / "splits", progress=False)


def test_split_with_one_class_in_test(small):
  d, ids, _ = small
  _write_split(d / "splits" / "split_0.csv", ids[:8] + ids[9::2], ids[8::2])
  with pytest.raises(ev.EvalError, match=r"split_0\.csv: the test set has only class \['neg'\]"):
    ev.run([d / "reps.npz"], d / "labels.csv", d / "splits", progress=False)


def test_split_training_set_missing_a_class(small):
  d, ids, _ = small
  _write_split(d / "splits" / "split_0.csv", ids[0:8:2], ids[8:])
  with pytest.raises(
    ev.EvalError,
    match=r"split_0\.csv: the train set has no slide of "
    r"class\(es\) \['pos'\]",
  ):
    ev.run([d / "reps.npz"], d / "labels.csv", d / "splits", progress=False)


def test_split_of_another_task_and_duplicates(small):
  d, ids, _ = small
  _write_split(d / "splits" / "split_0.csv", ["x1", "x2"], ["x3"])
  with pytest.raises(ev.EvalError, match="none of its slides is in the labels file"):
    ev.run([d / "reps.npz"], d / "labels.csv", d / "splits", progress=False)
  _write_split(d / "splits" / "split_0.csv", ids[:8], ids[7:])
  with pytest.raises(
    ev.EvalError,
    match=r"split_0\.csv line 9: slide 'slide_07' \(train\) "
    r"already listed on line 2 \(test\)",
  ):
    ev.run([d / "reps.npz"], d / "labels.csv", d / "splits", progress=False)


def test_bad_labels_files(tmp_path):
  (tmp_path / "a.csv").write_text("slide,label\nx,1\n")
  with pytest.raises(ev.EvalError, match=r"a\.csv: needs columns 'ID' and 'label'"):
    sp.load_labels(tmp_path / "a.csv")
  (tmp_path / "b.csv").write_text("ID,label,case_id\nx,1,c\ny,0,c\nx,0,c\n")
  with pytest.raises(ev.EvalError, match=r"b\.csv line 4: slide 'x' already labelled on line 2"):
    sp.load_labels(tmp_path / "b.csv")
  (tmp_path / "c.csv").write_text("ID,label\nx,1\ny,1\n")
  with pytest.raises(ev.EvalError, match="at least 2 classes"):
    sp.load_labels(tmp_path / "c.csv")


def test_cli_reports_errors_without_traceback(small):
  d, ids, labels = small
  _write_labels(d / "labels.csv", ids + ["ghost"], labels + ["pos"])
  p = subprocess.run(
    [
      sys.executable,
      "-m",
      "gigassl_jax.evaluate",
      f"--reps={d / 'reps.npz'}",
      f"--labels={d / 'labels.csv'}",
    ],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert p.returncode == 2
  assert "evaluate: error:" in p.stderr and "line 14" in p.stderr
  assert "Traceback" not in p.stderr


def test_kfold_run_writes_tables_and_loss_plot(small):
  d, ids, labels = small
  ev.save_reps(d / "noise.npz", ids, np.random.default_rng(8).normal(size=(12, 4)), "noise")
  run = d / "run"
  run.mkdir()
  with open(run / "metrics.jsonl", "w") as f:
    for s in range(1, 11):
      f.write(json.dumps({"step": s, "loss": 5.0 / s, "lr": 0.01 * s}) + "\n")
  res = ev.run(
    [d / "reps.npz", d / "noise.npz"],
    d / "labels.csv",
    None,
    d / "out",
    folds=3,
    repeats=2,
    workdir=run,
    progress=False,
  )
  rows = _table(d / "out" / "results.csv")
  assert [r["method"] for r in rows] == ["m", "noise"]
  assert all(int(r["n_splits"]) == 6 for r in rows)
  per = _table(d / "out" / "per_split.csv")
  for r in rows:
    a = np.array([float(p["auc"]) for p in per if p["method"] == r["method"]])
    assert float(r["auc_mean"]) == pytest.approx(a.mean())
    assert float(r["auc_std"]) == pytest.approx(a.std())
  assert "m | " in res["markdown"]
  with Image.open(d / "out" / "loss.png") as im:
    assert im.size[0] > 300
