r"""Training throughput (views/s) of the Giga-SSL step, per sparse-conv kernel, vs PyTorch + spconv.

    python benchmarks/bench_train.py [--batch=256] [--tiles=5] [--repeats=5]
        [--impls=gather,pairs] [--torch_threads=1] [--no_torch]
        [--reference_scn=DIR --reference_gigassl=DIR [--reference_threads=2]] [--out=FILE.json]

One arm per kernel implementation (kernels/sparse_conv/api.IMPLEMENTATIONS,
minus the dense oracle, the plain reference and kernels for another backend):
the full jitted training step of gigassl_jax.train (coordinate augmentation,
quantisation, neighbour tables, two forward passes, NT-Xent with global
negatives, backward, Adam), on all local devices, with the batch already on
device. Next to it, in the same run, the same network trained with PyTorch +
spconv (the sparse pooling block of kernels/sparse_conv/peer.py, global mean,
the projector, the normalise-then-matmul NT-Xent, Adam), its sparse tensors
built from the same quantised coordinates each step.

The JAX arms are timed in turn within each round (the machine's load drifts),
median over rounds; the torch arm then runs the same number of rounds in a
child process (XLA's spinning CPU worker threads slow a torch arm sharing the
process ~10x).

The original code (SparseConvNet + trislaz/gigassl, their own modules) is an
arm only when both checkouts are given (kernels/sparse_conv/reference_arm.py says
how to get and build them); a ratio to the reference is printed only from that
arm, measured in the same run. Thread counts of every arm are in the header.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from gigassl_jax.kernels.sparse_conv import api, reference_arm, shapes

from gigassl_jax import checkpoint, cli
from gigassl_jax import config as config_lib
from gigassl_jax import train
from gigassl_jax.machine import cpu_name

SKIP = {"dense", "reference"}


def raw_batch(seed: int, batch: int, tiles: int, channels: int) -> dict:
  """Level-0 positions of 2 views per slide drawn from tissue blobs (as shapes.train_views)."""
  rng = np.random.default_rng(seed)
  xy = np.zeros((batch, 2, tiles, 2), np.int32)
  for s in range(batch):
    cells = shapes.tissue_blob(rng, int(rng.integers(300, 4000)))
    for v in range(2):
      xy[s, v] = cells[rng.integers(0, len(cells), tiles)] * shapes.LEVEL0_PER_LEVEL1_TILE
  feats = rng.standard_normal((batch, 2, tiles, channels)).astype(np.float16)
  return {"feats": feats, "xy": xy, "position": np.arange(batch, dtype=np.int32)}


def jax_arm(impl: str, batch: dict, channels: int):
  """A warmed-up callable running one training step with kernel `impl`."""
  b = batch["feats"].shape[0]
  cfg = config_lib.Config(
    workdir="-", data_bank="-", model_conv_impl=impl, model_in_features=channels, train_batch_size=b
  )
  mesh = train.make_mesh(jax.local_devices())
  model = checkpoint.build_model(cfg, channels, bn_axis_name=train.AXIS)
  tx = checkpoint.make_optimizer(cfg, checkpoint.make_schedule(cfg, 1000, 10))
  graphdef, state = checkpoint.init_state(model, tx)
  step = train.make_train_step(graphdef, cfg, tx, mesh)
  holder = {"state": train.put_replicated(state, mesh)}
  dev_batch = train.put_batch(batch, mesh)

  def run():
    holder["state"], m = step(holder["state"], dev_batch)
    return jax.block_until_ready(m["loss"])

  run()
  return run


def quantised_views(batch: dict) -> dict:
  """The JAX step's augmentation + quantisation of both views, as numpy arrays."""
  from gigassl_jax import views as views_lib  # pylint: disable=g-import-not-at-top

  cfg = train.coord_config(config_lib.Config())
  key = jax.random.key(0)
  out = {}
  for v in range(2):
    sm = jax.jit(views_lib.make_views, static_argnums=(4, 5))(
      jax.random.fold_in(key, v),
      batch["xy"][:, v],
      batch["feats"][:, v],
      batch["position"],
      cfg,
      224,
    )
    for name in ("coords", "feats", "mask"):
      out[f"{name}{v}"] = np.asarray(getattr(sm, name))
  return out


