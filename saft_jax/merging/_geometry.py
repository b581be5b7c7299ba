"""Geometric merges: SLERP, Model Stock, LiNeS layer scaling."""
from __future__ import annotations

import re
from typing import Callable, Optional, Sequence

import jax.numpy as jnp

from ._task_vectors import (ExcludeFn, PyTree, check_like,
                            check_task_vectors, flatten, is_mergeable, leaf_dtype,
                            map_mergeable)

_EPS = 1e-12


def slerp(model_a: PyTree, model_b: PyTree, t=0.5, *, dot_threshold: float = 0.9995,
          exclude: ExcludeFn = None) -> PyTree:
  """Spherical linear interpolation of two models, leaf by leaf (each leaf one vector).

  With ``cos Ω`` the cosine between the flattened leaves,
  ``slerp = sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b`` (applied to the un-normalized
  leaves, as mergekit does); when ``|cos Ω| > dot_threshold`` or a leaf is zero it falls
  back to linear interpolation. ``t`` may be traced. Non-mergeable leaves come from
  ``model_a``.

  References:
    Shoemake, K. "Animating rotation with quaternion curves." SIGGRAPH 1985.
    Goddard, C. et al. "Arcee's MergeKit: A Toolkit for Merging Large Language Models."
    EMNLP 2024 (industry). arXiv:2403.13257.
  """
  check_like(model_a, [model_b], what="model", ref_name="model_a")
  t = jnp.asarray(t).astype(jnp.float32)

  def leaf(path, a, bs):
    a32, b32 = a.astype(jnp.float32), bs[0].astype(jnp.float32)
    na, nb = jnp.linalg.norm(a32.ravel()), jnp.linalg.norm(b32.ravel())
    dot = jnp.sum(a32 * b32) / jnp.maximum(na * nb, _EPS)
    dot = jnp.clip(dot, -1.0, 1.0)
    omega = jnp.arccos(dot)
    so = jnp.sin(omega)
    linear = (jnp.abs(dot) > dot_threshold) | (na * nb <= _EPS)
    safe = jnp.where(linear, 1.0, so)
    ca = jnp.where(linear, 1.0 - t, jnp.sin((1.0 - t) * omega) / safe)
    cb = jnp.where(linear, t, jnp.sin(t * omega) / safe)
    return (ca * a32 + cb * b32).astype(leaf_dtype(a))
  return map_mergeable(leaf, model_a, [model_b], exclude)


def _cos(a, b):
  a, b = a.astype(jnp.float32).ravel(), b.astype(jnp.float32).ravel()
  den = jnp.linalg.norm(a) * jnp.linalg.norm(b)
  return jnp.where(den > _EPS, jnp.sum(a * b) / jnp.maximum(den, _EPS), 0.0)


def model_stock_ratio(cos_theta, n: int):
  """Model Stock interpolation ratio ``t = N cos θ / (1 + (N − 1) cos θ)``."""
  return n * cos_theta / (1.0 + (n - 1) * cos_theta)


def model_stock(pretrained: PyTree, tvs: Sequence[PyTree], *,
                exclude: ExcludeFn = None) -> PyTree:
  """Model Stock: per leaf, ``θ = t · mean(θ_t) + (1 − t) · θ0 = θ0 + t · mean(τ_t)``.

  ``cos θ`` is the mean pairwise cosine between the task vectors of that leaf (``N ≥ 2``
  fine-tuned models; a zero task vector counts as cosine 0, giving ``t = 0``).

  References:
    Jang, D.-H., Yun, S., Han, D. "Model Stock: All we need is just a few fine-tuned
    models." ECCV 2024. arXiv:2403.19522.
  """
  check_task_vectors(tvs, pretrained)
  n = len(tvs)
  if n < 2:
    raise ValueError(f"model_stock needs at least 2 fine-tuned models, got {n}")

  def leaf(path, x0, xs):
    cs = [_cos(xs[i], xs[j]) for i in range(n) for j in range(i + 1, n)]
    c = sum(cs[1:], cs[0]) / len(cs)
    t = model_stock_ratio(c, n)
    mean = xs[0].astype(jnp.float32)
    for x in xs[1:]:
      mean = mean + x.astype(jnp.float32)
    mean = mean / n
    return (x0.astype(jnp.float32) + t * mean).astype(leaf_dtype(x0))
  return map_mergeable(leaf, pretrained, list(tvs), exclude)


