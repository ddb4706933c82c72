"""The kernels' input type: the rule book (neighbour tables) of one sparse convolution.

Owned by the kernel package so that kernels depend on nothing above them;
gigassl_jax.sparse.tables builds rule books from sparse maps and returns this
type. A rule book is a JAX pytree: the arrays are leaves (they may be traced),
`ksize` and `stride` are static.
"""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class Rulebook:
  """Geometry of one sparse convolution (or pooling) between two site sets.

  nbr:   int32 [V, S_out, K]  output row -> input row per tap (-1 none); tap order
         k = ksize * d0 + d1 (SparseConvNet's, d0 the offset along c0 = x).
  nbr_t: int32 [V, S_in, K]   input row -> output row per tap (-1 none), the
         mirrored table that backward passes gather with (no scatter-add).
  in_coords/out_coords int32 [V, S, 2], in_mask/out_mask bool [V, S]: kept for
  the dense oracle implementation and for tests.
  ksize, stride: static kernel size and stride.
  """

  nbr: jax.Array
  nbr_t: jax.Array
  in_coords: jax.Array
  in_mask: jax.Array
  out_coords: jax.Array
  out_mask: jax.Array
  ksize: int = dataclasses.field(default=3, metadata={"static": True})
  stride: int = dataclasses.field(default=1, metadata={"static": True})

  @property
  def taps(self) -> int:
    return self.nbr.shape[-1]

  def replace(self, **changes) -> Rulebook:
    return dataclasses.replace(self, **changes)


jax.tree_util.register_dataclass(
  Rulebook,
  data_fields=["nbr", "nbr_t", "in_coords", "in_mask", "out_coords", "out_mask"],
  meta_fields=["ksize", "stride"],
)


def is_concrete(*xs) -> bool:
  """True when no argument is a tracer, i.e. values can be checked eagerly."""
  return not any(isinstance(x, jax.core.Tracer) for x in xs)
