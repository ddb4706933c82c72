"""The streaming input through Grain worker processes (sampling.GrainReader).

--data_workers > 0 changes how fast the bank is read, never what is read: the
batches are bitwise those `sampling.read_views` gives for the step's slides,
a reader started at step k (a resumed run) gives the batches of steps k.. of a
run from 0, and a training run streamed through Grain equals the same run read
by threads, bitwise, resume included.
"""

import multiprocessing
import os
import signal

import numpy as np
import pytest

from gigassl_jax import bank as bank_lib
from gigassl_jax import sampling, synthetic, train
from gigassl_jax import views as views_lib
from test_determinism import _assert_resume_is_exact, _assert_same_runs, _cfg

SHAPE = (13, 3, 12, 32)  # bank: slides, augmentations, tiles, feature dim
TILES = 5


def _expected(reader, seed, step, batch):
  """The global batch of `step` from the bank directly: the epoch's shuffle, then read_views."""
  spe = len(reader) // batch
  epoch, i = divmod(step, spe)
  slides = sampling.slide_order(seed, epoch, len(reader))[i * batch : (i + 1) * batch]
  feats, xy = sampling.read_views(reader, seed, step, np.arange(batch), slides, TILES)
  pos = np.arange(batch, dtype=np.int32)
  return {"feats": feats, "xy": xy, "position": pos, "slide": slides.astype(np.int32)}


def _assert_equal(got, want, msg):
  assert set(got) == set(want), msg
  for k in want:
    assert got[k].dtype == want[k].dtype, f"{msg} {k}: {got[k].dtype} vs {want[k].dtype}"
    np.testing.assert_array_equal(got[k], want[k], err_msg=f"{msg} {k}")


@pytest.mark.parametrize("seed", [3])
def test_grain_batches_are_read_views_and_a_later_start_resumes_exactly(tmp_path, seed):
  bank = synthetic.make_synthetic_bank(tmp_path / "bank", *SHAPE, seed=seed)
  reader = bank_lib.open_bank(bank)
  batch = 4  # 3 steps an epoch: steps 0..7 span three epochs
  want = {s: _expected(reader, seed, s, batch) for s in range(8)}
  # A later epoch draws other slides and views (else equality would prove little).
  assert not np.array_equal(want[0]["feats"], want[6]["feats"]), f"seed={seed}"
  run = views_lib.ViewSampler(reader, batch_size=batch, tiles=TILES, seed=seed, workers=2)
  resumed = views_lib.ViewSampler(reader, batch_size=batch, tiles=TILES, seed=seed, workers=2)
  try:
    for s in range(8):
      _assert_equal(run.local_batch(s), want[s], f"seed={seed} step {s}")
    # Out of order: the reader restarts its workers at the step asked for.
    _assert_equal(run.local_batch(2), want[2], f"seed={seed} step 2 again")
    # A run resumed at step 5 starts its dataset there: steps 5.. of the run from 0.
    for s in range(5, 8):
      _assert_equal(resumed.local_batch(s), want[s], f"seed={seed} resumed step {s}")
  finally:
    run.close()
    resumed.close()


@pytest.mark.parametrize("seed", [4])
def test_each_process_streams_its_share(tmp_path, seed):
  """2 processes x 1 worker each: the shares concatenate to the global batch."""
  bank = synthetic.make_synthetic_bank(tmp_path / "bank", *SHAPE, seed=seed)
  reader = bank_lib.open_bank(bank)
  shares = [
    views_lib.ViewSampler(
      reader, batch_size=6, tiles=TILES, seed=seed, process_index=p, process_count=2, workers=1
    )
    for p in range(2)
  ]
  try:
    for s in (0, 1, 2):
      got = [sh.local_batch(s) for sh in shares]
      joined = {k: np.concatenate([g[k] for g in got]) for k in got[0]}
      _assert_equal(joined, _expected(reader, seed, s, 6), f"seed={seed} step {s}")
  finally:
    for sh in shares:
      sh.close()


@pytest.mark.parametrize("seed", [8])
def test_grain_run_equals_thread_run_bitwise_and_resumes_exactly(tmp_path, seed):
  """3 steps streamed by threads = by 2 Grain workers = 2 steps + a resume through Grain."""
  bank = synthetic.make_synthetic_bank(tmp_path / "bank", *SHAPE, seed=seed)
  threads = _cfg(bank, tmp_path / "threads", seed, data_resident="stream", data_workers=0)
  train.run(threads)
  grain = _cfg(bank, tmp_path / "grain", seed, data_resident="stream", data_workers=2)
  grain = grain.replace(train_ckpt_every=1)
  train.run(grain)
  _assert_same_runs(tmp_path / "threads", tmp_path / "grain", seed)
  # Resumed one step before the end: its Grain dataset starts there.
  _assert_resume_is_exact(tmp_path / "threads", grain, seed)


@pytest.mark.parametrize("seed", [5])
def test_a_dead_worker_is_a_clear_error(tmp_path, seed):
  bank = synthetic.make_synthetic_bank(tmp_path / "bank", *SHAPE, seed=seed)
  reader = bank_lib.open_bank(bank)
  s = views_lib.ViewSampler(reader, batch_size=4, tiles=TILES, seed=seed, workers=2)
  try:
    s.local_batch(0)  # starts the workers
    before = set(multiprocessing.active_children())
    workers = [p for p in before if p.name.startswith("grain-process-prefetch")]
    assert len(workers) == 2, f"seed={seed}: {[p.name for p in before]}"
    os.kill(workers[0].pid, signal.SIGKILL)
    # Steps already buffered still arrive; the dead worker's next one cannot.
    with pytest.raises(RuntimeError, match="worker process died.*--data_workers"):
      for step in range(1, 50):
        s.local_batch(step)
  finally:
    s.close()
