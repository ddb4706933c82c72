"""The training program: sampling, the data-parallel step, checkpoints, resume, CLI."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gigassl_jax import bank as bank_lib
from gigassl_jax import checkpoint
from gigassl_jax import config as config_lib
from gigassl_jax import views as views_lib
from gigassl_jax import sampling, synthetic, train

REPO = pathlib.Path(__file__).resolve().parents[1]
# Bank (slides, naug, tiles, dim) and run shared by the tests of this module.
SHAPE = (16, 3, 12, 32)
STEPS, CKPT, BATCH = 10, 2, 8
BANK_SEED = 17  # the module's bank (its tests name it on failure)


@pytest.fixture(scope="module")
def bank_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("bank")
  return synthetic.make_synthetic_bank(d, *SHAPE, seed=BANK_SEED)


def _cfg(bank, workdir, **kw):
  base = {
    "workdir": str(workdir),
    "data_bank": str(bank),
    "train_batch_size": BATCH,
    "train_steps": STEPS,
    "train_ckpt_every": CKPT,
    "train_log_every": 1,
    "train_progress": False,
    "optim_warmup_epochs": 1.0,
    "optim_base_lr": 0.3,
  }
  base.update(kw)
  return config_lib.Config(**base)


def _env(devices):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _cli(bank, workdir, *extra):
  return [
    sys.executable,
    "-m",
    "gigassl_jax.train",
    f"--flagfile={REPO / 'experiments/smoke.flags'}",
    f"--data_bank={bank}",
    f"--workdir={workdir}",
    f"--train_batch_size={BATCH}",
    f"--train_steps={STEPS}",
    f"--train_ckpt_every={CKPT}",
    "--train_log_every=1",
    "--optim_warmup_epochs=1",
    "--optim_base_lr=0.3",
    *extra,
  ]


def _losses(workdir):
  recs = [json.loads(l) for l in (pathlib.Path(workdir) / train.METRICS).read_text().splitlines()]
  return {r["step"]: r["loss"] for r in recs}


@pytest.fixture(scope="module")
def reference_run(bank_dir, tmp_path_factory):
  """One uninterrupted in-process run on the 8 test devices."""
  wd = tmp_path_factory.mktemp("ref")
  last = train.run(_cfg(bank_dir, wd))
  return wd, last


# ------------------------------------------------------------- sampling ----


def test_sampler_batches_are_epoch_permutations(bank_dir):
  r = bank_lib.open_bank(bank_dir)
  s = views_lib.ViewSampler(r, batch_size=4, tiles=5, seed=3)
  assert s.steps_per_epoch == SHAPE[0] // 4
  epoch0 = np.concatenate([s.slides(i) for i in range(s.steps_per_epoch)])
  assert sorted(epoch0.tolist()) == list(range(SHAPE[0]))
  epoch1 = np.concatenate([s.slides(s.steps_per_epoch + i) for i in range(s.steps_per_epoch)])
  assert sorted(epoch1.tolist()) == list(range(SHAPE[0]))
  assert not np.array_equal(epoch0, epoch1)  # reshuffled each epoch


def test_sampler_views_come_from_the_drawn_records(bank_dir):
  r = bank_lib.open_bank(bank_dir)
  s = views_lib.ViewSampler(r, batch_size=4, tiles=7, seed=1)
  b = s.local_batch(5)
  assert b["feats"].shape == (4, 2, 7, SHAPE[3]) and b["feats"].dtype == np.float16
  assert b["xy"].shape == (4, 2, 7, 2) and b["xy"].dtype == np.int32
  for i, (pos, slide) in enumerate(zip(b["position"], b["slide"])):
    aug, tiles = s.draws(5, int(pos))
    for v in range(2):
      emb, xy = r.get(int(slide), int(aug[v]))
      np.testing.assert_array_equal(b["feats"][i, v], emb[tiles[v]])
      np.testing.assert_array_equal(b["xy"][i, v], xy[tiles[v]])
  # the two views are independent draws
  assert not np.array_equal(b["feats"][:, 0], b["feats"][:, 1])


def test_sampler_is_a_function_of_step_and_process_shares_concatenate(bank_dir):
  r = bank_lib.open_bank(bank_dir)
  whole = views_lib.ViewSampler(r, batch_size=8, tiles=5, seed=7).local_batch(3)
  again = views_lib.ViewSampler(r, batch_size=8, tiles=5, seed=7).local_batch(3)
  parts = [
    views_lib.ViewSampler(
      r, batch_size=8, tiles=5, seed=7, process_index=p, process_count=2
    ).local_batch(3)
    for p in range(2)
  ]
  for k in whole:
    np.testing.assert_array_equal(whole[k], again[k])
    np.testing.assert_array_equal(whole[k], np.concatenate([p[k] for p in parts]))
  other = views_lib.ViewSampler(r, batch_size=8, tiles=5, seed=7).local_batch(4)
  assert not np.array_equal(whole["feats"], other["feats"])


def test_worker_processes_read_the_same_views_as_threads(bank_dir):
  """--data_workers > 0 (spawned reader processes) changes speed, never the views."""
  r = bank_lib.open_bank(bank_dir)
  threads = views_lib.ViewSampler(r, batch_size=8, tiles=5, seed=11, read_threads=3)
  procs = views_lib.ViewSampler(r, batch_size=8, tiles=5, seed=11, workers=3)
  try:
    for step in (0, 5):
      a, b = threads.local_batch(step), procs.local_batch(step)
      for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"step {step} {k}")
  finally:
    threads.close()
    procs.close()
  assert sampling.auto_workers(0) == 0 and sampling.auto_workers(5) == 5
  assert 0 <= sampling.auto_workers(-1) <= 32


def test_sampler_rejects_batch_larger_than_bank(bank_dir):
  r = bank_lib.open_bank(bank_dir)
  with pytest.raises(ValueError, match="exceeds the 16 slides"):
    views_lib.ViewSampler(r, batch_size=32, tiles=5, seed=0)


def test_prefetcher_order_and_errors():
  made = []

  def make(step):
    made.append(step)
    if step == 4:
      raise OSError("disk gone")
    return step * 10

  p = views_lib.Prefetcher(make, 2, 6, depth=2)
  assert p.get(2) == 20 and p.get(3) == 30
  with pytest.raises(RuntimeError, match="step 4 failed: disk gone"):
    p.get(4)
  p.close()
  with pytest.raises(RuntimeError, match="expected"):
    views_lib.Prefetcher(lambda s: s, 0, 3).get(1)


@pytest.mark.parametrize("seed", [3])
def test_make_views_augments_per_position_not_per_device(seed):
  rng = np.random.default_rng(seed)
  xy = (rng.integers(0, 30, size=(6, 5, 2)) * 896).astype(np.int32)
  feats = rng.normal(size=(6, 5, 4)).astype(np.float32)
  cfg = train.coord_config(config_lib.Config())
  key = jax.random.key(0)
  make_views = jax.jit(views_lib.make_views, static_argnums=(4, 5))
  full = make_views(key, xy, feats, jnp.arange(6), cfg, 224)
  half = make_views(key, xy[3:], feats[3:], jnp.arange(3, 6), cfg, 224)
  np.testing.assert_array_equal(full.coords[3:], half.coords, err_msg=f"seed {seed}")
  np.testing.assert_allclose(full.feats[3:], half.feats, err_msg=f"seed {seed}")
  # augmentation on: grids differ from the plain quantisation for some view
  plain = make_views(
    key,
    xy,
    feats,
    jnp.arange(6),
    train.coord_config(
      config_lib.Config(data_translate=False, data_rotate=False, data_flip=False, data_scale=False)
    ),
    224,
  )
  assert not np.array_equal(plain.coords, full.coords), f"seed {seed}"
  # augmentation off: exactly quantised positions (pitch 896 = 4 cells)
  np.testing.assert_array_equal(plain.coords[plain.mask] % 4, 0, err_msg=f"seed {seed}")


# -------------------------------------------------------- the train step ---


def _batch(rng, b, t, f):
  return {
    "feats": rng.normal(size=(b, 2, t, f)).astype(np.float16),
    "xy": (
      rng.integers(0, 12, size=(b, 2, t, 2)) * 896 + rng.integers(0, 896, size=(b, 2, t, 2))
    ).astype(np.int32),
    "position": np.arange(b, dtype=np.int32),
  }


@pytest.mark.parametrize("seed", [5])
def test_eight_device_step_equals_one_device_step(seed):
  rng = np.random.default_rng(seed)
  cfg = config_lib.Config(workdir="x", data_bank="x", model_in_features=32, train_seed=5)
  model = checkpoint.build_model(cfg, 32, bn_axis_name=train.AXIS)
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  batch = _batch(rng, 16, 5, 32)
  outs = []
  for n in (1, 8):
    mesh = train.make_mesh(jax.devices()[:n])
    step = train.make_grad_step(graphdef, cfg, mesh)
    outs.append(
      jax.device_get(
        step(
          train.put_replicated(params, mesh),
          train.put_replicated(stats, mesh),
          jnp.int32(3),
          train.put_batch(batch, mesh),
        )
      )
    )
  (l1, g1, s1, c1), (l8, g8, s8, c8) = outs
  np.testing.assert_allclose(l8, l1, rtol=1e-5, err_msg=f"seed {seed}")
  np.testing.assert_allclose(c8["collapse"], c1["collapse"], rtol=1e-5, err_msg=f"seed {seed}")
  # A count of hits over the 32 anchors: the devices must see the global batch.
  assert c8["top1"] == c1["top1"], f"seed {seed}: {c8['top1']} vs {c1['top1']}"
  for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g1)):
    # float32 sums in another order, amplified 1/tau = 20x by the loss: a few
    # 1e-4 of the largest entry (1e-4 failed once in ~10 fresh-random runs at
    # 1.4e-4); a wrong sharding or a missing pmean is off by O(1).
    np.testing.assert_allclose(
      a, b, atol=5e-4 * float(np.abs(b).max()) + 1e-7, err_msg=f"seed {seed}"
    )
  assert any(float(np.abs(b).max()) > 0 for b in jax.tree.leaves(g1)), f"seed {seed}"
  for a, b, old in zip(jax.tree.leaves(s8), jax.tree.leaves(s1), jax.tree.leaves(stats)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"seed {seed}")
    assert not np.allclose(b, old), f"seed {seed}: the running statistics did not move"


# ------------------------------------------------------------ full runs ----


def test_run_writes_metrics_checkpoints_and_restores(reference_run):
  wd, _ = reference_run
  recs = [json.loads(l) for l in (wd / train.METRICS).read_text().splitlines()]
  assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
  for r in recs:
    assert {"step", "loss", "lr", "views_per_s", "collapse", "top1"} <= set(r)
    assert np.isfinite(r["loss"]) and 0 <= r["collapse"] <= 2
    # Chance levels of the global batch (BATCH slides, 2 * BATCH - 1 candidates).
    assert r["loss_chance"] == pytest.approx(np.log(2 * BATCH - 1), rel=1e-12)
    assert r["top1_chance"] == pytest.approx(1 / (2 * BATCH - 1), rel=1e-12)
    # top1 is a count of hits over the 2 * BATCH anchors.
    assert r["top1"] * 2 * BATCH == pytest.approx(round(r["top1"] * 2 * BATCH), abs=1e-4)
  assert recs[0]["lr"] == 0.0 and max(r["lr"] for r in recs) > 0  # warm-up from 0
  assert all(r["views_per_s"] > 0 for r in recs[1:])
  assert (wd / "loss_curve.png").stat().st_size > 1000
  assert list((wd / "tb").iterdir())
  cfg = config_lib.read(wd)
  assert cfg.model_in_features == SHAPE[3] and cfg.train_steps == STEPS
  assert (wd / config_lib.FLAGS_TXT).read_text().count("--data_bank=") == 1
  model, cfg2 = checkpoint.restore_model(wd)
  assert cfg2 == cfg
  seed = 11
  rng = np.random.default_rng(seed)
  from gigassl_jax.sparse import maps

  sm = maps.build_views(
    (rng.integers(0, 9, size=(3, 5, 2)) * 224).astype(np.int32),
    rng.normal(size=(3, 5, SHAPE[3])).astype(np.float32),
  )
  rep, _ = model(sm)
  assert rep.shape == (3, 512) and np.isfinite(np.asarray(rep)).all(), f"seed {seed}"
  # eval mode: running statistics, so a view's representation is batch-independent
  rep1, _ = model(jax.tree.map(lambda x: x[:1], sm))
  np.testing.assert_allclose(rep1[0], rep[0], rtol=1e-5, atol=1e-6, err_msg=f"seed {seed}")
  # the restored parameters are the trained ones, not a fresh initialisation
  fresh = checkpoint.build_model(cfg, SHAPE[3])
  assert not np.allclose(fresh.pool.b1_conv2.weight[...], model.pool.b1_conv2.weight[...])


def test_non_finite_loss_stops_with_step_and_keeps_last_checkpoint(bank_dir, tmp_path):
  cfg = _cfg(bank_dir, tmp_path, loss_temperature=1e-38, train_steps=3)
  with pytest.raises(train.NonFiniteLossError, match="at step 1"):
    train.run(cfg)
  assert not list((tmp_path / checkpoint.CKPT_DIR).glob("[0-9]*"))


def test_killed_run_resumes_to_the_same_parameters(bank_dir, reference_run, tmp_path):
  ref_wd, _ = reference_run
  cmd = _cli(bank_dir, tmp_path / "run")
  # The resumed run loads the killed run's compiled step from this cache (the
  # same executable, so bit-for-bit results are unaffected; saves a compile).
  env = dict(
    _env(8),
    JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
  )
  proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  ckpt = tmp_path / "run" / checkpoint.CKPT_DIR
  deadline = time.time() + 480  # the first checkpoint needs a compile: minutes on a loaded CPU
  while time.time() < deadline and proc.poll() is None:
    if (ckpt / str(CKPT)).is_dir():  # orbax renames a finished checkpoint into place
      break
    time.sleep(0.01)
  exited = proc.poll()
  proc.send_signal(signal.SIGKILL)
  _, err = proc.communicate()
  done = sorted(int(p.name) for p in ckpt.glob("[0-9]*") if p.name.isdigit())
  assert done and done[-1] < STEPS, (
    f"the run was not killed mid-way (checkpoints {done}, exit status before the kill "
    f"{exited}): {err.decode(errors='replace')[-2000:]}"
  )
  res = subprocess.run(
    cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300, check=False
  )
  assert res.returncode == 0, res.stderr[-3000:]
  assert "resumed from the checkpoint of step" in res.stderr
  ref_losses, got_losses = _losses(ref_wd), _losses(tmp_path / "run")
  assert got_losses == ref_losses  # bit-for-bit on CPU
  m_ref, _ = checkpoint.restore_model(ref_wd)
  m_got, _ = checkpoint.restore_model(tmp_path / "run")
  for a, b in zip(jax.tree.leaves(nnx.state(m_ref)), jax.tree.leaves(nnx.state(m_got))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_cli_rejects_bad_flags(tmp_path):
  res = subprocess.run(
    [
      sys.executable,
      "-m",
      "gigassl_jax.train",
      f"--workdir={tmp_path}",
      "--data_bank=synthetic",
      "--loss_temperature=0",
    ],
    env=_env(1),
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert res.returncode != 0 and "--loss_temperature must be > 0" in res.stderr
  res = subprocess.run(
    [
      sys.executable,
      "-m",
      "gigassl_jax.train",
      f"--workdir={tmp_path}",
      f"--data_bank={tmp_path / 'nope'}",
    ],
    env=_env(1),
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert res.returncode != 0 and "nope does not exist" in res.stderr


_PARSE = """
import json, sys
from absl import flags
from gigassl_jax import config
config.define_flags()
out = {}
for path in sys.argv[1:]:
  for name in list(flags.FLAGS):
    flags.FLAGS[name].unparse()
  flags.FLAGS(["prog", "--flagfile=" + path, "--workdir=w", "--data_bank=synthetic"])
  out[path] = json.loads(config.from_flags().to_json())
