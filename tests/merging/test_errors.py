"""Bad input gives clear errors naming the offending leaf path."""
import jax
import jax.numpy as jnp
import pytest

from saft_jax import merging as m


def _tree(**over):
  t = {"enc": {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}, "head": jnp.ones((3,))}
  t["enc"].update(over)
  return t


def test_structure_mismatch_names_leaf():
  bad = {"enc": {"w": jnp.ones((2, 3))}, "head": jnp.ones((3,))}
  with pytest.raises(ValueError, match="enc/b"):
    m.task_arithmetic(_tree(), [bad], 1.0)
  with pytest.raises(ValueError, match="enc/b"):
    m.task_vector(_tree(), bad)


def test_shape_and_dtype_mismatch_name_leaf():
  with pytest.raises(ValueError, match=r"enc/w.*shape"):
    m.ties(_tree(), [_tree(), _tree(w=jnp.ones((3, 2)))], 1.0)
  with pytest.raises(ValueError, match=r"enc/b.*dtype"):
    m.task_arithmetic(_tree(), [_tree(b=jnp.zeros(3, jnp.bfloat16))], 1.0)
  with pytest.raises(ValueError, match=r"enc/w.*shape"):
    m.weight_average([_tree(), _tree(w=jnp.ones((2, 2)))])


@pytest.mark.parametrize("k", [0.0, -0.1, 1.5, float("nan")])
def test_k_outside_unit_interval(k):
  with pytest.raises(ValueError, match="k must be"):
    m.ties(_tree(), [_tree()], 1.0, k=k)
  with pytest.raises(ValueError, match="k must be"):
    m.ties_merged_vector([_tree()], k=k, trim="per_leaf")


def test_empty_lists_and_bad_arguments():
  for fn in (lambda: m.task_arithmetic(_tree(), [], 1.0), lambda: m.ties(_tree(), [], 1.0),
             lambda: m.weight_average([]), lambda: m.ties_merged_vector([]),
             lambda: m.tsv_merged_vector([]), lambda: m.magmax(_tree(), [])):
    with pytest.raises(ValueError, match="empty"):
      fn()
  with pytest.raises(ValueError, match="trim"):
    m.ties(_tree(), [_tree()], 1.0, trim="layer")
  with pytest.raises(ValueError, match="one entry per task"):
    m.task_arithmetic(_tree(), [_tree(), _tree()], jnp.ones(3))
  with pytest.raises(TypeError, match="list"):
    m.task_arithmetic(_tree(), _tree(), 1.0)
  with pytest.raises(ValueError, match="p must be"):
    m.dare(_tree(), 1.0, jax.random.key(0))
  with pytest.raises(ValueError, match="at least 2"):
    m.model_stock(_tree(), [_tree()])


def test_exclude_predicate_passes_leaves_through():
  theta0 = _tree()
  ft = jax.tree.map(lambda x: x + 1.0, theta0)
  excl = lambda p: p.startswith("head")
  tv = m.task_vector(theta0, ft, exclude=excl)
  assert float(jnp.abs(tv["head"]).sum()) == 0.0 and float(tv["enc"]["w"].sum()) == 6.0
  for out in (m.task_arithmetic(theta0, [ft, ft], 0.5, exclude=excl),  # raw models as tvs
              m.ties(theta0, [ft, ft], 0.5, exclude=excl),
              m.apply_task_vector(theta0, ft, 2.0, exclude=excl)):
    assert jnp.array_equal(out["head"], theta0["head"])
    assert not jnp.array_equal(out["enc"]["w"], theta0["enc"]["w"])
