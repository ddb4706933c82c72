"""Sparse-convolution kernels behind one API (see api.py); rulebook.py is their input type."""

from gigassl_jax.kernels.sparse_conv import api
from gigassl_jax.kernels.sparse_conv.api import *  # noqa: F403  the public API, listed in api.__all__

__all__ = api.__all__
