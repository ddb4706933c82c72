"""spconv (PyTorch) peer of the sparse convolutions, for tests and benchmarks only.

Never a runtime dependency: importing this module imports torch and spconv.
spconv 2.3.8 on CPU: its backward needs `get_current_stream` patched to 0 (done
here when torch sees no GPU), and its scatter-add races with more than one
thread, so correctness comparisons must run under `torch.set_num_threads(1)`
(timings say which thread count they used).

Conventions (checked by tests/test_kernels.py against the dense oracle):
indices are (view, c0, c1); an spconv weight [C_out, 3, 3, C_in] (KRSC) holds our
tap k = 3 d0 + d1 at [:, d0, d1, :], i.e. spconv_w = W.reshape(3, 3, Cin, Cout)
transposed to (Cout, d0, d1, Cin).
"""

from __future__ import annotations

import numpy as np
import spconv.pytorch as spconv
import spconv.pytorch.ops as spconv_ops
import torch

if not torch.cuda.is_available():  # CPU only: asking torch for a CUDA stream fails
  spconv_ops.get_current_stream = lambda: 0


def to_spconv_weight(w) -> torch.Tensor:
  """Our [9, C_in, C_out] -> spconv's [C_out, 3, 3, C_in]."""
  w = np.asarray(w, np.float32)
  _, cin, cout = w.shape
  return torch.from_numpy(np.ascontiguousarray(w.reshape(3, 3, cin, cout).transpose(3, 0, 1, 2)))


def sparse_tensor(
  coords, feats, mask, requires_grad=False, device="cpu"
) -> spconv.SparseConvTensor:
  """Our padded [V, S, 2] / [V, S, C] / [V, S] -> an spconv tensor of the active rows.

  The spatial shape is max coordinate + 3, so every stride-2 window holding an
  active input exists (this project's default: no batch-wide clipping).
  `device` is a torch device ("cuda" runs spconv's GPU kernels).
  """
  coords, feats, mask = (np.asarray(a) for a in (coords, feats, mask))
  v, s = mask.shape
  vi = np.broadcast_to(np.arange(v)[:, None], (v, s))[mask]
  idx = np.concatenate([vi[:, None], coords[mask]], axis=1).astype(np.int32)
  f = torch.from_numpy(np.ascontiguousarray(feats[mask].astype(np.float32))).to(device)
  f.requires_grad_(requires_grad)
  size = int(coords[mask].max(initial=0)) + 3
  return spconv.SparseConvTensor(f, torch.from_numpy(idx).to(device), [size, size], v)


def subm_conv(c_in, c_out, key="subm") -> spconv.SubMConv2d:
  return spconv.SubMConv2d(c_in, c_out, 3, padding=1, bias=False, indice_key=key)


def strided_conv(c_in, c_out, key="down") -> spconv.SparseConv2d:
  return spconv.SparseConv2d(c_in, c_out, 3, stride=2, padding=0, bias=False, indice_key=key)


def to_padded(t: spconv.SparseConvTensor, coords, mask) -> np.ndarray:
  """spconv output rows -> our padded layout [V, S, C] at the given (coords, mask)."""
  coords, mask = np.asarray(coords), np.asarray(mask)
  idx = t.indices.numpy()
  f = t.features.detach().numpy()
  lookup = {tuple(r): i for i, r in enumerate(idx.tolist())}
  out = np.zeros(mask.shape + (f.shape[1],), np.float32)
  for v, s in zip(*np.nonzero(mask)):
    out[v, s] = f[lookup[(v, int(coords[v, s, 0]), int(coords[v, s, 1]))]]
  if len(lookup) != int(mask.sum()):
    raise AssertionError(f"spconv has {len(lookup)} active sites, we have {int(mask.sum())}")
  return out


class PoolingBlock(torch.nn.Module):
  """The Giga-SSL pooling network (both blocks of sparse layer4) in spconv.

  The shortcut (3x3/2 average pool dividing by 9, then 1x1 conv) is one strided
  conv sharing the main path's index pairs, with every tap's weight = W_1x1 / 9:
  the same function (spconv's own average pool divides by the active count and
  has no CPU path). BN: torch BatchNorm1d over the active sites.
  """

  def __init__(self, c_in=256, c=512):
    super().__init__()
    self.b0_conv1 = strided_conv(c_in, c, "down")
    self.b0_convd = strided_conv(c_in, c, "down")
    self.b0_conv2 = subm_conv(c, c, "subm")
    self.b1_conv1 = subm_conv(c, c, "subm")
    self.b1_conv2 = subm_conv(c, c, "subm")
    self.norms = torch.nn.ModuleList(
      [torch.nn.BatchNorm1d(c, eps=1e-5, momentum=0.1) for _ in range(5)]
    )

  def forward(self, x: spconv.SparseConvTensor) -> spconv.SparseConvTensor:
    n = self.norms
    relu = torch.relu
    a = self.b0_conv1(x)
    a = a.replace_feature(relu(n[0](a.features)))
    a = self.b0_conv2(a)
    a = a.replace_feature(n[1](a.features))
    s = self.b0_convd(x)
    h = a.replace_feature(relu(a.features + n[2](s.features)))
    b = self.b1_conv1(h)
    b = b.replace_feature(relu(n[3](b.features)))
    b = self.b1_conv2(b)
    return b.replace_feature(relu(n[4](b.features) + h.features))
