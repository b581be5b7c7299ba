"""SAM/ASAM on partitioned trees whose frozen leaves are None (saft_jax.train.partition)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from saft_jax import optim


def _loss(p):
  return jnp.sum(p["a"]["kernel"] ** 2) + jnp.sum(jnp.sin(p["b"]["bias"]))


@pytest.mark.parametrize("make", [lambda b: optim.sam(b, rho=0.05),
                                  lambda b: optim.asam(b, rho=0.5, eta=0.01)])
def test_none_leaves_are_skipped_and_result_matches_dense(make):
  part = {"a": {"kernel": jnp.full((2, 2), 0.5), "bias": None},
          "b": {"kernel": None, "bias": jnp.arange(2.0)}}
  dense = {"a": {"kernel": part["a"]["kernel"]}, "b": {"bias": part["b"]["bias"]}}
  outs = []
  for params in (part, dense):
    tx = make(optax.sgd(0.1))
    with jax.numpy_dtype_promotion("standard"):
      u, _ = tx.update(jax.grad(_loss)(params), tx.init(params), params,
                       grad_fn=jax.grad(_loss))
    outs.append(u)
  assert outs[0]["a"]["bias"] is None and outs[0]["b"]["kernel"] is None
  np.testing.assert_array_equal(outs[0]["a"]["kernel"], outs[1]["a"]["kernel"])
  np.testing.assert_array_equal(outs[0]["b"]["bias"], outs[1]["b"]["bias"])
