"""The Giga-SSL pooling network (sparse ResNet18 layer4 + global mean) and projector.

docs/method.md section 4. Parameter names follow the golden vectors' (b0_conv1, ...),
and `load_torchvision_layer4` maps a torchvision ResNet18 state_dict onto them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gigassl_jax.kernels.sparse_conv import api as conv_api
from gigassl_jax.sparse import layers, maps, tables

ORIENTATIONS = ("natural", "reference")


class PoolingNet(nnx.Module):
  """Sparse ResNet18 layer4 (two basic blocks) + global mean over active sites.

  Block 0 (C_in -> C): strided 3x3/2 conv -> BN -> ReLU -> submanifold 3x3 -> BN;
  shortcut 3x3/2 average pool (sum / 9) -> 1x1 conv -> BN; sum, ReLU.
  Block 1 (C -> C): submanifold 3x3 -> BN -> ReLU -> submanifold 3x3 -> BN, plus
  identity, ReLU. No conv has a bias.

  conv_impl / conv_config pick the sparse-conv kernel and its blocks, pool_impl
  the average pool's window sum (kernels/sparse_conv/api.py; None = the fastest
  measured on this backend). precision: of every conv matmul (None = JAX's
  default_matmul_precision; else a jax.lax.Precision or "default" / "high" /
  "highest").
  """

  def __init__(
    self,
    in_features: int = 256,
    features: int = 512,
    *,
    conv_impl: str | None = None,
    conv_config=None,
    pool_impl: str | None = None,
    precision=None,
    table_builder: str = tables.DEFAULT_BUILDER,
    bn_axis_name: str | None = None,
    bn_momentum: float = 0.9,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    if table_builder not in tables.BUILDERS:
      raise ValueError(f"unknown table builder {table_builder!r}; valid: {tables.BUILDERS}")
    self.in_features = in_features
    self.features = features
    self.table_builder = table_builder
    self.pool_impl = pool_impl

    def conv(cin, cout, k):
      return layers.SparseConv(
        cin,
        cout,
        k,
        implementation=conv_impl,
        config=conv_config,
        precision=precision,
        dtype=dtype,
        rngs=rngs,
      )

    def bn():
      return layers.SparseBatchNorm(features, momentum=bn_momentum, axis_name=bn_axis_name)

    self.b0_conv1, self.b0_norm1 = conv(in_features, features, 3), bn()
    self.b0_conv2, self.b0_norm2 = conv(features, features, 3), bn()
    self.b0_convd, self.b0_normd = conv(in_features, features, 1), bn()
    self.b1_conv1, self.b1_norm1 = conv(features, features, 3), bn()
    self.b1_conv2, self.b1_norm2 = conv(features, features, 3), bn()

  def sites(self, smap: maps.SparseMap, spatial_size=None) -> maps.SparseMap:
    """Block outputs on the strided conv's output sites (capacity 4 S).

    Args:
      smap: input views, features [V, S, C_in].
      spatial_size: None (this project's default: every window with an active
        input exists) or the reference's batch-wide (S0, S1) input size, which
        reproduces SparseConvNet's edge clipping exactly.

    Returns:
      SparseMap with features [V, 4S, C].
    """
    if smap.channels != self.in_features:
      raise ValueError(
        f"the pooling net was built for {self.in_features}-d tile features, got "
        f"{smap.channels}-d (use in_features = the bank's feature dimension)"
      )
    x = smap.feats
    rb_s = tables.strided_rulebook(smap, builder=self.table_builder, spatial_size=spatial_size)
    out = maps.SparseMap(coords=rb_s.out_coords, feats=None, mask=rb_s.out_mask)
    rb_m = tables.submanifold_rulebook(out, ksize=3, builder=self.table_builder)
    m = rb_s.out_mask

    a = layers.relu(self.b0_norm1(self.b0_conv1(x, rb_s), m))
    a = self.b0_norm2(self.b0_conv2(a, rb_m), m)
    # Shortcut: avg-pool then 1x1 conv == 1x1 conv then avg-pool (both linear,
    # the 1x1 acts per site); on the S input rows the matmul is 4x smaller than
    # on the 4S output rows.
    s = self.b0_normd(
      layers.avg_pool(self.b0_convd(x, None), rb_s, implementation=self.pool_impl), m
    )
    h = layers.relu(a + s)
    b = layers.relu(self.b1_norm1(self.b1_conv1(h, rb_m), m))
    b = self.b1_norm2(self.b1_conv2(b, rb_m), m)
    return out.replace(feats=layers.relu(b + h))

  def __call__(self, smap: maps.SparseMap, spatial_size=None):
    """[V, C] slide-view representations (global mean over active output sites)."""
    o = self.sites(smap, spatial_size)
    return layers.global_mean(o.feats, o.mask)


class Projector(nnx.Module):
  """Linear 512->512, ReLU, BN1d, Linear 512->512, ReLU, BN1d, Linear 512->256.

  precision: of the three matmuls (as PoolingNet's).
  """

  def __init__(
    self,
    features: int = 512,
    hidden: int = 512,
    out: int = 256,
    *,
    precision=None,
    bn_axis_name: str | None = None,
    bn_momentum: float = 0.9,
    rngs: nnx.Rngs,
  ):
    p = conv_api.canonical_precision(precision)
    self.fc1 = nnx.Linear(features, hidden, precision=p, rngs=rngs)
    self.bn1 = layers.SparseBatchNorm(hidden, momentum=bn_momentum, axis_name=bn_axis_name)
    self.fc2 = nnx.Linear(hidden, hidden, precision=p, rngs=rngs)
    self.bn2 = layers.SparseBatchNorm(hidden, momentum=bn_momentum, axis_name=bn_axis_name)
    self.fc3 = nnx.Linear(hidden, out, precision=p, rngs=rngs)

  def __call__(self, x):
    ones = jnp.ones(x.shape[:1], bool)
    # BN1d over the views: the sparse BN with every row active (unbiased
    # running variance, cross-device sync) is exactly that.
    h = self.bn1(jax.nn.relu(self.fc1(x))[None], ones[None])[0]
    h = self.bn2(jax.nn.relu(self.fc2(h))[None], ones[None])[0]
    return self.fc3(h)


class GigaSSL(nnx.Module):
  """Pooling network + projector; `__call__` returns (representation, projection).

  precision: the matmul precision of every sparse convolution and of the
  projector: "default" (the backend's fast path: TF32 on an NVIDIA GPU, one
  bfloat16 pass on a TPU; exact float32 on CPU), "high", "highest" (full
  float32), or a jax.lax.Precision. Always explicit, so it does not depend on
  JAX's global default_matmul_precision. The NT-Xent loss runs at "highest"
  regardless (losses.nt_xent).
  """

  def __init__(
    self,
    in_features: int = 256,
    *,
    conv_impl: str | None = None,
    table_builder: str = tables.DEFAULT_BUILDER,
    bn_axis_name: str | None = None,
    precision: str = "default",
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    precision = conv_api.canonical_precision(precision)
    if precision is None:
      raise ValueError('precision must be "default", "high", "highest" or a jax.lax.Precision')
    self.pool = PoolingNet(
      in_features,
      512,
      conv_impl=conv_impl,
      precision=precision,
      table_builder=table_builder,
      bn_axis_name=bn_axis_name,
      dtype=dtype,
      rngs=rngs,
    )
    self.proj = Projector(512, 512, 256, precision=precision, bn_axis_name=bn_axis_name, rngs=rngs)

  def __call__(self, smap: maps.SparseMap):
    rep = self.pool(smap)
    return rep, self.proj(rep.astype(jnp.float32))


# ------------------------------------------------------ weight import -------

_LAYER4 = {
  "b0_conv1": "layer4.0.conv1",
  "b0_norm1": "layer4.0.bn1",
  "b0_conv2": "layer4.0.conv2",
  "b0_norm2": "layer4.0.bn2",
  "b0_convd": "layer4.0.downsample.0",
  "b0_normd": "layer4.0.downsample.1",
  "b1_conv1": "layer4.1.conv1",
  "b1_norm1": "layer4.1.bn1",
  "b1_conv2": "layer4.1.conv2",
  "b1_norm2": "layer4.1.bn2",
}


def dense_to_sparse_kernel(w, orientation: str = "natural") -> np.ndarray:
  """torch conv weight [C_out, C_in, kh, kw] -> sparse [kh*kw, C_in, C_out].

  Sparse tap k = 3*d0 + d1 with d0 along c0 = level-0 x (image columns).
  "natural": the dense row index kh runs along y, so W[3*d0 + d1] = w[:, :, d1, d0]
    (the ImageNet kernel sees the slide as the dense network sees an image).
  "reference": the reference's loading, W[3*kh + kw] = w[:, :, kh, kw] (every
    kernel applied transposed); use it to reproduce the reference exactly.
  """
  if orientation not in ORIENTATIONS:
    raise ValueError(f"unknown kernel orientation {orientation!r}; valid: {ORIENTATIONS}")
  w = np.asarray(w, np.float32)
  if orientation == "natural":
    w = np.swapaxes(w, 2, 3)  # [C_out, C_in, d0=kw, d1=kh]
  c_out, c_in, a, b = w.shape
  return np.ascontiguousarray(w.reshape(c_out, c_in, a * b).transpose(2, 1, 0))


def load_torchvision_layer4(
  net: PoolingNet, state_dict: dict, *, orientation: str = "natural", strict: bool = True
) -> None:
  """Copies a torchvision ResNet18 state_dict's `layer4.*` into `net` in place.

  Args:
    net: a PoolingNet with in_features 256 and features 512.
    state_dict: name -> array (e.g. from gigassl_jax.pth.load); a MoCo
      `module.encoder_q.` prefix is stripped.
    orientation: see dense_to_sparse_kernel; "natural" is the default.
    strict: raise when a layer4 key is missing.
  """
  sd = {}
  for k, v in state_dict.items():
    for prefix in ("module.encoder_q.", "module.", "encoder_q."):
      if k.startswith(prefix):
        k = k[len(prefix) :]
    sd[k] = np.asarray(v)
  for name, tname in _LAYER4.items():
    mod = getattr(net, name)
    if isinstance(mod, layers.SparseConv):
      key = tname + ".weight"
      if key not in sd:
        if strict:
          raise KeyError(f"state_dict has no {key!r} (is it a torchvision ResNet18?)")
        continue
      w = dense_to_sparse_kernel(sd[key], orientation)
      if w.shape != mod.weight[...].shape:
        raise ValueError(f"{key}: shape {w.shape} does not fit {name} {mod.weight[...].shape}")
      mod.weight.set_value(jnp.asarray(w, mod.weight[...].dtype))
    else:
      for ours, theirs in (
        ("scale", "weight"),
        ("bias", "bias"),
        ("mean", "running_mean"),
        ("var", "running_var"),
      ):
        key = f"{tname}.{theirs}"
        if key not in sd:
          if strict:
            raise KeyError(f"state_dict has no {key!r}")
          continue
        getattr(mod, ours).set_value(jnp.asarray(sd[key], jnp.float32))
