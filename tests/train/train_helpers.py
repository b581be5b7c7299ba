"""Tiny models and a tiny SAM for the training tests (plain JAX, no Flax)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

IN, HIDDEN, OUT = 6, 8, 4


def init_mlp(seed=0, sizes=(IN, HIDDEN, OUT)):
  rng = np.random.default_rng(seed)
  params = {}
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    params[f"dense{i}"] = {
        "kernel": jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=(b,)) * 0.1, jnp.float32),
    }
  return params


def mlp_apply(params, x):
  h = x.astype(params["dense0"]["kernel"].dtype)
  n = len(params)
  for i in range(n):
    h = h @ params[f"dense{i}"]["kernel"] + params[f"dense{i}"]["bias"]
    if i < n - 1:
      h = jnp.tanh(h)
  return h


def xent(logits, labels):
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))


def model_loss(params, batch):
  logits = mlp_apply(params, batch["x"])
  acc = jnp.mean((jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32))
  return xent(logits, batch["y"]), {"accuracy": acc}


def make_batch(n, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, IN)).astype(np.float32)
  y = (x[:, 0] > 0).astype(np.int32) + 2 * (x[:, 1] > 0).astype(np.int32)
  return {"x": x, "y": y}


def tiny_sam(base, rho=0.05):
  """SAM (Foret et al. 2021): eps = rho g/||g||, base update with grad_fn(params + eps)."""
  def init(params):
    return base.init(params)

  def update(grads, state, params, *, grad_fn, **extra):
    norm = optax.tree.norm(grads)
    eps = jax.tree.map(lambda g: rho * g / (norm + 1e-12), grads)
    g2 = grad_fn(jax.tree.map(jnp.add, params, eps))
    return base.update(g2, state, params)

  return optax.GradientTransformationExtraArgs(init, update)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (p, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(p))


def start_worker(nproc: int, pid: int, ndev: int, coordinator=None) -> None:
  """A multi-process test worker's set-up: ``ndev`` CPU devices, strict dtype promotion,
  and ``jax.distributed`` joined when ``nproc > 1`` (checked)."""
  from saft_jax import train
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", ndev)
  jax.config.update("jax_numpy_dtype_promotion", "strict")
  assert train.maybe_initialize_distributed(coordinator, nproc, pid,
                                            initialization_timeout=60) == (nproc > 1)
  assert jax.process_count() == nproc and len(jax.devices()) == nproc * ndev
