"""Makes ``optim_testlib`` (tiny problems shared by the optim tests) importable."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="package")
def _fast_compiles():
  """These tests compile many tiny programs: skip most XLA optimization passes
  while they run (numerics are unaffected at the tolerances used), restore after."""
  old = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)
