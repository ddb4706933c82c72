"""Our training step trains as a PyTorch + spconv twin of the method does, step by step.

N = 10 steps of OUR jitted data-parallel training step (train.make_train_step on
the 8 CPU devices of conftest.py: coordinate augmentation, quantisation, two
forward passes with synced batch norm, NT-Xent, all-reduced gradients, optax
Adam with the warm-up + cosine schedule) and of tests/torch_twin.py (spconv
pooling network, torch BatchNorm1d over the whole view batch = our synced BN,
projector, cross-entropy NT-Xent, torch.optim.Adam, the schedule written out),
from the same initial parameters, on the same views: each step's views are
made once by our data.make_views with the step's keys and fed to the twin as
quantised coordinates + features. Global negatives (the twin's batch is one
batch) and local negatives (the twin's batch is split into the 8 per-device
chunks, loss averaged over chunks, as the reference's DataParallel).

Why Adam runs with a large eps (the tolerance derivation): with the default
eps = 1e-8 an update is lr m / (sqrt(v) + eps) ~ lr sign(g), so the float32
rounding noise on near-zero gradient entries (the two sides sum in different
orders) flips those entries by +-lr: a difference as large as the step itself,
for correct code. Our step cannot run in float64 (it computes the views, the
convolutions and BN in float32); the twin runs in float64 (spconv has float64
CPU kernels), so the difference is our float32 rounding alone. (In float32 the
twin's own step-1 gradient is 1.6e-3 off its float64 one, relative L2, all of
it in the pooling net's spconv + BatchNorm1d backward; ours is 1.7e-5 off:
measured, seed 5.) With eps = EPS as large as the largest gradient entries
(max |g| ~ 10 here), the update is a smooth
function of the gradients: per entry, |d(update_t)/d(g_s)| <=
(lr_t / eps) (w_ts + sqrt(w'_ts) g_max / eps), with Adam's bias-corrected
averaging weights w of m and w' of v (each summing to 1; |m| <= g_max,
sqrt(v) >= sqrt(w'_ts) |g_s|), and sum_s sqrt(w'_ts) <= sqrt(N), so over N steps

  |dp_N| <= C (sum_t lr_t / eps) max_s |dg_s|,   C = 1 + sqrt(N) g_max / eps,

(L2 norms over all parameters, first order in dg). dg is our gradient's
float32 error at (nearly) equal parameters: RHO |g| with RHO = K u,
u = 2^-24 the float32 unit roundoff and K = 9 x 512 = 4608 terms in the
longest reduction of the network (a 3x3 convolution over 512 channels; the
weight gradients' sums over the batch's sites are shorter). Hence

  PARAMS:  |p_ours - p_twin|_2 <= C (sum_t lr_t / eps) RHO max_t |g_t|_2
  LOSS_t:  |L_ours - L_twin| <= RHO |L_t| + |g_t|_2 |p_ours - p_twin|_2 (at step t)

(the loss: the same rounding at equal parameters, plus its first-order change
with the parameters, by Cauchy-Schwarz). |g_t| and g_max are the twin's. The
test also asserts that the parameters moved by > 100x the parameter bound, and
that the twin with the wrong negatives misses step 1's loss by > 100x its
bound (so the tolerance can tell local from global negatives).
"""

import pathlib
import sys

import jax
import numpy as np
import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmarks/ (bench_train.raw_batch) is not a package

# Everything of ours this test uses, in one place.
import torch_twin

from benchmarks import bench_train
from gigassl_jax import config as config_lib
from gigassl_jax import checkpoint as ckpt_lib
from gigassl_jax import train

BATCH, TILES, FEATURES, STEPS = 16, 4, 32, 10
WARMUP = 5  # steps: optim_warmup_epochs = 1 at STEPS_PER_EPOCH = 5, then cosine to 0
STEPS_PER_EPOCH = 5
BASE_LR, EPS = 0.3, 10.0
U32 = 2.0**-24
RHO = 9 * 512 * U32  # K u, K = the longest reduction (see the module docstring)
NEGATIVES = ("global", "local")


