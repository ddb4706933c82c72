"""Patient leakage of the reference's fixed splits, counted by the repo's script and by hand."""

import csv
import json
import pathlib

import pytest

from gigassl_jax import splits as sp

REF = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "reference_eval"


def _hand_count(task, subset, k):
  """Patients on both sides of one split file: plain csv.reader, no project code."""
  with open(REF / "tables" / f"{task}.csv", newline="") as f:
    rows = list(csv.reader(f))
  head = rows[0]
  i_id, i_case = head.index("ID"), head.index("case_id")
  case = {r[i_id]: r[i_case] for r in rows[1:] if r}
  with open(REF / "splitdirs" / task / subset / f"split_{k}.csv", newline="") as f:
    rows = list(csv.reader(f))
  i_tr, i_te = rows[0].index("train"), rows[0].index("test")
  train = {case[r[i_tr]] for r in rows[1:] if len(r) > i_tr and r[i_tr] in case}
  test = {case[r[i_te]] for r in rows[1:] if len(r) > i_te and r[i_te] in case}
  return len(train & test)


@pytest.fixture(scope="module")
def counted():
  return sp.count_leaks(REF)


@pytest.mark.parametrize(
  "task,subset,k",
  [
    ("brca", "full", 0),
    ("brca", "full", 6),
    ("kidney", "full", 3),
    ("lung", "25p", 0),
    ("mhrd", "50", 6),
    ("thrd", "full", 6),
    ("tnbc", "full", 4),
  ],
)
def test_leak_counts_match_a_hand_count(counted, task, subset, k):
  got = next(
    r["leaking_patients"]
    for r in counted
    if (r["task"], r["subset"], r["split"]) == (task, subset, f"split_{k}")
  )
  assert got == _hand_count(task, subset, k), f"{task}/{subset}/split_{k}"


def test_committed_result_file_is_the_scripts_output(counted):
  """experiments/reference_eval/leaks.json (cited by docs/evaluate.md) is what the script gives."""
  doc = json.loads((REF / "leaks.json").read_text())
  assert doc["command"].startswith("python -m gigassl_jax.splits --leaks")
  assert doc["splits"] == counted
  full = {r["task"]: r for r in doc["summary"] if r["subset"] == "full"}
  # The ranges quoted in issue 16, counted there independently.
  want = {"brca": (4, 17), "kidney": (2, 7), "lung": (4, 12), "mhrd": (5, 14), "thrd": (7, 12)}
  want["tnbc"] = (0, 0)
  for task, (lo, hi) in want.items():
    assert (full[task]["leaking_patients_min"], full[task]["leaking_patients_max"]) == (lo, hi), (
      task
    )


def test_leaking_and_drop_leaking_on_a_toy_split():
  s = sp.Split(
    subset="full",
    name="full/split_0",
    source="x",
    train=("a1", "b1", "c1", "d1"),
    test=("a2", "b2", "e1", "zz"),
  )
  patients = {"a1": "A", "a2": "A", "b1": "B", "b2": "B", "c1": "C", "d1": "D", "e1": "E"}
  assert sp.leaking_patients(s, patients) == ["A", "B"]
  d = sp.drop_leaking(s, patients)
  assert d.test == ("e1", "zz") and d.train == s.train and d.subset == "full drop_leaking"
