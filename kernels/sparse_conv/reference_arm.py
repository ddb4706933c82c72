r"""The original Giga-SSL code as a benchmark arm (SparseConvNet + trislaz/gigassl).

Runs the reference's own, unmodified modules from user-given checkouts, in a
child process of the benchmark, on the same level-0 tile positions and features
as the JAX arms:

    python -m gigassl_jax.kernels.sparse_conv.reference_arm --scn=DIR --gigassl=DIR --part=step|block \
        --batch_npz=FILE --threads=2 --repeats=5

prints one JSON line: {"seconds": [...], "part", "threads", "scn_commit", "gigassl_commit"}.
Keeps argparse, not gigassl_jax.cli: a child-process entry point that imports no gigassl_jax.

part=step: one training step of the reference (`simclr.SimCLRMIL` around
`networks.FullSparseConvMIL`: two forward passes, its NT-Xent, backward, Adam),
without its data loader (the tile positions arrive already augmented; the JAX
arms' coordinate augmentation is inside their step, and costs well under 1 %).
part=block: the sparse pooling block alone (`sparse_pooling` + the global
average), forward + backward, as in kernels/sparse_conv/bench.py.

What is not the reference's: ImageNet weights cannot be downloaded here, so
`networks.get_resnet_model` is replaced by a randomly initialised torchvision
ResNet18 (weights do not change the time). Nothing else is patched.

Getting the checkouts (docs/kernels.md says the same):
    git clone https://github.com/facebookresearch/SparseConvNet && cd SparseConvNet \
        && python setup.py build_ext --inplace      # CPU-only build, about a minute
    git clone https://github.com/trislaz/gigassl
    pip install torchvision   # optional: a stand-in takes its place if it fails to load
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time
import types

import numpy as np


def _commit(path: pathlib.Path) -> str:
  r = subprocess.run(
    ["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
  )
  return r.stdout.strip() or "unknown"


def _import_reference(scn: pathlib.Path, gigassl: pathlib.Path):
  """Imports sparseconvnet from `scn` and gigassl's networks/simclr from `gigassl`."""
  if not (scn / "sparseconvnet").is_dir():
    raise SystemExit(f"--reference_scn={scn}: no sparseconvnet/ folder (a SparseConvNet checkout)")
  if not (gigassl / "gigassl" / "networks.py").is_file():
    raise SystemExit(
      f"--reference_gigassl={gigassl}: no gigassl/networks.py (a trislaz/gigassl checkout)"
    )
  sys.path[:0] = [str(scn), str(gigassl / "gigassl")]
  try:
    import sparseconvnet  # noqa: F401  pylint: disable=g-import-not-at-top,import-outside-toplevel
  except ImportError as e:
    raise SystemExit(
      f"--reference_scn={scn}: sparseconvnet does not import ({e}); build it in place with "
      "`python setup.py build_ext --inplace`"
    ) from None
  resnet_module = _torchvision_resnet()
  import networks  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  import simclr  # pylint: disable=g-import-not-at-top,import-outside-toplevel

  def random_resnet(arch, pretrained):  # offline: no ImageNet download
    del pretrained
    model = getattr(resnet_module, arch.lower())()
    n = model.fc.in_features
    model.fc = __import__("torch").nn.Sequential()
    return model, n

  networks.get_resnet_model = random_resnet
  return networks, simclr


def _torchvision_resnet():
  """torchvision.models.resnet, or an architecture-only stand-in where it does not load.

  The reference imports torchvision only for ResNet18's module layout (its
  weights are random here anyway). torchvision's PyPI wheels are CUDA builds
  whose compiled ops fail to register against a CPU-only torch; then a
  stand-in with torchvision's module names and child order takes its place.
  """
  try:
    import torchvision.models.resnet as resnet  # pylint: disable=g-import-not-at-top,import-outside-toplevel

    return resnet
  except (ImportError, RuntimeError):
    pass
  import torch  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  from torch import nn  # pylint: disable=g-import-not-at-top,import-outside-toplevel

  class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout)
      self.relu = nn.ReLU(inplace=True)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout)
      self.downsample = None
      if stride != 1 or cin != cout:
        self.downsample = nn.Sequential(
          nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
        )

  class Bottleneck(nn.Module):  # only for the reference's isinstance checks
    pass

  class ResNet(nn.Module):
    def __init__(self):
      super().__init__()
      self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
      self.bn1 = nn.BatchNorm2d(64)
      self.relu = nn.ReLU(inplace=True)
      self.maxpool = nn.MaxPool2d(3, 2, 1)
      cin = 64
      for i, (cout, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2))):
        setattr(
          self,
          f"layer{i + 1}",
          nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)),
        )
        cin = cout
      self.avgpool = nn.AdaptiveAvgPool2d(1)
      self.fc = nn.Linear(512, 1000)

  resnet = types.ModuleType("torchvision.models.resnet")
  resnet.__all__ = ["ResNet", "resnet18"]
  resnet.BasicBlock, resnet.Bottleneck, resnet.ResNet = BasicBlock, Bottleneck, ResNet
  resnet.resnet18 = lambda *a, **k: ResNet()
  models = types.ModuleType("torchvision.models")
  models.resnet = resnet
  # simclr.py builds a ResNet50 as a default argument of a class it never uses here.
  models.resnet50 = lambda *a, **k: nn.Module()
  package = types.ModuleType("torchvision")
  package.models = models
  sys.modules.update(
    {"torchvision": package, "torchvision.models": models, "torchvision.models.resnet": resnet}
  )
  del torch
  return resnet


