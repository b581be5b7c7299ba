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

  Reference implementation followed: ``arcee-ai/mergekit``,
  ``mergekit/merge_methods/slerp.py`` (``slerp``, ``DOT_THRESHOLD = 0.9995``). Deliberate
  differences: a zero leaf falls back to linear interpolation (mergekit leaves it
  un-normalized, so its cosine is 0 and it interpolates with ``Ω = π/2``); one ``t`` for
  all leaves (mergekit's per-layer ``t`` gradients are not offered; call per leaf group).

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

  ``t = N cos θ / (1 + (N − 1) cos θ)`` (:func:`model_stock_ratio`) with ``cos θ`` the
  cosine between the task vectors ``τ_t = θ_t − θ0`` of that leaf. For ``N = 2`` that is the
  paper's formula exactly. For ``N > 2`` the paper assumes all pairwise angles equal and
  gives no estimator; here ``cos θ`` is the *mean of the N(N−1)/2 pairwise cosines*, the
  convention of mergekit. A zero task vector counts as cosine 0, giving ``t = 0``.

  Reference implementation: the authors' code is not released (``naver-ai/model-stock``
  holds only a README); the ``N > 2`` rule follows ``arcee-ai/mergekit``,
  ``mergekit/merge_methods/model_stock.py``. Deliberate differences from mergekit: the
  cosine is not clamped to ``[−1, 1]``, a norm product below ``1e-12`` (mergekit: clamped
  at ``1e-6``) gives cosine 0, and mergekit's ``filter_wise`` (per-row) option is not
  offered. The ratio is not clipped: a negative mean cosine gives ``t < 0``.

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
OUT_OF_RANGE = ("unindexed", "error")


def layer_indices(path: str) -> tuple:
  """Every integer of ``path`` that forms a whole component or follows ``_``/``.``/``-``,
  left to right (``"visual/blocks_3/ln_1/scale" -> (3, 1)``)."""
  return tuple(int(g) for g in _LAYER_RE.findall(path))


def default_layer_index(path: str) -> Optional[int]:
  """The first (leftmost) integer of :func:`layer_indices`, or ``None``.

  ``"params/blocks_3/mlp/kernel" -> 3``, ``"layers/3/w" -> 3``,
  ``"visual.transformer.resblocks.3.attn.in_proj_weight" -> 3``,
  ``"visual/blocks_3/ln_1/scale" -> 3`` (the block, not ``ln_1``),
  ``"conv1/kernel" -> None`` (digits glued to letters do not count).
  """
  idx = layer_indices(path)
  return idx[0] if idx else None


def reference_layer_fn(num_layers: int) -> Callable[[str], Optional[int]]:
  """The LiNeS reference's layer rule, as a ``layer_fn`` for :func:`lines`.

  A key is in layer ``i`` for the *smallest* ``i`` in ``[0, num_layers)`` such that
  ``".{i}."`` occurs in it (``"/"`` is accepted as a separator too, for nested pytrees);
  keys without such an ``i`` (including indices ``>= num_layers``) are unindexed. Meant for
  PyTorch-style keys (``"visual.transformer.resblocks.3.attn.in_proj_weight"``); it finds
  no layer in ``"blocks_3"``-style paths.
  """
  pats = [re.compile(rf"[./]{i}[./]") for i in range(int(num_layers))]

  def layer_fn(path: str) -> Optional[int]:
    for i, pat in enumerate(pats):
      if pat.search(path):
        return i
    return None
  return layer_fn


def lines_scales(tv: PyTree, alpha, beta, *, num_layers: Optional[int] = None,
                 layer_fn: Callable[[str], Optional[int]] = default_layer_index,
                 unindexed_scale=None, out_of_range: str = "unindexed",
                 exclude: ExcludeFn = None) -> dict:
  """``{path: scale}`` for mergeable leaves: ``α + β · ℓ / (L − 1)`` (``ℓ`` 0-based).

  See :func:`lines` for the layer rule, ``num_layers`` and ``out_of_range``.
  """
  if out_of_range not in OUT_OF_RANGE:
    raise ValueError(f"out_of_range must be one of {OUT_OF_RANGE}, got {out_of_range!r}")
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
    if l is not None and not 0 <= l < num_layers:
      if out_of_range == "error":
        raise ValueError(f"leaf {p!r}: layer index {l} outside [0, {num_layers})")
      l = None
    if l is None:
      out[p] = un
    else:
      out[p] = alpha + beta * (l / max(num_layers - 1, 1))
  return out


