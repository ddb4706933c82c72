"""One entry point for every sparse-convolution implementation (in the manner of tokamax).

    out = sparse_conv(feats, weight, rulebook)                      # fastest here
    out = sparse_conv(feats, weight, rulebook, implementation="pairs",
                      config=PairsConfig(tile=128), precision="highest")

Implementations (docs/kernels.md): `dense` (oracle), `reference` (per tap,
plain jnp), `gather` (XLA gather + einsum), `pairs` (only real pairs, tiled by
tap), `pallas_gpu` (Triton gather-GEMM), `pallas_gpu_igemm` (Triton masked
implicit GEMM: per row block only its valid taps), `pallas_tpu` (DMA row gathers). Each
declares the backends it runs on; `implementation=None` picks the one measured
fastest on the current backend (`DEFAULT_BY_BACKEND`, from bench.py results).
A Pallas kernel asked for on another backend raises, unless `interpret=True`
asks for Pallas interpret mode explicitly (tests; slow). Block and tile sizes
are typed, frozen config dataclasses, one per implementation.

The average pool's numerator, `window_sum`, is dispatched the same way
(`WindowSumImplementation`: "tiles" or "gather").

`precision` (None, a jax.lax.Precision or its name: "default", "high",
"highest") is passed to every matmul of the convolution; None leaves it to
JAX's default_matmul_precision. The `dense` oracle runs at HIGHEST unless told
otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal, get_args

import jax
from gigassl_jax.kernels.sparse_conv import (
  dense,
  gather,
  pairs,
  pallas_gpu,
  pallas_gpu_igemm,
  pallas_tpu,
  reference,
)
from gigassl_jax.kernels.sparse_conv.dense import DenseConfig
from gigassl_jax.kernels.sparse_conv.pairs import PairsConfig
from gigassl_jax.kernels.sparse_conv.pallas_gpu import PallasGpuConfig
from gigassl_jax.kernels.sparse_conv.pallas_gpu_igemm import IgemmConfig
from gigassl_jax.kernels.sparse_conv.pallas_tpu import PallasTpuConfig
from gigassl_jax.kernels.sparse_conv.rulebook import Rulebook

Implementation = Literal[
  "dense", "reference", "gather", "pairs", "pallas_gpu", "pallas_gpu_igemm", "pallas_tpu"
]
WindowSumImplementation = Literal["tiles", "gather"]
Backend = Literal["cpu", "gpu", "tpu"]
Config = DenseConfig | PairsConfig | PallasGpuConfig | IgemmConfig | PallasTpuConfig

ALL_BACKENDS: frozenset[str] = frozenset(get_args(Backend))


@dataclasses.dataclass(frozen=True)
class Spec:
  """What the dispatcher knows of one implementation.

  fn(feats, weight, rulebook, config, *, precision[, interpret]) -> out.
  backends: where it compiles natively. config_type: its config dataclass (None:
  it takes none). pallas: a Pallas kernel (accepts `interpret`).
  """

  fn: Callable
  backends: frozenset[str]
  config_type: type | None = None
  pallas: bool = False


IMPLEMENTATIONS: dict[str, Spec] = {
  "dense": Spec(dense.conv_dense, ALL_BACKENDS, DenseConfig),
  "reference": Spec(reference.conv_reference, ALL_BACKENDS),
  "gather": Spec(gather.conv_gather, ALL_BACKENDS),
  "pairs": Spec(pairs.conv_pairs, ALL_BACKENDS, PairsConfig),
  "pallas_gpu": Spec(pallas_gpu.conv_pallas_gpu, frozenset({"gpu"}), PallasGpuConfig, True),
  "pallas_gpu_igemm": Spec(
    pallas_gpu_igemm.conv_pallas_gpu_igemm, frozenset({"gpu"}), IgemmConfig, True
  ),
  "pallas_tpu": Spec(pallas_tpu.conv_pallas_tpu, frozenset({"tpu"}), PallasTpuConfig, True),
}
assert set(IMPLEMENTATIONS) == set(get_args(Implementation))
assert set(pairs.WINDOW_SUM_METHODS) == set(get_args(WindowSumImplementation))

# CPU: measured by bench.py (experiments/results/kernels.md): `pairs` is several
# times faster than `gather` at the training shape and the fastest on slides.
# GPU: measured on an H200 (experiments/results/gpu_h200.md): `gather` is the
# fastest at every shape (2.8-8x spconv; `pallas_gpu` 0.85-2.1x, `pairs`
# 0.1-1.2x, its sequential tile loop being launch-bound on a GPU).
# `pallas_gpu_igemm` (masked implicit GEMM) has not run on a GPU yet: it stays
# selectable by name, and `gather` stays the GPU default until
# benchmarks/gpu_checks.sh (its igemm step) measures it faster.
# TPU: no measurement yet, so the plain-XLA `gather` (deterministic backward,
# known to compile everywhere); `pallas_tpu` is selectable by name.
DEFAULT_BY_BACKEND: dict[str, Implementation] = {"cpu": "pairs", "gpu": "gather", "tpu": "gather"}

# window_sum: "tiles" on CPU (measured: ~1 pair per output at the training
# shape, where 9 row gathers over every output cost more); "gather" elsewhere (a
# sequential tile loop is launch-bound on a GPU, the gathers fuse into one kernel).
WINDOW_SUM_DEFAULT_BY_BACKEND: dict[str, WindowSumImplementation] = {
  "cpu": "tiles",
  "gpu": "gather",
  "tpu": "gather",
}

_PRECISIONS = {
  "default": jax.lax.Precision.DEFAULT,
  "high": jax.lax.Precision.HIGH,
  "highest": jax.lax.Precision.HIGHEST,
}


def canonical_precision(precision) -> jax.lax.Precision | None:
  """None, a jax.lax.Precision or its name ("default", "high", "highest", any case)."""
  if precision is None or isinstance(precision, jax.lax.Precision):
    return precision
  if isinstance(precision, str) and precision.lower() in _PRECISIONS:
    return _PRECISIONS[precision.lower()]
  raise ValueError(f"unknown matmul precision {precision!r}; valid: {sorted(_PRECISIONS)}")


def _backend() -> str:
  return jax.default_backend()


def supported(implementation: str, backend: str | None = None) -> bool:
  """Whether `implementation` runs natively on `backend` (default: the current one)."""
  return (backend or _backend()) in IMPLEMENTATIONS[implementation].backends


def resolve(implementation: str | None, *, interpret: bool = False) -> Implementation:
  """Name of the implementation to use (None -> the fastest measured on this backend).

  Raises:
    ValueError: an unknown name; a Pallas kernel off its backend without
      interpret=True; interpret=True for an implementation that is not Pallas.
  """
  backend = _backend()
  if implementation is None:
    implementation = DEFAULT_BY_BACKEND.get(backend, "gather")
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
      f"unknown sparse-conv implementation {implementation!r}; valid: {sorted(IMPLEMENTATIONS)}"
    )
  spec = IMPLEMENTATIONS[implementation]
  if interpret and not spec.pallas:
    raise ValueError(f"interpret=True applies to Pallas kernels only, not {implementation!r}")
  if backend not in spec.backends and not interpret:
    raise ValueError(
      f"sparse-conv implementation {implementation!r} runs on {sorted(spec.backends)}, not on "
      f"this {backend!r} backend; pass interpret=True to run it in Pallas interpret mode"
    )
  return implementation


def sparse_conv(
  feats: jax.Array,
  weight: jax.Array,
  rulebook: Rulebook,
  *,
  implementation: Implementation | None = None,
  config: Config | None = None,
  interpret: bool = False,
  precision=None,
) -> jax.Array:
  """Sparse convolution `out[o] = sum_k feats[nbr[o, k]] @ weight[k]`.

  Args:
    feats: [V, S_in, C_in] features (zero on padding rows).
    weight: [K, C_in, C_out], tap k = ksize * d0 + d1 (d0 along c0 = x).
    rulebook: rulebook.Rulebook (built by gigassl_jax.sparse.tables).
    implementation: a name in IMPLEMENTATIONS, or None for the backend's fastest.
    config: the implementation's config dataclass (e.g. PairsConfig); None =
      its defaults.
    interpret: run a Pallas kernel in interpret mode (any backend).
    precision: matmul precision (see the module docstring).

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
  name = resolve(implementation, interpret=interpret)
  spec = IMPLEMENTATIONS[name]
  if spec.config_type is None:
    if config is not None:
      raise ValueError(f"implementation {name!r} takes no config, got {config!r}")
    args = ()
  else:
    config = spec.config_type() if config is None else config
    if not isinstance(config, spec.config_type):
      raise TypeError(
        f"implementation {name!r} takes a {spec.config_type.__name__}, got {config!r}"
      )
    args = (config,)
  kw = {"interpret": interpret} if spec.pallas else {}
  return spec.fn(feats, weight, rulebook, *args, precision=canonical_precision(precision), **kw)


