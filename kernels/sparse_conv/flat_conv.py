"""Scaffolding shared by the Pallas gather-GEMM convolutions (pallas_gpu, pallas_tpu).

Both run a kernel on flat rows: the features [V, S_in, C_in] become [V*S_in,
C_in], the tables index those rows (pairs.flat_table), and a custom VJP
(jax.grad cannot go through pallas_call) supplies each module's backward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from gigassl_jax.kernels.sparse_conv import pairs


def custom_vjp_conv(gather_gemm, backward):
  """conv(x, w, nbr, nbr_t, config, interpret, precision) -> [N_out, C_out].

  Args:
    gather_gemm: the forward, gather_gemm(nbr, x, w, config, *, interpret,
      precision) = sum_k x[nbr[:, k]] @ w[k].
    backward: backward(config, interpret, precision, (x, w, nbr, nbr_t), g) ->
      (dx, dw); dw is cast to w's dtype here.
  """

  @functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
  def conv(x, w, nbr, nbr_t, config, interpret, precision):
    return gather_gemm(nbr, x, w, config, interpret=interpret, precision=precision)

  def fwd(x, w, nbr, nbr_t, config, interpret, precision):
    out = gather_gemm(nbr, x, w, config, interpret=interpret, precision=precision)
    return out, (x, w, nbr, nbr_t)

  def bwd(config, interpret, precision, res, g):
    dx, dw = backward(config, interpret, precision, res, g)
    return dx, dw.astype(res[1].dtype), None, None

  conv.defvjp(fwd, bwd)
  return conv


def apply(conv, feats, weight, rulebook, config, interpret, precision):
  """A flat-row conv (custom_vjp_conv) on [V, S_in, C_in] features: [V, S_out, C_out]."""
  v, s_in, c_in = feats.shape
  s_out = rulebook.nbr.shape[1]
  dtype = jnp.result_type(feats, weight)
  nbr = pairs.flat_table(rulebook.nbr, s_in)
  nbr_t = pairs.flat_table(rulebook.nbr_t, s_out)
  x = feats.reshape(v * s_in, c_in).astype(dtype)
  out = conv(x, weight.astype(dtype), nbr, nbr_t, config, bool(interpret), precision)
  return out.reshape(v, s_out, weight.shape[-1])
