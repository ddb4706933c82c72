"""Peer comparison: submanifold and strided sparse conv vs spconv (PyTorch).

spconv 2.3.8 on CPU: its backward needs `ops.get_current_stream = lambda: 0`,
and its scatter-add races with 2 threads, hence torch.set_num_threads(1).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparse_helpers as H
from gigassl_jax.kernels.sparse_conv import api as conv_api
from gigassl_jax.sparse import tables

torch = pytest.importorskip("torch", reason="peer test needs torch (CI installs it)")
spconv = pytest.importorskip("spconv.pytorch", reason="peer test needs spconv (CI installs it)")


@pytest.fixture(autouse=True)
def _spconv_cpu():
  import spconv.pytorch.ops as ops

  old, threads = getattr(ops, "get_current_stream", None), torch.get_num_threads()
  ops.get_current_stream = lambda: 0
  torch.set_num_threads(1)
  yield
  ops.get_current_stream = old
  torch.set_num_threads(threads)


def _flat(sm):
  v, s = np.nonzero(np.asarray(sm.mask))
  idx = np.concatenate([v[:, None], np.asarray(sm.coords)[v, s]], 1).astype(np.int32)
  return v, s, idx


def _run_spconv(layer, sm, extent, r_rows):
  """Forward + backward of sum(out * R) in spconv; returns {coord: row}, grads."""
  v, s, idx = _flat(sm)
  f = torch.tensor(np.asarray(sm.feats)[v, s], requires_grad=True)
  x = spconv.SparseConvTensor(f, torch.tensor(idx), [extent, extent], sm.num_views)
  y = layer(x)
  yi = y.indices.numpy()
  r = torch.tensor(np.stack([r_rows[tuple(p)] for p in yi.tolist()]))
  (y.features * r).sum().backward()
  out = {tuple(p): row for p, row in zip(yi.tolist(), y.features.detach().numpy())}
  return out, f.grad.numpy(), layer.weight.grad.numpy()


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize(
  "case",
  [
    dict(n_views=3, n_tiles=6, extent=25),
    dict(n_views=2, n_tiles=81, extent=11, dense_patch=True),
    dict(n_views=3, n_tiles=100, extent=15),
  ],
)
@pytest.mark.parametrize("seed", [0])
def test_conv_matches_spconv(case, strided, seed):
  rng = np.random.default_rng(seed)
  cin, cout = 5, 7
  sm = H.random_map(rng, channels=cin, **case)
  w = rng.standard_normal((9, cin, cout)).astype(np.float32)
  if strided:
    rb = tables.strided_rulebook(sm)
    # Large enough spatial shape that every window with an active input exists.
    layer = spconv.SparseConv2d(cin, cout, 3, stride=2, padding=0, bias=False)
    extent = case["extent"] + 3
  else:
    rb = tables.submanifold_rulebook(sm, 3)
    layer = spconv.SubMConv2d(cin, cout, 3, bias=False, indice_key="s")
    extent = case["extent"] + 2
  # spconv weight [C_out, kh, kw, C_in], kh along index dim 1 = our c0.
  with torch.no_grad():
    layer.weight.copy_(torch.tensor(w.reshape(3, 3, cin, cout).transpose(3, 0, 1, 2)))
  om, oc = np.asarray(rb.out_mask), np.asarray(rb.out_coords)
  r = rng.standard_normal(om.shape + (cout,)).astype(np.float32)
  r_rows = {(vv, *oc[vv, ss]): r[vv, ss] for vv, ss in zip(*np.nonzero(om))}

  ref_out, ref_gf, ref_gw = _run_spconv(layer, sm, extent, r_rows)
  # Full float32 matmuls, asked for explicitly (no TF32 on a GPU).
  f = jax.jit(lambda x, w: conv_api.sparse_conv(x, w, rb, precision="highest"))
  out = np.asarray(f(sm.feats, jnp.asarray(w)))
  ours = {(vv, *oc[vv, ss]): out[vv, ss] for vv, ss in zip(*np.nonzero(om))}
  assert set(ours) == set(ref_out)  # same output sites
  for k in ours:
    np.testing.assert_allclose(ours[k], ref_out[k], rtol=1e-4, atol=1e-4)
  gf, gw = jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w) * r), (0, 1)))(sm.feats, jnp.asarray(w))
  v, s, _ = _flat(sm)
  np.testing.assert_allclose(np.asarray(gf)[v, s], ref_gf, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(
    np.asarray(gw).reshape(3, 3, cin, cout).transpose(3, 0, 1, 2), ref_gw, rtol=1e-4, atol=1e-3
  )
