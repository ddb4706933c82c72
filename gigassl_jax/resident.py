"""The bank resident on the devices: views gathered inside the jitted training step.

When the bank fits (`decide`), training loads it once onto the devices,
sharded over the `data` mesh by slide (host RAM on CPU). Each step the host
only draws the indices of the views (sampling.draws: a few integers per
slide, the same draws as the streaming path) and the step gathers the tile
embeddings and positions on the devices (`gather_views`). Reading records on
the host, the streaming path's cost, is gone from the loop.

Same seed, same views on both paths: the indices are the streaming path's,
and the gathered rows are copies of the same float16 values, so a resident
run and a streaming run of the same flags are the same computation
(tests/test_resident.py compares their parameters bitwise).

How "fits" is decided (docs/scale.md): the bytes of this process's shard of
the bank (its devices' slides, float16 embeddings + int32 positions) must be
at most `fraction` of its devices' memory: the allocator's limit
(`memory_stats()["bytes_limit"]`) on a GPU or TPU, the available host RAM
(MemAvailable) on CPU. The rest is for the model, the activations and XLA.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from gigassl_jax import sampling

MODES = ("auto", "device", "stream")


@dataclasses.dataclass(frozen=True)
class Decision:
  """Whether training keeps the bank on the devices, and why (one line for the log)."""

  resident: bool
  shard_bytes: int  # this process's share of the bank, padded
  budget_bytes: int | None  # fraction x memory of this process's devices (None: unknown)
  reason: str


def slide_bytes(reader) -> int:
  """Bytes of one slide on the devices: float16 [K, N, F] + int32 [K, N, 2]."""
  return reader.n_aug * reader.n_tiles * (2 * reader.feature_dim + 4 * 2)


def padded_slides(n_slides: int, n_devices: int) -> int:
  """Slides rounded up to a multiple of the devices (equal shards; padding is never drawn)."""
  return math.ceil(n_slides / n_devices) * n_devices


def host_available_bytes() -> int | None:
  """MemAvailable of /proc/meminfo (None where there is none)."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return None