_LAYER_RE = re.compile(r"(?:^|[/._\-\[])(\d+)(?=$|[/._\-\]])")


def default_layer_index(path: str) -> Optional[int]:
  """First integer that forms a whole path component or follows ``_``/``.``/``-``.

  ``"params/blocks_3/mlp/kernel" -> 3``, ``"layers/3/w" -> 3``,
  ``"visual.transformer.resblocks.3.attn.in_proj_weight" -> 3``,
  ``"conv1/kernel" -> None`` (digits glued to letters do not count).
  """
  m = _LAYER_RE.search(path)
  return int(m.group(1)) if m else None


def lines_scales(tv: PyTree, alpha, beta, *, num_layers: Optional[int] = None,
                 layer_fn: Callable[[str], Optional[int]] = default_layer_index,
                 unindexed_scale=None, exclude: ExcludeFn = None) -> dict:
  """``{path: scale}`` for mergeable leaves: ``α + β · ℓ / (L − 1)`` (``ℓ`` 0-based)."""
  flat, _ = flatten(tv)
  idx = {p: layer_fn(p) for p, x in flat if is_mergeable(p, x, exclude)}
  known = [l for l in idx.values() if l is not None]
  if num_layers is None:
    num_layers = max(known) + 1 if known else 1
  alpha = jnp.asarray(alpha).astype(jnp.float32)
  beta = jnp.asarray(beta).astype(jnp.float32)
  un = alpha if unindexed_scale is None else jnp.asarray(unindexed_scale).astype(jnp.float32)
  out = {}
  for p, l in idx.items():
    if l is None:
      out[p] = un
    else:
      if not 0 <= l < num_layers:
        raise ValueError(f"leaf {p!r}: layer index {l} outside [0, {num_layers})")
      out[p] = alpha + beta * (l / max(num_layers - 1, 1))
  return out


def lines(pretrained: PyTree, merged_tv: PyTree, alpha, beta, *,
          num_layers: Optional[int] = None,
          layer_fn: Callable[[str], Optional[int]] = default_layer_index,
          unindexed_scale=None, exclude: ExcludeFn = None) -> PyTree:
  """LiNeS: scale the (merged) task vector linearly with layer depth, then add to ``θ0``.

  Leaf ``p`` in layer ``ℓ = layer_fn(p)`` (0-based, ``L = num_layers``, default the
  largest index + 1) is scaled by ``α + β · ℓ / (L − 1)``: shallow layers stay close to
  the pre-trained model, deep layers keep the task-specific update. Leaves without a layer
  index (embeddings, final norm, projection) get ``unindexed_scale`` (default ``α``).
  ``alpha``/``beta`` may be traced (e.g. ``jax.vmap`` over a grid).

  References:
    Wang, K., Dimitriadis, N., Favero, A., Ortiz-Jiménez, G., Fleuret, F., Frossard, P.
    "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging."
    ICLR 2025. arXiv:2410.17146.
  """
  check_like(pretrained, [merged_tv])
  scales = lines_scales(merged_tv, alpha, beta, num_layers=num_layers, layer_fn=layer_fn,
                        unindexed_scale=unindexed_scale, exclude=exclude)
  return map_mergeable(
      lambda p, x0, xs: (x0.astype(jnp.float32)
                         + scales[p] * xs[0].astype(jnp.float32)).astype(leaf_dtype(x0)),
      pretrained, [merged_tv], exclude)
