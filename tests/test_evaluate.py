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


@pytest.mark.parametrize("seed", [1, 11])
def test_probe_is_the_reference_logistic_regression(seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(60, 8)) + np.r_[np.zeros(45), np.ones(15)][:, None] * 0.7
  y = np.r_[np.zeros(45, int), np.ones(15, int)]
  idx = rng.permutation(60)
  tr, te = idx[:40], idx[40:]
  got = ev.probe(x[tr], y[tr], x[te], y[te], 2)
  ref = LogisticRegression(C=10, class_weight="balanced", max_iter=1000).fit(x[tr], y[tr])
  want = _rank_auc(y[te], ref.predict_proba(x[te])[:, 1])
  assert got == pytest.approx(want, abs=1e-12), f"seed {seed}"
  # Class weights matter on unbalanced data: an unweighted fit ranks differently.
  plain = LogisticRegression(C=10, max_iter=1000).fit(x[tr], y[tr])
  assert not np.allclose(plain.coef_, ref.coef_), f"seed {seed}"


@pytest.mark.parametrize("seed", [2])
def test_reference_layout_lung_all_subsets(tmp_path, seed):
  """The real lung table and its 40 split files, with vectors that carry the label."""
  rows = _table(REF / "tables" / "lung.csv")
  ids, labels = [r["ID"] for r in rows], [r["label"] for r in rows]
  rng = np.random.default_rng(seed)
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
    assert by[("signal", subset)]["auc_mean"] > 0.8, f"seed {seed} {subset}"
    assert 0.35 < by[("noise", subset)]["auc_mean"] < 0.65, f"seed {seed} {subset}"
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
  assert got[0]["auc"] == pytest.approx(want, abs=1e-9), f"seed {seed}"
  # Outputs: table files and a real PNG.
  md = (tmp_path / "out" / "results.md").read_text()
  assert "| signal |" in md and "25p (train" in md
  assert len(_table(tmp_path / "out" / "per_split.csv")) == 80
  with Image.open(tmp_path / "out" / "pca.png") as im:
    assert im.size[0] > 300 and im.size[1] > 200


@pytest.mark.parametrize("seed", [3])
def test_reference_layout_kidney_three_classes_and_missing_ids(tmp_path, capsys, seed):
  """kidney/full lists 7 slides its own table lacks: left out with a warning, as the reference."""
  rows = _table(REF / "tables" / "kidney.csv")
  ids, labels = [r["ID"] for r in rows], [r["label"] for r in rows]
  rng = np.random.default_rng(seed)
  ev.save_reps(tmp_path / "k.npz", ids, _signal_reps(ids, labels, 5, rng, 2.0), "k")
  res = ev.run(
    [tmp_path / "k.npz"],
    REF / "tables" / "kidney.csv",
    REF / "splitdirs" / "kidney" / "full",
    progress=False,
  )
  assert "7 in that file" in capsys.readouterr().err
  (row,) = res["rows"]
  assert row["n_splits"] == 10 and row["auc_mean"] > 0.85, f"seed {seed}: {row}"
  # Test sets shrink by exactly the unknown slides of each file.
  known = set(ids)
  for rec in res["records"]:
    f = REF / "splitdirs" / "kidney" / "full" / (rec["split"].split("/")[1] + ".csv")
    assert rec["n_test"] == sum(1 for r in _table(f) if r["test"] in known)
    assert rec["n_train"] == sum(1 for r in _table(f) if r["train"] in known)


