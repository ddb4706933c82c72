"""The import rules of docs/architecture.md, enforced by parsing every module's imports.

Every module of the package (gigassl_jax/**, and kernels/** installed as
gigassl_jax.kernels) is classified by name into a layer; a module may import
only from its own layer or the layers below, with these refinements:
  - kernels import nothing of the package outside gigassl_jax.kernels, and no
    third-party library but jax and numpy (the torch/spconv peer is exempt);
  - a program does not import another program (shared code goes down a layer);
    the parts of one program (embed_*.py, embed/) import each other freely;
  - tools (layer 5) may import anything; nothing imports a tool.
A module missing from the table fails the test: add it to LAYERS (and to the
table in docs/architecture.md) when you create it.
"""

from __future__ import annotations

import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

KERNELS, SPARSE, MODEL, STATE, SUPPORT, PROGRAM, TOOL = 0, 1, 2, 3, 3.5, 4, 5
NAMES = {
  KERNELS: "0 kernels",
  SPARSE: "1 sparse",
  MODEL: "2 model",
  STATE: "3 state/IO",
  SUPPORT: "3.5 program support",
  PROGRAM: "4 programs",
  TOOL: "5 tools",
}

# Module (dotted, under gigassl_jax) -> layer. A trailing ".*" covers a package
# and everything in it; a trailing "_*" every module named with that prefix.
# Names that do not exist yet are the ones issue 12 introduces (views,
# checkpoint, reps, embed_* / embed/, import_features); `data` is views' old name.
LAYERS = {
  "kernels.sparse_conv.bench": TOOL,  # benchmark entry point: imports the model
  "kernels.sparse_conv.reference_arm": TOOL,  # benchmark arm: runs the original torch code
  "kernels.*": KERNELS,
  "kernels": KERNELS,
  "sparse.*": SPARSE,
  "sparse": SPARSE,
  "models": MODEL,
  "losses": MODEL,
  "retrieval": MODEL,
  "bank": STATE,
  "views": STATE,
  "data": STATE,
  "sampling": STATE,
  "resident": STATE,
  "checkpoint": STATE,
  "reps": STATE,
  "synthetic": STATE,
  "splits": STATE,
  "slides": STATE,
  "augment": STATE,
  "pth": STATE,
  "pca": STATE,
  "released": STATE,
  "machine": STATE,
  "config": STATE,  # the run's settings: checkpoint and the programs read them
  "cli": STATE,  # flags generated from config dataclasses
  "encoders": SUPPORT,
  "encoder_peer": SUPPORT,
  "embed": PROGRAM,
  "embed.*": PROGRAM,
  "embed_*": PROGRAM,
  "train": PROGRAM,
  "encode": PROGRAM,
  "evaluate": PROGRAM,
  "import_features": PROGRAM,
  "conformance": TOOL,
  "demo": TOOL,
  "cohort": TOOL,
  "": TOOL,  # gigassl_jax/__init__.py
}

# Third-party roots a kernel may import (besides the standard library).
KERNEL_LIBS = {"jax", "jaxlib", "numpy"}
# Modules allowed to import torch / spconv: peers used by tests and benchmarks only.
PEERS = {
  "kernels.sparse_conv.peer",
  "kernels.sparse_conv.bench",
  "kernels.sparse_conv.reference_arm",
  "encoder_peer",
}


def layer_of(name: str):
  """Layer of a module name under gigassl_jax, or None when the table lacks it."""
  if name in LAYERS:
    return LAYERS[name]
  best = None
  for pattern, layer in LAYERS.items():
    if pattern.endswith(".*") and (name + ".").startswith(pattern[:-1]):
      prefix = pattern[:-1]
    elif pattern.endswith("_*") and name.split(".")[0].startswith(pattern[:-1]):
      prefix = pattern[:-1]
    else:
      continue
    if best is None or len(prefix) > len(best[0]):
      best = (prefix, layer)
  return None if best is None else best[1]


def _program(name: str) -> str:
  """Which program a layer-4 module belongs to: embed_x and embed.x belong to embed."""
  return name.split(".")[0].split("_")[0] if name.startswith("embed") else name


def package_modules() -> dict[str, pathlib.Path]:
  """{dotted name under gigassl_jax: file} for the package and the kernels."""
  out = {}
  for base, prefix in ((ROOT / "gigassl_jax", ""), (ROOT / "kernels", "kernels.")):
    for path in sorted(base.rglob("*.py")):
      rel = path.relative_to(base)
      if base.name == "gigassl_jax" and rel.parts[0] == "kernels":
        continue  # the symlink to ../kernels, walked as kernels/
      parts = list(rel.with_suffix("").parts)
      if parts[-1] == "__init__":
        parts = parts[:-1]
      out[(prefix + ".".join(parts)).rstrip(".")] = path
  return out


