"""Sparse layers with SparseConvNet semantics: functions and Flax NNX modules.

All layers take and return features [V, S, C] on the site set of a SparseMap
(coords, mask); padding rows stay exactly zero.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from gigassl_jax.kernels.sparse_conv import api as conv_api

# ---------------------------------------------------------------- functions --


def avg_pool(feats, rulebook, *, implementation: conv_api.WindowSumImplementation | None = None):
  """3x3 stride-2 average pooling: sum of the active inputs in the window / 9.

  SparseConvNet divides by the filter volume, not by the number of active
  inputs. Shares the strided convolution's rule book (same output sites).
  The sum is the kernel api's window_sum (tiles of the real pairs on CPU, one
  row gather per tap elsewhere; no [V, S_out, K, C] intermediate); forward and
  backward are deterministic.

  Args:
    feats: [V, S_in, C]; rulebook: tables.strided_rulebook(...).
    implementation: window_sum's ("tiles", "gather"; None = the backend's).

  Returns:
    [V, S_out, C].
  """
  return conv_api.window_sum(feats, rulebook, implementation=implementation) / rulebook.taps


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


def batch_norm(
  x,
  mask,
  scale,
  bias,
  running_mean,
  running_var,
  *,
  train: bool,
  momentum: float = 0.9,
  eps: float = 1e-5,
  axis_name=None,
):
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
    y, mean, var, n = _bn_train(x, mask, scale, bias, axis_name, eps)
    unbiased = var * n / jnp.maximum(n - 1.0, 1.0)
    new_mean = momentum * running_mean + (1.0 - momentum) * mean
    new_var = momentum * running_var + (1.0 - momentum) * unbiased
    return y, new_mean, new_var
  y = _normalise(x, mask, scale, bias, running_mean, running_var, eps)
  return y, running_mean, running_var


def _normalise(x, mask, scale, bias, mean, var, eps):
  inv = jax.lax.rsqrt(var + eps) * scale
  y = (x.astype(jnp.float32) - mean) * inv + bias
  return jnp.where(mask[..., None], y, 0).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _bn_train(x, mask, scale, bias, axis_name, eps):
  """(y, batch mean, biased batch variance, count) of train-mode batch norm.

  A hand-written backward: autodiff of the two-pass moments and the masked
  normalisation made XLA run several more passes over the [V, S, C] rows
  (memory-bound on CPU); this one reads x and g twice (two per-channel sums,
  then dx in one pass). Collectives follow the training step's
  check_vma=False convention: statistics are psum'd over `axis_name`, so are
  the sums that dx needs; dscale and dbias are this device's own sums.
  """
  mean, var, n = masked_moments(x, mask, axis_name)
  return _normalise(x, mask, scale, bias, mean, var, eps), mean, var, n


def _bn_train_fwd(x, mask, scale, bias, axis_name, eps):
  out = _bn_train(x, mask, scale, bias, axis_name, eps)
  _, mean, var, n = out
  return out, (x, mask, scale, mean, var, n)


def _bn_train_bwd(axis_name, eps, res, cts):
  x, mask, scale, mean, var, n = res
  g, g_mean, g_var, _ = cts
  m = mask[..., None]
  red = tuple(range(x.ndim - 1))
  xc = x.astype(jnp.float32) - mean
  gm = jnp.where(m, g.astype(jnp.float32), 0)
  rstd = jax.lax.rsqrt(var + eps)
  dbias = jnp.sum(gm, axis=red)
  dscale = jnp.sum(gm * xc, axis=red) * rstd  # sum g * xhat over active rows
  sums = (dbias, dscale, g_mean, g_var)
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  a_sum, b_sum, c_sum, d_sum = sums
  inv_n = 1.0 / jnp.maximum(n, 1.0)
  a = rstd * scale
  # dx = a (g - A/n - xhat B/n) + C/n + 2 (x - mean) D/n, on active rows.
  k = (2.0 * d_sum - a * rstd * b_sum) * inv_n
  b0 = (c_sum - a * a_sum) * inv_n
  dx = jnp.where(m, a * gm + k * xc + b0, 0).astype(x.dtype)
  return dx, None, dscale.astype(scale.dtype), dbias.astype(scale.dtype)


_bn_train.defvjp(_bn_train_fwd, _bn_train_bwd)


# ------------------------------------------------------------------ modules --


def _kaiming(key, shape, dtype):
  # fan_in = taps * C_in, as for a dense conv of the same kernel.
  fan_in = shape[0] * shape[1]
  return jax.random.normal(key, shape, dtype) * jnp.sqrt(2.0 / fan_in).astype(dtype)


class SparseConv(nnx.Module):
  """Bias-free sparse convolution; weight [K, C_in, C_out] (tap k = ksize*d0 + d1).

  Which convolution (submanifold or strided) is decided by the rule book passed
  at call time; `implementation` and `config` pick the kernel (see
  kernels/sparse_conv/api.py); `precision` is that of every matmul (None, a
  jax.lax.Precision or "default" / "high" / "highest").
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    ksize: int = 3,
    *,
    implementation: conv_api.Implementation | None = None,
    config: conv_api.Config | None = None,
    precision=None,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.in_features = in_features
    self.out_features = out_features
    self.ksize = ksize
    self.implementation = implementation
    self.config = config
    self.precision = conv_api.canonical_precision(precision)
    self.dtype = dtype
    self.weight = nnx.Param(
      _kaiming(rngs.params(), (ksize * ksize, in_features, out_features), param_dtype)
    )

  def __call__(self, feats, rulebook):
    if feats.shape[-1] != self.in_features:
      raise ValueError(
        f"SparseConv expects {self.in_features} input channels, got {feats.shape[-1]}"
      )
    if self.ksize == 1:
      # A 1x1 "submanifold" conv is a per-site matmul.
      w = self.weight[...][0].astype(self.dtype)
      return jnp.matmul(feats.astype(self.dtype), w, precision=self.precision)
    return conv_api.sparse_conv(
      feats.astype(self.dtype),
      self.weight[...].astype(self.dtype),
      rulebook,
      implementation=self.implementation,
      config=self.config,
      precision=self.precision,
    )


class SparseBatchNorm(nnx.Module):
  """Batch norm over active sites (SparseConvNet BatchNormalization semantics).

  `use_running_average` is toggled by `model.train()` / `model.eval()`;
  `axis_name` syncs statistics across devices (shard_map axis), None = local.
  """

  def __init__(
    self,
    num_features: int,
    *,
    momentum: float = 0.9,
    eps: float = 1e-5,
    axis_name: str | None = None,
    use_running_average: bool = False,
    rngs: nnx.Rngs | None = None,
  ):
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
    y, m, v = batch_norm(
      x,
      mask,
      self.scale[...],
      self.bias[...],
      self.mean[...],
      self.var[...],
      train=train,
      momentum=self.momentum,
      eps=self.eps,
      axis_name=self.axis_name,
    )
    if train:
      self.mean.set_value(m)
      self.var.set_value(v)
    return y


def relu(x):
  return jax.nn.relu(x)


__all__ = [
  "avg_pool",
  "global_mean",
  "masked_moments",
  "batch_norm",
  "SparseConv",
  "SparseBatchNorm",
  "relu",
]
