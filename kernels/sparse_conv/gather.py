"""`gather` implementation: XLA gather of all K taps + one einsum.

The gather is a custom_vjp whose backward gathers output gradients through the
mirrored table `nbr_t` (input row -> output row per tap) instead of letting
autodiff scatter-add: no atomics, so the result is deterministic on GPU.
"""

import jax
import jax.numpy as jnp


def _flat_index(nbr, s_in):
  """[V, S_out, K] per-view rows -> rows of the flattened [V*S_in + 1] array.

  The extra last row is zeros: absent taps (-1) read it.
  """
  v = nbr.shape[0]
  base = (jnp.arange(v, dtype=jnp.int32) * s_in)[:, None, None]
  return jnp.where(nbr >= 0, nbr + base, v * s_in)


def _take_rows(x, nbr):
  v, s, c = x.shape
  flat = jnp.concatenate([x.reshape(v * s, c), jnp.zeros((1, c), x.dtype)])
  return flat[_flat_index(nbr, s)]


@jax.custom_vjp
def gather_taps(x, nbr, nbr_t):
  """Rows of x read by every (output site, tap).

  Args:
    x: [V, S_in, C].
    nbr: int32 [V, S_out, K] (-1 = no input; gives a zero row).
    nbr_t: int32 [V, S_in, K], the mirrored table (input row -> output row).

  Returns:
    [V, S_out, K, C].
  """
  return _take_rows(x, nbr)


def _gather_fwd(x, nbr, nbr_t):
  return _take_rows(x, nbr), (nbr, nbr_t)


def _gather_bwd(res, g):
  nbr, nbr_t = res
  v, s_out, k, c = g.shape
  # dx[i] = sum_k g[nbr_t[i, k], k]: input i is read by output nbr_t[i, k]
  # through tap k, so gather that output's tap-k slice of the cotangent.
  flat = jnp.concatenate([g.reshape(v * s_out * k, c), jnp.zeros((1, c), g.dtype)])
  base = (jnp.arange(v, dtype=jnp.int32) * s_out)[:, None, None]
  tap = jnp.arange(k, dtype=jnp.int32)[None, None, :]
  idx = jnp.where(nbr_t >= 0, (nbr_t + base) * k + tap, v * s_out * k)
  dx = jnp.sum(flat[idx], axis=2)
  return dx, None, None


gather_taps.defvjp(_gather_fwd, _gather_bwd)


def conv_gather(feats, weight, rulebook, *, precision=None):
  """Sparse convolution = gather_taps + einsum over (tap, in-channel).

  Args:
    feats: [V, S_in, C_in]; weight: [K, C_in, C_out]; rulebook: rulebook.Rulebook.
    precision: of the einsum (None = JAX's default).

  Returns:
    [V, S_out, C_out].
  """
  g = gather_taps(feats, rulebook.nbr, rulebook.nbr_t)
  return jnp.einsum("vokc,kcd->vod", g, weight.astype(g.dtype), precision=precision)
