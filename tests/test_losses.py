"""NT-Xent and the collapse measure against numpy, the SCN golden file, and devices."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from gigassl_jax import losses

GOLDEN = pathlib.Path(__file__).parent / "fixtures" / "golden_scn" / "ntxent.npz"
SEEDS = (0, 1)  # fixed; a failing case names its seed in the test id


def ntxent_numpy(z1, z2, tau):
  """The reference's formula, in float64: [positive, 2N-2 negatives] / tau, CE label 0."""
  z = np.concatenate([z1, z2]).astype(np.float64)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  sim = z @ z.T
  n2 = len(z)
  n = n2 // 2
  total = 0.0
  for i in range(n2):
    pos = (i + n) % n2
    negs = [sim[i, j] for j in range(n2) if j not in (i, pos)]
    logits = np.array([sim[i, pos]] + negs) / tau
    m = logits.max()
    total += m + np.log(np.exp(logits - m).sum()) - logits[0]
  return total / n2


def _mesh(n):
  return jax.sharding.Mesh(
    np.array(jax.devices()[:n]), ("data",), axis_types=(jax.sharding.AxisType.Auto,)
  )


@pytest.mark.parametrize("tau", [0.05, 0.5])
@pytest.mark.parametrize("seed", SEEDS)
def test_ntxent_matches_numpy(tau, seed):
  rng = np.random.default_rng(seed)
  z1 = rng.normal(size=(12, 24)).astype(np.float32)
  z2 = (z1 + rng.normal(size=z1.shape)).astype(np.float32)
  got = float(losses.nt_xent(z1, z2, tau))
  # The loss is a difference of terms of size ~1/tau computed in float32, so
  # its error is absolute (~eps / tau), not relative: at tau = 0.05 the loss
  # can be ~0.008 and 2e-5 relative (1.7e-7) was exceeded once.
  np.testing.assert_allclose(got, ntxent_numpy(z1, z2, tau), rtol=2e-5, atol=2e-6 / tau)


@pytest.mark.parametrize("seed", SEEDS)
def test_ntxent_symmetric_in_views(seed):
  rng = np.random.default_rng(seed)
  z1, z2 = rng.normal(size=(2, 8, 16)).astype(np.float32)
  np.testing.assert_allclose(losses.nt_xent(z1, z2), losses.nt_xent(z2, z1), rtol=1e-6)


def test_ntxent_golden():
  g = np.load(GOLDEN)
  val, (g1, g2) = jax.value_and_grad(losses.nt_xent, argnums=(0, 1))(
    g["z1"], g["z2"], float(g["temperature"])
  )
  np.testing.assert_allclose(float(val), float(g["loss_float64"]), rtol=1e-5)
  scale = max(np.abs(g["grad_z1"]).max(), np.abs(g["grad_z2"]).max())
  np.testing.assert_allclose(g1, g["grad_z1"], atol=1e-4 * scale)
  np.testing.assert_allclose(g2, g["grad_z2"], atol=1e-4 * scale)


def test_ntxent_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="must both be"):
    losses.nt_xent(jnp.ones((4, 8)), jnp.ones((5, 8)))


def _sharded_loss(z1, z2, n_dev, axis_name):
  def body(a, b):
    return jax.lax.pmean(losses.nt_xent(a, b, 0.1, axis_name=axis_name), "data")

  f = jax.shard_map(
    body, mesh=_mesh(n_dev), in_specs=(P("data"), P("data")), out_specs=P(), check_vma=False
  )
  return jax.jit(f)(z1, z2)


@pytest.mark.parametrize("seed", SEEDS)
def test_global_negatives_over_devices_equal_single_device(seed):
  rng = np.random.default_rng(seed)
  z1, z2 = rng.normal(size=(2, 16, 32)).astype(np.float32)
  got = float(_sharded_loss(z1, z2, 8, "data"))
  np.testing.assert_allclose(got, ntxent_numpy(z1, z2, 0.1), rtol=2e-5)


@pytest.mark.parametrize("seed", SEEDS)
def test_global_negatives_gradient_over_devices(seed):
  rng = np.random.default_rng(seed)
  z1, z2 = rng.normal(size=(2, 16, 32)).astype(np.float32)

  def sharded(a, b):
    def body(a, b):
      return jax.lax.pmean(losses.nt_xent(a, b, 0.1, axis_name="data"), "data")

    return jax.shard_map(
      body, mesh=_mesh(8), in_specs=(P("data"), P("data")), out_specs=P(), check_vma=False
    )(a, b)

  # The all_gather's transpose must route every negative's gradient back to
  # the device that holds that row.
  g_dev = jax.jit(jax.grad(sharded, argnums=(0, 1)))(z1, z2)
  g_ref = jax.grad(lambda a, b: losses.nt_xent(a, b, 0.1), argnums=(0, 1))(z1, z2)
  for a, b in zip(g_dev, g_ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * float(np.abs(b).max()))


@pytest.mark.parametrize("seed", SEEDS)
def test_local_negatives_equal_mean_of_per_device_losses(seed):
  rng = np.random.default_rng(seed)
  z1, z2 = rng.normal(size=(2, 16, 32)).astype(np.float32)
  got = float(_sharded_loss(z1, z2, 4, None))
  per_dev = [ntxent_numpy(z1[i : i + 4], z2[i : i + 4], 0.1) for i in range(0, 16, 4)]
  np.testing.assert_allclose(got, np.mean(per_dev), rtol=2e-5)
  # and it differs from the global-negatives loss (more negatives, higher loss)
  assert got < ntxent_numpy(z1, z2, 0.1)


@pytest.mark.parametrize("seed", SEEDS)
def test_collapse_level_numpy_and_extremes(seed):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(64, 256)).astype(np.float32)
  a = z / np.linalg.norm(z, axis=1, keepdims=True)
  want = a.std(0).mean() * np.sqrt(256)
  np.testing.assert_allclose(float(losses.collapse_level(z)), want, rtol=1e-5)
  assert 0.9 < want < 1.1  # spread projections ~ 1
  collapsed = np.tile(z[:1], (64, 1)) + 1e-4 * rng.normal(size=z.shape).astype(np.float32)
  assert float(losses.collapse_level(collapsed)) < 0.01


def _dot_precisions(text):
  """Precision configs of every dot_general in StableHLO text (NONE = unspecified)."""
  dots = re.findall(r"stablehlo\.dot_general[^\n]*", text)
  return [m.group(1) if (m := re.search(r"precision = \[(\w+)", d)) else "NONE" for d in dots]


@pytest.mark.parametrize("global_precision", ["default", "highest"])
def test_ntxent_similarity_is_float32_highest_whatever_the_global_setting(global_precision):
  """The similarity matmul (and its gradient's) lowers at HIGHEST in float32, even in bfloat16."""
  z = jax.ShapeDtypeStruct((8, 16), jnp.bfloat16)
  with jax.default_matmul_precision(global_precision):
    text = jax.jit(jax.grad(losses.nt_xent, argnums=(0, 1))).lower(z, z).as_text()
  precisions = _dot_precisions(text)
  assert precisions and set(precisions) == {"HIGHEST"}, precisions
  assert all("bf16" not in d for d in re.findall(r"stablehlo\.dot_general[^\n]*", text))
