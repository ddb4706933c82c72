"""Test setup: 8 CPU devices, so data-parallel code runs as on an 8-device host.

XLA_FLAGS must be set before jax is imported anywhere, hence at conftest import.
"""

import os
import pathlib

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture
def fixtures_dir():
  return FIXTURES
