"""Same seed, same result: bitwise on CPU, and no accumulation whose order a backend may pick.

A scatter-add with repeated indices (segment_sum, the transpose of a gather)
accumulates in an arbitrary order on XLA GPU, so two identical GPU runs can
differ in the last bits, which training then amplifies. The training step may
therefore hold only scatter-adds whose indices are unique (each output written
at most once: no order to pick). The jaxpr test checks this for the kernels that
each backend selects by default; benchmarks/gpu_determinism_step.sh repeats the
bitwise run comparison on a GPU.
"""

import collections
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gigassl_jax import checkpoint as ckpt_lib
from gigassl_jax import config as config_lib
from gigassl_jax import synthetic, train
from gigassl_jax.kernels.sparse_conv import api as conv_api
from gigassl_jax.sparse import maps

SHAPE = (16, 3, 12, 32)  # bank: slides, augmentations, tiles, feature dim
BATCH, STEPS = 8, 3


def _cfg(bank, workdir, seed, **kw):
  return config_lib.Config(
    workdir=str(workdir),
    data_bank=str(bank),
    train_batch_size=BATCH,
    train_steps=STEPS,
    train_ckpt_every=STEPS,
    train_log_every=1,
    train_progress=False,
    train_seed=seed,
    optim_warmup_epochs=0.0,
    **kw,
  )


def _final_state(workdir):
  """Leaves of the final checkpoint's parameters and BN statistics, by path."""
  model, _ = ckpt_lib.restore_model(workdir)
  flat = jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def _metrics(workdir):
  lines = (pathlib.Path(workdir) / train.METRICS).read_text().splitlines()
  # views_per_s is a wall-clock rate: the only field allowed to differ.
  return [{k: v for k, v in json.loads(l).items() if k != "views_per_s"} for l in lines]


def _assert_same_runs(wd_a, wd_b, seed):
  """Two finished runs: bitwise equal parameters and BN statistics, equal metrics."""
  a, b = _final_state(wd_a), _final_state(wd_b)
  assert a.keys() == b.keys(), f"seed={seed}"
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=f"seed={seed} {wd_b}: {k}")
  ma, mb = _metrics(wd_a), _metrics(wd_b)
  assert len(ma) == STEPS and ma == mb, f"seed={seed}: {ma} vs {mb}"


def _assert_resume_is_exact(ref_wd, cfg, seed):
  """Reruns the finished run `cfg` (checkpointed every step) from its step STEPS - 1.

  Its last checkpoint is forgotten, so the run resumes one step before the
  end; it must end bitwise where the reference run `ref_wd` ended. A marker in
  step 1's record shows it did resume (a resumed run keeps the records up to
  its checkpoint; a run that started over would rewrite them).
  """
  wd = pathlib.Path(cfg.workdir)
  shutil.rmtree(wd / ckpt_lib.CKPT_DIR / str(STEPS))
  metrics = wd / train.METRICS
  lines = metrics.read_text().splitlines()
  marked = lines[0].replace('"step": 1,', '"step": 1, "marker": 1,')
  metrics.write_text("\n".join([marked] + lines[1:]) + "\n")
  train.run(cfg)
  first = json.loads(metrics.read_text().splitlines()[0])
  assert first.get("marker") == 1, f"seed={seed}: the run did not resume: {first}"
  metrics.write_text("\n".join([lines[0]] + metrics.read_text().splitlines()[1:]) + "\n")
  _assert_same_runs(ref_wd, wd, seed)


@pytest.mark.parametrize("seed", [5])
def test_two_identical_runs_are_bitwise_equal(tmp_path, seed):
  bank = synthetic.make_synthetic_bank(tmp_path / "bank", *SHAPE, seed=seed)
  for name in ("a", "b"):
    train.run(_cfg(bank, tmp_path / name, seed))
  a, b = _final_state(tmp_path / "a"), _final_state(tmp_path / "b")
  assert a.keys() == b.keys(), f"seed={seed}"
  init = ckpt_lib.build_model(_cfg(bank, tmp_path / "a", seed), SHAPE[3])
  init = {
    jax.tree_util.keystr(p): np.asarray(v)
    for p, v in jax.tree_util.tree_flatten_with_path(nnx.state(init))[0]
  }
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=f"seed={seed} {k}")
  # The runs trained (else equality would prove nothing): parameters moved.
  moved = [k for k in a if k in init and not np.array_equal(a[k], init[k])]
  assert len(moved) > len(a) // 2, f"seed={seed}: only {moved} changed"
  ma, mb = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
  assert len(ma) == STEPS and ma == mb, f"seed={seed}: {ma} vs {mb}"


