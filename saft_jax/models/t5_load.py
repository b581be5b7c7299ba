"""`load_t5` / `save_t5`: Hugging Face T5 directories <-> our T5 params (both directions).

A Hugging Face T5 directory holds `config.json` (a transformers `T5Config`) and the
weights of a `T5ForConditionalGeneration` with transformers' key names, in
`model.safetensors`, in shards listed by `model.safetensors.index.json`, or in
`pytorch_model.bin` (read through PyTorch when it is installed). T5 v1.0 (tied
embeddings, ReLU feed-forward), T5 v1.1 / Flan-T5 (gated-GELU, separate `lm_head`) and
mT5 directories are read. transformers is not needed.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from saft_jax.models import convert_common as cc
from saft_jax.models import t5 as t5_lib
from saft_jax.models.t5 import T5Config

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
_FMT = "Hugging Face T5"
# present in some checkpoints, never used: the decoder's first cross-attention has no bias
_UNUSED = "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"
_TIED_INPUTS = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")

# compiled once per (config, shapes, options); inside a caller's jit they are inlined
_STATIC = ("compute_dtype", "remat")
_encode = jax.jit(t5_lib.encode, static_argnums=0, static_argnames=_STATIC)
_logits = jax.jit(t5_lib.t5_logits, static_argnums=0, static_argnames=_STATIC)
_seq_logprob = jax.jit(t5_lib.sequence_logprob, static_argnums=0,
                       static_argnames=_STATIC + ("length_normalize",))


@dataclasses.dataclass
class T5:
  """A T5 model: its config, its params and the model functions bound to the config.

  The methods are the functions of `saft_jax.models.t5` with the config bound, compiled
  with `jax.jit` (once per input shapes and keyword options, which must be hashable:
  `compute_dtype=jnp.bfloat16`, `remat=True`, ...). They can be called inside another
  jitted or differentiated function.

  Attributes:
    config: the `T5Config`.
    params: the params dict (see `saft_jax.models.t5`).
  """
  config: T5Config
  params: dict

  def encode(self, params: dict, input_ids, attention_mask=None, **kwargs) -> jax.Array:
    """`[B, L, d_model]` encoder output; keyword arguments go to `t5.encode`."""
    return _encode(self.config, params, input_ids, attention_mask, **kwargs)

  def logits(self, params: dict, input_ids, attention_mask, decoder_input_ids,
             decoder_attention_mask=None, **kwargs) -> jax.Array:
    """`[B, L_dec, vocab_size]` float32 teacher-forced logits (`t5.t5_logits`)."""
    return _logits(self.config, params, input_ids, attention_mask, decoder_input_ids,
                            decoder_attention_mask, **kwargs)

  def greedy_decode(self, params: dict, input_ids, attention_mask=None, max_len: int = 32,
                    **kwargs) -> jax.Array:
    """`[B, max_len]` int32 greedy tokens (`t5.greedy_decode`)."""
    return t5_lib.greedy_decode(self.config, params, input_ids, attention_mask, max_len,
                                **kwargs)

  def sequence_logprob(self, params: dict, input_ids, attention_mask, candidates,
                       candidate_mask=None, **kwargs) -> jax.Array:
    """`[B, C]` float32 log-probabilities of candidate targets (`t5.sequence_logprob`)."""
    return _seq_logprob(self.config, params, input_ids, attention_mask, candidates,
                        candidate_mask, **kwargs)

  def rank_classify(self, params: dict, input_ids, attention_mask, candidates,
                    candidate_mask=None, **kwargs) -> jax.Array:
    """`[B]` int32 index of the most probable candidate (`t5.rank_classify`)."""
    scores = self.sequence_logprob(params, input_ids, attention_mask, candidates,
                                   candidate_mask, **kwargs)
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)

  def shift_right(self, labels) -> jax.Array:
    """Decoder inputs for `labels` with this model's start and pad tokens."""
    return t5_lib.shift_right(labels, self.config.decoder_start_token_id,
                              self.config.pad_token_id)


# ----------------------------------------------------------------------------- key table
def _attn(prefix: str, path: tuple) -> List[cc.Entry]:
  return [cc.entry(f"{prefix}.{n}.weight", path + (n, "kernel"), "linear") for n in "qkvo"]


