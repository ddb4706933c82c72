"""gigassl_jax.pth: torch-free checkpoint reading, against files torch.save wrote."""

import os
import pathlib
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest

from gigassl_jax import pth


def _to_numpy(t):
  import torch  # pylint: disable=g-import-not-at-top

  t = t.detach()
  if t.dtype == torch.bfloat16:
    return t.float().numpy().astype(ml_dtypes.bfloat16)
  return t.numpy()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_round_trip_matches_torch(tmp_path, zip_format):
  torch = pytest.importorskip("torch")
  g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
  base = torch.randn(7, 9, generator=g)
  half = torch.randn(4, 5, 6, generator=g).half()
  obj = {
    "f32": base,
    "transposed": base.t(),  # non-contiguous, shares base's storage
    "window": base[2:, 1:7:2],  # storage offset + strides
    "row": base[3],  # 1-d view with offset
    "f16_perm": half.permute(2, 0, 1),
    "i64": torch.randint(-(2**40), 2**40, (11,), generator=g),
    "bf16": torch.randn(3, 4, generator=g).bfloat16(),
    "u8": torch.randint(0, 255, (2, 3), generator=g, dtype=torch.uint8),
    "bool": torch.rand(5, generator=g) > 0.5,
    "scalar": torch.tensor(42),
    "param": torch.nn.Parameter(torch.randn(3, 2, generator=g)),
    "empty": torch.zeros(0, 3),
    "nested": {"list": [torch.randn(2, generator=g), 7, "text"], "tuple": (1.5, torch.arange(4))},
  }
  path = tmp_path / "ckpt.pth"
  torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
  assert zipfile.is_zipfile(path) == zip_format
  got = pth.load(path)
  for key in (
    "f32",
    "transposed",
    "window",
    "row",
    "f16_perm",
    "i64",
    "bf16",
    "u8",
    "bool",
    "scalar",
    "param",
    "empty",
  ):
    want = _to_numpy(obj[key])
    assert got[key].dtype == want.dtype, key
    assert got[key].shape == want.shape, key
    np.testing.assert_array_equal(got[key], want, err_msg=key)
    assert got[key].flags.c_contiguous
  np.testing.assert_array_equal(got["nested"]["list"][0], _to_numpy(obj["nested"]["list"][0]))
  assert got["nested"]["list"][1:] == [7, "text"]
  assert got["nested"]["tuple"][0] == 1.5
  np.testing.assert_array_equal(got["nested"]["tuple"][1], np.arange(4))
  # Views are copies: writing one must not change another that shared storage.
  got["f32"][0, 0] += 1
  assert got["transposed"][0, 0] == obj["f32"][0, 0].item()


def test_bundled_legacy_file_matches_torch():
  torch = pytest.importorskip("torch")
  from gigassl_jax import encoders  # pylint: disable=g-import-not-at-top

  path = encoders.bundled_efficientnet_lite0_path()
  assert not zipfile.is_zipfile(path)  # the pre-1.6 format
  want = torch.load(path, map_location="cpu", weights_only=True)
  got = pth.load_state_dict(path)
  assert list(got) == list(want)
  for k, v in want.items():
    assert got[k].shape == tuple(v.shape), k
    np.testing.assert_array_equal(got[k], v.numpy(), err_msg=k)


def test_load_state_dict_unwraps_training_checkpoint(tmp_path):
  torch = pytest.importorskip("torch")
  sd = {"module.encoder_q.conv1.weight": torch.randn(4, 3, 3, 3), "module.queue": torch.randn(8, 2)}
  ckpt = {
    "epoch": 3,
    "arch": "resnet18",
    "state_dict": sd,
    "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
  }
  torch.save(ckpt, tmp_path / "moco.pth.tar")
  got = pth.load_state_dict(tmp_path / "moco.pth.tar")
  assert sorted(got) == sorted(sd)
  np.testing.assert_array_equal(got["module.queue"], sd["module.queue"].numpy())