@pytest.mark.parametrize("seed", [4, 14])
def test_kfold_splits_are_stratified_partitions_with_subsets(seed):
  rng = np.random.default_rng(seed)
  ids = [f"s{i}" for i in range(90)]
  labels = dict(zip(ids, rng.choice(["a", "b", "c"], size=90, p=[0.5, 0.3, 0.2])))
  splits = sp.kfold_splits(ids, labels, folds=5, subsets=("full", "25p", "12"), seed=7, repeats=2)
  assert len(splits) == 3 * 10, f"seed {seed}"
  full = [s for s in splits if s.subset == "full"]
  for rep in range(2):
    folds = full[rep * 5 : (rep + 1) * 5]
    tests = [set(s.test) for s in folds]
    assert set().union(*tests) == set(ids) and sum(map(len, tests)) == 90, f"seed {seed}"
    for s in folds:
      assert not set(s.train) & set(s.test), f"seed {seed}"
      for c in "abc":  # stratified: each test fold holds ~1/5 of every class
        n_c = sum(labels[i] == c for i in ids)
        assert abs(sum(labels[i] == c for i in s.test) - n_c / 5) <= 1, f"seed {seed}"
  for s in splits:
    base = next(f for f in full if f.test == s.test)
    assert set(s.train) <= set(base.train), f"seed {seed}"
    if s.subset == "12":
      assert len(s.train) == 12 and {labels[i] for i in s.train} == {"a", "b", "c"}, f"seed {seed}"
    if s.subset == "25p":
      assert len(s.train) == round(0.25 * len(base.train)), f"seed {seed}"
  again = sp.kfold_splits(ids, labels, folds=5, subsets=("full", "25p", "12"), seed=7, repeats=2)
  assert [s.train for s in again] == [s.train for s in splits], f"seed {seed}"


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


@pytest.fixture(params=[5])
def small(tmp_path, request):
  """12 labelled slides (6 per class), their vectors and one split file (seed: the param)."""
  rng = np.random.default_rng(request.param)
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


@pytest.mark.parametrize("seed", [6])
def test_nan_vector_names_file_and_row(small, seed):
  d, ids, labels = small
  x = np.random.default_rng(seed).normal(size=(12, 4))
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


@pytest.mark.parametrize("seed", [8])
def test_kfold_run_writes_tables_and_loss_plot(small, seed):
  d, ids, labels = small
  ev.save_reps(d / "noise.npz", ids, np.random.default_rng(seed).normal(size=(12, 4)), "noise")
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
    # Each AUC goes through CSV as repr(float): exact; the mean's rounding ~1e-16.
    assert float(r["auc_mean"]) == pytest.approx(a.mean(), abs=1e-12), f"seed {seed}"
    assert float(r["auc_std"]) == pytest.approx(a.std(), abs=1e-12), f"seed {seed}"
  assert "m | " in res["markdown"]
  with Image.open(d / "out" / "loss.png") as im:
    assert im.size[0] > 300


# ---------------------------------------------------------------- patients


