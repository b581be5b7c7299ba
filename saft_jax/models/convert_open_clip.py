"""open_clip / OpenAI CLIP state dicts <-> our params (both directions).

Key names as in open_clip's `CLIP` model (OpenAI weights): `visual.conv1.weight`,
`visual.class_embedding`, `visual.positional_embedding`, `visual.ln_pre.*`,
`visual.transformer.resblocks.{i}.{ln_1, attn.in_proj_weight [3W, W], attn.in_proj_bias,
attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`, `visual.ln_post.*`, `visual.proj [W, D]`
(used as `x @ proj`), `token_embedding.weight`, `positional_embedding`,
`transformer.resblocks.{i}...`, `ln_final.*`, `text_projection [W, D]`, `logit_scale`.
The `attn_mask` buffer and OpenAI's `input_resolution`/`context_length`/`vocab_size`
entries are accepted and ignored.

A state dict does not record the number of heads nor the activation: heads default to
`width // 64` (open_clip's head width for every CLIP preset) and the activation to
QuickGELU (OpenAI weights); pass `config=` (or `act="gelu"` for LAION weights) otherwise.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional

import numpy as np

from saft_jax.models import convert_common as cc
from saft_jax.models.clip import init_clip_params
from saft_jax.models.configs import CLIPConfig, TextConfig, VisionConfig

_IGNORED = ("attn_mask", "input_resolution", "context_length", "vocab_size")


def _blocks(prefix: str, tower: str, layers: int) -> List[cc.Entry]:
  out = []
  for i in range(layers):
    p, o = f"{prefix}resblocks.{i}", (tower, f"blocks_{i}")
    for ln in ("ln_1", "ln_2"):
      out.append(cc.entry(f"{p}.{ln}.weight", o + (ln, "scale")))
      out.append(cc.entry(f"{p}.{ln}.bias", o + (ln, "bias")))
    out.append(cc.Entry((f"{p}.attn.in_proj_weight",),
                        tuple(o + ("attn", n, "kernel") for n in "qkv"), "fused_linear"))
    out.append(cc.Entry((f"{p}.attn.in_proj_bias",),
                        tuple(o + ("attn", n, "bias") for n in "qkv"), "fused_bias"))
    out.append(cc.entry(f"{p}.attn.out_proj.weight", o + ("attn", "out", "kernel"), "linear"))
    out.append(cc.entry(f"{p}.attn.out_proj.bias", o + ("attn", "out", "bias")))
    for oc, name in (("c_fc", "fc"), ("c_proj", "proj")):
      out.append(cc.entry(f"{p}.mlp.{oc}.weight", o + ("mlp", name, "kernel"), "linear"))
      out.append(cc.entry(f"{p}.mlp.{oc}.bias", o + ("mlp", name, "bias")))
  return out


def key_table(cfg: CLIPConfig) -> List[cc.Entry]:
  """open_clip key <-> our path entries for every parameter of `cfg`."""
  t = [
      cc.entry("visual.conv1.weight", ("visual", "conv1", "kernel"), "conv"),
      cc.entry("visual.class_embedding", ("visual", "class_embedding")),
      cc.entry("visual.positional_embedding", ("visual", "positional_embedding")),
      cc.entry("visual.ln_pre.weight", ("visual", "ln_pre", "scale")),
      cc.entry("visual.ln_pre.bias", ("visual", "ln_pre", "bias")),
  ]
  t += _blocks("visual.transformer.", "visual", cfg.vision.layers)
  t += [
      cc.entry("visual.ln_post.weight", ("visual", "ln_post", "scale")),
      cc.entry("visual.ln_post.bias", ("visual", "ln_post", "bias")),
      cc.entry("visual.proj", ("visual", "proj", "kernel")),
      cc.entry("token_embedding.weight", ("text", "token_embedding")),
      cc.entry("positional_embedding", ("text", "positional_embedding")),
  ]
  t += _blocks("transformer.", "text", cfg.text.layers)
  t += [
      cc.entry("ln_final.weight", ("text", "ln_final", "scale")),
      cc.entry("ln_final.bias", ("text", "ln_final", "bias")),
      cc.entry("text_projection", ("text", "proj", "kernel")),
      cc.entry("logit_scale", ("logit_scale",)),
  ]
  return t


def _need(state, key):
  if key not in state:
    raise ValueError(f"open_clip: missing key {key!r}")
  return np.asarray(state[key])


def infer_config(state: Mapping[str, np.ndarray], *, act: str = "quick_gelu",
                 head_width: int = 64) -> CLIPConfig:
  """Our `CLIPConfig` from the shapes of an open_clip state dict (as open_clip's
  `build_model_from_openai_state_dict`); heads = width // head_width."""
  conv = _need(state, "visual.conv1.weight")
  v_width, in_ch, patch = conv.shape[0], conv.shape[1], conv.shape[-1]
  grid = round(math.sqrt(_need(state, "visual.positional_embedding").shape[0] - 1))
  out_dim = _need(state, "visual.proj").shape[1]
  v_layers = cc.block_indices(state, "visual.transformer.resblocks.")
  v_mlp = _need(state, "visual.transformer.resblocks.0.mlp.c_fc.weight").shape[0]
  tok = _need(state, "token_embedding.weight")
  t_width = _need(state, "ln_final.weight").shape[0]
  t_layers = cc.block_indices(state, "transformer.resblocks.")
  t_mlp = _need(state, "transformer.resblocks.0.mlp.c_fc.weight").shape[0]
  for w, name in ((v_width, "visual"), (t_width, "text")):
    if w % head_width:
      raise ValueError(f"open_clip: {name} width {w} is not a multiple of head_width "
                       f"{head_width}; pass config= explicitly")
  vision = VisionConfig(image_size=patch * grid, patch_size=patch, width=v_width,
                        layers=v_layers, heads=v_width // head_width, output_dim=out_dim,
                        mlp_ratio=v_mlp / v_width, act=act, in_channels=in_ch)
  text = TextConfig(context_length=_need(state, "positional_embedding").shape[0],
                    vocab_size=tok.shape[0], width=t_width, layers=t_layers,
                    heads=t_width // head_width,
                    output_dim=_need(state, "text_projection").shape[1],
                    mlp_ratio=t_mlp / t_width, act=act)
  return CLIPConfig(vision, text)


