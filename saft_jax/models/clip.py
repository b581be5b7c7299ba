"""Pure functional CLIP towers (OpenAI CLIP architecture as in open_clip).

Parameters are plain nested dicts of arrays. Layout of the vision tower
(`init_vision_params`), W = width, D = output_dim, p = patch_size, C = channels:

    conv1/kernel                 [p, p, C, W]   patch embedding (no bias), HWIO
    class_embedding              [W]
    positional_embedding         [tokens, W]
    ln_pre/{scale, bias}         [W]
    blocks_{i}/ln_1/{scale, bias}
    blocks_{i}/attn/{q,k,v,out}/{kernel [W, W], bias [W]}   used as x @ kernel + bias
    blocks_{i}/ln_2/{scale, bias}
    blocks_{i}/mlp/fc/{kernel [W, M], bias [M]}
    blocks_{i}/mlp/proj/{kernel [M, W], bias [W]}
    ln_post/{scale, bias}
    proj/kernel                  [W, D]

The text tower (`init_text_params`) has `token_embedding [V, W]`,
`positional_embedding [L, W]`, the same `blocks_{i}`, `ln_final` and `proj/kernel`.
A full model is `{"visual": ..., "text": ..., "logit_scale": scalar}`.

Blocks are pre-LayerNorm: `x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))`. With a 16-bit
`compute_dtype` the parameters stay in their own dtype and are cast for the matmuls;
LayerNorm statistics and softmax are computed in float32.

References:
  Radford et al., "Learning Transferable Visual Models From Natural Language
  Supervision", ICML 2021 (arXiv:2103.00020).
"""
from __future__ import annotations

from typing import Any, Optional, Union

import jax
import jax.numpy as jnp

from saft_jax.models import attention as attn_lib
from saft_jax.models.configs import CLIPConfig, TextConfig, VisionConfig

Params = dict


# ----------------------------------------------------------------------------- init
def _normal(key, shape, std):
  return (std * jax.random.normal(key, shape, jnp.float32)).astype(jnp.float32)


def _ln(width):
  return {"scale": jnp.ones((width,), jnp.float32), "bias": jnp.zeros((width,), jnp.float32)}


def _init_blocks(key, width, mlp_dim, layers) -> dict:
  attn_std = width ** -0.5
  proj_std = attn_std * (2 * layers) ** -0.5
  fc_std = (2 * width) ** -0.5
  out = {}
  for i, k in enumerate(jax.random.split(key, layers)):
    kq, kk, kv, ko, kf, kp = jax.random.split(k, 6)
    dense = lambda kk_, din, dout, std: {"kernel": _normal(kk_, (din, dout), std),
                                         "bias": jnp.zeros((dout,), jnp.float32)}
    out[f"blocks_{i}"] = {
        "ln_1": _ln(width),
        "attn": {"q": dense(kq, width, width, attn_std), "k": dense(kk, width, width, attn_std),
                 "v": dense(kv, width, width, attn_std), "out": dense(ko, width, width, proj_std)},
        "ln_2": _ln(width),
        "mlp": {"fc": dense(kf, width, mlp_dim, fc_std),
                "proj": dense(kp, mlp_dim, width, proj_std)},
    }
  return out


def init_vision_params(cfg: VisionConfig, key: jax.Array) -> Params:
  """Random float32 parameters of the vision tower (open_clip's init scheme)."""
  k_conv, k_cls, k_pos, k_blocks, k_proj = jax.random.split(key, 5)
  w, p, c = cfg.width, cfg.patch_size, cfg.in_channels
  params = {
      "conv1": {"kernel": _normal(k_conv, (p, p, c, w), (p * p * c) ** -0.5)},
      "class_embedding": _normal(k_cls, (w,), w ** -0.5),
      "positional_embedding": _normal(k_pos, (cfg.num_tokens, w), w ** -0.5),
      "ln_pre": _ln(w),
  }
  params.update(_init_blocks(k_blocks, w, cfg.mlp_dim, cfg.layers))
  params["ln_post"] = _ln(w)
  params["proj"] = {"kernel": _normal(k_proj, (w, cfg.output_dim), w ** -0.5)}
  return params