def _twin_cohort(d, seed, n_patients=60, dim=512):
  """Two slides per patient with nearly identical vectors; labels random per patient."""
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(n_patients, dim))
  y = rng.permutation(
    np.r_[np.zeros(n_patients // 2, int), np.ones(n_patients - n_patients // 2, int)]
  )
  ids, labels, cases, x = [], [], [], []
  for p in range(n_patients):
    for j in range(2):
      ids.append(f"TCGA-{p:02d}-s{j}")
      labels.append(["neg", "pos"][y[p]])
      cases.append(f"TCGA-{p:02d}")
      x.append(z[p] + 0.01 * rng.normal(size=dim))
  with open(d / "labels.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["ID", "label", "case_id"])
    w.writerows(zip(ids, labels, cases))
  ev.save_reps(d / "twins.npz", ids, np.array(x), "twins")
  return ids


@pytest.mark.parametrize("seed", [0, 1000])
def test_patient_grouped_cv_removes_the_twin_leak(tmp_path, seed):
  """60 patients x 2 near-identical slides, random labels per patient, 5 folds x 2 repeats.

  Slide-level folds: a test slide's twin sits in training with probability
  ~4/5, and the probe (512-d, C=10, separable training set) gives it its twin's
  label, so the AUC is about 1 - P(both of a pos/neg pair unmatched)/2 =
  1 - 0.2**2 / 2 = 0.98 (issue 16 measured 0.981): bound > 0.9 per cohort.
  Patient-grouped folds: no twin in training and labels independent of the
  vectors, so AUC ~ 0.5, but one cohort's CV AUC on random labels varies a
  lot: the Mann-Whitney null std over its 60 patients (30/30) is
  sqrt(61 / (12 * 30 * 30)) = 0.075, and refitting per fold on random labels
  adds to it (0.12 over 12 cohorts with scikit-learn alone, no project code;
  repeats of the same cohort barely reduce it). So the chance-level check
  averages K = 8 independent cohorts: std 0.12 / sqrt(8) = 0.042, bound
  |mean - 0.5| < 0.15 (3.5 std); a leak of the size above (+0.48) cannot pass.
  """
  common = {"folds": 5, "repeats": 2, "progress": False}
  grouped_aucs, patient_aucs = [], []
  for k in range(8):
    d = tmp_path / f"cohort_{k}"
    d.mkdir()
    _twin_cohort(d, seed + k)
    reps, labels = [d / "twins.npz"], d / "labels.csv"
    grouped = ev.run(reps, labels, seed=seed + k, **common)
    grouped_aucs.append(grouped["rows"][0]["auc_mean"])
    assert grouped["rows"][0]["n_splits"] == 10, f"seed {seed + k}"
    assert all(r["leaking_patients"] == 0 for r in grouped["records"]), f"seed {seed + k}"
    # Patient level: one averaged vector per patient, folds of 12 patients.
    pat = ev.run(reps, labels, seed=seed + k, level="patient", **common)
    patient_aucs.append(pat["rows"][0]["auc_mean"])
    assert all(r["n_test"] == 12 and r["level"] == "patient" for r in pat["records"]), (
      f"seed {seed + k}"
    )
    if k < 2:  # the leak is large in every cohort: two suffice
      leaky = ev.run(reps, labels, seed=seed + k, patient_column="none", **common)
      a = leaky["rows"][0]["auc_mean"]
      assert a > 0.9, f"seed {seed + k}: slide-level CV AUC {a}"
      assert leaky["rows"][0]["leaking_patients_max"] is None, f"seed {seed + k}"
  assert "patients on both sides (per split) | 0 |" in grouped["markdown"], f"seed {seed}"
  assert "Level: slide" in grouped["markdown"], f"seed {seed}"
  assert "Level: patient" in pat["markdown"], f"seed {seed}"
  g, p = float(np.mean(grouped_aucs)), float(np.mean(patient_aucs))
  assert abs(g - 0.5) < 0.15, f"seeds {seed}..{seed + 7}: patient-grouped CV AUCs {grouped_aucs}"
  assert abs(p - 0.5) < 0.15, f"seeds {seed}..{seed + 7}: patient-level CV AUCs {patient_aucs}"


@pytest.mark.parametrize("seed", [3, 4])
def test_grouped_kfold_subsets_count_and_draw_patients(seed):
  rng = np.random.default_rng(seed)
  n_pat = 50
  per = rng.integers(1, 4, size=n_pat)  # 1-3 slides per patient
  ids, patients, labels = [], {}, {}
  plab = rng.choice(["a", "b"], size=n_pat, p=[0.6, 0.4])
  for p in range(n_pat):
    for j in range(per[p]):
      s = f"p{p}_{j}"
      ids.append(s)
      patients[s], labels[s] = f"p{p}", plab[p]
  splits = sp.kfold_splits(
    ids, labels, folds=5, subsets=("full", "25p", "12"), seed=seed, repeats=2, patients=patients
  )
  assert len(splits) == 30, f"seed {seed}"
  full = [s for s in splits if s.subset == "full"]
  for rep in range(2):
    tests = [set(s.test) for s in full[rep * 5 : (rep + 1) * 5]]
    assert set().union(*tests) == set(ids) and sum(map(len, tests)) == len(ids), f"seed {seed}"
  for s in splits:
    tr_p = {patients[i] for i in s.train}
    te_p = {patients[i] for i in s.test}
    assert not tr_p & te_p, f"seed {seed}: {s.name} patients on both sides {tr_p & te_p}"
    # Whole patients: every slide of a training patient in this fold's base is in.
    base = next(f for f in full if f.test == s.test)
    assert set(s.train) == {i for i in base.train if patients[i] in tr_p}, f"seed {seed} {s.name}"
    n_base = len({patients[i] for i in base.train})
    if s.subset == "12":
      assert len(tr_p) == 12 and {labels[i] for i in s.train} == {"a", "b"}, f"seed {seed}"
    if s.subset == "25p":
      assert len(tr_p) == round(0.25 * n_base), f"seed {seed} {s.name}"


@pytest.fixture
def toy_patients(tmp_path):
  """7 patients (1-3 slides each), 3-d vectors, and one fixed split where P2 and P5 leak."""
  slides = {
    "P1": ["a", "b"],
    "P2": ["c", "d", "e"],
    "P3": ["f"],
    "P4": ["g", "h"],
    "P5": ["i", "j"],
    "P6": ["k"],
    "P7": ["l", "m"],
  }
  plab = {"P1": "neg", "P2": "pos", "P3": "neg", "P4": "pos", "P5": "neg", "P6": "pos", "P7": "pos"}
  ids = [s for p in slides for s in slides[p]]
  patient = {s: p for p in slides for s in slides[p]}
  with open(tmp_path / "labels.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["ID", "label", "case_id"])
    w.writerows((s, plab[patient[s]], patient[s]) for s in ids)
  (tmp_path / "splits").mkdir()
  # Train: P1, P2 (c, d), P4, P5 (i); test: P2 (e), P3, P5 (j), P6, P7.
  _write_split(tmp_path / "splits" / "split_0.csv", list("abcdghi"), list("efjklm"))
  return tmp_path, ids, patient, plab


@pytest.mark.parametrize("seed", [5, 6])
def test_patient_level_auc_by_hand(toy_patients, seed):
  d, ids, patient, plab = toy_patients
  x = np.random.default_rng(seed).normal(size=(len(ids), 3))
  ev.save_reps(d / "r.npz", ids, x, "r")
  res = ev.run([d / "r.npz"], d / "labels.csv", d / "splits", level="patient", progress=False)
  (rec,) = res["records"]
  # By hand: mean of a patient's slides, L2, the reference probe, rank AUC over patients.
  row = {s: i for i, s in enumerate(ids)}
  pv = {}
  for p in plab:
    m = x[[row[s] for s in ids if patient[s] == p]].mean(0)
    pv[p] = m / np.linalg.norm(m)
  train_p, test_p = ["P1", "P2", "P4", "P5"], ["P2", "P3", "P5", "P6", "P7"]
  clf = LogisticRegression(C=10, class_weight="balanced", max_iter=1000)
  clf.fit(np.array([pv[p] for p in train_p]), [plab[p] == "pos" for p in train_p])
  score = clf.predict_proba(np.array([pv[p] for p in test_p]))[:, 1]
  want = _rank_auc(np.array([plab[p] == "pos" for p in test_p]), score)
  # float32 patient vectors vs float64 here: ~1e-7 relative in the inputs; the
  # AUC is a rank statistic, so it matches exactly unless two scores tie to 1e-6.
  assert rec["auc"] == pytest.approx(want, abs=1e-12), f"seed {seed}"
  assert (rec["n_train"], rec["n_test"], rec["level"]) == (4, 5, "patient"), f"seed {seed}"
  assert rec["leaking_patients"] == 2, f"seed {seed}"
  assert "Level: patient" in res["markdown"], f"seed {seed}"


@pytest.mark.parametrize("seed", [7])
def test_fixed_splits_report_and_drop_leaking_patients(toy_patients, capsys, seed):
  d, ids, _, _ = toy_patients
  ev.save_reps(d / "r.npz", ids, np.random.default_rng(seed).normal(size=(len(ids), 3)), "r")
  res = ev.run(
    [d / "r.npz"], d / "labels.csv", d / "splits", splits_fix="drop_leaking", progress=False
  )
  err = capsys.readouterr().err
  assert "split_0.csv: 2 patients have slides on both sides (2 test slides)" in err, err
  given, dropped = res["records"]
  assert (given["subset"], given["n_test"], given["leaking_patients"]) == ("splits", 6, 2)
  # e (P2) and j (P5) leave the test set.
  assert (dropped["subset"], dropped["n_test"], dropped["leaking_patients"]) == (
    "splits drop_leaking",
    4,
    0,
  )
  assert "| patients on both sides (per split) | 2 | 0 |" in res["markdown"], res["markdown"]


# ---------------------------------------------------------------- one-line errors


def _cli(*args):
  return subprocess.run(
    [sys.executable, "-m", "gigassl_jax.evaluate", *args],
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )


def _one_error_line(p):
  lines = [ln for ln in p.stderr.splitlines() if ln.strip() and not ln.startswith("evaluate: drop")]
  assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
  assert len(lines) == 1 and lines[0].startswith("evaluate: error: "), p.stderr
  return lines[0]


@pytest.mark.parametrize("seed", [9])
def test_drop_missing_without_overlap_is_one_line(small, seed):
  d, ids, _ = small
  other = [f"other_{i}" for i in range(12)]
  ev.save_reps(d / "other.npz", other, np.random.default_rng(seed).normal(size=(12, 4)), "o")
  with pytest.raises(ev.EvalError, match="none of its 12 labelled slides has a representation"):
    ev.run([d / "other.npz"], d / "labels.csv", drop_missing=True, progress=False)
  line = _one_error_line(
    _cli(f"--reps={d / 'other.npz'}", f"--labels={d / 'labels.csv'}", "--drop_missing")
  )
  assert "first label id 'slide_00', first representation id 'other_0'" in line, line
  # Overlap with one class only: also one line.
  ev.save_reps(d / "half.npz", ids[::2], np.random.default_rng(seed).normal(size=(6, 4)), "h")
  line = _one_error_line(
    _cli(f"--reps={d / 'half.npz'}", f"--labels={d / 'labels.csv'}", "--drop_missing")
  )
  assert "only class(es) ['neg']" in line, line


def test_bad_cli_inputs_are_one_line_with_plain_ids(small):
  d, _, _ = small
  # Too few slides of a class for the folds: the class is printed as 'neg', not np.str_('neg').
  line = _one_error_line(
    _cli(f"--reps={d / 'reps.npz'}", f"--labels={d / 'labels.csv'}", "--folds=7")
  )
  assert "class 'neg' has 6 slides, fewer than --folds=7" in line, line
  assert "np.str_" not in line
  line = _one_error_line(_cli(f"--reps={d / 'nope.npz'}", f"--labels={d / 'labels.csv'}"))
  assert "nope.npz: representation file not found" in line, line
  line = _one_error_line(_cli(f"--reps={d / 'reps.npz'}", f"--labels={d / 'nope.csv'}"))
  assert "nope.csv: labels file not found" in line, line
  line = _one_error_line(
    _cli(f"--reps={d / 'reps.npz'}", f"--labels={d / 'labels.csv'}", "--level=patient")
  )
  assert "--level=patient needs a patient column" in line, line
  line = _one_error_line(
    _cli(f"--reps={d / 'reps.npz'}", f"--labels={d / 'labels.csv'}", "--patient_column=case")
  )
  assert "no patient column 'case'" in line, line
  (d / "latin.csv").write_bytes(b"ID,label\nslide_\xe9,a\n")
  line = _one_error_line(_cli(f"--reps={d / 'reps.npz'}", f"--labels={d / 'latin.csv'}"))
  assert "latin.csv" in line, line