def imports(name: str, path: pathlib.Path):
  """[(imported module, line)] of a module, relative imports resolved.

  `from gigassl_jax import a, b` yields gigassl_jax.a and gigassl_jax.b.
  """
  tree = ast.parse(path.read_text(), str(path))
  is_pkg = path.name == "__init__.py"
  pkg = ("gigassl_jax." + name).rstrip(".").split(".")
  if not is_pkg:
    pkg = pkg[:-1]
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [(a.name, node.lineno) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = ".".join(pkg[: len(pkg) - node.level + 1] + ([node.module] if node.module else []))
      else:
        base = node.module or ""
      out.append((base, node.lineno))
      if base in ("gigassl_jax", "gigassl_jax.sparse", "gigassl_jax.kernels.sparse_conv"):
        out += [(f"{base}.{a.name}", node.lineno) for a in node.names]
  return out


def _internal(module: str, known) -> str | None:
  """The package module an import names (its longest known prefix), or None if external."""
  if module != "gigassl_jax" and not module.startswith("gigassl_jax."):
    return None
  parts = module.split(".")[1:]
  while parts and ".".join(parts) not in known:
    parts.pop()
  return ".".join(parts)


MODULES = package_modules()


def test_the_walk_sees_the_package():
  """The premise of the rules below: the walk finds the layers' modules."""
  for name in ("kernels.sparse_conv.api", "kernels.sparse_conv.rulebook", "sparse.tables"):
    assert name in MODULES, sorted(MODULES)
  assert "models" in MODULES and "conformance" in MODULES, sorted(MODULES)


def test_every_module_is_in_the_layer_table():
  missing = [n for n in MODULES if layer_of(n) is None]
  assert not missing, (
    f"modules not in the layer table: {missing}; add each to LAYERS in "
    "tests/test_architecture.py and to the table in docs/architecture.md"
  )


def test_layer_table_classifies_future_names():
  """The names issue 12 introduces are classified before they exist."""
  assert layer_of("views") == STATE and layer_of("checkpoint") == STATE
  assert layer_of("reps") == STATE and layer_of("import_features") == PROGRAM
  assert layer_of("embed_slides") == PROGRAM and layer_of("embed.cli") == PROGRAM
  assert layer_of("kernels.sparse_conv.new_kernel") == KERNELS
  assert layer_of("kernels.sparse_conv.bench") == TOOL
  assert layer_of("brand_new_module") is None
  assert _program("embed_slides") == _program("embed.cli") == "embed" != _program("encode")


def downward_violations(modules: dict[str, pathlib.Path]) -> list[str]:
  """Imports of `modules` ({name: file}) that break the layer rules, one line each."""
  bad = []
  for name, path in modules.items():
    mine = layer_of(name)
    if mine is None or mine == TOOL:
      continue
    for module, line in imports(name, path):
      target = _internal(module, modules)
      if not target:  # external, or the (empty) package root of `from gigassl_jax import x`
        continue
      theirs = layer_of(target)
      shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
      where = f"{shown}:{line} ({NAMES[mine]}) imports gigassl_jax.{target}"
      if theirs is None:
        continue  # reported by test_every_module_is_in_the_layer_table
      if theirs > mine:
        bad.append(f"{where} ({NAMES[theirs]}): a layer above")
      elif mine == PROGRAM and theirs == PROGRAM and _program(name) != _program(target):
        bad.append(f"{where}: another program (move the shared code down a layer)")
  return bad


def test_imports_point_downward():
  bad = downward_violations(MODULES)
  assert not bad, "imports against the layer rules:\n" + "\n".join(bad)


def test_the_rules_catch_upward_and_sideways_imports(tmp_path):
  """The checker itself, on made-up modules: each kind of violation is reported."""
  files = {
    "sparse.maps": "from gigassl_jax import models\n",  # 1 -> 2: upward
    "models": "from gigassl_jax.sparse import maps\nimport gigassl_jax.kernels.sparse_conv.api\n",
    "kernels.sparse_conv.api": "import numpy\n",
    "encode": "from gigassl_jax import train, bank\n",  # program -> program
    "train": "from gigassl_jax import demo\n",  # program -> tool
    "embed_slides": "from gigassl_jax.embed_cli import x\n",  # parts of one program: fine
    "embed_cli": "from gigassl_jax import config\n",
    "bank": "",
    "config": "",
    "demo": "from gigassl_jax import train\n",  # tools may import anything
  }
  modules = {}
  for name, text in files.items():
    path = tmp_path / (name.replace(".", "_") + ".py")
    path.write_text(text)
    modules[name] = path
  bad = downward_violations(modules)
  assert len(bad) == 3, bad
  assert "sparse_maps.py:1 (1 sparse) imports gigassl_jax.models (2 model)" in bad[0], bad
  assert "imports gigassl_jax.train: another program" in bad[1], bad
  assert "imports gigassl_jax.demo (5 tools): a layer above" in bad[2], bad


def test_kernels_import_only_jax_numpy_and_the_standard_library():
  bad = []
  for name, path in MODULES.items():
    if layer_of(name) != KERNELS or name in PEERS:
      continue
    for module, line in imports(name, path):
      root = module.split(".")[0]
      target = _internal(module, MODULES)
      if target:
        if layer_of(target) != KERNELS:
          bad.append(f"{path.relative_to(ROOT)}:{line} imports {module} (outside the kernels)")
      elif (
        target is None and root not in KERNEL_LIBS and root not in sys.stdlib_module_names and root
      ):
        bad.append(f"{path.relative_to(ROOT)}:{line} imports {module} (not jax/numpy/stdlib)")
  assert not bad, "\n".join(bad)


def test_no_tensorflow_and_torch_only_in_peers():
  bad = []
  for name, path in MODULES.items():
    for module, line in imports(name, path):
      root = module.split(".")[0]
      if root == "tensorflow" or (root in ("torch", "spconv") and name not in PEERS):
        bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
  assert not bad, "\n".join(bad)
