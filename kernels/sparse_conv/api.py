"""One entry point for every sparse-convolution implementation.

    out = sparse_conv(feats, weight, rulebook, implementation="pairs")

Implementations (docs/kernels.md): `dense` (oracle), `reference` (per tap,
plain jnp), `gather` (XLA gather + einsum), `pairs` (only real pairs, tiled by
tap), `pallas_gpu` (Triton gather-GEMM), `pallas_tpu` (DMA row gathers).
Implementations are looked up by name; an unknown name is rejected with the list
of valid ones; None picks the fastest one measured for the current backend
(`DEFAULT_BY_BACKEND`, from kernels/sparse_conv/bench.py results).
"""

from __future__ import annotations

import jax
from gigassl_jax.kernels.sparse_conv import dense, gather, pairs, pallas_gpu, pallas_tpu, reference

IMPLEMENTATIONS = {
  "dense": dense.conv_dense,
  "reference": reference.conv_reference,
  "gather": gather.conv_gather,
  "pairs": pairs.conv_pairs,
  "pallas_gpu": pallas_gpu.conv_pallas_gpu,
  "pallas_tpu": pallas_tpu.conv_pallas_tpu,
}

# CPU: measured by bench.py (experiments/results/kernels.md): `pairs` is several
# times faster than `gather` at the training shape and the fastest on slides.
# GPU: measured on an H200 (experiments/results/gpu_h200.md): `gather` is the
# fastest at every shape (2.8-8x spconv; `pallas_gpu` 0.85-2.1x, `pairs`
# 0.1-1.2x, its sequential tile loop being launch-bound on a GPU).
# TPU: no measurement yet, so the plain-XLA `gather` (deterministic backward,
# known to compile everywhere); `pallas_tpu` is selectable by name.
DEFAULT_BY_BACKEND = {"cpu": "pairs", "gpu": "gather", "tpu": "gather"}


def resolve(implementation: str | None) -> str:
  """Name of the implementation to use (None -> this backend's default)."""
  if implementation is None:
    return DEFAULT_BY_BACKEND.get(jax.default_backend(), "gather")
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
      f"unknown sparse-conv implementation {implementation!r}; valid: {sorted(IMPLEMENTATIONS)}"
    )
  return implementation


def sparse_conv(feats, weight, rulebook, *, implementation: str | None = None, **options):
  """Sparse convolution `out[o] = sum_k feats[nbr[o, k]] @ weight[k]`.

  Args:
    feats: [V, S_in, C_in] features (zero on padding rows).
    weight: [K, C_in, C_out], tap k = ksize * d0 + d1 (d0 along c0 = x).
    rulebook: gigassl_jax.sparse.tables.Rulebook.
    implementation: a name in IMPLEMENTATIONS, or None for the backend default.
    **options: implementation-specific options (e.g. extent= for dense).

  Returns:
    [V, S_out, C_out], zero on inactive output rows.
  """
  if feats.shape[-1] != weight.shape[1]:
    raise ValueError(
      f"feature channels {feats.shape[-1]} do not match the weight's input "
      f"channels {weight.shape[1]} (weight shape {weight.shape})"
    )
  if weight.shape[0] != rulebook.taps:
    raise ValueError(f"weight has {weight.shape[0]} taps but the rule book has {rulebook.taps}")
  if feats.shape[:2] != rulebook.in_mask.shape:
    raise ValueError(
      f"features {feats.shape[:2]} do not match the rule book's input sites "
      f"{rulebook.in_mask.shape}"
    )
  return IMPLEMENTATIONS[resolve(implementation)](feats, weight, rulebook, **options)
