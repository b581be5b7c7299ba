"""Frozen linear heads fitted on θ0's features (the offline analogue of CLIP's
zero-shot heads): multinomial logistic regression on L2-normalized features."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from saft_jax.experiment.evaluate import head_logits


def fit_linear_head(features: jax.Array, labels: jax.Array, num_classes: int, *,
                    steps: int = 300, lr: float = 0.05, l2: float = 1e-4) -> jax.Array:
  """Fits ``W [D, C]`` so that ``normalize(features) @ W`` predicts ``labels``.

  Full-batch Adam on the mean cross-entropy plus ``l2 · ‖W‖²``; deterministic
  (zero init). The head is frozen afterwards, like CLIP's zero-shot heads.
  """
  if features.ndim != 2 or labels.shape != features.shape[:1]:
    raise ValueError(f"features [N, D] and labels [N] expected, got {features.shape}, "
                     f"{labels.shape}")
  tx = optax.adam(lr)

  def loss(w):
    logits = head_logits(features, w)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return ce + l2 * jnp.sum(w * w)

  @jax.jit
  def run(w):
    def body(carry, _):
      w, s = carry
      g = jax.grad(loss)(w)
      u, s = tx.update(g, s, w)
      return (optax.apply_updates(w, u), s), None
    (w, _), _ = jax.lax.scan(body, (w, tx.init(w)), None, length=steps)
    return w

  with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 counts and floats
    return run(jnp.zeros((features.shape[1], num_classes), jnp.float32))
