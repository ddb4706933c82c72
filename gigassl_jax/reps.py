"""Slide-vector files (TEMPORARY in branch `programs`: re-exports evaluate's).

The helper that owns evaluate.py moves `Reps`, `save_reps` and `load_reps`
here; at merge their version of this file replaces this one.
"""

from gigassl_jax.evaluate import Reps, load_reps, save_reps  # noqa: F401