def devices_memory_bytes(devices) -> int | None:
  """Memory the process's `devices` offer the bank: the allocators' limits, or host RAM on CPU."""
  if all(d.platform == "cpu" for d in devices):
    return host_available_bytes()  # CPU devices share the host's memory
  total = 0
  for d in devices:
    stats = d.memory_stats() if hasattr(d, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
      return None
    total += int(stats["bytes_limit"])
  return total


def decide(reader, mesh, mode: str, fraction: float) -> Decision:
  """Resident or streaming, for --data_resident=`mode` (auto, device, stream)."""
  if mode not in MODES:
    raise ValueError(f"--data_resident must be one of {MODES}, got {mode!r}")
  n_dev = mesh.devices.size
  local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  per_device = padded_slides(len(reader), n_dev) // n_dev
  shard = per_device * len(local) * slide_bytes(reader)
  memory = devices_memory_bytes(local)
  budget = None if memory is None else int(fraction * memory)
  gib = 2**30
  have = "unknown memory" if budget is None else f"{budget / gib:.1f} GiB = {fraction:g} x memory"
  size = f"bank shard {shard / gib:.2f} GiB on {len(local)} device(s), {have}"
  if mode == "device":
    return Decision(True, shard, budget, f"on the devices (--data_resident=device; {size})")
  if mode == "stream":
    return Decision(
      False, shard, budget, f"streamed from the host (--data_resident=stream; {size})"
    )
  fits = budget is not None and shard <= budget
  if jax.process_count() > 1:  # every process must take the same path
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    fits = bool(np.all(multihost_utils.process_allgather(np.array(fits))))
    size += " (all processes must fit)"
  if fits:
    return Decision(True, shard, budget, f"on the devices (it fits: {size})")
  return Decision(False, shard, budget, f"streamed from the host (it does not fit: {size})")


def load(reader, mesh, axis: str, progress: bool = False, chunk: int = 64) -> dict:
  """The whole bank as global arrays sharded over `axis` by slide.

  Each process reads only the slides of its own devices, `chunk` slides at a
  time, each chunk written in place into its device's buffer: the host holds
  one chunk, never the bank.

  Returns:
    {"feats": float16 [S', K, N, F], "xy": int32 [S', K, N, 2]}, S' = the
    slides padded to a multiple of the devices (padding rows are zeros and
    never drawn).
  """
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel

  n = padded_slides(len(reader), mesh.devices.size)
  k, t, f = reader.n_aug, reader.n_tiles, reader.feature_dim
  sharding = NamedSharding(mesh, P(axis))
  blocks = sharding.addressable_devices_indices_map((n,))
  bar = None
  if progress:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel

    total = sum(len(range(*i[0].indices(n))) for i in blocks.values())
    bar = tqdm(total=total, desc="bank -> devices", unit="slide", dynamic_ncols=True)
  put = jax.jit(
    lambda buf, x, i: jax.lax.dynamic_update_slice_in_dim(buf, x, i, 0), donate_argnums=0
  )
  shards = {"feats": [], "xy": []}
  for device, index in blocks.items():
    rows = range(*index[0].indices(n))
    bufs = {
      "feats": jnp.zeros((len(rows), k, t, f), jnp.float16, device=device),
      "xy": jnp.zeros((len(rows), k, t, 2), jnp.int32, device=device),
    }
    for c0 in range(0, len(rows), chunk):
      part = list(rows[c0 : c0 + chunk])
      feats = np.zeros((len(part), k, t, f), np.float16)
      xy = np.zeros((len(part), k, t, 2), np.int32)
      for j, s_ in enumerate(part):
        if s_ < len(reader):
          for a in range(k):
            feats[j, a], xy[j, a] = reader.get(s_, a)
      for name, x in (("feats", feats), ("xy", xy)):
        bufs[name] = put(bufs[name], jax.device_put(x, device), c0)
      if bar is not None:
        bar.update(len(part))
    for name in shards:
      shards[name].append(bufs[name])
  if bar is not None:
    bar.close()
  return {
    "feats": jax.make_array_from_single_device_arrays((n, k, t, f), sharding, shards["feats"]),
    "xy": jax.make_array_from_single_device_arrays((n, k, t, 2), sharding, shards["xy"]),
  }


def step_indices(sampler, step: int) -> dict:
  """The draws of every slide of `step`'s GLOBAL batch (the same on every process).

  Returns:
    slide int32 [B], aug int32 [B, 2], tiles int32 [B, 2, T], position int32 [B].
  """
  slides = sampler.slides(step)
  b = len(slides)
  aug = np.empty((b, 2), np.int32)
  tiles = np.empty((b, 2, sampler.tiles), np.int32)
  for p in range(b):
    aug[p], tiles[p] = sampling.draws(
      sampler.seed, step, p, sampler.reader.n_aug, sampler.reader.n_tiles, sampler.tiles
    )
  return {
    "slide": slides.astype(np.int32),
    "aug": aug,
    "tiles": tiles,
    "position": np.arange(b, dtype=np.int32),
  }


def gather_views(bank: dict, idx: dict, axis: str) -> dict:
  """This device's share of the batch, gathered from the sharded bank (inside shard_map).

  Every device gathers the rows of the global batch that its bank shard holds
  (zeros for the others); a psum over `axis` completes the batch on every
  device (exact: every element is one value plus zeros) and each keeps its
  own slides.

  Args:
    bank: this device's shard, feats float16 [S/D, K, N, F], xy int32 [S/D, K, N, 2].
    idx: step_indices of the global batch (replicated).
    axis: the data mesh axis.

  Returns:
    feats float16 [B/D, 2, T, F], xy int32 [B/D, 2, T, 2], position int32 [B/D]:
    what the streaming path's batch holds on this device.
  """
  n_local = bank["feats"].shape[0]
  d = jax.lax.axis_index(axis)
  local = idx["slide"] - d * n_local
  own = (local >= 0) & (local < n_local)
  s = jnp.where(own, local, 0)[:, None, None]
  a = idx["aug"][:, :, None]
  t = idx["tiles"]
  mask = own[:, None, None, None]
  feats = jnp.where(mask, bank["feats"][s, a, t], jnp.zeros((), bank["feats"].dtype))
  xy = jnp.where(mask, bank["xy"][s, a, t], 0)
  # An all-reduce, then this device's slice: a reduce-scatter (psum_scatter)
  # would move less, but stalls ~30 s per step across processes on gloo
  # (docs/scale.md, "Several processes").
  b_local = feats.shape[0] // jax.lax.axis_size(axis)
  mine = lambda x: jax.lax.dynamic_slice_in_dim(x, d * b_local, b_local)  # noqa: E731
  feats = mine(jax.lax.psum(feats, axis))
  xy = mine(jax.lax.psum(xy, axis))
  return {"feats": feats, "xy": xy, "position": mine(idx["position"])}
