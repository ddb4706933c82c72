"""Sparse layers with SparseConvNet semantics: functions and Flax NNX modules.

All layers take and return features [V, S, C] on the site set of a SparseMap
(coords, mask); padding rows stay exactly zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gigassl_jax.kernels.sparse_conv import api as conv_api
from gigassl_jax.kernels.sparse_conv import pairs as pairs_impl

# ---------------------------------------------------------------- functions --


def avg_pool(feats, rulebook):
  """3x3 stride-2 average pooling: sum of the active inputs in the window / 9.

  SparseConvNet divides by the filter volume, not by the number of active
  inputs. Shares the strided convolution's rule book (same output sites).
  K row gathers (no [V, S_out, K, C] intermediate); the backward gathers through
  the mirrored table, so it is deterministic.

  Args:
    feats: [V, S_in, C]; rulebook: tables.strided_rulebook(...).

  Returns:
    [V, S_out, C].
  """
  return pairs_impl.window_sum(feats, rulebook) / rulebook.taps


def global_mean(feats, mask):
  """Mean over each view's active sites (every site weighs the same).

  Args:
    feats: [V, S, C]; mask: bool [V, S].

  Returns:
    [V, C] (zero for a view with no active site).
  """
  m = mask.astype(feats.dtype)[..., None]
  n = jnp.maximum(jnp.sum(m, axis=1), 1)
  return jnp.sum(feats * m, axis=1) / n


def masked_moments(x, mask, axis_name=None):
  """Per-channel mean, biased variance and count over active sites.

  Two-pass (mean first, then squared deviations), summed over the devices of
  `axis_name` when given, so the statistics are those of the global batch.

  Args:
    x: [..., C]; mask: bool [...] (the leading dims of x).
    axis_name: None or a mesh axis name (inside shard_map / pmap).

  Returns:
    mean [C], var [C], count (scalar float32).
  """
  m = mask.astype(jnp.float32)[..., None]
  xf = x.astype(jnp.float32)
  red = tuple(range(x.ndim - 1))
  s = jnp.sum(xf * m, axis=red)
  n = jnp.sum(m)
  if axis_name is not None:
    s, n = jax.lax.psum((s, n), axis_name)
  mean = s / jnp.maximum(n, 1.0)
  ss = jnp.sum(jnp.square(xf - mean) * m, axis=red)
  if axis_name is not None:
    ss = jax.lax.psum(ss, axis_name)
  return mean, ss / jnp.maximum(n, 1.0), n


def batch_norm(x, mask, scale, bias, running_mean, running_var, *, train: bool,
               momentum: float = 0.9, eps: float = 1e-5, axis_name=None):
  """Batch norm over the active sites of all views (and devices).

  Train: normalise with the batch statistics; running <- momentum * running +
  (1 - momentum) * batch, the running variance unbiased (n / (n - 1)).
  Eval: normalise with the running statistics.

  Args:
    x: [V, S, C]; mask: bool [V, S]; scale, bias, running_*: [C].

  Returns:
    (y [V, S, C] zero on padding rows, new_running_mean, new_running_var).
  """
  if train:
    mean, var, n = masked_moments(x, mask, axis_name)
    unbiased = var * n / jnp.maximum(n - 1.0, 1.0)
    new_mean = momentum * running_mean + (1.0 - momentum) * mean
    new_var = momentum * running_var + (1.0 - momentum) * unbiased
  else:
    mean, var = running_mean, running_var
    new_mean, new_var = running_mean, running_var
  inv = jax.lax.rsqrt(var + eps) * scale
  y = (x.astype(jnp.float32) - mean) * inv + bias
  y = jnp.where(mask[..., None], y, 0).astype(x.dtype)
  return y, new_mean, new_var


# ------------------------------------------------------------------ modules --


def _kaiming(key, shape, dtype):
  # fan_in = taps * C_in, as for a dense conv of the same kernel.
  fan_in = shape[0] * shape[1]
  return jax.random.normal(key, shape, dtype) * jnp.sqrt(2.0 / fan_in).astype(dtype)


class SparseConv(nnx.Module):
  """Bias-free sparse convolution; weight [K, C_in, C_out] (tap k = ksize*d0 + d1).

  Which convolution (submanifold or strided) is decided by the rule book passed
  at call time; `implementation` picks the kernel (see kernels/sparse_conv).
  """

  def __init__(self, in_features: int, out_features: int, ksize: int = 3, *,
               implementation: str | None = None, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.in_features = in_features
    self.out_features = out_features
    self.ksize = ksize
    self.implementation = implementation
    self.dtype = dtype
    self.weight = nnx.Param(
        _kaiming(rngs.params(), (ksize * ksize, in_features, out_features), param_dtype))

  def __call__(self, feats, rulebook):
    if feats.shape[-1] != self.in_features:
      raise ValueError(
          f"SparseConv expects {self.in_features} input channels, got {feats.shape[-1]}")
    if self.ksize == 1:
      # A 1x1 "submanifold" conv is a per-site matmul.
      return feats.astype(self.dtype) @ self.weight[...][0].astype(self.dtype)
    return conv_api.sparse_conv(
        feats.astype(self.dtype), self.weight[...].astype(self.dtype), rulebook,
        implementation=self.implementation)


class SparseBatchNorm(nnx.Module):
  """Batch norm over active sites (SparseConvNet BatchNormalization semantics).

  `use_running_average` is toggled by `model.train()` / `model.eval()`;
  `axis_name` syncs statistics across devices (shard_map axis), None = local.
  """

  def __init__(self, num_features: int, *, momentum: float = 0.9, eps: float = 1e-5,
               axis_name: str | None = None, use_running_average: bool = False,
               rngs: nnx.Rngs | None = None):
    del rngs
    self.momentum = momentum
    self.eps = eps
    self.axis_name = axis_name
    self.use_running_average = use_running_average
    self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))

  def __call__(self, x, mask):
    train = not self.use_running_average
    y, m, v = batch_norm(x, mask, self.scale[...], self.bias[...], self.mean[...],
                         self.var[...], train=train, momentum=self.momentum,
                         eps=self.eps, axis_name=self.axis_name)
    if train:
      self.mean.set_value(m)
      self.var.set_value(v)
    return y


def relu(x):
  return jax.nn.relu(x)


__all__ = ["avg_pool", "global_mean", "masked_moments", "batch_norm", "SparseConv",
           "SparseBatchNorm", "relu"]