def _inputs(batch: dict, view: int, torch):
  """The reference's model input for one view: {'x': [B, T, F], 'loc': B tensors [T, 2]}."""
  feats = torch.from_numpy(batch["feats"][:, view].astype(np.float32))
  locs = [torch.from_numpy(batch["xy"][s, view].astype(np.float32)) for s in range(len(feats))]
  return {"x": feats, "loc": locs}


def make_step(scn, gigassl, batch: dict, part: str, seed: int = 0):
  """A warmed-up callable running one reference step (part='step') or block fwd+bwd."""
  networks, simclr = _import_reference(pathlib.Path(scn), pathlib.Path(gigassl))
  import torch  # pylint: disable=g-import-not-at-top,import-outside-toplevel

  torch.manual_seed(seed)
  args = types.SimpleNamespace(
    model_path="", downmap=224, num_class=512, freeze_pooling=0, temperature_xent=0.05
  )
  model = simclr.SimCLRMIL(networks.FullSparseConvMIL, args)
  model.train()
  x1, x2 = _inputs(batch, 0, torch), _inputs(batch, 1, torch)
  if part == "step":
    opt = torch.optim.Adam(model.parameters(), lr=0.03 * len(batch["feats"]) / 256)

    def run():
      opt.zero_grad(set_to_none=True)
      out = model(x1, x2)
      out["loss"].backward()
      opt.step()
      return float(out["loss"].detach())
  elif part == "block":
    mil = model.backbone.net.mil_model  # SparseConvMIL: sparse_pooling + global average

    def run():
      model.zero_grad(set_to_none=True)
      x = x1["x"].clone().requires_grad_(False)
      y = mil(x, x1["loc"])
      y.sum().backward()
      return float(y.detach().sum())
  else:
    raise ValueError(f"part must be step or block, got {part!r}")
  run()
  return run


def run_child(scn, gigassl, batch: dict, part: str, threads: int, repeats: int) -> dict:
  """Times the reference in a child process (as the torch arm: XLA's spinning threads)."""
  import tempfile  # pylint: disable=g-import-not-at-top,import-outside-toplevel

  with tempfile.TemporaryDirectory() as d:
    path = pathlib.Path(d) / "batch.npz"
    np.savez(path, feats=batch["feats"], xy=batch["xy"])
    cmd = [
      sys.executable,
      "-m",
      "gigassl_jax.kernels.sparse_conv.reference_arm",
      f"--scn={scn}",
      f"--gigassl={gigassl}",
      f"--part={part}",
      f"--batch_npz={path}",
      f"--threads={threads}",
      f"--repeats={repeats}",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
  if r.returncode != 0:
    raise SystemExit(f"reference arm failed:\n{r.stderr.strip()[-2000:]}")
  return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--scn", required=True, help="SparseConvNet checkout, built in place")
  p.add_argument("--gigassl", required=True, help="trislaz/gigassl checkout")
  p.add_argument("--part", choices=("step", "block"), default="step")
  p.add_argument("--batch_npz", required=True, help="feats [B, 2, T, F], xy [B, 2, T, 2] level-0")
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--repeats", type=int, default=5)
  a = p.parse_args(argv)
  import torch  # pylint: disable=g-import-not-at-top,import-outside-toplevel

  torch.set_num_threads(a.threads)
  with np.load(a.batch_npz) as z:
    batch = dict(z)
  fn = make_step(a.scn, a.gigassl, batch, a.part)
  times = []
  for _ in range(a.repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  print(
    json.dumps(
      {
        "seconds": times,
        "part": a.part,
        "threads": a.threads,
        "scn_commit": _commit(pathlib.Path(a.scn)),
        "gigassl_commit": _commit(pathlib.Path(a.gigassl)),
      }
    )
  )


if __name__ == "__main__":
  main()
