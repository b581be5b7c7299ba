"""FTLO: fine-tune only the linear layers inside attention.

The trainable set is exactly the q, k, v and output projection kernels of every
attention block (or a fused `qkv` kernel plus `out`); their biases, the MLPs, the
LayerNorms and the embeddings stay frozen. Two namings are recognized: CLIP's
`.../attn/{q,k,v,out,qkv}/kernel` and T5's `.../{self_attn,cross_attn}/{q,k,v,o}/kernel`
(every self-attention block of the encoder and decoder and every cross-attention block
of the decoder; the relative-position bias tables stay frozen). Use the mask with `optax.masked` /
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
# T5 (saft_jax.models.t5): attention modules and their projections.
T5_ATTENTION_MODULES = ("self_attn", "cross_attn")
T5_ATTENTION_PROJECTIONS = ("q", "k", "v", "o")


def _key_name(entry: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def ftlo_predicate(path: Sequence[Any]) -> bool:
  """True iff `path` names an attention projection kernel: `.../attn/{q,k,v,out,qkv}/kernel`
  (CLIP) or `.../{self_attn,cross_attn}/{q,k,v,o}/kernel` (T5).

  Args:
    path: a key path as given by `jax.tree_util.tree_map_with_path` (DictKey entries)
      or a sequence of strings.
  """
  names = [_key_name(e) for e in path]
  if len(names) < 3 or names[-1] != "kernel":
    return False
  if names[-3] == "attn":
    return names[-2] in ATTENTION_PROJECTIONS
  return names[-3] in T5_ATTENTION_MODULES and names[-2] in T5_ATTENTION_PROJECTIONS


def ftlo_mask(params: Any) -> Any:
  """Pytree of bools (same structure as `params`): True on the FTLO-trainable leaves.

  Raises:
    ValueError: if no leaf is selected (e.g. params that do not follow the
      `blocks_{i}/attn/{q,k,v,out}/kernel` or T5 naming).
  """
  mask = jax.tree_util.tree_map_with_path(lambda path, _: ftlo_predicate(path), params)
  if not any(jax.tree_util.tree_leaves(mask)):
    raise ValueError("ftlo_mask: no '.../attn/{q,k,v,out,qkv}/kernel' or "
                     "'.../{self_attn,cross_attn}/{q,k,v,o}/kernel' leaf found in params")
  return mask
