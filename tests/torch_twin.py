"""PyTorch + spconv twin of the Giga-SSL training step, for tests/test_parity_torch.py only.

Written from the method (not from our JAX code): the sparse pooling network of
kernels/sparse_conv/peer.py (spconv convolutions, torch BatchNorm1d over the
active sites of the whole view batch), the global mean over each view's active
sites, the projector (Linear, ReLU, BatchNorm1d, Linear, ReLU, BatchNorm1d,
Linear), the symmetric NT-Xent as a cross entropy over the 2N x 2N cosine
similarities / tau (with local negatives: computed per data-parallel chunk and
averaged, as the reference's DataParallel did), torch.optim.Adam and the linear
warm-up + cosine schedule written out by hand. Two forward passes per step, one
per view batch, each with its own BN statistics, as the reference.

spconv's CPU scatter-add races with more than one thread: the twin runs under
torch.set_num_threads(1) (peer.py's note). Importing peer patches spconv's
get_current_stream for its CPU backward.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn.utils import parametrize

from gigassl_jax.kernels.sparse_conv import peer

# Our parameter names -> (twin module path, kind). Kinds: conv3 (our [9, Cin, C]
# <-> spconv [C, 3, 3, Cin]), conv1 (our [1, Cin, C] <-> the tied [C, Cin] of the
# shortcut), bn (scale/bias/mean/var <-> weight/bias/running_mean/running_var),
# linear (kernel [in, out] <-> weight [out, in]; bias).
_CONV3 = {f"pool.{n}": f"pool.{n}" for n in ("b0_conv1", "b0_conv2", "b1_conv1", "b1_conv2")}
_BN = {
  "pool.b0_norm1": "pool.norms.0",
  "pool.b0_norm2": "pool.norms.1",
  "pool.b0_normd": "pool.norms.2",
  "pool.b1_norm1": "pool.norms.3",
  "pool.b1_norm2": "pool.norms.4",
  "proj.bn1": "proj.2",
  "proj.bn2": "proj.5",
}
_LINEAR = {"proj.fc1": "proj.0", "proj.fc2": "proj.3", "proj.fc3": "proj.6"}
_BN_FIELDS = (
  ("scale", "weight"),
  ("bias", "bias"),
  ("mean", "running_mean"),
  ("var", "running_var"),
)


class _TiedShortcutTaps(torch.nn.Module):
  """Shortcut = 3x3/2 average pool (sum / 9) then 1x1 conv: one strided conv whose
  9 taps all hold W_1x1 / 9 (peer.PoolingBlock's form). The trainable tensor is
  the single [C, Cin] 1x1 weight, so Adam sees one parameter, as ours does."""

  def forward(self, w1):  # [C, Cin] -> spconv [C, 3, 3, Cin]
    return (w1[:, None, None, :] / 9.0).expand(-1, 3, 3, -1).contiguous()

  def right_inverse(self, w):  # only used at registration; overwritten by load()
    return w[:, 0, 0, :] * 9.0


class TwinNet(torch.nn.Module):
  """Pooling network (spconv) + global mean + projector; forward -> [V, 256]."""

  def __init__(self, in_features: int, dtype=torch.float32):
    super().__init__()
    self.dtype = dtype
    self.pool = peer.PoolingBlock(in_features, 512)
    parametrize.register_parametrization(
      self.pool.b0_convd, "weight", _TiedShortcutTaps(), unsafe=True
    )
    self.proj = torch.nn.Sequential(
      torch.nn.Linear(512, 512),
      torch.nn.ReLU(),
      torch.nn.BatchNorm1d(512, eps=1e-5, momentum=0.1),
      torch.nn.Linear(512, 512),
      torch.nn.ReLU(),
      torch.nn.BatchNorm1d(512, eps=1e-5, momentum=0.1),
      torch.nn.Linear(512, 256),
    )
    self.to(dtype)

  def forward(self, coords, feats, mask):
    """Padded views (coords [V, S, 2], feats [V, S, F], mask [V, S]) -> projections [V, 256]."""
    n_views = mask.shape[0]
    x = peer.sparse_tensor(coords, feats, mask)  # float32 features (as ours): exact in float64
    y = self.pool(x.replace_feature(x.features.to(self.dtype)))
    b = y.indices[:, 0].long()
    s = torch.zeros(n_views, y.features.shape[1], dtype=self.dtype).index_add_(0, b, y.features)
    cnt = torch.zeros(n_views, dtype=self.dtype).index_add_(0, b, torch.ones_like(s[:, 0][b]))
    return self.proj(s / cnt.clamp(min=1)[:, None])

  def _shortcut(self):
    return self.pool.b0_convd.parametrizations.weight.original

  @torch.no_grad()
  def load(self, flat: dict) -> None:
    """Copies our flat parameters/statistics ("pool.b0_conv1.weight" -> array) in."""
    mods = dict(self.named_modules())
    for ours, theirs in _CONV3.items():
      mods[theirs].weight.copy_(peer.to_spconv_weight(flat[f"{ours}.weight"]))
    self._shortcut().copy_(torch.from_numpy(np.asarray(flat["pool.b0_convd.weight"])[0].T.copy()))
    for ours, theirs in _BN.items():
      for a, b in _BN_FIELDS:
        getattr(mods[theirs], b).copy_(torch.from_numpy(np.asarray(flat[f"{ours}.{a}"])))
    for ours, theirs in _LINEAR.items():
      mods[theirs].weight.copy_(torch.from_numpy(np.asarray(flat[f"{ours}.kernel"]).T.copy()))
      mods[theirs].bias.copy_(torch.from_numpy(np.asarray(flat[f"{ours}.bias"])))

  @torch.no_grad()
  def export(self) -> dict:
    """The inverse of load: our names and layouts, float64 numpy."""
    mods = dict(self.named_modules())
    out = {}

    def np64(t):  # a copy: for float64 parameters .double().numpy() shares their memory
      return t.detach().double().numpy().copy()

    for ours, theirs in _CONV3.items():
      w = np64(mods[theirs].weight)  # [C, 3, 3, Cin]
      c, _, _, cin = w.shape
      out[f"{ours}.weight"] = w.transpose(1, 2, 3, 0).reshape(9, cin, c)
    out["pool.b0_convd.weight"] = np64(self._shortcut()).T[None]
    for ours, theirs in _BN.items():
      for a, b in _BN_FIELDS:
        out[f"{ours}.{a}"] = np64(getattr(mods[theirs], b))
    for ours, theirs in _LINEAR.items():
      out[f"{ours}.kernel"] = np64(mods[theirs].weight).T
      out[f"{ours}.bias"] = np64(mods[theirs].bias)
    return out


def nt_xent(z1, z2, tau: float, chunks: int = 1):
  """Symmetric NT-Xent; chunks > 1: each consecutive chunk of slides is its own batch
  (local negatives, one chunk per device), and the loss is the mean over chunks."""
  losses = []
  for a, b in zip(z1.chunk(chunks), z2.chunk(chunks)):
    z = torch.nn.functional.normalize(torch.cat([a, b]), dim=1)
    n = a.shape[0]
    logits = (z @ z.T) / tau
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    losses.append(torch.nn.functional.cross_entropy(logits, target))
  return torch.stack(losses).mean()


def warmup_cosine(step: int, peak: float, warmup: int, total: int, end: float = 0.0) -> float:
  """lr of update `step` (0-based): 0 -> peak linearly over `warmup` updates, then a
  half cosine from peak to `end` over the remaining total - warmup updates."""
  if step < warmup:
    return peak * step / warmup
  span = max(total, warmup + 1) - warmup
  t = min(step - warmup, span)
  return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * t / span))


def train(net: TwinNet, views, *, lrs, tau, chunks, b1, b2, eps):
  """Runs len(views) Adam steps; views[t] = (view1, view2), each (coords, feats, mask).

  Returns:
    dict of float64 numpy arrays: loss [steps]; grad_norm [steps] (L2 over all
    parameters) and grad_max [steps] (largest |entry|) of each step's gradient;
    params, a list of steps + 1 exports (before the first step, after each).
  """
  torch.set_num_threads(1)
  opt = torch.optim.Adam(net.parameters(), lr=0.0, betas=(b1, b2), eps=eps)
  net.train()
  out = {"loss": [], "grad_norm": [], "grad_max": [], "params": [net.export()]}
  for lr, (v1, v2) in zip(lrs, views):
    for group in opt.param_groups:
      group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss = nt_xent(net(*v1), net(*v2), tau, chunks)  # two passes: BN statistics per view batch
    loss.backward()
    grads = [p.grad.double() for p in net.parameters()]
    out["grad_norm"].append(float(torch.sqrt(sum((g * g).sum() for g in grads))))
    out["grad_max"].append(max(float(g.abs().max()) for g in grads))
    opt.step()
    out["loss"].append(float(loss.detach()))
    out["params"].append(net.export())
  return {k: v if k == "params" else np.array(v) for k, v in out.items()}
