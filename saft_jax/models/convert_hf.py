"""Hugging Face transformers `CLIPModel` checkpoints <-> our params (both directions).

A Hugging Face CLIP directory holds `config.json` (a `CLIPConfig`) and
`model.safetensors` with transformers' key names (`vision_model.*`, `text_model.*`,
`visual_projection.weight`, `text_projection.weight`, `logit_scale`). The activation is
config.json's `hidden_act` ("quick_gelu", transformers' default when absent, or "gelu").
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping

import numpy as np

from saft_jax.models import convert_common as cc
from saft_jax.models.clip import init_clip_params
from saft_jax.models.configs import CLIPConfig, TextConfig, VisionConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}
_LEGACY_EOS = 2  # transformers pools at argmax(input_ids) when eos_token_id == 2


def _act(name: str, where: str) -> str:
  if name not in _ACTS:
    raise ValueError(f"{where}.hidden_act {name!r} is not supported (quick_gelu or gelu)")
  return _ACTS[name]


def _int(v, where):
  if isinstance(v, (list, tuple)):
    if len(set(v)) != 1:
      raise ValueError(f"{where}: non-square value {v} is not supported")
    v = v[0]
  return int(v)


def config_from_hf(hf: Mapping[str, Any]) -> CLIPConfig:
  """Our `CLIPConfig` from a transformers `CLIPConfig` dict (the parsed config.json)."""
  if hf.get("model_type", "clip") != "clip":
    raise ValueError(f"config.json: model_type {hf.get('model_type')!r} is not 'clip'")
  t, v = hf.get("text_config") or {}, hf.get("vision_config") or {}
  proj = int(hf.get("projection_dim", 512))
  t_width = int(t.get("hidden_size", 512))
  v_width = int(v.get("hidden_size", 768))
  eos = t.get("eos_token_id", 49407)
  if isinstance(eos, (list, tuple)):
    eos = eos[0]
  text = TextConfig(
      context_length=int(t.get("max_position_embeddings", 77)),
      vocab_size=int(t.get("vocab_size", 49408)), width=t_width,
      layers=int(t.get("num_hidden_layers", 12)), heads=int(t.get("num_attention_heads", 8)),
      output_dim=proj, mlp_ratio=int(t.get("intermediate_size", 2048)) / t_width,
      act=_act(t.get("hidden_act", "quick_gelu"), "text_config"),
      ln_eps=float(t.get("layer_norm_eps", 1e-5)),
      eos_token_id=None if eos == _LEGACY_EOS else (None if eos is None else int(eos)))
  vision = VisionConfig(
      image_size=_int(v.get("image_size", 224), "vision_config.image_size"),
      patch_size=_int(v.get("patch_size", 32), "vision_config.patch_size"), width=v_width,
      layers=int(v.get("num_hidden_layers", 12)), heads=int(v.get("num_attention_heads", 12)),
      output_dim=proj, mlp_ratio=int(v.get("intermediate_size", 3072)) / v_width,
      act=_act(v.get("hidden_act", "quick_gelu"), "vision_config"),
      in_channels=int(v.get("num_channels", 3)), ln_eps=float(v.get("layer_norm_eps", 1e-5)))
  return CLIPConfig(vision, text, float(hf.get("logit_scale_init_value", 2.6592)))


def config_to_hf(cfg: CLIPConfig) -> Dict[str, Any]:
  """A transformers `CLIPConfig` dict for `cfg` (what `save_clip(..., format="hf")` writes).

  Argmax pooling (`eos_token_id=None`) is written as transformers' legacy
  `eos_token_id: 2`, which selects the same argmax rule there.
  """
  t, v = cfg.text, cfg.vision
  return {
      "architectures": ["CLIPModel"], "model_type": "clip",
      "projection_dim": cfg.embed_dim, "logit_scale_init_value": cfg.logit_scale_init,
      "initializer_factor": 1.0,
      "text_config": {
          "model_type": "clip_text_model", "vocab_size": t.vocab_size, "hidden_size": t.width,
          "intermediate_size": t.mlp_dim, "projection_dim": cfg.embed_dim,
          "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
          "max_position_embeddings": t.context_length, "hidden_act": t.act,
          "layer_norm_eps": t.ln_eps,
          "eos_token_id": _LEGACY_EOS if t.eos_token_id is None else t.eos_token_id},
      "vision_config": {
          "model_type": "clip_vision_model", "hidden_size": v.width,
          "intermediate_size": v.mlp_dim, "projection_dim": cfg.embed_dim,
          "num_hidden_layers": v.layers, "num_attention_heads": v.heads,
          "num_channels": v.in_channels, "image_size": v.image_size,
          "patch_size": v.patch_size, "hidden_act": v.act, "layer_norm_eps": v.ln_eps},
  }


def _blocks(prefix: str, tower: str, layers: int) -> List[cc.Entry]:
  out = []
  for i in range(layers):
    p, o = f"{prefix}.encoder.layers.{i}", (tower, f"blocks_{i}")
    for ln_hf, ln in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2")):
      out.append(cc.entry(f"{p}.{ln_hf}.weight", o + (ln, "scale")))
      out.append(cc.entry(f"{p}.{ln_hf}.bias", o + (ln, "bias")))
    for hf_name, name in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("out_proj", "out")):
      out.append(cc.entry(f"{p}.self_attn.{hf_name}.weight", o + ("attn", name, "kernel"), "linear"))
      out.append(cc.entry(f"{p}.self_attn.{hf_name}.bias", o + ("attn", name, "bias")))
    for hf_name, name in (("fc1", "fc"), ("fc2", "proj")):
      out.append(cc.entry(f"{p}.mlp.{hf_name}.weight", o + ("mlp", name, "kernel"), "linear"))
      out.append(cc.entry(f"{p}.mlp.{hf_name}.bias", o + ("mlp", name, "bias")))
  return out


def key_table(cfg: CLIPConfig) -> List[cc.Entry]:
  """transformers key <-> our path entries for every parameter of `cfg`."""
  vm, tm = "vision_model", "text_model"
  t = [
      cc.entry(f"{vm}.embeddings.patch_embedding.weight", ("visual", "conv1", "kernel"), "conv"),
      cc.entry(f"{vm}.embeddings.class_embedding", ("visual", "class_embedding")),
      cc.entry(f"{vm}.embeddings.position_embedding.weight", ("visual", "positional_embedding")),
      cc.entry(f"{vm}.pre_layrnorm.weight", ("visual", "ln_pre", "scale")),
      cc.entry(f"{vm}.pre_layrnorm.bias", ("visual", "ln_pre", "bias")),
  ]
  t += _blocks(vm, "visual", cfg.vision.layers)
  t += [
      cc.entry(f"{vm}.post_layernorm.weight", ("visual", "ln_post", "scale")),
      cc.entry(f"{vm}.post_layernorm.bias", ("visual", "ln_post", "bias")),
      cc.entry("visual_projection.weight", ("visual", "proj", "kernel"), "linear"),
      cc.entry(f"{tm}.embeddings.token_embedding.weight", ("text", "token_embedding")),
      cc.entry(f"{tm}.embeddings.position_embedding.weight", ("text", "positional_embedding")),
  ]
  t += _blocks(tm, "text", cfg.text.layers)
  t += [
      cc.entry(f"{tm}.final_layer_norm.weight", ("text", "ln_final", "scale")),
      cc.entry(f"{tm}.final_layer_norm.bias", ("text", "ln_final", "bias")),
      cc.entry("text_projection.weight", ("text", "proj", "kernel"), "linear"),
      cc.entry("logit_scale", ("logit_scale",)),
  ]
  return t


def _ignored(key: str) -> bool:
  return key.endswith("position_ids")


def params_from_hf_state_dict(state: Mapping[str, np.ndarray], cfg: CLIPConfig, *,
                              dtype=np.float32) -> dict:
  """Our params from a transformers `CLIPModel` state dict (strict; errors name keys)."""
  state = dict(state)
  if "logit_scale" in state:
    state["logit_scale"] = np.asarray(state["logit_scale"]).reshape(())
  return cc.import_state_dict(state, key_table(cfg), cc.shape_of(init_clip_params, cfg),
                              dtype=dtype, ignore=_ignored, fmt="Hugging Face CLIP")


def params_to_hf_state_dict(params: Mapping, cfg: CLIPConfig) -> Dict[str, np.ndarray]:
  """transformers `CLIPModel` state dict (numpy) from our params."""
  return cc.export_state_dict(params, key_table(cfg), fmt="Hugging Face CLIP")


def is_hf_dir(path: str) -> bool:
  return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE))


def has_hf_weights(path: str) -> bool:
  return any(os.path.isfile(os.path.join(path, n)) for n in (WEIGHTS_FILE, "pytorch_model.bin"))


def load_hf(path: str, *, dtype=np.float32):
  """(config, params) from a Hugging Face CLIP directory (config.json + model.safetensors)."""
  with open(os.path.join(path, CONFIG_FILE)) as f:
    cfg = config_from_hf(json.load(f))
  weights = os.path.join(path, WEIGHTS_FILE)
  if os.path.isfile(weights):
    state = cc.read_safetensors(weights)
  elif os.path.isfile(os.path.join(path, "pytorch_model.bin")):
    state = cc.read_torch(os.path.join(path, "pytorch_model.bin"))
  else:
    raise ValueError(f"{path!r}: no {WEIGHTS_FILE} (or pytorch_model.bin) next to config.json")
  return cfg, params_from_hf_state_dict(state, cfg, dtype=dtype)


def save_hf(cfg: CLIPConfig, params: Mapping, path: str) -> None:
  """Writes `path/config.json` and `path/model.safetensors` (loadable by CLIPModel)."""
  os.makedirs(path, exist_ok=True)
  state = params_to_hf_state_dict(params, cfg)
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(config_to_hf(cfg), f, indent=2)
  cc.write_safetensors(state, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})