def _flat(tree) -> dict:
  """A train-state subtree -> {"pool.b0_conv1.weight": float64 array} (torch_twin's names)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {
    ".".join(str(k.key) for k in path if hasattr(k, "key")): np.asarray(v, np.float64)
    for path, v in leaves
  }


def _is_param(name: str) -> bool:
  return not name.endswith((".mean", ".var"))  # BN running statistics are state


def _dist(a: dict, b: dict) -> float:
  """L2 distance over all parameters (not the BN running statistics)."""
  return float(np.sqrt(sum(np.sum((a[k] - b[k]) ** 2) for k in a if _is_param(k))))


def _raw_batch(seed: int) -> dict:
  """Level-0 tile positions (tissue-blob slides, 2 views each) and float16 features."""
  return bench_train.raw_batch(seed, BATCH, TILES, FEATURES)


def _views(cfg, batch: dict, step: int):
  """The views our step makes at `step` (train.step_views), as numpy."""
  return [
    tuple(np.asarray(x) for x in (sm.coords, sm.feats, sm.mask))
    for sm in train.step_views(cfg, step, batch)
  ]


def _ours(cfg, batches):
  """Our training: initial flat state, per-step losses and flat states."""
  mesh = train.make_mesh(jax.devices())
  model = ckpt_lib.build_model(cfg, FEATURES, bn_axis_name=train.AXIS)
  tx = ckpt_lib.make_optimizer(cfg, ckpt_lib.make_schedule(cfg, STEPS, STEPS_PER_EPOCH))
  graphdef, state = ckpt_lib.init_state(model, tx)
  states = [{**_flat(state["params"]), **_flat(state["batch_stats"])}]
  step = train.make_train_step(graphdef, cfg, tx, mesh)
  state = train.put_replicated(state, mesh)
  losses = []
  for batch in batches:
    state, m = step(state, train.put_batch(batch, mesh))
    losses.append(float(train.to_host(m["loss"])))
    states.append({**_flat(state["params"]), **_flat(state["batch_stats"])})
  return np.array(losses), states


def _twin(cfg, init: dict, views, chunks: int):
  net = torch_twin.TwinNet(FEATURES, torch.float64)
  net.load(init)
  lrs = [torch_twin.warmup_cosine(t, cfg.lr, WARMUP, STEPS) for t in range(STEPS)]
  return torch_twin.train(
    net,
    views,
    lrs=lrs,
    tau=cfg.loss_temperature,
    chunks=chunks,
    b1=cfg.optim_b1,
    b2=cfg.optim_b2,
    eps=cfg.optim_eps,
  )


@pytest.mark.parametrize("negatives", NEGATIVES)
@pytest.mark.parametrize("seed", [5])
def test_training_matches_torch_twin(seed, negatives):
  n_dev = len(jax.devices())
  assert n_dev == 8 and BATCH % n_dev == 0 and BATCH // n_dev >= 2, f"seed={seed} devices {n_dev}"
  cfg = config_lib.Config(
    workdir="-",
    data_bank="-",
    model_in_features=FEATURES,
    model_sync_bn=True,
    train_batch_size=BATCH,
    train_seed=seed,
    loss_negatives=negatives,
    optim_base_lr=BASE_LR,
    optim_eps=EPS,
    optim_warmup_epochs=WARMUP / STEPS_PER_EPOCH,
  )
  batches = [_raw_batch(1000 * seed + t) for t in range(STEPS)]
  views = [_views(cfg, b, t) for t, b in enumerate(batches)]
  ours_loss, ours = _ours(cfg, batches)
  chunks = {"global": 1, "local": n_dev}
  twin = _twin(cfg, ours[0], views, chunks[negatives])

  lrs = np.array([torch_twin.warmup_cosine(t, cfg.lr, WARMUP, STEPS) for t in range(STEPS)])
  g_max = float(twin["grad_max"].max())
  c = 1.0 + np.sqrt(STEPS) * g_max / EPS
  p_tol = c * lrs.sum() / EPS * RHO * twin["grad_norm"].max()
  dists = [_dist(o, t) for o, t in zip(ours, twin["params"])]
  moved = _dist(ours[-1], ours[0])
  table = "\n".join(
    f"step {t + 1:2d} lr {lrs[t]:.5f} loss ours {ours_loss[t]:.7f} twin {twin['loss'][t]:.7f}"
    f" diff {ours_loss[t] - twin['loss'][t]:+.2e} |dp| {dists[t + 1]:.2e}"
    for t in range(STEPS)
  )
  msg = f"seed={seed} negatives={negatives} param tol {p_tol:.2e} moved {moved:.3g}\n{table}"
  print(msg)
  assert dists[0] == 0.0, msg  # the twin starts from our parameters exactly
  assert moved > 100 * p_tol, msg  # the training moved the parameters far beyond the tolerance
  for t in range(STEPS):
    l_tol = RHO * abs(twin["loss"][t]) + twin["grad_norm"][t] * dists[t]
    assert abs(ours_loss[t] - twin["loss"][t]) <= l_tol, f"step {t + 1} tol {l_tol:.2e}\n{msg}"
    assert dists[t + 1] <= p_tol, f"step {t + 1}\n{msg}"
  # BN running statistics: decaying averages of the batch moments, so their
  # rounding is RHO relative; plus the moments' first-order change with the
  # parameters, taken as |dp| (Lipschitz 1: the moments are of BN-normalised,
  # ReLU'd activations through weights of norm ~1 - an estimate, not a bound).
  for k in ours[-1]:
    if not _is_param(k):
      s_tol = RHO * np.abs(twin["params"][-1][k]).max() + p_tol
      np.testing.assert_allclose(
        ours[-1][k], twin["params"][-1][k], rtol=0, atol=s_tol, err_msg=f"{k}\n{msg}"
      )

  # The tolerance tells the negatives apart: the twin with the other choice,
  # from the same parameters on step 1's views, misses our step-1 loss.
  wrong = _twin(cfg, ours[0], views[:1], chunks["local" if negatives == "global" else "global"])
  l_tol = RHO * abs(twin["loss"][0])
  assert abs(wrong["loss"][0] - ours_loss[0]) > 100 * l_tol, f"wrong twin {wrong['loss'][0]}\n{msg}"