def lines_multitask_alpha(tvs: Sequence[PyTree], merged_tv: PyTree, *,
                          exclude: ExcludeFn = None):
  """The LiNeS reference's multi-task ``α = (‖Σ_t τ_t‖₁ / ‖τ_MTL‖₁) / T``.

  ``τ_MTL`` is the merged task vector that :func:`lines` scales (``β`` is then searched);
  norms are L1 over all mergeable leaves, as ``norm_summed_tvs`` / ``norm_mtv`` in the
  reference's ``src/eval/aggregation.py``. Returns a float32 scalar.
  """
  check_task_vectors(tvs, merged_tv)
  flats = [flatten(t)[0] for t in tvs]
  mflat, _ = flatten(merged_tv)
  num = jnp.zeros((), jnp.float32)
  den = jnp.zeros((), jnp.float32)
  for j, (p, x) in enumerate(mflat):
    if is_mergeable(p, x, exclude):
      num = num + jnp.sum(jnp.abs(sum(f[j][1].astype(jnp.float32) for f in flats)))
      den = den + jnp.sum(jnp.abs(x.astype(jnp.float32)))
  return num / den / len(tvs)


def lines(pretrained: PyTree, merged_tv: PyTree, alpha, beta, *,
          num_layers: Optional[int] = None,
          layer_fn: Callable[[str], Optional[int]] = default_layer_index,
          unindexed_scale=None, out_of_range: str = "unindexed",
          exclude: ExcludeFn = None) -> PyTree:
  """LiNeS: scale the (merged) task vector linearly with layer depth, then add to ``θ0``.

  Leaf ``p`` in layer ``ℓ = layer_fn(p)`` (0-based, ``L = num_layers``) is scaled by
  ``α + β · ℓ / (L − 1)``: shallow layers stay close to the pre-trained model, deep layers
  keep the task-specific update. Leaves without a layer index (embeddings, final norm,
  projection) get ``unindexed_scale`` (default ``α``). ``alpha``/``beta`` may be traced
  (e.g. ``jax.vmap`` over a grid). For the reference's multi-task setting use
  ``alpha = lines_multitask_alpha(tvs, merged_tv)`` and search ``beta``.

  Layer of a leaf: the default :func:`default_layer_index` takes the *leftmost* integer of
  the path that is a whole component or follows ``_``/``.``/``-``, so a key with two
  indices is assigned its first one (``"visual/blocks_3/ln_1/scale"`` is layer 3).
  ``num_layers`` defaults to the largest index found + 1; pass it explicitly (12 for
  ViT-B, 24 for ViT-L, as the reference). An index outside ``[0, L)``:
  ``out_of_range="unindexed"`` (default, as the reference, whose ``.{i}.`` loop only
  runs over ``i < L``) scales the leaf like an unindexed one; ``"error"`` raises.

  Reference implementation followed: ``wang-kee/LiNeS``, ``src/eval/eval.py``
  (``LiNeS_scaling``): a key is in the *smallest* block ``i < L`` whose ``".{i}."``
  substring it contains, other keys get ``α``. Deliberate difference: the default layer
  rule is the leftmost index, not the smallest, because in ``blocks_3/ln_1``-style paths
  the later integers name sub-modules (on every CLIP key the two rules agree: there is one
  block index); ``layer_fn=reference_layer_fn(L)`` reproduces the reference's rule on
  PyTorch-style keys. ``L = 1`` gives scale ``α`` everywhere (the reference divides by
  zero).

  References:
    Wang, K., Dimitriadis, N., Favero, A., Ortiz-Jiménez, G., Fleuret, F., Frossard, P.
    "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging."
    ICLR 2025. arXiv:2410.17146.
  """
  check_like(pretrained, [merged_tv])
  scales = lines_scales(merged_tv, alpha, beta, num_layers=num_layers, layer_fn=layer_fn,
                        unindexed_scale=unindexed_scale, out_of_range=out_of_range,
                        exclude=exclude)
  return map_mergeable(
      lambda p, x0, xs: (x0.astype(jnp.float32)
                         + scales[p] * xs[0].astype(jnp.float32)).astype(leaf_dtype(x0)),
      pretrained, [merged_tv], exclude)
