"""Bad input gives a clear ValueError/TypeError naming the problem."""
import jax
import jax.numpy as jnp
import optax
import pytest

from saft_jax import optim
import optim_testlib as tl

WITH_RHO = sorted(n for n in optim.TRANSFORMS if n != "swa")
# transforms whose update evaluates grad_fn (msam never does, swa ignores it)
NEEDS_GRAD_FN = sorted(n for n in optim.TRANSFORMS if n not in ("msam", "swa"))


def _problem():
  params = tl.mlp_params()
  batch = tl.mlp_batch()
  return params, jax.grad(lambda p: tl.mlp_loss(p, batch))


@pytest.mark.parametrize("name", WITH_RHO)
@pytest.mark.parametrize("rho", [0.0, -0.1, float("nan")])
def test_rho_must_be_positive(name, rho):
  arg = "gamma" if name == "rwp" else "rho"  # rwp's radius is the noise scale
  with pytest.raises(ValueError, match=arg):
    tl.make(name, **{arg: rho})


def test_unknown_options():
  with pytest.raises(ValueError, match="variant"):
    optim.asam(optax.sgd(0.1), variant="released_v2")
  with pytest.raises(TypeError, match="rhoo"):
    optim.sam(optax.sgd(0.1), rhoo=0.1)  # pylint: disable=unexpected-keyword-arg
  with pytest.raises(TypeError, match="base_optimizer"):
    optim.sam(0.1)
  with pytest.raises(ValueError, match="k"):
    optim.looksam(optax.sgd(0.1), k=0)
  with pytest.raises(TypeError, match="k"):
    optim.sam_every_k(optax.sgd(0.1), k=1.5)
  with pytest.raises(ValueError, match="sparsity"):
    optim.ssam_f(optax.sgd(0.1), sparsity=1.0)
  with pytest.raises(ValueError, match="mix"):
    optim.rwp(optax.sgd(0.1), mix=1.5)
  with pytest.raises(TypeError, match="key"):
    optim.rwp(optax.sgd(0.1), key="seed")


@pytest.mark.parametrize("name", NEEDS_GRAD_FN)
def test_missing_grad_fn(name):
  params, gf = _problem()
  tx = tl.make(name)
  with pytest.raises(ValueError, match="grad_fn"):
    tx.update(gf(params), tx.init(params), params)


@pytest.mark.parametrize("name", NEEDS_GRAD_FN)
def test_grad_fn_with_wrong_structure(name):
  params, gf = _problem()
  tx = tl.make(name)
  bad = lambda p: {"dense1": gf(p)["dense1"]}  # noqa: E731
  with pytest.raises(ValueError, match="structure"):
    jax.jit(lambda p, s: tx.update(gf(p), s, p, grad_fn=bad))(params, tx.init(params))


def test_grad_fn_with_wrong_shape_names_leaf():
  params, gf = _problem()
  tx = optim.sam(optax.sgd(0.1))

  def bad(p):
    g = gf(p)
    g["ln"]["scale"] = jnp.zeros((3,))
    return g

  with pytest.raises(ValueError, match=r"\['ln'\]\['scale'\]"):
    tx.update(gf(params), tx.init(params), params, grad_fn=bad)


def test_grad_fn_not_callable_and_params_missing():
  params, gf = _problem()
  tx = optim.sam(optax.sgd(0.1))
  with pytest.raises(TypeError, match="callable"):
    tx.update(gf(params), tx.init(params), params, grad_fn=3)
  with pytest.raises(ValueError, match="params"):
    tx.update(gf(params), tx.init(params), None, grad_fn=gf)


def test_predicate_selecting_nothing():
  params, gf = _problem()
  tx = optim.asam(optax.sgd(0.1), weight_predicate=lambda path, leaf: False)
  with pytest.raises(ValueError, match="selects no leaf"):
    tx.init(params)
  with pytest.raises(TypeError, match="weight_predicate"):
    optim.asam(optax.sgd(0.1), weight_predicate="kernel")


def test_mask_selecting_nothing_or_wrong_structure():
  params, _ = _problem()
  nothing = jax.tree.map(lambda _: False, params)
  with pytest.raises(ValueError, match="mask selects no leaf"):
    optim.sam(optax.sgd(0.1), mask=nothing).init(params)
  with pytest.raises(ValueError, match="mask"):
    optim.sam(optax.sgd(0.1), mask={"dense1": True}).init(params)


def test_masked_wrapper_without_masked_grad_fn_explains():
  params, gf = _problem()
  mask = jax.tree.map(lambda _: True, params)
  mask["ln"]["scale"] = False
  tx = optax.masked(optim.sam(optax.sgd(0.1)), mask)

  def strict_grad_fn(p):  # a typical loss that indexes every leaf
    return gf({k: dict(v) for k, v in p.items()})

  with pytest.raises(TypeError, match="masked_grad_fn"):
    tx.update(gf(params), tx.init(params), params, grad_fn=strict_grad_fn)


def test_mask_argument_perturbs_only_trainable_leaves():
  """mask= keeps frozen leaves at their value in the grad_fn call."""
  params, gf = _problem()
  mask = jax.tree.map(lambda _: False, params)
  mask["dense2"]["kernel"] = True
  seen = []

  def rec(p):
    seen.append(p)
    return gf(p)

  tx = optim.sam(optax.sgd(0.1), rho=0.5, mask=mask)
  tx.update(gf(params), tx.init(params), params, grad_fn=rec)
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), seen[0], params)
  assert moved == mask
  g = gf(params)["dense2"]["kernel"]
  eps = seen[0]["dense2"]["kernel"] - params["dense2"]["kernel"]
  assert jnp.allclose(eps, 0.5 * g / jnp.linalg.norm(g), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", sorted(n for n in optim.TRANSFORMS
                                        if n not in ("swa", "rwp")))
def test_eps_guard_must_be_positive(name):
  with pytest.raises(ValueError, match="eps"):
    tl.make(name, eps=0.0)