class _Evil:
  """Unpickling this would run a shell command."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def _write_evil(path: pathlib.Path, marker: pathlib.Path, as_zip: bool):
  payload = pickle.dumps({"weight": _Evil(marker)}, protocol=2)
  if as_zip:
    with zipfile.ZipFile(path, "w") as zf:
      zf.writestr("archive/data.pkl", payload)
      zf.writestr("archive/version", "3\n")
  else:  # legacy header followed by the payload
    with open(path, "wb") as f:
      for part in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
        pickle.dump(part, f, protocol=2)
      f.write(payload)


@pytest.mark.parametrize("as_zip", [True, False], ids=["zip", "legacy"])
def test_rejects_malicious_pickle(tmp_path, as_zip):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pth"
  _write_evil(path, marker, as_zip)
  with pytest.raises(pth.UnsafeCheckpointError) as err:
    pth.load(path)
  assert str(path) in str(err.value)
  assert "system" in str(err.value)
  assert not marker.exists()


def test_rejects_malicious_first_pickle(tmp_path):
  """The payload in the very first pickle (no torch header) is refused too."""
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pth"
  path.write_bytes(pickle.dumps(_Evil(marker), protocol=2))
  with pytest.raises(pth.UnsafeCheckpointError, match="evil.pth"):
    pth.load(path)
  assert not marker.exists()
  # The payload is live: a plain unpickler runs it (so the test is not vacuous).
  pickle.loads(path.read_bytes())
  assert marker.exists()


@pytest.mark.parametrize("seed", [0, 1])
def test_not_a_checkpoint(tmp_path, seed):
  path = tmp_path / "noise.pth"
  path.write_bytes(np.random.default_rng(seed).bytes(300))
  with pytest.raises(pickle.UnpicklingError, match="noise.pth"):  # seed in the test id
    pth.load(path)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_truncated_checkpoint(tmp_path, zip_format):
  torch = pytest.importorskip("torch")
  path = tmp_path / "cut.pth"
  torch.save({"w": torch.randn(100, 100)}, path, _use_new_zipfile_serialization=zip_format)
  data = path.read_bytes()
  path.write_bytes(data[: len(data) - 5000])
  with pytest.raises(Exception, match="cut.pth"):
    pth.load(path)


@pytest.mark.parametrize("seed", [0, 1])
def test_save_is_read_by_torch_load(tmp_path, seed):
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(seed)
  arrays = {
    "f32": rng.normal(size=(9, 1, 4, 6)).astype(np.float32),
    "f64": rng.normal(size=(3,)),
    "f16": rng.normal(size=(2, 5)).astype(np.float16),
    "i64": rng.integers(-(2**40), 2**40, (4,)),
    "i32": rng.integers(-9, 9, (2, 2)).astype(np.int32),
    "u8": rng.integers(0, 255, (7,)).astype(np.uint8),
    "bool": rng.random(5) > 0.5,
    "scalar": np.array(3.5, np.float32),
    "empty": np.zeros((2, 0, 3), np.float32),
    "fortran": np.asfortranarray(rng.normal(size=(3, 4)).astype(np.float32)),
  }
  config = {"downmap": 224, "num_class": 2, "name": "x", "rate": 0.25, "big": 2**40,
            "flags": [True, False, None], "pair": (1, "a")}  # fmt: skip
  path = tmp_path / "w.pth"
  pth.save({"config": config, "state_dict": arrays}, path)
  got = torch.load(path, weights_only=True)
  assert got["config"] == config, f"seed {seed}"
  for k, a in arrays.items():
    t = got["state_dict"][k]
    assert tuple(t.shape) == a.shape, f"seed {seed}: {k}"
    assert np.array_equal(t.numpy(), a), f"seed {seed}: {k}"
  # Our own reader gives the same arrays back.
  back = pth.load(path)["state_dict"]
  for k, a in arrays.items():
    assert back[k].dtype == a.dtype and np.array_equal(back[k], a), f"seed {seed}: {k}"
