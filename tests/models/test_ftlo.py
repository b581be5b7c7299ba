"""FTLO mask: selects exactly the attention projection kernels; training leaves the rest."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from saft_jax import models as M

import hf_utils as H  # noqa: E402

CFG = M.VisionConfig(image_size=8, patch_size=4, width=16, layers=3, heads=2, output_dim=5,
                     in_channels=1)


def _paths(tree):
  return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_mask_selects_exactly_attention_kernels():
  p = jax.eval_shape(lambda: M.init_vision_params(CFG, jax.random.key(0)))
  sel = sorted(k for k, v in _paths(M.ftlo_mask(p)).items() if v)
  expected = sorted(f"['blocks_{i}']['attn']['{n}']['kernel']"
                    for i in range(CFG.layers) for n in ("q", "k", "v", "out"))
  assert sel == expected
  assert M.ftlo_predicate(("blocks_0", "attn", "qkv", "kernel"))
  assert not M.ftlo_predicate(("blocks_0", "attn", "q", "bias"))
  assert not M.ftlo_predicate(("blocks_0", "mlp", "proj", "kernel"))
  assert not M.ftlo_predicate(("proj", "kernel"))
  with pytest.raises(ValueError, match="no"):
    M.ftlo_mask({"w": jnp.ones(2)})


@pytest.mark.parametrize("method", ["adamw", "asam"])
def test_training_changes_only_masked_leaves(method):
  p0 = H.random_params(M.init_vision_params, CFG, seed=0)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 8, 8, 1)), jnp.float32)
  y = jnp.arange(4) % 5
  mask = M.ftlo_mask(p0)
  frozen = jax.tree.map(lambda m: not m, mask)
  # optax.masked passes unmasked updates through unchanged, so the frozen leaves get an
  # explicit set_to_zero.
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.masked(optax.adamw(1e-2, weight_decay=0.1), mask),
                   optax.masked(optax.set_to_zero(), frozen))
  if method == "asam":  # SAFT: ASAM around the masked AdamW, perturbing trainable leaves only
    optim = pytest.importorskip("saft_jax.optim")
    tx = optim.asam(tx, rho=0.5, eta=0.01, mask=mask)

  def loss(p):
    logits = M.encode_image(CFG, p, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(p, s):
    grad_fn = jax.grad(loss)
    g = grad_fn(p)
    if method == "asam":
      u, s = tx.update(g, s, p, grad_fn=grad_fn)
    else:
      u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  p, s = p0, tx.init(p0)
  # optax's Adam bias correction computes `float ** int32`, which strict promotion rejects.
  with jax.numpy_dtype_promotion("standard"):
    for _ in range(4):
      p, s = step(p, s)
  for (path, a), b, m in zip(jax.tree_util.tree_leaves_with_path(p0), jax.tree.leaves(p),
                             jax.tree.leaves(mask)):
    if m:
      assert not np.array_equal(a, b), jax.tree_util.keystr(path)
    else:
      assert np.array_equal(a, b), jax.tree_util.keystr(path)
