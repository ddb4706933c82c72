"""Released Giga-SSL checkpoints and PCA files: read without torch, checked against torch/SCN."""

import os
import pathlib
import pickle

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from gigassl_jax import encode, pca, pth, released
from gigassl_jax import conformance
from gigassl_jax.sparse import maps

GOLDEN = pathlib.Path(__file__).parent / "fixtures" / "golden_scn"
BASE = "net.mil_model.sparse_pooling.0."


def _golden(name):
  with np.load(GOLDEN / name, allow_pickle=False) as z:
    d = {k: z[k] for k in z.files}
  if "w_b0_conv1" in d:
    w = {n: d["w_" + n] for n in released.CONVS}
  else:
    w = conformance.regenerate_weights(d["weight_seed"], int(d["c_in"]), int(d["c"]))
  return d, w


def _write_released(path, d, w, prefix="backbone.mil.", downmap=224, config=None):
  """The released layout, written with torch itself (as the Giga-SSL authors' code does)."""
  sd = {}
  for ours, theirs in released.CONVS.items():
    sd[f"{prefix}{BASE}{theirs}.weight"] = torch.from_numpy(w[ours][:, None].copy())
  for ours, theirs in released.NORMS.items():
    for t in ("weight", "bias", "running_mean", "running_var"):
      sd[f"{prefix}{BASE}{theirs}.{t}"] = torch.from_numpy(d[f"{ours}_{t}"].copy())
  c = int(d["c"])
  # Keys a real checkpoint also holds: the projector and the classifier (ignored).
  sd[f"{prefix}projection_head.0.weight"] = torch.zeros(c, c)
  sd["linear_classifier.weight"] = torch.zeros(2, c)
  if config is None:
    config = {"downmap": downmap, "num_class": 2, "nb_tiles": 5}
  torch.save({"config": config, "state_dict": sd}, path)


class _Reader:
  """A bank reader over float32 arrays (the real bank stores float16, which would blur the check)."""

  def __init__(self, feats, coords):
    self.feats, self.coords = feats, coords  # [B, T, F], [B, T, 2]
    self.n_aug, self.n_tiles = 1, feats.shape[1]
    self.slide_ids = [f"s{i}" for i in range(len(feats))]

  def __len__(self):
    return len(self.feats)

  def get(self, s, k):
    del k
    return self.feats[s], self.coords[s]


@pytest.mark.parametrize("name", ["layer4_eval_small.npz", "layer4_eval.npz"])
@pytest.mark.parametrize("prefix", ["backbone.mil.", "backbone."])
def test_golden_checkpoint_reproduces_scn(tmp_path, name, prefix):
  d, w = _golden(name)
  path = tmp_path / "gigassl-scm-test.pth.tar"
  _write_released(path, d, w, prefix)
  rel = released.load(path)
  assert (rel.in_features, rel.features) == (int(d["c_in"]), int(d["c"]))
  assert rel.downmap == 224 and rel.prefix == prefix and rel.ignored == 2
  # Batch A: level-0 coordinates as gigassl training feeds them (no edge clipping);
  # encode's all-tiles path with the checkpoint's downmap as the cell.
  reader = _Reader(d["A_tile_features"].astype(np.float32), d["A_raw_level0_coords"])
  ours = encode.encode_all_tiles(rel.pool, reader, cell=rel.downmap)
  ref = encode.l2_normalize(d["A_pooled"].astype(np.float64))
  # The golden README's float32 bound for layer4 outputs is 1e-4 x max|ref|
  # (its float64 re-implementation deviates by ~1e-5); after L2 normalisation
  # every entry is <= 1, so 1e-4 absolute is that bound.
  err = np.abs(ours - ref).max()
  assert err < 1e-4, f"{name} prefix {prefix!r}: max |ours - SCN| = {err}"