print(json.dumps(out))
"""


def test_every_flagfile_parses_and_each_kernel_has_an_ablation_arm():
  from gigassl_jax.kernels.sparse_conv import api

  from gigassl_jax.sparse import tables

  files = sorted(str(p.relative_to(REPO)) for p in (REPO / "experiments").glob("*.flags"))
  res = subprocess.run(
    [sys.executable, "-c", _PARSE, *files],
    env=_env(1),
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert res.returncode == 0, res.stderr[-3000:]
  cfgs = json.loads(res.stdout)
  base = cfgs["experiments/base.flags"]
  assert (
    base["train_batch_size"],
    base["data_tiles"],
    base["loss_temperature"],
    base["optim_base_lr"],
    base["optim_warmup_epochs"],
  ) == (256, 5, 0.05, 0.03, 10.0)
  for impl in set(api.IMPLEMENTATIONS) - {"dense", "reference"}:
    cfg = cfgs[f"experiments/ablation_{impl}.flags"]
    assert cfg["model_conv_impl"] == impl and cfg["train_batch_size"] == 256
  for b in tables.BUILDERS:
    assert cfgs[f"experiments/ablation_table_{b}.flags"]["model_table_builder"] == b
  assert cfgs["experiments/smoke.flags"]["train_steps"] <= 10


@pytest.mark.parametrize("seed", [2])
def test_model_init_from_a_torchvision_pth(tmp_path, seed):
  torch = pytest.importorskip("torch")  # only to write the file; reading is torch-free
  rng = np.random.default_rng(seed)
  sd = {}
  for blk, convs in (("0", ("conv1", "conv2", "downsample.0")), ("1", ("conv1", "conv2"))):
    for c in convs:
      cin = 256 if (blk == "0" and c != "conv2") else 512
      k = 1 if c == "downsample.0" else 3
      sd[f"layer4.{blk}.{c}.weight"] = torch.from_numpy(
        rng.normal(size=(512, cin, k, k)).astype(np.float32)
      )
    for bn in ("bn1", "bn2", "downsample.1") if blk == "0" else ("bn1", "bn2"):
      for name in ("weight", "bias", "running_mean"):
        sd[f"layer4.{blk}.{bn}.{name}"] = torch.from_numpy(rng.normal(size=512).astype(np.float32))
      sd[f"layer4.{blk}.{bn}.running_var"] = torch.from_numpy(
        rng.uniform(0.5, 2, size=512).astype(np.float32)
      )
  path = tmp_path / "resnet18.pth"
  torch.save({"state_dict": {"module.encoder_q." + k: v for k, v in sd.items()}}, path)
  cfg = config_lib.Config(
    workdir="x", data_bank="x", model_init="torchvision", model_weights=str(path)
  )
  model = checkpoint.build_model(cfg, 256)
  w = sd["layer4.1.conv2.weight"].numpy()  # [out, in, kh, kw]; natural: tap 3*kw + kh
  np.testing.assert_array_equal(
    model.pool.b1_conv2.weight[...][3 * 2 + 1], w[:, :, 1, 2].T, err_msg=f"seed {seed}"
  )
  np.testing.assert_array_equal(
    model.pool.b0_normd.var[...],
    sd["layer4.0.downsample.1.running_var"].numpy(),
    err_msg=f"seed {seed}",
  )
  with pytest.raises(FileNotFoundError, match="does not exist"):
    checkpoint.build_model(cfg.replace(model_weights=str(tmp_path / "none.pth")), 256)


# ------------------------------------------------- streams, schedule, resume ---


@pytest.mark.parametrize("seed", [0, 7])
def test_init_augmentation_and_step_keys_are_separate_streams(seed):
  """No key of parameter init equals an augmentation key of the first steps (or a view's)."""
  rngs = nnx.Rngs(checkpoint.stream_key(seed, checkpoint.INIT_STREAM))
  init = [rngs.params() for _ in range(8)]
  aug = checkpoint.stream_key(seed, checkpoint.AUGMENT_STREAM)
  steps = [jax.random.fold_in(aug, s) for s in range(8)]
  views = [jax.random.fold_in(k, v) for k in steps for v in range(2)]
  data = {tuple(np.asarray(jax.random.key_data(k)).ravel()) for k in init + steps + views}
  assert len(data) == len(init) + len(steps) + len(views), f"seed {seed}"
  # The old single chain: key(seed) folded with step 0 was also nnx.Rngs(seed)'s root.
  assert tuple(np.asarray(jax.random.key_data(steps[0])).ravel()) != tuple(
    np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 0))).ravel()
  ), f"seed {seed}"


