"""Tiny problems for the optim tests: a dense quadratic and a 2-layer MLP."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from saft_jax import optim

# Small, fast settings for every exported transform (periods 2 so that both
# kinds of step occur within a few steps). key args are static in inject tests.
KWARGS = {
    "sam": {},
    "asam": {},
    "friendly_sam": {},
    "gsam": {},
    "sagm": {},
    "pgn": {},
    "ssam_f": {"update_freq": 2},
    "ssam_d": {"update_freq": 2},
    "rwp": {"key": 3},
    "swa": {},
    "wa_sam": {},
    "looksam": {"k": 2},
    "msam": {},
    "sam_every_k": {"k": 2},
}
STATIC = {
    "ssam_f": ("update_freq", "sparsity", "key"),
    "ssam_d": ("update_freq", "sparsity", "drop_rate", "key"),
    "rwp": ("key",),
    "swa": ("period",),
    "wa_sam": ("period",),
    "looksam": ("k",),
    "sam_every_k": ("k",),
}


def make(name, base=None, **kw):
  base = optax.sgd(0.1) if base is None else base
  return optim.TRANSFORMS[name](base, **{**KWARGS[name], **kw})


def mlp_params(dtype=jnp.float32, seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  p = {
      "dense1": {"kernel": jax.random.normal(k[0], (4, 8)) * 0.5,
                 "bias": jnp.full((8,), 0.1)},
      "ln": {"scale": jnp.ones((8,)) * 1.1},
      "dense2": {"kernel": jax.random.normal(k[1], (8, 3)) * 0.5,
                 "bias": jnp.zeros((3,)) + 0.05},
  }
  return jax.tree.map(lambda x: x.astype(dtype), p)


def mlp_batch(n=16, seed=1):
  kx, ky = jax.random.split(jax.random.key(seed))
  return {"x": jax.random.normal(kx, (n, 4)), "y": jax.random.normal(ky, (n, 3))}


def mlp_loss(params, batch):
  dt = params["dense1"]["kernel"].dtype
  x = batch["x"].astype(dt)
  h = jnp.tanh(x @ params["dense1"]["kernel"] + params["dense1"]["bias"])
  h = h * params["ln"]["scale"]
  out = h @ params["dense2"]["kernel"] + params["dense2"]["bias"]
  return jnp.mean(jnp.square(out.astype(jnp.float32) - batch["y"]))


# ---------------------------------------------------------------- dense quadratic

QUAD_SHAPES = {"dense": {"kernel": (3, 2), "bias": (2,)}, "ln": {"scale": (2,)}}


def quad_problem(seed=0):
  """Returns params (f32 pytree), A (SPD, float64), b (float64)."""
  rng = np.random.default_rng(seed)
  n = sum(int(np.prod(s)) for s in jax.tree.leaves(
      QUAD_SHAPES, is_leaf=lambda x: isinstance(x, tuple)))
  m = rng.normal(size=(n, n))
  a = m @ m.T / n + np.eye(n)
  b = rng.normal(size=n)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32),
                        QUAD_SHAPES, is_leaf=lambda x: isinstance(x, tuple))
  return params, a, b


def flat(tree):
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def unflat(vec, like):
  leaves, treedef = jax.tree.flatten(like)
  out, i = [], 0
  for x in leaves:
    out.append(np.asarray(vec[i:i + x.size]).reshape(x.shape))
    i += x.size
  return jax.tree.unflatten(treedef, out)


def quad_grad_fn(a, b):
  """JAX grad_fn of 0.5 x'Ax + b'x (float32)."""
  a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)

  def loss(p):
    x = jnp.concatenate([jnp.ravel(v) for v in jax.tree.leaves(p)])
    return 0.5 * x @ (a32 @ x) + b32 @ x

  return jax.grad(loss)


def np_grad(a, b, x):
  return a @ x + b


def optim_leaf(path):
  """Name of the last key of a key path."""
  k = path[-1]
  return str(getattr(k, "key", getattr(k, "name", k)))
