"""Warm-up + cosine schedule (closed form) and the clip + AdamW chain (NumPy reference)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from saft_jax import train


def _closed_form(t, peak, total, warm, offset):
  if t < warm:
    return peak * (t + offset) / warm
  if t > total:
    return 0.0
  return peak * 0.5 * (1 + math.cos(math.pi * (t - warm) / (total - warm)))


@pytest.mark.parametrize("offset", [0, 1])
def test_warmup_cosine_closed_form(offset):
  peak, total, warm = 1e-5, 8000, 500
  sched = train.warmup_cosine_schedule(peak, total, warm, warmup_offset=offset)
  ts = [0, 1, 250, 499, 500, 501, 2000, 4250, 7999, 8000, 9000]
  got = np.asarray([sched(jnp.asarray(t, jnp.int32)) for t in ts])
  want = np.asarray([_closed_form(t, peak, total, warm, offset) for t in ts])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)
  assert float(sched(warm)) == pytest.approx(peak, rel=1e-6)
  assert float(sched(total)) == pytest.approx(0.0, abs=1e-12)
  assert float(sched(4250)) == pytest.approx(peak / 2, rel=1e-5)  # cosine midpoint


def test_offset0_matches_optax():
  ours = train.warmup_cosine_schedule(3e-4, 1000, 100, warmup_offset=0)
  ref = optax.warmup_cosine_decay_schedule(0.0, 3e-4, 100, 1000, 0.0)
  for t in [0, 5, 99, 100, 101, 555, 999, 1000]:
    np.testing.assert_allclose(float(ours(t)), float(ref(t)), rtol=1e-5, atol=1e-12)


def test_schedule_rejects_bad_arguments():
  with pytest.raises(ValueError, match="warmup_steps"):
    train.warmup_cosine_schedule(1e-5, 100, 100)


def test_base_optimizer_matches_numpy_clip_adamw():
  """clip_by_global_norm(1) then PyTorch-style AdamW with the schedule, in NumPy."""
  lr, total, warm, wd, b1, b2, eps = 1e-2, 6, 2, 0.1, 0.9, 0.999, 1e-8
  tx = train.make_base_optimizer(lr, total, warm, wd, clip_norm=1.0)
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  rng = np.random.default_rng(0)
  p = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(4,)).astype(np.float32)}
  params = jax.tree.map(jnp.asarray, p)
  state = tx.init(params)
  ref = {k: v.astype(np.float64) for k, v in p.items()}
  m = {k: np.zeros_like(v) for k, v in ref.items()}
  v2 = {k: np.zeros_like(v) for k, v in ref.items()}
  for t in range(4):
    g = {k: (rng.normal(size=v.shape) * (5.0 if t % 2 == 0 else 0.01)).astype(np.float32)
         for k, v in p.items()}
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam bias correction needs it
      updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, params, grad_fn=None)
    params = optax.apply_updates(params, updates)
    # NumPy reference.
    norm = math.sqrt(sum(float(np.sum(x.astype(np.float64) ** 2)) for x in g.values()))
    scale = min(1.0, 1.0 / norm)
    lr_t = _closed_form(t, lr, total, warm, 1)
    for k in ref:
      gk = g[k].astype(np.float64) * scale
      m[k] = b1 * m[k] + (1 - b1) * gk
      v2[k] = b2 * v2[k] + (1 - b2) * gk ** 2
      mhat, vhat = m[k] / (1 - b1 ** (t + 1)), v2[k] / (1 - b2 ** (t + 1))
      ref[k] = ref[k] - lr_t * wd * ref[k] - lr_t * mhat / (np.sqrt(vhat) + eps)
    for k in ref:
      np.testing.assert_allclose(np.asarray(params[k]), ref[k], rtol=1e-5, atol=1e-7)
