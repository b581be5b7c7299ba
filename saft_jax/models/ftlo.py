"""FTLO: fine-tune only the linear layers inside attention.

The trainable set is exactly the q, k, v and output projection kernels of every
attention block (or a fused `qkv` kernel plus `out`); their biases, the MLPs, the
LayerNorms and the embeddings stay frozen. Use the mask with `optax.masked` /
`optax.multi_transform`, e.g.

    tx = optax.multi_transform({True: optax.adamw(1e-5), False: optax.set_to_zero()},
                               ftlo_mask(params))

References:
  Jin et al., "Fine-tuning attention modules only: enhancing weight disentanglement
  in task arithmetic", ICLR 2025 (arXiv:2407.07089).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax

ATTENTION_PROJECTIONS = ("q", "k", "v", "out", "qkv")


def _key_name(entry: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def ftlo_predicate(path: Sequence[Any]) -> bool:
  """True iff `path` names an attention projection kernel: `.../attn/{q,k,v,out,qkv}/kernel`.

  Args:
    path: a key path as given by `jax.tree_util.tree_map_with_path` (DictKey entries)
      or a sequence of strings.
  """
  names = [_key_name(e) for e in path]
  return (len(names) >= 3 and names[-1] == "kernel" and names[-2] in ATTENTION_PROJECTIONS
          and names[-3] == "attn")


def ftlo_mask(params: Any) -> Any:
  """Pytree of bools (same structure as `params`): True on the FTLO-trainable leaves.

  Raises:
    ValueError: if no leaf is selected (e.g. params that do not follow the
      `blocks_{i}/attn/{q,k,v,out}/kernel` naming).
  """
  mask = jax.tree_util.tree_map_with_path(lambda path, _: ftlo_predicate(path), params)
  if not any(jax.tree_util.tree_leaves(mask)):
    raise ValueError("ftlo_mask: no '.../attn/{q,k,v,out,qkv}/kernel' leaf found in params")
  return mask
