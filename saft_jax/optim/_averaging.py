"""Weight averaging of the iterates: SWA and WA-SAM, plus state accessors."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from saft_jax.optim import _base
from saft_jax.optim._cheap import MSAMState
from saft_jax.optim._sam import sam

F32 = _base.F32


class AveragingState(NamedTuple):
  """State of an iterate-averaging wrapper.

  Attributes:
    count: int32 number of ``update`` calls.
    n_averaged: int32 number of iterates in ``averaged``.
    averaged: running mean of the post-update params (see ``averaged_params``).
    inner_state: state of the wrapped transformation.
  """

  count: jax.Array
  n_averaged: jax.Array
  averaged: Any
  inner_state: optax.OptState


def weight_averaging(
    inner: optax.GradientTransformation,
    start_step: int = 0,
    period: int = 1,
    *,
    accumulator_dtype: Any = None,
    axis_name: str | None = None,
    who: str = "weight_averaging",
) -> optax.GradientTransformationExtraArgs:
  """Averages the iterates produced by ``inner`` (updates pass through).

  After ``update`` number ``t`` (0-based) the new params ``θ_{t+1} = θ_t + u_t``
  join the running mean when ``t >= start_step`` and
  ``(t − start_step) % period == 0``. Before the first average the state holds
  the initial params. ``axis_name``: inside ``jax.shard_map``, ``pmean`` the
  incoming gradient before ``inner`` (leave None when ``inner`` already does).
  """
  _base.check_positive(f"{who}: start_step", start_step, allow_zero=True)
  period = _base.check_period(f"{who}: period", period)
  inner = optax.with_extra_args_support(inner)

  def dtype_of(p):
    return p.dtype if accumulator_dtype is None else jnp.dtype(accumulator_dtype)

  def init_fn(params):
    # a copy, never an alias of params (params are often donated)
    avg = jax.tree.map(lambda p: jnp.array(p, dtype=dtype_of(p), copy=True), params)
    return AveragingState(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32), avg,
                          inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    _base.require_params(params, who)
    updates = _base.pmean(updates, axis_name)
    new_updates, inner_state = inner.update(updates, state.inner_state, params,
                                            **extra_args)
    t = state.count
    due = jnp.logical_and(t >= start_step, (t - start_step) % period == 0)
    w = 1.0 / (state.n_averaged.astype(F32) + 1.0)
    w = jnp.where(due, w, 0.0)
    avg = jax.tree.map(
        lambda a, p, u: (a.astype(F32) + w * ((p.astype(F32) + u.astype(F32))
                                              - a.astype(F32))).astype(a.dtype),
        state.averaged, params, new_updates)
    n = state.n_averaged + due.astype(jnp.int32)
    return new_updates, AveragingState(_base.count_inc(t), n, avg, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def swa(
    base_optimizer: optax.GradientTransformation,
    start_step: int = 0,
    period: int = 1,
    *,
    accumulator_dtype: Any = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Stochastic weight averaging: the base optimizer plus an iterate average.

  Updates are those of ``base_optimizer`` (``grad_fn`` is accepted and
  ignored); ``averaged_params(state)`` returns the equal-weight mean of the
  iterates ``θ_{t+1}`` with ``t >= start_step`` and ``(t − start_step) %
  period == 0``. The running mean is kept in each param's dtype unless
  ``accumulator_dtype`` (e.g. ``jnp.float32``) is given. ``axis_name``: set
  inside ``jax.shard_map`` to ``pmean`` the gradient over the data axis.

  References:
    Izmailov et al., Averaging Weights Leads to Wider Optima and Better
    Generalization, UAI 2018. https://arxiv.org/abs/1803.05407
  """
  _base.check_base_optimizer(base_optimizer, "swa")
  return weight_averaging(base_optimizer, start_step, period,
                          accumulator_dtype=accumulator_dtype, axis_name=axis_name,
                          who="swa")


def wa_sam(
    base_optimizer: optax.GradientTransformation,
    rho: float = 0.05,
    start_step: int = 0,
    period: int = 1,
    *,
    accumulator_dtype: Any = None,
    eps: float = _base.DEFAULT_EPS,
    mask: Any = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Weight-averaged SAM (WA-SAM / WASAM): SAM steps, SWA of the iterates.

  The updates are exactly those of ``sam(base_optimizer, rho)``;
  ``averaged_params(state)`` returns the average of the SAM iterates
  (schedule as in ``swa``).

  References:
    Kaddour, Liu, Silva and Kusner, When Do Flat Minima Optimizers Work?,
    NeurIPS 2022. https://arxiv.org/abs/2202.00661
  """
  inner = sam(base_optimizer, rho, eps=eps, mask=mask, axis_name=axis_name)
  return weight_averaging(inner, start_step, period,
                          accumulator_dtype=accumulator_dtype, who="wa_sam")


def _find(state: Any, cls: type) -> list:
  found = []

  def visit(x):
    if isinstance(x, cls):
      found.append(x)
      return
    if isinstance(x, (tuple, list)):
      for y in x:
        visit(y)
    elif isinstance(x, dict):
      for y in x.values():
        visit(y)

  visit(state)
  return found


def averaged_params(state: Any) -> Any:
  """The averaged params of the (single) SWA / WA-SAM state inside ``state``.

  ``state`` may be the transform's own state or any optax state containing
  it (chain, MultiSteps, inject_hyperparams, masked). Under ``optax.masked``
  the result has ``optax.MaskedNode`` in place of the leaves not averaged.
  """
  found = _find(state, AveragingState)
  if len(found) != 1:
    raise ValueError(
        f"averaged_params: expected exactly one swa/wa_sam state in the optimizer "
        f"state, found {len(found)}.")
  return found[0].averaged


def unperturbed_params(params: Any, state: Any) -> Any:
  """Removes MSAM's standing perturbation: returns ``θ = θ̃ − ε``.

  ``state`` is (or contains) exactly one ``MSAMState``.
  """
  found = _find(state, MSAMState)
  if len(found) != 1:
    raise ValueError(
        f"unperturbed_params: expected exactly one msam state, found {len(found)}.")
  st = found[0]
  return jax.tree.map(lambda p, m: (p.astype(F32) + st.scale * m).astype(p.dtype),
                      params, st.momentum)
