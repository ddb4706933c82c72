"""The bank resident on the devices (gigassl_jax.resident): same views, same run, as streaming.

The test process has 8 CPU devices (conftest.py), so the bank is sharded over
8 devices here, with padding when the slides do not divide.
"""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from gigassl_jax import bank as bank_lib
from gigassl_jax import resident, synthetic, train
from gigassl_jax import views as views_lib
from test_determinism import _assert_resume_is_exact, _assert_same_runs, _cfg

SHAPE = (13, 3, 12, 32)  # 13 slides: padded to 16 on 8 devices


@pytest.mark.parametrize("seed", [11])
def test_gathered_views_equal_the_streamed_views(tmp_path, seed):
  """gather_views on 8 devices = what the host reads (sampler.local_batch), bit for bit."""
  bank = synthetic.make_synthetic_bank(tmp_path / "bank", *SHAPE, seed=seed)
  reader = bank_lib.open_bank(bank)
  mesh = train.make_mesh()
  assert mesh.devices.size == 8, "conftest gives 8 CPU devices"
  sampler = views_lib.ViewSampler(reader, batch_size=8, tiles=5, seed=seed)
  on_device = resident.load(reader, mesh, train.AXIS, chunk=3)  # several chunks per device
  assert on_device["feats"].shape == (16, 3, 12, 32)
  gather = jax.jit(
    jax.shard_map(
      lambda b, i: resident.gather_views(b, i, train.AXIS),
      mesh=mesh,
      in_specs=(P(train.AXIS), P()),
      out_specs=P(train.AXIS),
      check_vma=False,
    )
  )
  try:
    for step in (0, 1, 7):  # 7: a later epoch (1 step per epoch here), another shuffle
      want = sampler.local_batch(step)
      idx = train.put_replicated(resident.step_indices(sampler, step), mesh)
      got = jax.device_get(gather(on_device, idx))
      for k in ("feats", "xy", "position"):
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"seed={seed} step={step} {k}")
  finally:
    sampler.close()


@pytest.mark.parametrize("seed", [12])
def test_resident_and_streaming_runs_are_bitwise_equal_and_resume_exactly(tmp_path, seed):
  """3 steps resident = 3 steps streamed = 2 streamed + 1 resident after a resume, bitwise.

  The input state is the step alone, so a resume is exact on both paths, and
  --data_resident may change between a run and its resume.
  """
  bank = synthetic.make_synthetic_bank(tmp_path / "bank", *SHAPE, seed=seed)
  train.run(_cfg(bank, tmp_path / "device", seed, data_resident="device"))
  stream = _cfg(bank, tmp_path / "stream", seed, data_resident="stream")
  stream = stream.replace(train_ckpt_every=1)
  train.run(stream)
  _assert_same_runs(tmp_path / "device", tmp_path / "stream", seed)
  # Resumed one step before the end, resident now.
  _assert_resume_is_exact(tmp_path / "device", stream.replace(data_resident="device"), seed)


def test_decide_follows_the_flag_and_the_budget(tmp_path):
  bank = synthetic.make_synthetic_bank(tmp_path / "bank", *SHAPE, seed=0)
  reader = bank_lib.open_bank(bank)
  mesh = train.make_mesh()
  per_slide = 3 * 12 * (2 * 32 + 8)
  assert resident.slide_bytes(reader) == per_slide
  forced = resident.decide(reader, mesh, "device", 1e-12)
  assert forced.resident and "--data_resident=device" in forced.reason
  assert forced.shard_bytes == 16 * per_slide  # 13 slides padded to 16, all devices local
  assert not resident.decide(reader, mesh, "stream", 1.0).resident
  memory = resident.devices_memory_bytes(list(mesh.devices.flat))
  assert memory and memory > 0, "MemAvailable should be readable on Linux"
  fits = 16 * per_slide / memory  # the fraction at which the shard exactly fits
  assert resident.decide(reader, mesh, "auto", min(1.0, 100 * fits)).resident
  small = resident.decide(reader, mesh, "auto", fits / 100)
  assert not small.resident and "does not fit" in small.reason
  with pytest.raises(ValueError, match="--data_resident"):
    resident.decide(reader, mesh, "gpu", 0.5)
