"""Sparse core: maps, neighbour tables, layers vs a dense oracle, BN, augmentation."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sparse_helpers as H
from gigassl_jax import models
from gigassl_jax.kernels.sparse_conv import api as conv_api
from gigassl_jax.sparse import coord_augment, layers, maps, tables

# Every matmul here runs at full float32 precision, asked for explicitly
# (precision="highest"), so the tolerances hold on a GPU too (no TF32).
HIGHEST = "highest"


@pytest.fixture(params=[0], ids=lambda s: f"seed={s}")
def rng(request):
  """Seeded generator; the seed is in the test id, so a failure names it."""
  return np.random.default_rng(request.param)


# ------------------------------------------------------------------ maps ----


def test_build_views_quantises_relative_to_minimum_and_averages(rng):
  v, t, c = 4, 30, 5
  xy = rng.integers(-50_000, 50_000, size=(v, t, 2))
  xy[:, 10:20] = xy[:, :10]  # exact duplicates land in one cell
  xy[:, 20:25] = xy[:, :5] + rng.integers(0, 5, size=(v, 5, 2))  # near-duplicates
  feats = rng.standard_normal((v, t, c)).astype(np.float32)
  sm = maps.build_views(xy, feats, cell=224)
  for i in range(v):
    g = (xy[i] - xy[i].min(0)) // 224  # python ints: exact floor
    cells = {}
    for p, f in zip(map(tuple, g), feats[i]):
      cells.setdefault(p, []).append(f)
    keys = sorted(cells)
    n = len(keys)
    assert int(sm.mask[i].sum()) == n
    np.testing.assert_array_equal(np.asarray(sm.coords[i, :n]), np.array(keys))
    want = np.stack([np.mean(cells[k], 0) for k in keys])
    np.testing.assert_allclose(np.asarray(sm.feats[i, :n]), want, rtol=1e-6, atol=1e-6)
    assert not np.asarray(sm.feats[i, n:]).any()  # padding rows stay zero


def test_quantisation_is_exact_integer_floor():
  # (x - min) // 224 exactly, not floor(x/224) - floor(min/224) nor float32.
  x = np.array([[[224 * 7 + 100, 0], [100, 0], [16777217, 0], [16777216 - 223, 0]]])
  sm = maps.quantize(jnp.asarray(x, jnp.int32), jnp.ones((1, 4), bool), 224)
  want = (x[0, :, 0] - x[0, :, 0].min()) // 224
  np.testing.assert_array_equal(np.asarray(sm)[0, :, 0], want)


def test_jit_serves_views_with_any_number_of_valid_sites(rng):
  f = jax.jit(lambda xy, ft, m: maps.build_views(xy, ft, m).num_sites())
  xy = jnp.asarray(rng.integers(0, 5000, size=(2, 16, 2)), jnp.int32)
  ft = jnp.asarray(rng.standard_normal((2, 16, 3)), jnp.float32)
  for n in (1, 7, 16):
    m = jnp.arange(16)[None, :] < jnp.array([[n], [16 - n + 1]])
    got = np.asarray(f(xy, ft, m))
    assert got[0] <= n and got[1] <= 17 - n and got.min() >= 1
  assert f._cache_size() == 1


@pytest.mark.parametrize(
  "bad,match",
  [
    ("nan", "non-finite"),
    ("range", "representable"),
    ("int64", "int32 range"),
    ("float", "integers"),
    ("shape", "must be"),
    ("channels", "input channels"),
  ],
)
def test_bad_input_is_rejected_clearly(rng, bad, match):
  xy = rng.integers(0, 10_000, size=(2, 6, 2))
  ft = rng.standard_normal((2, 6, 4)).astype(np.float32)
  if bad == "nan":
    ft[1, 3, 2] = np.nan
  elif bad == "range":
    xy[0, 0, 0] = 224 * maps.COORD_LIMIT + 20_000
  elif bad == "int64":
    xy[1, 2, 1] = 3_000_000_000  # would wrap silently in int32
  elif bad == "float":
    xy = xy.astype(np.float32)
  elif bad == "shape":
    ft = ft[:, :5]
  with pytest.raises(ValueError, match=match):
    if bad == "channels":
      sm = maps.build_views(xy, ft)
      rb = tables.submanifold_rulebook(sm)
      conv_api.sparse_conv(sm.feats, jnp.ones((9, 5, 2)), rb)
    else:
      maps.build_views(xy, ft)


def test_capacity_exceeded_by_grid_coordinates_is_rejected():
  with pytest.raises(ValueError, match="grid coordinates must lie"):
    maps.from_grid(np.array([[[0, maps.COORD_LIMIT]]]), np.ones((1, 1, 2), np.float32))


# ---------------------------------------------------------------- tables ----


@pytest.mark.parametrize("n_tiles,extent", [(5, 30), (300, 40)])
def test_hash_and_sort_builders_give_identical_tables(rng, n_tiles, extent):
  sm = H.random_map(rng, 4, n_tiles, extent, dense_patch=n_tiles >= 49, invalid_frac=0.2)
  for ks in (3, 5):
    a = tables.submanifold_rulebook(sm, ks, builder="sort")
    b = tables.submanifold_rulebook(sm, ks, builder="hash")
    np.testing.assert_array_equal(np.asarray(a.nbr), np.asarray(b.nbr))
  a = tables.strided_rulebook(sm, builder="sort")
  b = tables.strided_rulebook(sm, builder="hash")
  np.testing.assert_array_equal(np.asarray(a.nbr), np.asarray(b.nbr))
  np.testing.assert_array_equal(np.asarray(a.nbr_t), np.asarray(b.nbr_t))


def test_submanifold_table_matches_brute_force(rng):
  sm = H.random_map(rng, 3, 50, 9, invalid_frac=0.1)
  rb = tables.submanifold_rulebook(sm, 3)
  for v in range(3):
    where = {
      tuple(c): i
      for i, (c, m) in enumerate(zip(np.asarray(sm.coords[v]).tolist(), np.asarray(sm.mask[v])))
      if m
    }
    for o, (c, m) in enumerate(zip(np.asarray(sm.coords[v]).tolist(), np.asarray(sm.mask[v]))):
      for k in range(9):
        want = where.get((c[0] + k // 3 - 1, c[1] + k % 3 - 1), -1) if m else -1
        assert int(rb.nbr[v, o, k]) == want


@pytest.mark.parametrize("spatial", [None, (13, 15)])
def test_strided_output_sites_match_brute_force(rng, spatial):
  sm = H.random_map(rng, 3, 30, 14)
  rb = tables.strided_rulebook(sm, spatial_size=spatial)
  want = H.oracle_strided_sites(sm.coords, sm.mask, 14, spatial)
  for v in range(3):
    got = np.asarray(rb.out_coords[v])[np.asarray(rb.out_mask[v])]
    assert [tuple(p) for p in got.tolist()] == want[v]
  # Every input of a window feeds it: nbr and the mirrored nbr_t agree.
  nbr, nbr_t = np.asarray(rb.nbr), np.asarray(rb.nbr_t)
  pairs = {(v, o, k, i) for v, o, k in zip(*np.nonzero(nbr >= 0)) for i in [nbr[v, o, k]]}
  pairs_t = {(v, nbr_t[v, i, k], k, i) for v, i, k in zip(*np.nonzero(nbr_t >= 0))}
  assert pairs == pairs_t


def test_spatial_size_must_be_odd():
  sm = maps.from_grid(np.zeros((1, 1, 2), np.int32), np.ones((1, 1, 2), np.float32))
  with pytest.raises(ValueError, match="odd"):
    tables.strided_rulebook(sm, spatial_size=(8, 9))


# ---------------------------------------------------- layers vs dense oracle ----


CASES = [
  dict(n_views=3, n_tiles=5, extent=20),  # isolated sites (training-like)
  dict(n_views=2, n_tiles=64, extent=10, dense_patch=True),  # dense patch
  dict(n_views=4, n_tiles=120, extent=16, invalid_frac=0.3),
]  # duplicates + padding


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("ksize", [1, 3, 5])
def test_submanifold_conv_matches_dense_oracle(rng, case, ksize):
  sm = H.random_map(rng, channels=6, **case)
  w = jnp.asarray(rng.standard_normal((ksize * ksize, 6, 7)), jnp.float32)
  conv = layers.SparseConv(6, 7, ksize, precision=HIGHEST, rngs=nnx.Rngs(0))
  conv.weight.set_value(w)
  rb = tables.submanifold_rulebook(sm, ksize)
  ext = case["extent"] + 2

  def ours(f, w):
    if ksize == 1:
      return jnp.matmul(f, w[0], precision=HIGHEST)
    return conv_api.sparse_conv(f, w, rb, precision=HIGHEST)

  np.testing.assert_allclose(
    np.asarray(conv(sm.feats, rb)), np.asarray(ours(sm.feats, w)), rtol=1e-6, atol=1e-6
  )

  def oracle(f, w):
    return H.oracle_conv(f, w, sm.coords, sm.mask, sm.coords, sm.mask, ext, 1, ksize)

  r = jnp.asarray(rng.standard_normal(sm.mask.shape + (7,)), jnp.float32)
  ours, oracle = jax.jit(ours), jax.jit(oracle)
  g1 = jax.jit(jax.grad(lambda f, w: jnp.sum(ours(f, w) * r), (0, 1)))(sm.feats, w)
  g2 = jax.jit(jax.grad(lambda f, w: jnp.sum(oracle(f, w) * r), (0, 1)))(sm.feats, w)
  np.testing.assert_allclose(
    np.asarray(ours(sm.feats, w)), np.asarray(oracle(sm.feats, w)), rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(
    np.asarray(g1[0]) * np.asarray(sm.mask)[..., None], np.asarray(g2[0]), rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(np.asarray(g1[1]), np.asarray(g2[1]), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_strided_conv_and_avgpool_match_dense_oracle(rng, case):
  sm = H.random_map(rng, channels=4, **case)
  rb = tables.strided_rulebook(sm)
  ext = case["extent"] + 4
  w = jnp.asarray(rng.standard_normal((9, 4, 5)), jnp.float32)
  r = jnp.asarray(rng.standard_normal(rb.out_mask.shape + (5,)), jnp.float32)

  def ours(f, w):
    return conv_api.sparse_conv(f, w, rb, implementation="gather", precision=HIGHEST)

  def oracle(f, w):
    return H.oracle_conv(f, w, sm.coords, sm.mask, rb.out_coords, rb.out_mask, ext, 2, 3)

  ours, oracle = jax.jit(ours), jax.jit(oracle)
  np.testing.assert_allclose(
    np.asarray(ours(sm.feats, w)), np.asarray(oracle(sm.feats, w)), rtol=1e-5, atol=1e-5
  )
  g1 = jax.jit(jax.grad(lambda f, w: jnp.sum(ours(f, w) * r), (0, 1)))(sm.feats, w)
  g2 = jax.jit(jax.grad(lambda f, w: jnp.sum(oracle(f, w) * r), (0, 1)))(sm.feats, w)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)
  # Average pooling = the strided conv with weight identity / 9 on every tap.
  eye = jnp.broadcast_to(jnp.eye(4) / 9.0, (9, 4, 4))
  r4 = r[..., :4]
  np.testing.assert_allclose(
    np.asarray(layers.avg_pool(sm.feats, rb)),
    np.asarray(oracle(sm.feats, eye)),
    rtol=1e-5,
    atol=1e-6,
  )
  ga = jax.jit(jax.grad(lambda f: jnp.sum(layers.avg_pool(f, rb) * r4)))(sm.feats)
  gb = jax.jit(jax.grad(lambda f: jnp.sum(oracle(f, eye) * r4)))(sm.feats)
  np.testing.assert_allclose(np.asarray(ga), np.asarray(gb), rtol=1e-5, atol=1e-6)


def _dot_precisions(text):
  """Precision configs of every dot_general in StableHLO text (NONE = unspecified)."""
  dots = re.findall(r"stablehlo\.dot_general[^\n]*", text)
  return [m.group(1) if (m := re.search(r"precision = \[(\w+)", d)) else "NONE" for d in dots]


@pytest.mark.parametrize("impl", ["pairs", "gather", "reference"])
@pytest.mark.parametrize("precision,want", [("default", "DEFAULT"), ("highest", "HIGHEST")])
def test_model_precision_reaches_every_matmul(rng, impl, precision, want):
  """GigaSSL(precision=...) sets the precision config of every dot_general of the
  sparse convs (forward and backward) and the projector, whatever JAX's global
  default (set here to the other value to show it is not what decides)."""
  sm = H.random_map(rng, 2, 5, 6, channels=8)
  model = models.GigaSSL(8, conv_impl=impl, precision=precision, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)

  def loss(state, sm):
    rep, z = nnx.merge(graphdef, state)(sm)
    return jnp.sum(rep) + jnp.sum(z)

  other = "highest" if precision == "default" else "default"
  with jax.default_matmul_precision(other):
    text = jax.jit(jax.grad(loss)).lower(state, sm).as_text()
  precisions = _dot_precisions(text)
  # 3 projector matmuls forward (+ their two gradients each), 5 convs forward.
  assert len(precisions) >= 3 * 3 + 5, precisions
  assert set(precisions) == {want}, precisions


def test_model_precision_rejects_unknown_names():
  with pytest.raises(ValueError, match="precision"):
    models.GigaSSL(8, precision="bf16", rngs=nnx.Rngs(0))


def test_pooling_net_dense_and_gather_agree_with_gradients(rng):
  sm = H.random_map(rng, 4, 12, 12, channels=16)
  net_a = models.PoolingNet(16, 24, conv_impl="gather", precision=HIGHEST, rngs=nnx.Rngs(3))
  net_b = models.PoolingNet(16, 24, conv_impl="reference", precision=HIGHEST, rngs=nnx.Rngs(3))
  r = jnp.asarray(rng.standard_normal((4, 24)), jnp.float32)

  def loss(net, f):
    return jnp.sum(net(sm.replace(feats=f)) * r)

  vg = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1)))
  la, (gna, gfa) = vg(net_a, sm.feats)
  lb, (gnb, gfb) = vg(net_b, sm.feats)
  # The loss sums 96 terms of either sign: float32 reordering errors scale with
  # sum |r| (outputs are O(1) after BN/ReLU), not with the (possibly small) sum.
  np.testing.assert_allclose(float(la), float(lb), rtol=1e-5, atol=1e-6 * float(jnp.abs(r).sum()))
  np.testing.assert_allclose(np.asarray(gfa), np.asarray(gfb), rtol=1e-4, atol=1e-5)
  for a, b in zip(
    jax.tree.leaves(nnx.state(gna, nnx.Param)), jax.tree.leaves(nnx.state(gnb, nnx.Param))
  ):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


# -------------------------------------------------------------- BN, mean ----


def test_batch_norm_over_active_sites_matches_numpy(rng):
  x = rng.standard_normal((3, 10, 6)).astype(np.float32) * 3 + 1.5
  mask = rng.random((3, 10)) < 0.6
  mask[0, 0] = True
  rm, rv = rng.standard_normal(6).astype(np.float32), rng.random(6).astype(np.float32) + 0.5
  sc, b = rng.standard_normal(6).astype(np.float32), rng.standard_normal(6).astype(np.float32)
  y, m, v = layers.batch_norm(jnp.asarray(x), jnp.asarray(mask), sc, b, rm, rv, train=True)
  act = x[mask]
  mu, var = act.mean(0), act.var(0)
  want = (x - mu) / np.sqrt(var + 1e-5) * sc + b
  np.testing.assert_allclose(np.asarray(y)[mask], want[mask], rtol=1e-4, atol=1e-4)
  assert not np.asarray(y)[~mask].any()
  np.testing.assert_allclose(np.asarray(m), 0.9 * rm + 0.1 * mu, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(v), 0.9 * rv + 0.1 * act.var(0, ddof=1), rtol=1e-5)
  ye, me, ve = layers.batch_norm(jnp.asarray(x), jnp.asarray(mask), sc, b, rm, rv, train=False)
  np.testing.assert_allclose(
    np.asarray(ye)[mask], ((x - rm) / np.sqrt(rv + 1e-5) * sc + b)[mask], rtol=1e-4, atol=1e-4
  )
  np.testing.assert_array_equal(np.asarray(me), rm)


def test_batch_norm_backward_matches_autodiff_synced_and_local(rng):
  # The hand-written train-mode backward vs autodiff of the plain formula, with
  # cotangents on y and on both statistics, locally and synced over 8 devices
  # (shard_map with check_vma=False, as the training step).
  from jax.sharding import Mesh, PartitionSpec as P

  n = jax.device_count()
  mesh = Mesh(np.array(jax.devices()), ("data",))
  x = jnp.asarray(rng.standard_normal((n * 2, 7, 5)) * 2 + 1, jnp.float32)
  mask = jnp.asarray(rng.random((n * 2, 7)) < 0.5).at[:, 0].set(True)
  r = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  sc, b = (jnp.asarray(rng.standard_normal(5), jnp.float32) for _ in range(2))

  def plain(x, m, sc, b, axis_name):
    mean, var, _ = layers.masked_moments(x, m, axis_name)
    return layers._normalise(x, m, sc, b, mean, var, 1e-5), mean, var

  def custom(x, m, sc, b, axis_name):
    return layers._bn_train(x, m, sc, b, axis_name, 1e-5)[:3]

  def grads(bn, axis_name):
    def local(x, m, r, sc, b):
      def loss(x, sc, b):
        y, mu, var = bn(x, m, sc, b, axis_name)
        return jnp.sum(y * r) + jnp.sum(mu * jnp.arange(5.0)) + jnp.sum(var)

      gx, gs, gb = jax.grad(loss, (0, 1, 2))(x, sc, b)
      return gx, gs[None], gb[None]

    if axis_name is None:
      return local(x, mask, r, sc, b)
    f = jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(P("data"),) * 3 + (P(), P()),
      out_specs=(P("data"),) * 3,
      check_vma=False,
    )
    return jax.jit(f)(x, mask, r, sc, b)

  for axis_name in (None, "data"):
    for got, want in zip(grads(custom, axis_name), grads(plain, axis_name)):
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_synced_batch_norm_over_devices_equals_global(rng):
  from jax.sharding import AxisType, Mesh, PartitionSpec as P

  n = jax.device_count()
  assert n == 8
  mesh = Mesh(np.array(jax.devices()), ("data",), axis_types=(AxisType.Auto,))
  x = jnp.asarray(rng.standard_normal((n * 2, 7, 5)) * 2 + 1, jnp.float32)
  mask = jnp.asarray(rng.random((n * 2, 7)) < 0.5).at[:, 0].set(True)
  ones, zeros = jnp.ones(5), jnp.zeros(5)

  def local(x, m):
    y, mu, var = layers.batch_norm(x, m, ones, zeros, zeros, ones, train=True, axis_name="data")
    return y, mu[None], var[None]

  f = jax.shard_map(
    local, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=(P("data"), P("data"), P("data"))
  )
  y, mu, var = f(x, mask)
  y0, mu0, var0 = layers.batch_norm(x, mask, ones, zeros, zeros, ones, train=True)
  np.testing.assert_allclose(np.asarray(y), np.asarray(y0), rtol=1e-5, atol=1e-5)
  for i in range(n):
    np.testing.assert_allclose(np.asarray(mu[i]), np.asarray(mu0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(var[i]), np.asarray(var0), rtol=1e-5, atol=1e-6)


def test_global_mean_over_active_sites(rng):
  x = rng.standard_normal((4, 9, 3)).astype(np.float32)
  mask = rng.random((4, 9)) < 0.5
  mask[:, 0] = True
  got = np.asarray(layers.global_mean(jnp.asarray(x), jnp.asarray(mask)))
  for v in range(4):
    np.testing.assert_allclose(got[v], x[v][mask[v]].mean(0), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------- coordinate augment ----


def test_coordinate_augmentation_properties(rng):
  xy = rng.integers(0, 40, size=(6, 12, 2)) * 896 + 1000
  key = jax.random.key(int(rng.integers(1 << 30)))
  off = coord_augment.CoordAugment(False, False, False, False)
  np.testing.assert_array_equal(np.asarray(coord_augment.augment_views(key, xy, cfg=off)), xy)
  # Translation alone shifts every tile by the same vector: the grid relative to
  # the minimum is unchanged.
  tr = coord_augment.augment_views(
    key, xy, cfg=coord_augment.CoordAugment(True, False, False, False)
  )
  shift = np.asarray(tr) - xy
  assert (shift == shift[:, :1]).all() and (shift != 0).any()
  np.testing.assert_array_equal(
    np.asarray(maps.quantize(tr, jnp.ones((6, 12), bool), 224)),
    np.asarray(maps.quantize(xy, jnp.ones((6, 12), bool), 224)),
  )
  # Rotation + flips keep pairwise distances (up to integer truncation).
  rf = np.asarray(
    coord_augment.augment_views(key, xy, cfg=coord_augment.CoordAugment(False, True, True, False))
  ).astype(float)
  d0 = np.linalg.norm(xy[:, :, None] - xy[:, None], axis=-1)
  d1 = np.linalg.norm(rf[:, :, None] - rf[:, None], axis=-1)
  np.testing.assert_allclose(d1, d0, atol=3.0)
  # Per-axis scale alone stays in its range.
  sc = np.asarray(
    coord_augment.augment_views(
      key, xy, cfg=coord_augment.CoordAugment(False, False, False, True, (0.5, 2.0))
    )
  )
  ratio = (sc.max(1) - sc.min(1)) / (xy.max(1) - xy.min(1))
  assert ((ratio > 0.5 - 1e-2) & (ratio < 2.0 + 1e-2)).all()
  # Seeded: same key, same result; different views get different transforms.
  full = coord_augment.augment_views(key, xy)
  np.testing.assert_array_equal(np.asarray(full), np.asarray(coord_augment.augment_views(key, xy)))
  with pytest.raises(ValueError, match="scale_range"):
    coord_augment.CoordAugment(scale_range=(1.3, 0.7))