def params_from_open_clip_state_dict(state: Mapping[str, np.ndarray], cfg: CLIPConfig, *,
                                     dtype=np.float32) -> dict:
  """Our params from an open_clip state dict (strict; errors name the key)."""
  state = dict(state)
  if "logit_scale" in state:
    state["logit_scale"] = np.asarray(state["logit_scale"]).reshape(())
  return cc.import_state_dict(state, key_table(cfg), cc.shape_of(init_clip_params, cfg),
                              dtype=dtype, ignore=lambda k: k in _IGNORED, fmt="open_clip")


def params_to_open_clip_state_dict(params: Mapping, cfg: CLIPConfig) -> Dict[str, np.ndarray]:
  """open_clip state dict (numpy; no `attn_mask`, which open_clip does not persist)."""
  return cc.export_state_dict(params, key_table(cfg), fmt="open_clip")


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
  if path.endswith(".safetensors"):
    return cc.read_safetensors(path)
  return cc.read_torch(path)


def load_open_clip(path: str, *, config: Optional[CLIPConfig] = None, act: str = "quick_gelu",
                   dtype=np.float32):
  """(config, params) from an open_clip state-dict file (.safetensors, .pt or .bin)."""
  state = read_state_dict(path)
  cfg = config if config is not None else infer_config(state, act=act)
  return cfg, params_from_open_clip_state_dict(state, cfg, dtype=dtype)


def save_open_clip(cfg: CLIPConfig, params: Mapping, path: str) -> None:
  """Writes an open_clip state dict: safetensors for `.safetensors`, else `torch.save`."""
  state = params_to_open_clip_state_dict(params, cfg)
  if path.endswith(".safetensors"):
    cc.write_safetensors(state, path)
  else:
    cc.write_torch(state, path)
