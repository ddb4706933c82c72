"""Sparse-convolution kernels behind one API (see api.py)."""

from gigassl_jax.kernels.sparse_conv.api import IMPLEMENTATIONS, resolve, sparse_conv

__all__ = ["IMPLEMENTATIONS", "resolve", "sparse_conv"]
