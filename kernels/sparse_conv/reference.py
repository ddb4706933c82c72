"""Plain-jnp reference of the sparse convolution: one gather + matmul per tap.

The simplest correct form, differentiated by JAX's own autodiff (its backward
scatter-adds). Every other implementation is tested against it and against the
`dense` oracle.
"""

import jax.numpy as jnp


def conv_reference(feats, weight, rulebook, *, precision=None):
  """Sparse convolution, tap by tap.

  Args:
    feats: [V, S_in, C_in] input features (zero on padding rows).
    weight: [K, C_in, C_out], tap k = ksize * d0 + d1.
    rulebook: rulebook.Rulebook with nbr [V, S_out, K].
    precision: of the matmuls (None = JAX's default).

  Returns:
    [V, S_out, C_out]; rows of inactive output sites are zero.
  """
  nbr = rulebook.nbr
  out = jnp.zeros(nbr.shape[:2] + (weight.shape[-1],), jnp.result_type(feats, weight))
  for k in range(nbr.shape[-1]):
    idx = nbr[:, :, k]
    rows = jnp.take_along_axis(feats, jnp.maximum(idx, 0)[..., None], axis=1)
    rows = jnp.where((idx >= 0)[..., None], rows, 0)
    out = out + jnp.matmul(rows, weight[k], precision=precision)
  return out
