"""Loss builders with the ``loss_fn(trainable, frozen, batch) -> (loss, aux)`` signature.

- :func:`partitioned_loss` — SGD (everything trainable) and FTLO (a masked subset).
- :func:`linearized_loss` — FTTS: the model is its first-order Taylor expansion at θ0.
"""
from __future__ import annotations

from typing import Any, Callable

import jax

from saft_jax.train.partition import combine


def partitioned_loss(model_loss: Callable[[Any, Any], tuple[jax.Array, Any]]):
  """``loss_fn(trainable, frozen, batch) = model_loss(combine(trainable, frozen), batch)``."""
  def loss_fn(trainable, frozen, batch):
    return model_loss(combine(trainable, frozen), batch)
  return loss_fn


def linearized_consts(theta0: Any, consts: Any = None) -> dict:
  """The ``frozen`` argument of a :func:`linearized_loss` step: θ0 plus any constants."""
  return {"theta0": theta0, "consts": consts}


def linearized_loss(apply_fn: Callable[[Any, Any, Any], Any],
                    loss_on_outputs: Callable[[Any, Any, Any], tuple[jax.Array, Any]]):
  """FTTS loss on the linearized model; the trainable parameter is the offset dθ.

  ``f_lin(x; θ0 + dθ) = f(x; θ0) + J_θ f(x; θ0) · dθ``, computed with one ``jax.jvp``
  (primal θ0, tangent dθ). θ0 is read from the ``frozen`` argument (see
  :func:`linearized_consts`), so it is an argument of the compiled step, never a
  captured constant.

  Args:
    apply_fn: ``apply_fn(params, consts, batch) -> outputs`` (a pytree of float arrays);
      ``params`` has the structure of θ0 (and of dθ).
    loss_on_outputs: ``loss_on_outputs(outputs, consts, batch) -> (loss, aux)``.

  Returns:
    ``loss_fn(dtheta, frozen, batch) -> (loss, aux)`` with
    ``frozen = {"theta0": θ0, "consts": consts}``.

  References:
    Ortiz-Jiménez et al., "Task Arithmetic in the Tangent Space", NeurIPS 2023.
  """
  def loss_fn(dtheta, frozen, batch):
    if not isinstance(frozen, dict) or "theta0" not in frozen:
      raise TypeError("linearized_loss expects frozen = linearized_consts(theta0, consts)")
    theta0, consts = frozen["theta0"], frozen.get("consts")
    if jax.tree.structure(theta0) != jax.tree.structure(dtheta):
      raise ValueError("dθ and θ0 must have the same tree structure: "
                       f"{jax.tree.structure(dtheta)} vs {jax.tree.structure(theta0)}")
    out0, jvp_out = jax.jvp(lambda p: apply_fn(p, consts, batch), (theta0,), (dtheta,))
    outputs = jax.tree.map(lambda a, b: a + b, out0, jvp_out)
    return loss_on_outputs(outputs, consts, batch)
  return loss_fn