def window_sum(
  feats: jax.Array,
  rulebook: Rulebook,
  *,
  implementation: WindowSumImplementation | None = None,
  config: PairsConfig | None = None,
) -> jax.Array:
  """Sum of the active inputs in each output's window: out[o] = sum_k feats[nbr[o, k]].

  The average pool's numerator (pairs.window_sum, which rejects an unknown
  name). Both implementations run on every backend, deterministically; None
  picks WINDOW_SUM_DEFAULT_BY_BACKEND.

  Args:
    feats: [V, S_in, C]; rulebook: the strided rule book.
    implementation: "tiles", "gather" or None.
    config: tile size of "tiles" (PairsConfig).

  Returns:
    [V, S_out, C].
  """
  if implementation is None:
    implementation = WINDOW_SUM_DEFAULT_BY_BACKEND.get(_backend(), "gather")
  tile = (config or PairsConfig()).tile
  return pairs.window_sum(feats, rulebook, tile=tile, method=implementation)


__all__ = [
  "DEFAULT_BY_BACKEND",
  "IMPLEMENTATIONS",
  "WINDOW_SUM_DEFAULT_BY_BACKEND",
  "Backend",
  "DenseConfig",
  "IgemmConfig",
  "Implementation",
  "PairsConfig",
  "PallasGpuConfig",
  "PallasTpuConfig",
  "Rulebook",
  "Spec",
  "WindowSumImplementation",
  "canonical_precision",
  "resolve",
  "sparse_conv",
  "supported",
  "window_sum",
]