def _mlp(prefix: str, path: tuple, cfg: T5Config) -> List[cc.Entry]:
  names = ("wi_0", "wi_1", "wo") if cfg.is_gated else ("wi", "wo")
  return [cc.entry(f"{prefix}.DenseReluDense.{n}.weight", path + ("mlp", n, "kernel"), "linear")
          for n in names]


def key_table(cfg: T5Config) -> List[cc.Entry]:
  """transformers key <-> our path entries for every parameter of `cfg`."""
  t = [cc.entry("shared.weight", ("shared",))]
  for stack, layers in (("encoder", cfg.num_layers), ("decoder", cfg.num_decoder_layers)):
    t.append(cc.entry(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                      (stack, "relative_attention_bias")))
    for i in range(layers):
      p, o = f"{stack}.block.{i}.layer", (stack, f"blocks_{i}")
      t.append(cc.entry(f"{p}.0.layer_norm.weight", o + ("self_attn_norm", "scale")))
      t += _attn(f"{p}.0.SelfAttention", o + ("self_attn",))
      ff = 1
      if stack == "decoder":
        t.append(cc.entry(f"{p}.1.layer_norm.weight", o + ("cross_attn_norm", "scale")))
        t += _attn(f"{p}.1.EncDecAttention", o + ("cross_attn",))
        ff = 2
      t.append(cc.entry(f"{p}.{ff}.layer_norm.weight", o + ("mlp_norm", "scale")))
      t += _mlp(f"{p}.{ff}", o, cfg)
    t.append(cc.entry(f"{stack}.final_layer_norm.weight", (stack, "final_norm", "scale")))
  if not cfg.tie_word_embeddings:
    t.append(cc.entry("lm_head.weight", ("lm_head", "kernel"), "linear"))
  return t


def _same(a, b) -> bool:
  a, b = np.asarray(a), np.asarray(b)
  return a.shape == b.shape and np.array_equal(a, b)


def resolve_tying(state: Mapping[str, np.ndarray], cfg: T5Config) -> tuple:
  """(state, cfg) with the LM head decided by the weights, as transformers 5 does.

  A distinct `lm_head.weight` makes the head separate (`tie_word_embeddings=False`); one
  equal to `shared.weight`, or none, ties it, unless config.json says
  `tie_word_embeddings: false`, where a missing `lm_head.weight` is an error. The input
  embeddings `encoder/decoder.embed_tokens.weight`, when present, must equal
  `shared.weight`. The scaling of the decoder output is kept from the config.
  """
  state = dict(state)
  shared = state.get("shared.weight")
  if shared is None:
    raise ValueError(f"{_FMT}: missing key 'shared.weight'")
  for key in _TIED_INPUTS:
    if key in state:
      if not _same(state[key], shared):
        raise ValueError(f"{_FMT}: key {key!r} differs from 'shared.weight' (separate input "
                         f"embeddings are not supported)")
      del state[key]
  head = state.get("lm_head.weight")
  if head is not None:
    tie = _same(head, shared)
    if tie:
      del state["lm_head.weight"]
  elif not cfg.tie_word_embeddings:
    raise ValueError(f"{_FMT}: missing key 'lm_head.weight' (config.json has "
                     f"tie_word_embeddings: false)")
  else:
    tie = True
  return state, dataclasses.replace(cfg, tie_word_embeddings=tie)


def params_from_hf_state_dict(state: Mapping[str, np.ndarray], cfg: T5Config, *,
                              dtype=np.float32) -> tuple:
  """(config, params) from a transformers `T5ForConditionalGeneration` state dict.

  Strict: every missing, unexpected or mis-shaped key raises a ValueError naming it.
  """
  state, cfg = resolve_tying(state, cfg)
  params = cc.import_state_dict(state, key_table(cfg), cc.shape_of(t5_lib.init_t5_params, cfg),
                                dtype=dtype, ignore=lambda k: k == _UNUSED, fmt=_FMT)
  return cfg, params


def params_to_hf_state_dict(params: Mapping, cfg: T5Config) -> Dict[str, np.ndarray]:
  """transformers `T5ForConditionalGeneration` state dict (numpy) from our params."""
  return cc.export_state_dict(params, key_table(cfg), fmt=_FMT)