def _scatter_adds(jaxpr, found):
  """Counts (primitive, unique_indices) of every scatter-add in a jaxpr, nested ones too."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "scatter-add":
      found[bool(eqn.params.get("unique_indices"))] += 1
    for v in eqn.params.values():
      for sub in v if isinstance(v, (list, tuple)) else [v]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          _scatter_adds(inner, found)
  return found


@pytest.mark.parametrize("backend", ["cpu", "gpu", "tpu"])
@pytest.mark.parametrize("sync_bn", [True, False])
def test_train_step_has_no_order_dependent_scatter_add(monkeypatch, backend, sync_bn):
  # The kernels are chosen per backend at trace time (api.DEFAULT_BY_BACKEND):
  # tracing with the backend name patched gives the GPU/TPU step's jaxpr here.
  monkeypatch.setattr(conv_api, "_backend", lambda: backend)
  b, t, f = BATCH, 16, 8
  cfg = config_lib.Config(workdir="unused", train_batch_size=b, data_tiles=t, model_sync_bn=sync_bn)
  mesh = train.make_mesh()
  model = ckpt_lib.build_model(cfg, f, bn_axis_name=train.AXIS if sync_bn else None)
  tx = ckpt_lib.make_optimizer(cfg, ckpt_lib.make_schedule(cfg, 10, 2))
  graphdef, state = ckpt_lib.init_state(model, tx)
  step = train.make_train_step(graphdef, cfg, tx, mesh)
  batch = {
    "feats": jnp.zeros((b, 2, t, f), jnp.float16),
    "xy": jnp.zeros((b, 2, t, 2), jnp.int32),
    "position": jnp.arange(b, dtype=jnp.int32),
  }
  found = _scatter_adds(jax.make_jaxpr(step)(state, batch).jaxpr, collections.Counter())
  assert found[False] == 0, f"{backend}: {found[False]} scatter-adds with repeated indices"


def _assert_divided(got, num, n, msg):
  """got == num / n elementwise, bitwise, as float32 division or as num * (1 / n).

  XLA CPU lowers a division by a broadcast divisor to a multiplication by its
  reciprocal (1 ulp from the correctly rounded quotient on some elements), so
  both roundings are exact answers; a different summation order is not.
  """
  num, n = np.asarray(num, np.float32), np.float32(n)
  got = np.asarray(got)
  ok = (got == num / n) | (got == num * (np.float32(1) / n))
  assert ok.all(), f"{msg}: {got} vs {num / n}"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_duplicate_means_sum_in_input_order(seed):
  """from_grid's means equal a float32 left-to-right sum per cell, bitwise; gradient too."""
  rng = np.random.default_rng(seed)
  v, t, c = 3, 40, 5
  grid = rng.integers(0, 3, (v, t, 2)).astype(np.int32)  # 9 cells: many duplicates
  feats = (rng.standard_normal((v, t, c)) * 10.0 ** rng.uniform(-3, 3, (v, t, 1))).astype(
    np.float32
  )
  valid = rng.random((v, t)) > 0.2
  sm = maps.from_grid(grid, feats, valid)
  for i in range(v):
    cells = sorted({tuple(g) for g, ok in zip(grid[i], valid[i]) if ok})
    assert int(sm.mask[i].sum()) == len(cells), f"seed={seed} view {i}"
    for row, cell in enumerate(cells):
      acc, n = np.zeros(c, np.float32), 0
      for j in range(t):
        if valid[i, j] and tuple(grid[i, j]) == cell:
          acc, n = acc + feats[i, j], n + 1  # float32, input order
      np.testing.assert_array_equal(sm.coords[i, row], cell, err_msg=f"seed={seed}")
      _assert_divided(sm.feats[i, row], acc, n, f"seed={seed} view {i} cell {cell}")
  # Gradient of sum(w * means): w[cell] / count for every valid tile, 0 otherwise.
  w = rng.standard_normal((v, t, c)).astype(np.float32)
  g = jax.grad(lambda x: jnp.sum(maps.from_grid(grid, x, valid).feats * w))(jnp.asarray(feats))
  for i in range(v):
    cells = [tuple(x) for x in np.asarray(sm.coords[i])[np.asarray(sm.mask[i])]]
    for j in range(t):
      if not valid[i, j]:
        np.testing.assert_array_equal(g[i, j], 0.0, err_msg=f"seed={seed} view {i} tile {j}")
      else:
        row = cells.index(tuple(grid[i, j]))
        n = sum(valid[i, k] and tuple(grid[i, k]) == tuple(grid[i, j]) for k in range(t))
        _assert_divided(g[i, j], w[i, row], n, f"seed={seed} view {i} tile {j} (gradient)")