def test_other_widths_load_and_match_dense_peer(tmp_path):
  """A 48 -> 96 network written by torch from seeded random weights: loading it equals
  building the same PoolingNet by hand, and the dense reference implementation agrees."""
  seed = 11
  rng = np.random.default_rng(seed)
  c_in, c = 48, 96
  w = conformance.regenerate_weights(seed, c_in, c)
  d = {"c": c}
  for n in released.NORMS:
    d[f"{n}_weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
    d[f"{n}_bias"] = rng.normal(0, 0.1, c).astype(np.float32)
    d[f"{n}_running_mean"] = rng.normal(0, 0.1, c).astype(np.float32)
    d[f"{n}_running_var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
  path = tmp_path / "w.pth"
  _write_released(path, d, w, downmap=112)
  rel = released.load(path)
  dense = released.load(path, conv_impl="dense")
  assert (rel.in_features, rel.features, rel.downmap) == (c_in, c, 112), f"seed {seed}"
  feats = rng.random((3, 40, c_in)).astype(np.float32)
  coords = (rng.integers(0, 12, (3, 40, 2)) * 448).astype(np.int32)
  a = encode.encode_all_tiles(rel.pool, _Reader(feats, coords), cell=112)
  # The dense peer runs eagerly (it needs concrete coordinates to size its grid).
  valid = np.ones(coords.shape[:2], bool)
  smap = maps.from_grid(maps.quantize(coords, valid, 112), feats, valid)
  b = encode.l2_normalize(np.asarray(dense.pool(smap), np.float64))
  # Two float32 summation orders over <= 9 taps x 96 channels per layer, five
  # layers: ~1e-6 relative; 1e-5 on unit vectors leaves margin.
  assert np.abs(a - b).max() < 1e-5, f"seed {seed}: {np.abs(a - b).max()}"
  for name, theirs in released.CONVS.items():
    got = np.asarray(getattr(rel.pool, name).weight[...])
    assert np.array_equal(got, w[name]), f"seed {seed}: {theirs}"


def test_export_then_torch_load(tmp_path):
  d, w = _golden("layer4_eval_small.npz")
  src = tmp_path / "src.pth"
  _write_released(src, d, w)
  rel = released.load(src)
  out = tmp_path / "export.pth"
  released.export(rel.pool, out, downmap=rel.downmap)
  got = torch.load(out, weights_only=True)
  want = torch.load(src, weights_only=True)["state_dict"]
  assert got["config"]["downmap"] == 224
  pool_keys = {k for k in want if BASE in k}
  assert set(got["state_dict"]) == pool_keys
  for k in pool_keys:
    assert got["state_dict"][k].dtype == torch.float32, k
    assert torch.equal(got["state_dict"][k], want[k]), k
  # And it reads back through our own loader with the same numbers.
  again = released.load(out)
  for n in released.CONVS:
    assert np.array_equal(
      np.asarray(getattr(again.pool, n).weight[...]), np.asarray(getattr(rel.pool, n).weight[...])
    ), n


def test_refuses_other_layouts(tmp_path):
  path = tmp_path / "resnet.pth"
  torch.save({"state_dict": {"layer4.0.conv1.weight": torch.zeros(2, 2, 3, 3)}}, path)
  with pytest.raises(ValueError, match=r"no Giga-SSL pooling network.*layer4\.0"):
    released.load(path)
  d, w = _golden("layer4_eval_small.npz")
  bad = tmp_path / "bad.pth"
  _write_released(bad, d, w, prefix="model.")
  with pytest.raises(ValueError, match="model.net"):
    released.load(bad)


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.mkdir, (self.marker,))


def test_pickle_that_runs_code_is_refused(tmp_path):
  marker = str(tmp_path / "pwned")
  path = tmp_path / "evil.pth"
  torch.save({"config": {"downmap": 224}, "state_dict": {"x": _Evil(marker)}}, path)
  with pytest.raises(pth.UnsafeCheckpointError, match="posix.mkdir|os.mkdir"):
    released.load(path)
  npy = tmp_path / "pca-evil.npy"
  np.save(npy, np.array([_Evil(marker)], object), allow_pickle=True)
  with pytest.raises(pth.UnsafeCheckpointError, match="mkdir"):
    pca.load(npy)
  assert not os.path.exists(marker)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("whiten", [False, True])
@pytest.mark.parametrize("how", ["torch.save", "np.save", "pickle"])
def test_pca_file_matches_sklearn(tmp_path, seed, whiten, how):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(400, 64)) @ rng.normal(size=(64, 64))
  ref = PCA(16, whiten=whiten, random_state=seed).fit(x)
  path = tmp_path / {"torch.save": "pca-x.pth", "np.save": "pca-x.npy", "pickle": "pca.pkl"}[how]
  if how == "torch.save":
    torch.save(ref, path)
  elif how == "np.save":
    np.save(path, ref, allow_pickle=True)
  else:
    with open(path, "wb") as f:
      pickle.dump(ref, f, protocol=4)
  got = pca.load(path)
  assert (got.in_dim, got.out_dim, got.whiten) == (64, 16, whiten), f"seed {seed}"
  y, want = got.transform(x), ref.transform(x)
  # Same float64 formula; the float32 output cast is the only difference:
  # 2^-24 relative of values up to max|want|.
  tol = 2.0**-23 * np.abs(want).max()
  assert np.abs(y - want).max() <= tol, f"seed {seed}: {np.abs(y - want).max()} > {tol}"


def test_config_with_numpy_paths_and_namespace_loads(tmp_path):
  """Training configs hold numpy scalars, paths and argparse Namespaces: read as plain values."""
  import argparse  # noqa: PLC0415

  d, w = _golden("layer4_eval_small.npz")
  ns = argparse.Namespace(downmap=np.int64(224), num_class=2, lr=np.float64(3e-4),
                          out=pathlib.Path("/runs/x"), sizes=np.arange(3))  # fmt: skip
  path = tmp_path / "ns.pth"
  _write_released(path, d, w, config=ns)
  rel = released.load(path)
  assert rel.downmap == 224 and rel.config["out"] == "/runs/x", rel.config
  assert rel.config["lr"] == 3e-4 and rel.config["__class__"] == "Namespace"