# ----------------------------------------------------------------------------- files
def is_t5_dir(path: str) -> bool:
  """Whether `path` is a directory with config.json whose model_type is T5's."""
  cfg_path = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(cfg_path):
    return False
  with open(cfg_path) as f:
    return json.load(f).get("model_type") in t5_lib.MODEL_TYPES


def _shards(path: str, index_name: str) -> List[str]:
  with open(os.path.join(path, index_name)) as f:
    index = json.load(f)
  files = sorted(set(index.get("weight_map", {}).values()))
  if not files:
    raise ValueError(f"{os.path.join(path, index_name)!r}: empty weight_map")
  for name in files:
    if not os.path.isfile(os.path.join(path, name)):
      raise ValueError(f"{path!r}: shard {name!r} listed in {index_name} is missing")
  return files


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
  """All weights of a Hugging Face directory as numpy arrays (safetensors preferred)."""
  if os.path.isfile(os.path.join(path, SAFETENSORS_FILE)):
    return cc.read_safetensors(os.path.join(path, SAFETENSORS_FILE))
  if os.path.isfile(os.path.join(path, SAFETENSORS_INDEX)):
    state: Dict[str, np.ndarray] = {}
    for name in _shards(path, SAFETENSORS_INDEX):
      state.update(cc.read_safetensors(os.path.join(path, name)))
    return state
  if os.path.isfile(os.path.join(path, TORCH_FILE)):
    return cc.read_torch(os.path.join(path, TORCH_FILE))
  if os.path.isfile(os.path.join(path, TORCH_INDEX)):
    state = {}
    for name in _shards(path, TORCH_INDEX):
      state.update(cc.read_torch(os.path.join(path, name)))
    return state
  raise ValueError(f"{path!r}: no {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, {TORCH_FILE} or "
                   f"{TORCH_INDEX} next to config.json")


def load_t5(path: str, *, dtype: Any = jnp.float32) -> T5:
  """Loads a Hugging Face T5 directory (config.json + weights).

  Args:
    path: a directory saved by transformers' `T5ForConditionalGeneration.save_pretrained`
      (or `save_t5`): config.json and model.safetensors, sharded safetensors
      (model.safetensors.index.json) or pytorch_model.bin (needs PyTorch).
    dtype: dtype of the params (None keeps the file's dtypes).

  Returns:
    A `T5` with `.config`, `.params`, `.logits`, `.encode`, `.greedy_decode`,
    `.sequence_logprob`.

  Raises:
    ValueError: not a T5 directory, no weights, or a missing, unexpected or mis-shaped
      key (named in the message).
  """
  cfg_path = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(cfg_path):
    raise ValueError(f"{path!r} is not a Hugging Face T5 directory (no {CONFIG_FILE})")
  with open(cfg_path) as f:
    cfg = T5Config.from_hf_dict(json.load(f))
  np_dtype = None if dtype is None else np.dtype(jnp.dtype(dtype))
  cfg, params = params_from_hf_state_dict(read_state_dict(path), cfg, dtype=np_dtype)
  return T5(cfg, jax.tree.map(jnp.asarray, params))


def save_t5(t5: T5, path: str, *, dtype: Optional[Any] = None) -> None:
  """Writes `path/config.json` and `path/model.safetensors`, loadable by transformers'
  `T5ForConditionalGeneration.from_pretrained` (and by `load_t5`).

  Args:
    t5: a `T5` (use `dataclasses.replace(t5, params=new_params)` for new params).
    path: output directory (created).
    dtype: cast the weights to this dtype (e.g. jnp.bfloat16); None keeps theirs.
  """
  cfg = t5.config
  t5_lib.check_params(cfg, t5.params, "save_t5")
  params = jax.tree.map(np.asarray, t5.params)
  if dtype is not None:
    params = jax.tree.map(lambda a: a.astype(jnp.dtype(dtype)), params)
  state = params_to_hf_state_dict(params, cfg)
  os.makedirs(path, exist_ok=True)
  hf = cfg.to_hf_dict()
  hf["dtype"] = str(next(iter(state.values())).dtype)
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(hf, f, indent=2)
  cc.write_safetensors(state, os.path.join(path, SAFETENSORS_FILE), metadata={"format": "pt"})