def init_text_params(cfg: TextConfig, key: jax.Array) -> Params:
  """Random float32 parameters of the text tower (open_clip's init scheme)."""
  k_tok, k_pos, k_blocks, k_proj = jax.random.split(key, 4)
  w = cfg.width
  params = {
      "token_embedding": _normal(k_tok, (cfg.vocab_size, w), 0.02),
      "positional_embedding": _normal(k_pos, (cfg.context_length, w), 0.01),
  }
  params.update(_init_blocks(k_blocks, w, cfg.mlp_dim, cfg.layers))
  params["ln_final"] = _ln(w)
  params["proj"] = {"kernel": _normal(k_proj, (w, cfg.output_dim), w ** -0.5)}
  return params


def init_clip_params(cfg: CLIPConfig, key: jax.Array) -> Params:
  """Random parameters of a full CLIP model: {"visual", "text", "logit_scale"}."""
  kv, kt = jax.random.split(key)
  return {"visual": init_vision_params(cfg.vision, kv),
          "text": init_text_params(cfg.text, kt),
          "logit_scale": jnp.asarray(cfg.logit_scale_init, jnp.float32)}


# ----------------------------------------------------------------------------- layers
def layer_norm(x: jax.Array, p: Params, eps: float) -> jax.Array:
  """LayerNorm over the last axis; statistics in float32, output in x's dtype."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + jnp.float32(eps))
  y = y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)
  return y.astype(x.dtype)


def _dense(x, p, dtype):
  y = jnp.dot(x, p["kernel"].astype(dtype), preferred_element_type=jnp.float32)
  if "bias" in p:
    y = y + p["bias"].astype(jnp.float32)
  return y.astype(dtype)


def _act(x, name):
  if name == "quick_gelu":
    return x * jax.nn.sigmoid(jnp.asarray(1.702, x.dtype) * x)
  return jax.nn.gelu(x, approximate=False)


def _block(x, p, *, heads, act, eps, impl, causal, valid_length):
  dtype = x.dtype
  b, t, w = x.shape
  dh = w // heads
  # Matmuls on [B·T, W] rows: XLA:CPU runs the weight gradient of a 3-D `dot` (two
  # contracting dims) about 2× slower than the same 2-D one.
  x = x.reshape(b * t, w)
  h = layer_norm(x, p["ln_1"], eps)
  a = p["attn"]
  # One fused [W, 3W] matmul for q, k, v (the kernels stay separate leaves for FTLO).
  qkv_kernel = jnp.concatenate([a[n]["kernel"].astype(dtype) for n in "qkv"], axis=1)
  qkv_bias = jnp.concatenate([a[n]["bias"].astype(jnp.float32) for n in "qkv"], axis=0)
  qkv = (jnp.dot(h, qkv_kernel, preferred_element_type=jnp.float32) + qkv_bias).astype(dtype)
  if impl == "xla":
    q, k, v = qkv.reshape(b, t, 3, heads, dh).transpose(2, 0, 3, 1, 4)  # 3 × [B, H, T, Dh]
    o = attn_lib.attention_heads_first(q, k, v, causal=causal, valid_length=valid_length)
    o = o.transpose(0, 2, 1, 3)
  else:
    q, k, v = jnp.split(qkv.reshape(b, t, 3 * heads, dh), 3, axis=2)
    o = attn_lib.attention(q, k, v, impl=impl, causal=causal, valid_length=valid_length)
  x = x + _dense(o.reshape(b * t, w), a["out"], dtype)
  h = layer_norm(x, p["ln_2"], eps)
  h = _act(_dense(h, p["mlp"]["fc"], dtype), act)
  return (x + _dense(h, p["mlp"]["proj"], dtype)).reshape(b, t, w)


def _num_blocks(params: Params, where: str, expected: int) -> None:
  for i in range(expected):
    if f"blocks_{i}" not in params:
      raise ValueError(f"{where}: missing parameter subtree 'blocks_{i}' "
                       f"(config has {expected} layers)")
  extra = sorted(k for k in params if k.startswith("blocks_")
                 and int(k.split("_")[1]) >= expected)
  if extra:
    raise ValueError(f"{where}: unexpected parameter subtrees {extra} "
                     f"(config has {expected} layers)")


def _transformer(x, params, *, layers, heads, act, eps, impl, causal, valid_length,
                 remat, return_blocks, num_real):
  fn = lambda x_, p_: _block(x_, p_, heads=heads, act=act, eps=eps, impl=impl,
                             causal=causal, valid_length=valid_length)
  if remat:
    policy = None
    if remat == "dots":
      policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    elif remat is not True:
      raise ValueError(f"remat must be False, True or 'dots', got {remat!r}")
    fn = jax.checkpoint(fn, policy=policy)
  outs = []
  for i in range(layers):
    x = fn(x, params[f"blocks_{i}"])
    if return_blocks:
      outs.append(x[:, :num_real])
  return x, outs


def _check_image_params(cfg: VisionConfig, params: Params) -> None:
  if not isinstance(params, dict) or "conv1" not in params:
    raise ValueError("encode_image: params must be the vision tower's dict (with 'conv1'); "
                     "pass params['visual'] for a full CLIP model")
  _num_blocks(params, "encode_image", cfg.layers)


def encode_image(cfg: VisionConfig, params: Params, images: jax.Array, *,
                 compute_dtype: Any = jnp.float32, return_blocks: bool = False,
                 attention_impl: Optional[str] = None,
                 remat: Union[bool, str] = False):
  """Image embeddings of the vision tower.

  Args:
    cfg: the vision config (static under jit).
    params: the vision tower's parameters (see the module docstring).
    images: `[B, H, W, C]` float images, already normalized.
    compute_dtype: dtype of the activations and matmul inputs (e.g. jnp.bfloat16);
      parameters are cast, not stored, in it.
    return_blocks: also return every block's residual-stream output.
    attention_impl: None (auto), "xla", "dpa" or "cudnn" (see `attention`).
    remat: rematerialize each block in the backward pass (True, or "dots" to keep
      the matmul outputs).

  Returns:
    `[B, output_dim]` float32 embeddings (not normalized), or `(embeddings, blocks)`
    where `blocks` is a list of `cfg.layers` arrays `[B, tokens, width]` in
    `compute_dtype` when `return_blocks=True`.
  """
  _check_image_params(cfg, params)
  images = jnp.asarray(images)
  if images.ndim != 4 or images.shape[1:] != (cfg.image_size, cfg.image_size, cfg.in_channels):
    raise ValueError(f"encode_image: images must be [B, {cfg.image_size}, {cfg.image_size}, "
                     f"{cfg.in_channels}] (NHWC), got {images.shape}")
  dtype = jnp.dtype(compute_dtype)
  b = images.shape[0]
  p, g, w = cfg.patch_size, cfg.grid_size, cfg.width
  # Patch embedding as one matmul: [B, g, p, g, p, C] -> [B, g*g, p*p*C].
  x = images.astype(dtype).reshape(b, g, p, g, p, cfg.in_channels)
  x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, p * p * cfg.in_channels)
  kernel = params["conv1"]["kernel"].astype(dtype).reshape(p * p * cfg.in_channels, w)
  x = jnp.dot(x.reshape(b * g * g, -1), kernel,
              preferred_element_type=jnp.float32).reshape(b, g * g, w)
  cls = jnp.broadcast_to(params["class_embedding"].astype(jnp.float32), (b, 1, w))
  x = jnp.concatenate([cls, x], axis=1) + params["positional_embedding"].astype(jnp.float32)
  x = layer_norm(x, params["ln_pre"], cfg.ln_eps).astype(dtype)

  n = cfg.num_tokens
  impl = attn_lib.resolve_impl(attention_impl, n, dtype)
  length = attn_lib.padded_length(impl, n)
  if length != n:
    x = jnp.pad(x, ((0, 0), (0, length - n), (0, 0)))
  x, blocks = _transformer(x, params, layers=cfg.layers, heads=cfg.heads, act=cfg.act,
                           eps=cfg.ln_eps, impl=impl, causal=False,
                           valid_length=n if length != n else None, remat=remat,
                           return_blocks=return_blocks, num_real=n)
  pooled = layer_norm(x[:, 0], params["ln_post"], cfg.ln_eps)
  emb = jnp.dot(pooled, params["proj"]["kernel"].astype(dtype),
                preferred_element_type=jnp.float32)
  if return_blocks:
    return emb, blocks
  return emb


def _pool_index(cfg: TextConfig, tokens: jax.Array) -> jax.Array:
  if cfg.eos_token_id is None:
    return jnp.argmax(tokens, axis=-1)
  return jnp.argmax((tokens == cfg.eos_token_id).astype(jnp.int32), axis=-1)


def encode_text(cfg: TextConfig, params: Params, tokens: jax.Array, *,
                compute_dtype: Any = jnp.float32, return_blocks: bool = False,
                attention_impl: Optional[str] = None,
                remat: Union[bool, str] = False):
  """Text embeddings of the causal text tower.

  Args:
    cfg: the text config (static under jit).
    params: the text tower's parameters.
    tokens: `[B, context_length]` integer token ids.
    compute_dtype, return_blocks, attention_impl, remat: as in `encode_image`.

  Returns:
    `[B, output_dim]` float32 embeddings taken at the end-of-text position (see
    `TextConfig.eos_token_id`), or `(embeddings, blocks)`.
  """
  if not isinstance(params, dict) or "token_embedding" not in params:
    raise ValueError("encode_text: params must be the text tower's dict (with "
                     "'token_embedding'); pass params['text'] for a full CLIP model")
  _num_blocks(params, "encode_text", cfg.layers)
  tokens = jnp.asarray(tokens)
  if tokens.ndim != 2 or tokens.shape[1] != cfg.context_length:
    raise ValueError(f"encode_text: tokens must be [B, {cfg.context_length}], got {tokens.shape}")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise TypeError(f"encode_text: tokens must be integers, got {tokens.dtype}")
  dtype = jnp.dtype(compute_dtype)
  x = jnp.take(params["token_embedding"], tokens, axis=0).astype(jnp.float32)
  x = (x + params["positional_embedding"].astype(jnp.float32)).astype(dtype)
  n = cfg.context_length
  impl = attn_lib.resolve_impl(attention_impl, n, dtype)
  length = attn_lib.padded_length(impl, n)
  if length != n:  # padded keys sit after every real query: the causal mask hides them
    x = jnp.pad(x, ((0, 0), (0, length - n), (0, 0)))
  x, blocks = _transformer(x, params, layers=cfg.layers, heads=cfg.heads, act=cfg.act,
                           eps=cfg.ln_eps, impl=impl, causal=True, valid_length=None,
                           remat=remat, return_blocks=return_blocks, num_real=n)
  x = layer_norm(x[:, :n], params["ln_final"], cfg.ln_eps)
  pooled = x[jnp.arange(x.shape[0]), _pool_index(cfg, tokens)]
  emb = jnp.dot(pooled, params["proj"]["kernel"].astype(dtype),
                preferred_element_type=jnp.float32)
  if return_blocks:
    return emb, blocks
  return emb


def normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """L2-normalizes the last axis (float32)."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), jnp.float32(eps))


def clip_logits(cfg: CLIPConfig, params: Params, images: jax.Array, tokens: jax.Array,
                **kwargs):
  """`(logits_per_image [Bi, Bt], logits_per_text [Bt, Bi])` as in CLIPModel."""
  img = normalize(encode_image(cfg.vision, params["visual"], images, **kwargs))
  txt = normalize(encode_text(cfg.text, params["text"], tokens, **kwargs))
  scale = jnp.exp(jnp.asarray(params["logit_scale"], jnp.float32))
  logits = scale * img @ txt.T
  return logits, logits.T