def test_final_lr_is_the_flag_not_scaled_by_the_batch():
  cfg = config_lib.Config(
    workdir="x", data_bank="x", train_batch_size=8, optim_base_lr=0.5, optim_final_lr=1e-3
  )
  sched = checkpoint.make_schedule(cfg, 100, 10)
  assert float(sched(100)) == pytest.approx(1e-3, rel=1e-6)  # not 1e-3 x 8 / 256
  assert max(float(sched(s)) for s in range(100)) == pytest.approx(0.5 * 8 / 256, rel=1e-6)


def test_resume_refuses_changed_flags_unless_allowed(bank_dir, tmp_path):
  cfg = _cfg(bank_dir, tmp_path).replace(model_in_features=SHAPE[3])
  config_lib.write(cfg, tmp_path)
  changed = cfg.replace(train_batch_size=16, loss_temperature=0.1, train_log_every=3)
  assert config_lib.changed_flags(cfg, changed) == ["loss_temperature", "train_batch_size"]
  with pytest.raises(train.ChangedFlagsError, match="--loss_temperature.*--train_batch_size"):
    train.run(changed)
  allowed = changed.replace(train_allow_changed_flags=("train_batch_size", "loss_temperature"))
  assert config_lib.changed_flags(cfg, allowed) == []
  with pytest.raises(ValueError, match="unknown flags"):
    cfg.replace(train_allow_changed_flags=("no_such_flag",)).validate()
  # The command line: one line on stderr naming the flag, exit status 2.
  res = subprocess.run(
    [
      sys.executable,
      "-m",
      "gigassl_jax.train",
      f"--workdir={tmp_path}",
      f"--data_bank={bank_dir}",
      f"--train_batch_size={BATCH}",
      f"--train_steps={STEPS}",
      f"--train_ckpt_every={CKPT}",
      "--optim_warmup_epochs=1",
      "--optim_base_lr=0.3",
      "--loss_temperature=0.2",
    ],
    env=_env(1),
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert res.returncode == 2, res.stderr[-3000:]
  errors = [l for l in res.stderr.splitlines() if "error" in l.lower()]
  assert len(errors) == 1 and "changed flags --loss_temperature (0.05 -> 0.2)" in errors[0], (
    res.stderr[-3000:]
  )
  assert "Traceback" not in res.stderr
