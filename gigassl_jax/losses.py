"""NT-Xent (SimCLR) loss, pure, with an optional device axis for global negatives."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _normalize(z, eps=1e-12):
  z = z.astype(jnp.float32)
  return z * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, axis=-1, keepdims=True), eps * eps))


def nt_xent(z1, z2, temperature: float = 0.05, axis_name: str | None = None):
  """Symmetric NT-Xent over the 2N views of N slides.

  Each anchor's positive is the other view of the same slide; its negatives are
  the other 2N - 2 views (itself excluded). Computed as normalise-then-matmul
  (the reference's broadcast cosine similarity gives the same numbers, far slower),
  always in float32 at Precision.HIGHEST whatever the model's precision: the
  logits are similarities / tau (1/tau = 20), which amplifies a TF32 matmul's
  ~1e-3 relative error into the loss and its gradients.

  With `axis_name` (inside shard_map), z1/z2 are this device's share [n, D]; the
  keys are gathered from every device (global negatives, `all_gather(tiled)`),
  and the value returned is the mean over the LOCAL anchors; average it over the
  devices (pmean) for the global loss. Without it, the negatives are local and
  the value is the mean over the 2n anchors.

  Args:
    z1, z2: [n, D] projections of the two views (row i of each = slide i).
    temperature: tau.
    axis_name: None or the mesh axis of the data-parallel devices.

  Returns:
    scalar float32.
  """
  sim, pos_idx = view_similarities(z1, z2, axis_name)
  logits = sim / temperature
  # A masked row sum, not take_along_axis: the gather's transpose would be a
  # scatter-add (order not fixed on GPU); a select transposes to a select. One
  # term per row is non-zero, so the sum is exact and equals the gather.
  cols = jnp.arange(logits.shape[1])[None, :]
  pos = jnp.sum(jnp.where(cols == pos_idx[:, None], logits, 0.0), axis=1)
  return jnp.mean(jax.nn.logsumexp(logits, axis=1) - pos)


def view_similarities(z1, z2, axis_name: str | None = None):
  """Cosine similarities of the 2n local anchors to all 2N views, self excluded.

  The layout NT-Xent and the batch retrieval metric share: anchors are this
  device's z1 rows then z2 rows; keys are every device's (all_gather) z1 then
  z2 rows; each anchor's own column is -inf. float32 at Precision.HIGHEST.

  Returns:
    (sim [2n, 2N] float32, pos_idx [2n] int: the column of each anchor's positive).
  """
  if z1.shape != z2.shape or z1.ndim != 2:
    raise ValueError(f"z1 and z2 must both be [n, D], got {z1.shape} and {z2.shape}")
  a1, a2 = _normalize(z1), _normalize(z2)
  n = a1.shape[0]
  if axis_name is None:
    k1, k2, offset, total = a1, a2, 0, n
  else:
    k1 = _gather_rows(a1, axis_name)
    k2 = _gather_rows(a2, axis_name)
    offset = jax.lax.axis_index(axis_name) * n
    total = k1.shape[0]
  anchors = jnp.concatenate([a1, a2])  # [2n, D]
  keys = jnp.concatenate([k1, k2])  # [2N, D]
  sim = jnp.matmul(anchors, keys.T, precision=jax.lax.Precision.HIGHEST)  # [2n, 2N], float32
  i = jnp.arange(n)
  self_idx = jnp.concatenate([offset + i, total + offset + i])
  pos_idx = jnp.concatenate([total + offset + i, offset + i])
  cols = jnp.arange(2 * total)[None, :]
  return jnp.where(cols == self_idx[:, None], -jnp.inf, sim), pos_idx


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _gather_rows(x, axis_name):
  """all_gather(x, tiled) whose transpose is psum + own slice, not a reduce-scatter.

  Same gradient (a reduce-scatter is a sum over devices, then each device's
  block); over gloo (CPU, several processes) the reduce-scatter of the
  all_gather's transpose stalled each step ~30 s, an all-reduce does not
  (experiments/results/scale/multihost.md).
  """
  return jax.lax.all_gather(x, axis_name, tiled=True)


def _gather_rows_fwd(x, axis_name):
  return _gather_rows(x, axis_name), x.shape[0]


def _gather_rows_bwd(axis_name, n, ct):
  total = jax.lax.psum(ct, axis_name)
  start = jax.lax.axis_index(axis_name) * n
  return (jax.lax.dynamic_slice_in_dim(total, start, n, axis=0),)


_gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def collapse_level(z):
  """std over the batch of the L2-normalised projections, times sqrt(dim).

  About 1 for well-spread projections, 0 at complete collapse. The reference
  uses sqrt(512) for a 256-d vector; this uses the vector's real dimension.

  Args:
    z: [n, D].
  """
  a = _normalize(z)
  return jnp.mean(jnp.std(a, axis=0)) * jnp.sqrt(float(a.shape[-1]))
