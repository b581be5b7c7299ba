"""T5 encoder–decoder as pure functions (T5 v1.0, T5 v1.1 / Flan-T5, mT5).

Parameters are plain nested dicts of arrays. D = d_model, V = vocab_size, I = num_heads
* d_kv, F = d_ff, N = relative_attention_num_buckets, H = num_heads:

    shared                                   [V, D]   token embedding (encoder and decoder)
    encoder/relative_attention_bias          [N, H]   one table, used by every encoder layer
    encoder/blocks_{i}/self_attn_norm/scale  [D]
    encoder/blocks_{i}/self_attn/{q,k,v}/kernel  [D, I]   used as x @ kernel (no biases)
    encoder/blocks_{i}/self_attn/o/kernel    [I, D]
    encoder/blocks_{i}/mlp_norm/scale        [D]
    encoder/blocks_{i}/mlp/wi/kernel         [D, F]   "relu" (T5 v1.0)
    encoder/blocks_{i}/mlp/{wi_0,wi_1}/kernel  [D, F] "gated-gelu" (T5 v1.1, Flan-T5, mT5)
    encoder/blocks_{i}/mlp/wo/kernel         [F, D]
    encoder/final_norm/scale                 [D]
    decoder/...                              as the encoder, plus in each block
    decoder/blocks_{i}/cross_attn_norm/scale, decoder/blocks_{i}/cross_attn/{q,k,v,o}/kernel
    lm_head/kernel                           [D, V]   only when `tie_word_embeddings=False`

Conventions of T5 (and of transformers' `T5ForConditionalGeneration`, which the tests
compare against): RMS layer norm without mean subtraction or bias (variance in float32);
no 1/sqrt(d) scaling of the attention logits; a learned relative-position bias, computed
once per stack from the bucketed query–key distance (bidirectional buckets in the
encoder, causal buckets in the decoder) and added in every layer of that stack; no bias
in cross-attention; with tied embeddings the decoder output is scaled by d_model**-0.5
before the LM head.

With a 16-bit `compute_dtype` the parameters stay in their own dtype and are cast for
the matmuls, which accumulate in float32; norms, attention logits and softmax are
computed in float32, and the logits are returned in float32.

References:
  Raffel et al., "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
  Transformer", JMLR 2020 (arXiv:1910.10683).
  Chung et al., "Scaling Instruction-Finetuned Language Models", 2022 (arXiv:2210.11416).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

Params = dict
FEED_FORWARD_PROJ = ("relu", "gated-gelu")
MODEL_TYPES = ("t5", "mt5")
_POSITIVE = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers",
             "num_heads", "relative_attention_num_buckets", "relative_attention_max_distance")


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class T5Config:
  """Sizes and conventions of a T5 model (frozen and hashable: a static jit argument).

  Attributes:
    vocab_size: rows of the token embedding (and of the LM head).
    d_model: residual stream width.
    d_kv: width of one attention head (`num_heads * d_kv` need not equal `d_model`).
    d_ff: hidden width of the feed-forward block.
    num_layers: encoder blocks.
    num_decoder_layers: decoder blocks (None: `num_layers`).
    num_heads: attention heads.
    relative_attention_num_buckets: buckets of the relative-position bias.
    relative_attention_max_distance: distance from which all positions share a bucket.
    feed_forward_proj: "relu" (T5 v1.0: `wo(relu(wi x))`) or "gated-gelu" (T5 v1.1,
      Flan-T5, mT5: `wo(gelu_tanh(wi_0 x) * wi_1 x)`).
    tie_word_embeddings: the LM head is the token embedding (T5 v1.0); False: a separate
      `lm_head` (T5 v1.1, Flan-T5, mT5).
    scale_decoder_outputs: multiply the decoder output by `d_model**-0.5` before the LM
      head (None: same as `tie_word_embeddings`, as T5 v1.0 and v1.1 do).
    layer_norm_epsilon: epsilon of the RMS norms.
    pad_token_id: padding id (also the decoder start token of T5 checkpoints).
    eos_token_id: end-of-sequence id (generation stops there).
    decoder_start_token_id: first decoder input (None: `pad_token_id`).
  """
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_decoder_layers: Optional[int] = None
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  feed_forward_proj: str = "relu"
  tie_word_embeddings: bool = True
  scale_decoder_outputs: Optional[bool] = None
  layer_norm_epsilon: float = 1e-6
  pad_token_id: int = 0
  eos_token_id: int = 1
  decoder_start_token_id: Optional[int] = None

  def __post_init__(self):
    if self.num_decoder_layers is None:
      object.__setattr__(self, "num_decoder_layers", self.num_layers)
    if self.scale_decoder_outputs is None:
      object.__setattr__(self, "scale_decoder_outputs", bool(self.tie_word_embeddings))
    if self.decoder_start_token_id is None:
      object.__setattr__(self, "decoder_start_token_id", self.pad_token_id)
    for name in _POSITIVE:
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"T5Config: {name} must be a positive int, got {value!r}")
    if self.feed_forward_proj not in FEED_FORWARD_PROJ:
      raise ValueError(f"T5Config: feed_forward_proj must be one of {FEED_FORWARD_PROJ}, got "
                       f"{self.feed_forward_proj!r}")
    for name in ("tie_word_embeddings", "scale_decoder_outputs"):
      if not isinstance(getattr(self, name), (bool, np.bool_)):
        raise ValueError(f"T5Config: {name} must be a bool, got {getattr(self, name)!r}")
    if self.relative_attention_num_buckets < 4:
      raise ValueError("T5Config: relative_attention_num_buckets must be >= 4 (half of them, "
                       "per direction, are split into exact and logarithmic buckets), got "
                       f"{self.relative_attention_num_buckets}")
    if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 2:
      raise ValueError("T5Config: relative_attention_max_distance must exceed "
                       "relative_attention_num_buckets // 2, got "
                       f"{self.relative_attention_max_distance} <= "
                       f"{self.relative_attention_num_buckets // 2}")
    if not self.layer_norm_epsilon > 0:
      raise ValueError(f"T5Config: layer_norm_epsilon must be positive, got "
                       f"{self.layer_norm_epsilon!r}")
    for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
          or not 0 <= value < self.vocab_size:
        raise ValueError(f"T5Config: {name} must be an int in [0, vocab_size={self.vocab_size}), "
                         f"got {value!r}")

  @property
  def inner_dim(self) -> int:
    """Width of the concatenated attention heads (`num_heads * d_kv`)."""
    return self.num_heads * self.d_kv

  @property
  def is_gated(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  @classmethod
  def from_hf_dict(cls, hf: Mapping[str, Any]) -> "T5Config":
    """The config of a transformers T5 `config.json` (parsed), with transformers' defaults.

    Whether the decoder output is scaled follows transformers: `scale_decoder_outputs`
    when the file has it (transformers 5 writes it), else `tie_word_embeddings`
    (default True). Whether the LM head is a separate matrix is finally decided by the
    checkpoint (`load_t5` unties when the weights hold a distinct `lm_head.weight`).
    """
    model_type = hf.get("model_type", "t5")
    if model_type not in MODEL_TYPES:
      raise ValueError(f"config.json: model_type {model_type!r} is not one of {MODEL_TYPES}")
    ffp = hf.get("feed_forward_proj", "relu")
    if ffp not in FEED_FORWARD_PROJ:
      raise ValueError(f"config.json: feed_forward_proj {ffp!r} is not supported (one of "
                       f"{FEED_FORWARD_PROJ})")
    tie = hf.get("tie_word_embeddings", True)
    tie = True if tie is None else bool(tie)
    scale = hf.get("scale_decoder_outputs")
    scale = tie if scale is None else bool(scale)
    eos = hf.get("eos_token_id", 1)
    if isinstance(eos, (list, tuple)):
      if not eos:
        raise ValueError("config.json: eos_token_id is an empty list")
      eos = eos[0]
    pad = hf.get("pad_token_id", 0)
    pad = 0 if pad is None else int(pad)
    start = hf.get("decoder_start_token_id")
    num_layers = int(hf.get("num_layers", 6))
    dec_layers = hf.get("num_decoder_layers")
    return cls(
        vocab_size=int(hf.get("vocab_size", 32128)), d_model=int(hf.get("d_model", 512)),
        d_kv=int(hf.get("d_kv", 64)), d_ff=int(hf.get("d_ff", 2048)), num_layers=num_layers,
        num_decoder_layers=num_layers if dec_layers is None else int(dec_layers),
        num_heads=int(hf.get("num_heads", 8)),
        relative_attention_num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
        relative_attention_max_distance=int(hf.get("relative_attention_max_distance", 128)),
        feed_forward_proj=ffp, tie_word_embeddings=tie, scale_decoder_outputs=scale,
        layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-6)), pad_token_id=pad,
        eos_token_id=1 if eos is None else int(eos),
        decoder_start_token_id=pad if start is None else int(start))

  def to_hf_dict(self) -> dict:
    """A transformers `T5Config` dict (config.json) for this config.

    It records `tie_word_embeddings` (read by every transformers version) and
    `scale_decoder_outputs` (read by transformers 5), so both versions rebuild the same
    model from what `save_t5` writes.
    """
    return {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
        "vocab_size": self.vocab_size, "d_model": self.d_model, "d_kv": self.d_kv,
        "d_ff": self.d_ff, "num_layers": self.num_layers,
        "num_decoder_layers": self.num_decoder_layers, "num_heads": self.num_heads,
        "relative_attention_num_buckets": self.relative_attention_num_buckets,
        "relative_attention_max_distance": self.relative_attention_max_distance,
        "feed_forward_proj": self.feed_forward_proj,
        "tie_word_embeddings": bool(self.tie_word_embeddings),
        "scale_decoder_outputs": bool(self.scale_decoder_outputs),
        "layer_norm_epsilon": self.layer_norm_epsilon, "pad_token_id": self.pad_token_id,
        "eos_token_id": self.eos_token_id,
        "decoder_start_token_id": self.decoder_start_token_id,
        "is_encoder_decoder": True, "dropout_rate": 0.1, "initializer_factor": 1.0,
        "use_cache": True,
    }


# ----------------------------------------------------------------------------- init
def _normal(key, shape, std):
  return std * jax.random.normal(key, shape, jnp.float32)


def _init_attn(key, cfg: T5Config) -> dict:
  kq, kk, kv, ko = jax.random.split(key, 4)
  d, inner = cfg.d_model, cfg.inner_dim
  return {"q": {"kernel": _normal(kq, (d, inner), (d * cfg.d_kv) ** -0.5)},
          "k": {"kernel": _normal(kk, (d, inner), d ** -0.5)},
          "v": {"kernel": _normal(kv, (d, inner), d ** -0.5)},
          "o": {"kernel": _normal(ko, (inner, d), inner ** -0.5)}}


def _init_mlp(key, cfg: T5Config) -> dict:
  k0, k1, ko = jax.random.split(key, 3)
  d, f = cfg.d_model, cfg.d_ff
  out = {"wo": {"kernel": _normal(ko, (f, d), f ** -0.5)}}
  if cfg.is_gated:
    out["wi_0"] = {"kernel": _normal(k0, (d, f), d ** -0.5)}
    out["wi_1"] = {"kernel": _normal(k1, (d, f), d ** -0.5)}
  else:
    out["wi"] = {"kernel": _normal(k0, (d, f), d ** -0.5)}
  return out


def _norm(d):
  return {"scale": jnp.ones((d,), jnp.float32)}


def _init_stack(key, cfg: T5Config, layers: int, decoder: bool) -> dict:
  k_bias, k_blocks = jax.random.split(key)
  out = {"relative_attention_bias": _normal(
      k_bias, (cfg.relative_attention_num_buckets, cfg.num_heads), cfg.d_model ** -0.5)}
  for i, k in enumerate(jax.random.split(k_blocks, layers)):
    ks, kc, km = jax.random.split(k, 3)
    block = {"self_attn_norm": _norm(cfg.d_model), "self_attn": _init_attn(ks, cfg)}
    if decoder:
      block["cross_attn_norm"] = _norm(cfg.d_model)
      block["cross_attn"] = _init_attn(kc, cfg)
    block["mlp_norm"] = _norm(cfg.d_model)
    block["mlp"] = _init_mlp(km, cfg)
    out[f"blocks_{i}"] = block
  out["final_norm"] = _norm(cfg.d_model)
  return out


def init_t5_params(cfg: T5Config, key: jax.Array) -> Params:
  """Random float32 parameters (transformers' T5 init scheme; see the module docstring)."""
  k_emb, k_enc, k_dec, k_head = jax.random.split(key, 4)
  params = {"shared": _normal(k_emb, (cfg.vocab_size, cfg.d_model), 1.0),
            "encoder": _init_stack(k_enc, cfg, cfg.num_layers, decoder=False),
            "decoder": _init_stack(k_dec, cfg, cfg.num_decoder_layers, decoder=True)}
  if not cfg.tie_word_embeddings:
    params["lm_head"] = {"kernel": _normal(k_head, (cfg.d_model, cfg.vocab_size), 1.0)}
  return params


# ----------------------------------------------------------------------------- layers
def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """T5's layer norm: `scale * x / sqrt(mean(x²) + eps)` (no mean, no bias); statistics in
  float32, output in x's dtype."""
  x32 = x.astype(jnp.float32)
  var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
  y = x32 * jax.lax.rsqrt(var + jnp.float32(eps))
  return (scale.astype(jnp.float32) * y).astype(x.dtype)


def _dense(x, kernel, dtype):
  return jnp.dot(x, kernel.astype(dtype), preferred_element_type=jnp.float32).astype(dtype)


def _mlp(x, p, cfg: T5Config, dtype):
  if cfg.is_gated:
    gate = jax.nn.gelu(_dense(x, p["wi_0"]["kernel"], dtype), approximate=True)  # "gelu_new"
    h = gate * _dense(x, p["wi_1"]["kernel"], dtype)
  else:
    h = jax.nn.relu(_dense(x, p["wi"]["kernel"], dtype))
  return _dense(h, p["wo"]["kernel"], dtype)


def _heads(x, kernel, heads, dtype):
  """`[B, T, D] @ [D, H*Dk]` -> `[B, H, T, Dk]`."""
  y = _dense(x, kernel, dtype)
  b, t, _ = y.shape
  return y.reshape(b, t, heads, -1).transpose(0, 2, 1, 3)


def _attend(q, k, v, bias, mask):
  """Unscaled dot-product attention on `[B, H, T, Dk]`; `bias` (float32) and `mask` (bool,
  True = attend) broadcast against `[B, H, Tq, Tk]`. Returns `[B, Tq, H*Dk]`."""
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + bias
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  o = jnp.einsum("bhqk,bhkd->bhqd", weights, v, preferred_element_type=jnp.float32)
  b, h, t, dk = o.shape
  return o.astype(q.dtype).transpose(0, 2, 1, 3).reshape(b, t, h * dk)


def _mha(x, kv, p, bias, mask, heads, dtype):
  q = _heads(x, p["q"]["kernel"], heads, dtype)
  k = _heads(kv, p["k"]["kernel"], heads, dtype)
  v = _heads(kv, p["v"]["kernel"], heads, dtype)
  return _dense(_attend(q, k, v, bias, mask), p["o"]["kernel"], dtype)


# ----------------------------------------------------------------------------- position bias
def relative_position_bucket(relative_position, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> np.ndarray:
  """T5's bucket of each relative position `key_position - query_position` (NumPy, int32).

  Half of the buckets (per direction when `bidirectional`) hold the exact distances
  0 .. n/2-1, the other half logarithmically wider ranges up to `max_distance`; beyond it
  all distances share the last bucket. Unidirectional (decoder) buckets map every
  positive relative position (a future key) to bucket 0. Computed in float32 exactly as
  transformers does, on the host, so the buckets do not depend on the accelerator's
  `log`.
  """
  rp = np.asarray(relative_position, dtype=np.int64)
  out = np.zeros_like(rp)
  n = num_buckets
  if bidirectional:
    n //= 2
    out = out + (rp > 0) * n
    rp = np.abs(rp)
  else:
    rp = -np.minimum(rp, 0)
  max_exact = n // 2
  with np.errstate(divide="ignore"):
    scaled = (np.log(np.maximum(rp, 1).astype(np.float32) / np.float32(max_exact))
              / np.float32(math.log(max_distance / max_exact)) * np.float32(n - max_exact))
  large = np.minimum(max_exact + scaled.astype(np.int64), n - 1)
  return (out + np.where(rp < max_exact, rp, large)).astype(np.int32)


def _bucket_grid(cfg: T5Config, q_len: int, k_len: int, bidirectional: bool) -> np.ndarray:
  rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
  return relative_position_bucket(rel, bidirectional=bidirectional,
                                  num_buckets=cfg.relative_attention_num_buckets,
                                  max_distance=cfg.relative_attention_max_distance)


def _bias_from_buckets(table, buckets):
  """`[N, H]` table, int buckets `[..., Tq, Tk]` -> float32 bias `[1, H, Tq, Tk]`."""
  values = jnp.take(table.astype(jnp.float32), buckets, axis=0)  # [Tq, Tk, H]
  return jnp.moveaxis(values, -1, 0)[None]


def relative_position_bias(cfg: T5Config, table: jax.Array, query_length: int,
                           key_length: int, *, bidirectional: bool) -> jax.Array:
  """`[1, num_heads, query_length, key_length]` float32 bias of one stack (its
  `relative_attention_bias` table); transformers' `T5Attention.compute_bias`."""
  return _bias_from_buckets(table, jnp.asarray(
      _bucket_grid(cfg, query_length, key_length, bidirectional)))


# ----------------------------------------------------------------------------- stacks
def _remat(fn, remat):
  if not remat:
    return fn
  if remat == "dots":
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  if remat is True:
    return jax.checkpoint(fn)
  raise ValueError(f"remat must be False, True or 'dots', got {remat!r}")


def _check_stack(params, name: str, layers: int, where: str) -> None:
  stack = params.get(name)
  if not isinstance(stack, Mapping):
    raise ValueError(f"{where}: params lack the {name!r} subtree (expected the full T5 params "
                     f"dict with 'shared', 'encoder', 'decoder')")
  for key in ("relative_attention_bias", "final_norm"):
    if key not in stack:
      raise ValueError(f"{where}: params lack '{name}/{key}'")
  for i in range(layers):
    if f"blocks_{i}" not in stack:
      raise ValueError(f"{where}: missing parameter subtree '{name}/blocks_{i}' (config has "
                       f"{layers} {name} layers)")
  extra = sorted(k for k in stack if k.startswith("blocks_") and int(k.split("_")[1]) >= layers)
  if extra:
    raise ValueError(f"{where}: unexpected parameter subtrees {extra} under {name!r} (config has "
                     f"{layers} {name} layers)")


def check_params(cfg: T5Config, params, where: str, decoder: bool = True) -> None:
  """A ValueError (prefixed with `where`) naming the first subtree of `params` that
  `cfg` needs and that is missing, or the extra blocks; only the structure is checked."""
  if not isinstance(params, Mapping) or "shared" not in params:
    raise ValueError(f"{where}: params must be the T5 params dict (with 'shared', 'encoder', "
                     f"'decoder')")
  _check_stack(params, "encoder", cfg.num_layers, where)
  if decoder:
    _check_stack(params, "decoder", cfg.num_decoder_layers, where)
    if not cfg.tie_word_embeddings and "lm_head" not in params:
      raise ValueError(f"{where}: params lack 'lm_head' (config has tie_word_embeddings=False)")


def _check_ids(x, name: str, where: str):
  x = jnp.asarray(x)
  if x.ndim != 2:
    raise ValueError(f"{where}: {name} must be [batch, length], got shape {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"{where}: {name} must be integers, got {x.dtype}")
  return x


def _check_mask(mask, ids, name: str, where: str):
  if mask is None:
    return jnp.ones(ids.shape, bool)
  mask = jnp.asarray(mask)
  if mask.shape != ids.shape:
    raise ValueError(f"{where}: {name} must have the shape of its ids {ids.shape}, got "
                     f"{mask.shape}")
  return mask.astype(bool)


def _embed(params, ids, dtype):
  return jnp.take(params["shared"], ids, axis=0).astype(dtype)


def _encode(cfg: T5Config, params, input_ids, attention_mask, dtype, remat):
  enc = params["encoder"]
  length = input_ids.shape[1]
  bias = relative_position_bias(cfg, enc["relative_attention_bias"], length, length,
                                bidirectional=True)
  mask = attention_mask[:, None, None, :]

  def block(x, p):
    h = rms_norm(x, p["self_attn_norm"]["scale"], cfg.layer_norm_epsilon)
    x = x + _mha(h, h, p["self_attn"], bias, mask, cfg.num_heads, dtype)
    h = rms_norm(x, p["mlp_norm"]["scale"], cfg.layer_norm_epsilon)
    return x + _mlp(h, p["mlp"], cfg, dtype)

  block = _remat(block, remat)
  x = _embed(params, input_ids, dtype)
  for i in range(cfg.num_layers):
    x = block(x, enc[f"blocks_{i}"])
  return rms_norm(x, enc["final_norm"]["scale"], cfg.layer_norm_epsilon)


def _lm_logits(cfg: T5Config, params, h, dtype):
  """Final-normed decoder states `[..., D]` -> float32 logits `[..., V]`."""
  if cfg.scale_decoder_outputs:
    h = (h.astype(jnp.float32) * jnp.float32(cfg.d_model ** -0.5)).astype(dtype)
  if cfg.tie_word_embeddings:
    return jnp.einsum("...d,vd->...v", h, params["shared"].astype(dtype),
                      preferred_element_type=jnp.float32)
  return jnp.dot(h, params["lm_head"]["kernel"].astype(dtype),
                 preferred_element_type=jnp.float32)


def _decode(cfg: T5Config, params, encoder_hidden, attention_mask, decoder_input_ids,
            decoder_attention_mask, dtype, remat):
  dec = params["decoder"]
  length = decoder_input_ids.shape[1]
  bias = relative_position_bias(cfg, dec["relative_attention_bias"], length, length,
                                bidirectional=False)
  self_mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
  if decoder_attention_mask is not None:
    self_mask = self_mask & decoder_attention_mask[:, None, None, :]
  cross_mask = attention_mask[:, None, None, :]
  enc = encoder_hidden.astype(dtype)

  def block(x, p):
    h = rms_norm(x, p["self_attn_norm"]["scale"], cfg.layer_norm_epsilon)
    x = x + _mha(h, h, p["self_attn"], bias, self_mask, cfg.num_heads, dtype)
    h = rms_norm(x, p["cross_attn_norm"]["scale"], cfg.layer_norm_epsilon)
    x = x + _mha(h, enc, p["cross_attn"], None, cross_mask, cfg.num_heads, dtype)
    h = rms_norm(x, p["mlp_norm"]["scale"], cfg.layer_norm_epsilon)
    return x + _mlp(h, p["mlp"], cfg, dtype)

  block = _remat(block, remat)
  x = _embed(params, decoder_input_ids, dtype)
  for i in range(cfg.num_decoder_layers):
    x = block(x, dec[f"blocks_{i}"])
  x = rms_norm(x, dec["final_norm"]["scale"], cfg.layer_norm_epsilon)
  return _lm_logits(cfg, params, x, dtype)


# ----------------------------------------------------------------------------- public API
def encode(cfg: T5Config, params: Params, input_ids: jax.Array,
           attention_mask: Optional[jax.Array] = None, *, compute_dtype: Any = jnp.float32,
           remat: Union[bool, str] = False) -> jax.Array:
  """Encoder output (after its final norm).

  Args:
    cfg: the config (static under jit).
    params: the full T5 params dict.
    input_ids: `[B, L]` integer token ids.
    attention_mask: `[B, L]`, 1 (or True) for real tokens, 0 for padding; None: all real
      (as transformers' forward; pass the mask for padded batches). Padded keys are
      masked out; padded positions still get (unused) outputs.
    compute_dtype: dtype of the activations and matmul inputs (e.g. jnp.bfloat16);
      parameters are cast, not stored, in it.
    remat: rematerialize each block in the backward pass (True, or "dots" to keep the
      matmul outputs).

  Returns:
    `[B, L, d_model]` in `compute_dtype`.
  """
  check_params(cfg, params, "encode", decoder=False)
  input_ids = _check_ids(input_ids, "input_ids", "encode")
  mask = _check_mask(attention_mask, input_ids, "attention_mask", "encode")
  return _encode(cfg, params, input_ids, mask, jnp.dtype(compute_dtype), remat)


def decode(cfg: T5Config, params: Params, encoder_hidden: jax.Array,
           attention_mask: Optional[jax.Array], decoder_input_ids: jax.Array,
           decoder_attention_mask: Optional[jax.Array] = None, *,
           compute_dtype: Any = jnp.float32, remat: Union[bool, str] = False) -> jax.Array:
  """Teacher-forced decoder logits given the encoder output.

  Args:
    encoder_hidden: `[B, L_enc, d_model]` from `encode`.
    attention_mask: the encoder's `[B, L_enc]` mask (masks the cross-attention keys).
    decoder_input_ids: `[B, L_dec]` (e.g. `shift_right(labels, ...)`).
    decoder_attention_mask: optional `[B, L_dec]` mask of the decoder keys, on top of
      the causal mask (None: causal only, as transformers).
    cfg, params, compute_dtype, remat: as in `encode`.

  Returns:
    `[B, L_dec, vocab_size]` float32 logits.
  """
  check_params(cfg, params, "decode")
  decoder_input_ids = _check_ids(decoder_input_ids, "decoder_input_ids", "decode")
  encoder_hidden = jnp.asarray(encoder_hidden)
  if encoder_hidden.ndim != 3 or encoder_hidden.shape[0] != decoder_input_ids.shape[0] \
      or encoder_hidden.shape[2] != cfg.d_model:
    raise ValueError(f"decode: encoder_hidden must be [B={decoder_input_ids.shape[0]}, L_enc, "
                     f"{cfg.d_model}], got {encoder_hidden.shape}")
  enc_mask = _check_mask(attention_mask, encoder_hidden[..., 0], "attention_mask", "decode")
  dec_mask = None
  if decoder_attention_mask is not None:
    dec_mask = _check_mask(decoder_attention_mask, decoder_input_ids, "decoder_attention_mask",
                           "decode")
  return _decode(cfg, params, encoder_hidden, enc_mask, decoder_input_ids, dec_mask,
                 jnp.dtype(compute_dtype), remat)


def t5_logits(cfg: T5Config, params: Params, input_ids: jax.Array,
              attention_mask: Optional[jax.Array], decoder_input_ids: jax.Array,
              decoder_attention_mask: Optional[jax.Array] = None, *,
              compute_dtype: Any = jnp.float32, remat: Union[bool, str] = False) -> jax.Array:
  """Teacher-forced logits `[B, L_dec, vocab_size]` (float32) of the full model, as
  transformers' `T5ForConditionalGeneration(...).logits`. Arguments as in `encode` and
  `decode`."""
  check_params(cfg, params, "t5_logits")
  input_ids = _check_ids(input_ids, "input_ids", "t5_logits")
  decoder_input_ids = _check_ids(decoder_input_ids, "decoder_input_ids", "t5_logits")
  if input_ids.shape[0] != decoder_input_ids.shape[0]:
    raise ValueError(f"t5_logits: input_ids and decoder_input_ids have different batch sizes "
                     f"({input_ids.shape[0]} vs {decoder_input_ids.shape[0]})")
  mask = _check_mask(attention_mask, input_ids, "attention_mask", "t5_logits")
  dec_mask = None
  if decoder_attention_mask is not None:
    dec_mask = _check_mask(decoder_attention_mask, decoder_input_ids, "decoder_attention_mask",
                           "t5_logits")
  dtype = jnp.dtype(compute_dtype)
  hidden = _encode(cfg, params, input_ids, mask, dtype, remat)
  return _decode(cfg, params, hidden, mask, decoder_input_ids, dec_mask, dtype, remat)


def shift_right(labels: jax.Array, decoder_start_token_id: int, pad_token_id: int) -> jax.Array:
  """Decoder inputs for teacher forcing, as transformers' `T5._shift_right`: the start
  token, then `labels[:, :-1]`, with -100 (ignored label positions) replaced by the pad
  token."""
  labels = jnp.asarray(labels)
  if labels.ndim < 1:
    raise ValueError(f"shift_right: labels must have a length axis, got shape {labels.shape}")
  start = jnp.full(labels.shape[:-1] + (1,), decoder_start_token_id, labels.dtype)
  shifted = jnp.concatenate([start, labels[..., :-1]], axis=-1)
  return jnp.where(shifted == -100, jnp.asarray(pad_token_id, labels.dtype), shifted)


# ----------------------------------------------------------------------------- greedy decoding
@functools.partial(jax.jit, static_argnames=("cfg", "max_len", "dtype_name"))
def _greedy(cfg: T5Config, params, input_ids, attention_mask, *, max_len: int,
            dtype_name: str):
  dtype = jnp.dtype(dtype_name)
  b = input_ids.shape[0]
  eps, heads = cfg.layer_norm_epsilon, cfg.num_heads
  enc = _encode(cfg, params, input_ids, attention_mask, dtype, False)
  cross_mask = attention_mask[:, None, None, :]
  dec = params["decoder"]
  blocks = [dec[f"blocks_{i}"] for i in range(cfg.num_decoder_layers)]
  cross_kv = [(_heads(enc, p["cross_attn"]["k"]["kernel"], heads, dtype),
               _heads(enc, p["cross_attn"]["v"]["kernel"], heads, dtype)) for p in blocks]
  # buckets of key position j for query position t: row t of the causal grid
  buckets = jnp.asarray(_bucket_grid(cfg, max_len, max_len, bidirectional=False))
  table = dec["relative_attention_bias"]
  key_pos = jnp.arange(max_len, dtype=jnp.int32)
  zero = jnp.int32(0)

  def step(tok, t, cache):
    x = _embed(params, tok, dtype)[:, None, :]  # [B, 1, D]
    bias = _bias_from_buckets(table, jax.lax.dynamic_index_in_dim(buckets, t, keepdims=True))
    self_mask = (key_pos <= t)[None, None, None, :]
    new_cache = []
    for p, (ck, cv), (ek, ev) in zip(blocks, cache, cross_kv):
      h = rms_norm(x, p["self_attn_norm"]["scale"], eps)
      a = p["self_attn"]
      q = _heads(h, a["q"]["kernel"], heads, dtype)
      ck = jax.lax.dynamic_update_slice(ck, _heads(h, a["k"]["kernel"], heads, dtype),
                                        (zero, zero, t, zero))
      cv = jax.lax.dynamic_update_slice(cv, _heads(h, a["v"]["kernel"], heads, dtype),
                                        (zero, zero, t, zero))
      new_cache.append((ck, cv))
      x = x + _dense(_attend(q, ck, cv, bias, self_mask), a["o"]["kernel"], dtype)
      h = rms_norm(x, p["cross_attn_norm"]["scale"], eps)
      c = p["cross_attn"]
      q = _heads(h, c["q"]["kernel"], heads, dtype)
      x = x + _dense(_attend(q, ek, ev, None, cross_mask), c["o"]["kernel"], dtype)
      h = rms_norm(x, p["mlp_norm"]["scale"], eps)
      x = x + _mlp(h, p["mlp"], cfg, dtype)
    x = rms_norm(x, dec["final_norm"]["scale"], eps)
    return _lm_logits(cfg, params, x[:, 0], dtype), new_cache

  def cond(state):
    t, _, _, finished, _ = state
    return (t < max_len) & ~jnp.all(finished)

  def body(state):
    t, tok, out, finished, cache = state
    logits, cache = step(tok, t, cache)
    nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    nxt = jnp.where(finished, jnp.int32(cfg.pad_token_id), nxt)
    out = jax.lax.dynamic_update_slice(out, nxt[:, None], (zero, t))
    return t + 1, nxt, out, finished | (nxt == cfg.eos_token_id), cache

  shape = (b, heads, max_len, cfg.d_kv)
  cache = [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in blocks]
  state = (zero, jnp.full((b,), cfg.decoder_start_token_id, jnp.int32),
           jnp.full((b, max_len), cfg.pad_token_id, jnp.int32), jnp.zeros((b,), bool), cache)
  return jax.lax.while_loop(cond, body, state)[2]


def greedy_decode(cfg: T5Config, params: Params, input_ids: jax.Array,
                  attention_mask: Optional[jax.Array] = None, max_len: int = 32, *,
                  compute_dtype: Any = jnp.float32) -> jax.Array:
  """Greedy decoding with a key/value cache, compiled once per (config, shapes, max_len).

  The same tokens as transformers' `generate(do_sample=False, num_beams=1,
  max_new_tokens=max_len)` without its leading decoder start token: each step appends
  the arg-max token; a sequence that has produced `eos_token_id` continues with
  `pad_token_id`; the loop stops when every sequence has ended or after `max_len` steps.

  Args:
    cfg, params, input_ids, attention_mask, compute_dtype: as in `encode`.
    max_len: number of tokens to generate (static: one compilation per value).

  Returns:
    `[B, max_len]` int32 tokens (EOS included, then padding).
  """
  check_params(cfg, params, "greedy_decode")
  input_ids = _check_ids(input_ids, "input_ids", "greedy_decode")
  mask = _check_mask(attention_mask, input_ids, "attention_mask", "greedy_decode")
  if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len <= 0:
    raise ValueError(f"greedy_decode: max_len must be a positive int, got {max_len!r}")
  return _greedy(cfg, params, input_ids, mask, max_len=int(max_len),
                 dtype_name=jnp.dtype(compute_dtype).name)


# ----------------------------------------------------------------------------- rank classification
def sequence_logprob(cfg: T5Config, params: Params, input_ids: jax.Array,
                     attention_mask: Optional[jax.Array], candidates: jax.Array,
                     candidate_mask: Optional[jax.Array] = None, *,
                     length_normalize: bool = False, compute_dtype: Any = jnp.float32,
                     remat: Union[bool, str] = False) -> jax.Array:
  """Log-probability of each candidate target sequence given each input (rank
  classification: the predicted class is the candidate with the highest score).

  The encoder runs once per input; the decoder runs teacher-forced on every
  (input, candidate) pair, and a candidate's score is the sum over its tokens of
  `log_softmax(logits)[token]`.

  Args:
    input_ids, attention_mask: the `[B, L]` inputs, as in `encode`.
    candidates: `[C, T]` token ids of the candidate targets, shared by all inputs, or
      `[B, C, T]` per input; each usually ends with the EOS token. Shorter candidates are
      padded with -100 or the pad token, or described by `candidate_mask`.
    candidate_mask: optional mask of the candidates' real tokens (shape of `candidates`);
      None: every id that is neither negative nor `pad_token_id`.
    length_normalize: divide each sum by the candidate's number of tokens.
    compute_dtype, remat: as in `encode`.

  Returns:
    `[B, C]` float32 scores.
  """
  check_params(cfg, params, "sequence_logprob")
  input_ids = _check_ids(input_ids, "input_ids", "sequence_logprob")
  mask = _check_mask(attention_mask, input_ids, "attention_mask", "sequence_logprob")
  cands = jnp.asarray(candidates)
  if not jnp.issubdtype(cands.dtype, jnp.integer):
    raise TypeError(f"sequence_logprob: candidates must be integers, got {cands.dtype}")
  b = input_ids.shape[0]
  if cands.ndim == 2:
    cands = jnp.broadcast_to(cands[None], (b,) + cands.shape)
  if cands.ndim != 3 or cands.shape[0] != b:
    raise ValueError(f"sequence_logprob: candidates must be [C, T] or [B={b}, C, T], got "
                     f"{jnp.shape(candidates)}")
  if candidate_mask is None:
    valid = (cands >= 0) & (cands != cfg.pad_token_id)
  else:
    valid = jnp.asarray(candidate_mask).astype(bool)
    if valid.ndim == 2:
      valid = jnp.broadcast_to(valid[None], (b,) + valid.shape)
    if valid.shape != cands.shape:
      raise ValueError(f"sequence_logprob: candidate_mask has shape {jnp.shape(candidate_mask)}, "
                       f"candidates {jnp.shape(candidates)}")
  _, c, t = cands.shape
  labels = jnp.where(valid, cands, jnp.asarray(cfg.pad_token_id, cands.dtype)).reshape(b * c, t)
  dtype = jnp.dtype(compute_dtype)
  hidden = _encode(cfg, params, input_ids, mask, dtype, remat)
  logits = _decode(cfg, params, jnp.repeat(hidden, c, axis=0), jnp.repeat(mask, c, axis=0),
                   shift_right(labels, cfg.decoder_start_token_id, cfg.pad_token_id), None,
                   dtype, remat)
  token_lp = (jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
              - jax.nn.logsumexp(logits, axis=-1))
  valid = valid.reshape(b * c, t)
  scores = jnp.sum(jnp.where(valid, token_lp, jnp.float32(0)), axis=-1)
  if length_normalize:
    scores = scores / jnp.maximum(jnp.sum(valid, axis=-1), 1).astype(jnp.float32)
  return scores.reshape(b, c)


def rank_classify(cfg: T5Config, params: Params, input_ids: jax.Array,
                  attention_mask: Optional[jax.Array], candidates: jax.Array,
                  candidate_mask: Optional[jax.Array] = None, **kwargs) -> jax.Array:
  """`[B]` int32 index of the best-scoring candidate per input (see `sequence_logprob`)."""
  scores = sequence_logprob(cfg, params, input_ids, attention_mask, candidates, candidate_mask,
                            **kwargs)
  return jnp.argmax(scores, axis=-1).astype(jnp.int32)