def torch_arm(views: dict, channels: int, threads: int, seed: int = 0, device: str = "cpu"):
  """A warmed-up callable running one PyTorch + spconv training step on `views`.

  device "cuda": the step runs on the GPU and each call ends with a device sync.
  """
  import torch  # pylint: disable=g-import-not-at-top  (peer only)
  from gigassl_jax.kernels.sparse_conv import peer  # pylint: disable=g-import-not-at-top

  torch.manual_seed(seed)
  # Denormal numbers appear in this network's backward pass; without
  # flush-to-zero torch's CPU kernels ran ~20x slower here (measured).
  torch.set_flush_denormal(True)
  views = [tuple(views[f"{k}{v}"] for k in ("coords", "feats", "mask")) for v in range(2)]

  class Net(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.pool = peer.PoolingBlock(channels, 512)
      self.proj = torch.nn.Sequential(
        torch.nn.Linear(512, 512),
        torch.nn.ReLU(),
        torch.nn.BatchNorm1d(512),
        torch.nn.Linear(512, 512),
        torch.nn.ReLU(),
        torch.nn.BatchNorm1d(512),
        torch.nn.Linear(512, 256),
      )

    def forward(self, x, n_views):
      y = self.pool(x)
      b = y.indices[:, 0].long()
      s = torch.zeros(n_views, y.features.shape[1], device=device).index_add_(0, b, y.features)
      cnt = torch.zeros(n_views, device=device).index_add_(
        0, b, torch.ones_like(b, dtype=torch.float32)
      )
      return self.proj(s / cnt.clamp(min=1)[:, None])

  def nt_xent(z1, z2, tau=0.05):
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    logits = (z @ z.T) / tau
    logits.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(device)
    return torch.nn.functional.cross_entropy(logits, target)

  net = Net().to(device)
  opt = torch.optim.Adam(net.parameters(), lr=0.03)
  n = views[0][0].shape[0]

  def run():
    torch.set_num_threads(threads)
    opt.zero_grad(set_to_none=True)
    z = [net(peer.sparse_tensor(*views[v], device=device), n) for v in range(2)]
    loss = nt_xent(*z)
    loss.backward()
    opt.step()
    return float(loss.detach())  # a host copy: waits for the GPU

  run()
  return run


def torch_child(
  views_path: str, channels: int, threads: int, repeats: int, device: str = "cpu"
) -> None:
  """Times the torch arm in this (child) process; prints the per-round seconds as JSON."""
  with np.load(views_path) as z:
    views = dict(z)
  fn = torch_arm(views, channels, threads, device=device)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  print(json.dumps(times))


@dataclasses.dataclass(frozen=True)
class BenchTrainConfig:
  """The flags of this script."""

  batch: int = cli.field(256, "Slides per step (2 views each).")
  tiles: int = cli.field(5, "T, tiles per view.")
  channels: int = cli.field(256, "Tile-embedding channels.")
  repeats: int = cli.field(5, "Timed rounds (median).")
  impls: tuple[str, ...] = cli.field((), "Comma list (default: all for this backend).")
  torch_threads: int = cli.field(
    1, "1: spconv on this 2-core CPU ran ~10x slower with 2 (measured)."
  )
  torch_device: str = cli.field(
    "auto",
    "auto: cuda when JAX runs on a GPU (the peer on the same card).",
    choices=("auto", "cpu", "cuda"),
  )
  no_torch: bool = cli.field(False, "Skip the PyTorch + spconv arm.")
  torch_child: str = cli.field("", "(internal) run the torch arm on this views file.")
  reference_scn: str = cli.field("", "SparseConvNet checkout built in place (reference arm).")
  reference_gigassl: str = cli.field("", "trislaz/gigassl checkout (reference arm).")
  reference_threads: int = cli.field(2, "Torch threads of the reference arm.")
  out: str = cli.field("", "Also write the table as JSON (command, date, machine) here.")


def main(argv):
  del argv
  a = cli.from_flags(BenchTrainConfig)
  if a.torch_child:  # the parent names the device: no JAX backend starts here
    torch_child(a.torch_child, a.channels, a.torch_threads, a.repeats, a.torch_device)
    return
  backend = jax.default_backend()
  torch_device = a.torch_device
  if torch_device == "auto":
    torch_device = "cuda" if backend == "gpu" else "cpu"
  impls = (
    list(a.impls)
    if a.impls
    else [n for n in api.IMPLEMENTATIONS if n not in SKIP and api.supported(n, backend)]
  )
  batch = raw_batch(0, a.batch, a.tiles, a.channels)
  arms = {}
  for impl in impls:
    t = time.perf_counter()
    arms[f"jax {impl}"] = jax_arm(impl, batch, a.channels)
    print(f"# compiled {impl} in {time.perf_counter() - t:.1f}s", file=sys.stderr, flush=True)
  times = {k: [] for k in arms}
  for r in range(a.repeats):
    for k, fn in arms.items():
      t = time.perf_counter()
      fn()
      times[k].append(time.perf_counter() - t)
    print(f"# round {r + 1}/{a.repeats}", file=sys.stderr, flush=True)
  if not a.no_torch:
    # XLA's CPU worker threads keep spinning for seconds after a step, which
    # slowed a torch arm in the same process ~10x (measured): torch runs in a
    # child process once this one is idle.
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "views.npz")
      np.savez(path, **quantised_views(batch))
      time.sleep(5)
      res = subprocess.run(
        [
          sys.executable,
          __file__,
          f"--torch_child={path}",
          f"--channels={a.channels}",
          f"--torch_threads={a.torch_threads}",
          f"--repeats={a.repeats}",
          f"--torch_device={torch_device}",
        ],
        capture_output=True,
        text=True,
        check=True,
      )
      label = (
        f"torch+spconv ({a.torch_threads} thr)" if torch_device == "cpu" else "torch+spconv (cuda)"
      )
      times[label] = json.loads(res.stdout.splitlines()[-1])
  if bool(a.reference_scn) != bool(a.reference_gigassl):
    raise ValueError("--reference_scn and --reference_gigassl go together")
  if a.reference_scn:
    time.sleep(5)
    ref = reference_arm.run_child(
      a.reference_scn, a.reference_gigassl, batch, "step", a.reference_threads, a.repeats
    )
    label = f"reference SCN+gigassl {ref['scn_commit']}/{ref['gigassl_commit']}"
    times[f"{label} ({a.reference_threads} thr)"] = ref["seconds"]
  med = {k: statistics.median(v) for k, v in times.items()}
  views = 2 * a.batch
  base = next((k for k in med if k.startswith("torch")), None)
  d = jax.devices()[0]
  dev = f"{d.platform}:{d.device_kind} x{jax.local_device_count()}"
  if d.platform == "cpu":
    dev += f" ({cpu_name()})"
  threads = (
    f"XLA: {os.cpu_count()} host threads; torch+spconv: {a.torch_threads} thread(s); "
    f"reference: {a.reference_threads if a.reference_scn else '-'} thread(s)"
  )
  print(
    f"device: {dev}; batch {a.batch} slides x 2 views, T = {a.tiles}, C_in = {a.channels}; "
    f"median of {a.repeats} rounds; {threads}"
  )
  ref = next((k for k in med if k.startswith("reference")), None)
  print("| arm | s/step | views/s | vs torch+spconv | vs reference |")
  print("|---|---|---|---|---|")
  rows = []
  for k, s in med.items():
    rows.append(
      {
        "arm": k,
        "seconds_per_step": s,
        "views_per_s": views / s,
        "vs_torch_spconv": med[base] / s if base else None,
        "vs_reference": med[ref] / s if ref else None,
      }
    )
    r = rows[-1]
    cell = lambda x: "-" if x is None else f"{x:.2f}x"  # noqa: E731
    print(
      f"| {k} | {s:.3f} | {views / s:.0f} | {cell(r['vs_torch_spconv'])} | {cell(r['vs_reference'])} |"
    )
  if a.out:
    record = {
      "command": " ".join(["python"] + sys.argv),
      "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
      "machine": dev,
      "threads": threads,
      "batch": a.batch,
      "tiles": a.tiles,
      "repeats": a.repeats,
      "rows": rows,
      "raw_seconds": times,
    }
    tmp = a.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(record, f, indent=2)
    os.replace(tmp, a.out)


if __name__ == "__main__":
  cli.define_flags(BenchTrainConfig)
  cli.run(main)
