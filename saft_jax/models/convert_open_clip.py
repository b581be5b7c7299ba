"""open_clip / OpenAI CLIP state dicts <-> our params (both directions).

Key names as in open_clip's `CLIP` model (OpenAI weights): `visual.conv1.weight`,
`visual.class_embedding`, `visual.positional_embedding`, `visual.ln_pre.*`,
`visual.transformer.resblocks.{i}.{ln_1, attn.in_proj_weight [3W, W], attn.in_proj_bias,
attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`, `visual.ln_post.*`, `visual.proj [W, D]`
(used as `x @ proj`), `token_embedding.weight`, `positional_embedding`,
`transformer.resblocks.{i}...`, `ln_final.*`, `text_projection [W, D]`, `logit_scale`.
The `attn_mask` buffer and OpenAI's `input_resolution`/`context_length`/`vocab_size`
entries are accepted and ignored.

Where the activation comes from (an explicit `act=` always wins):
  * a directory in open_clip's hub layout (`open_clip_config.json` + weights, what
    open_clip's `push_to_hf_hub` writes and `local-dir:` reads): `model_cfg.quick_gelu`
    (open_clip's default, false, is GELU), which also gives the heads;
  * OpenAI's original TorchScript `.pt` archives: always QuickGELU;
  * a bare state dict (`.safetensors`, `.pt`, `.bin`) records no activation: `act=` (or a
    `config=`, whose act is used) is required, else `UnknownActivationError`. Its heads
    are `width // 64` (open_clip's head width for every CLIP preset) unless `config=`.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Mapping, Optional

import numpy as np

from saft_jax.models import convert_common as cc
from saft_jax.models.clip import init_clip_params
from saft_jax.models.configs import (ACT_CHOICES, CLIPConfig, TextConfig, VisionConfig,
                                     check_act, with_act)

_IGNORED = ("attn_mask", "input_resolution", "context_length", "vocab_size")
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"  # what save_open_clip writes in a directory
# open_clip's preference among the weight files of a directory (factory._find_checkpoint_in_dir)
WEIGHTS_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                 "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth",
                 "model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")
STATE_DICT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


class UnknownActivationError(ValueError):
  """A checkpoint that does not record its activation, loaded without `act=`."""


def unknown_activation_error(path: str) -> UnknownActivationError:
  return UnknownActivationError(
      f"{path!r} is a bare open_clip state dict: it does not record the activation its weights "
      "were trained with, and the wrong one gives silently different embeddings. Pass "
      f"act=: {ACT_CHOICES}. Alternatively load a checkpoint that records it: a directory with "
      f"{CONFIG_FILE} (open_clip's hub layout, also written by save_clip(clip, DIR, "
      "format=\"open_clip\")), a Hugging Face CLIP directory (config.json), or OpenAI's "
      "original TorchScript .pt; or pass config= (its act is used).")


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


def infer_config(state: Mapping[str, np.ndarray], *, act: str,
                 head_width: int = 64) -> CLIPConfig:
  """Our `CLIPConfig` from the shapes of an open_clip state dict (as open_clip's
  `build_model_from_openai_state_dict`); heads = width // head_width. The shapes do not
  tell the activation: `act` ("gelu" or "quick_gelu") is required."""
  check_act(act)
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


# ----------------------------------------------------------------------------- model_cfg
# open_clip settings (vision_cfg / text_cfg) our towers do not implement, with the values
# that are fine (open_clip's defaults); any other value is refused by name.
_OFF = (None, False)
_UNSUPPORTED_COMMON = {
    "ls_init_value": (None,), "act_kwargs": (None, {}), "final_ln_after_pool": _OFF,
    "block_type": (None, "default"), "qk_norm": _OFF, "scaled_cosine_attn": _OFF,
    "scale_heads": _OFF, "scale_attn_inner": _OFF, "scale_attn": _OFF, "scale_fc": _OFF,
}
_UNSUPPORTED_VISION = dict(
    _UNSUPPORTED_COMMON, timm_model_name=(None, ""), attentional_pool=_OFF, no_ln_pre=_OFF,
    pool_type=("tok",), pos_embed_type=("learnable",))
_UNSUPPORTED_TEXT = dict(
    _UNSUPPORTED_COMMON, hf_model_name=(None, ""), text_arch=("clip",), embed_cls=_OFF,
    no_causal_mask=_OFF, proj_bias=_OFF, proj_type=("linear",), variable_text=_OFF,
    pool_type=("argmax", "eos"))
_UNSUPPORTED_TOP = {"custom_text": _OFF, "multimodal_cfg": (None,), "genlip_cfg": (None,),
                    "genlap_cfg": (None,), "audio_cfg": (None,), "init_logit_bias": (None,)}


def _refuse(cfg: Mapping[str, Any], table: Mapping[str, tuple], where: str) -> None:
  bad = [f"{k}={cfg[k]!r}" for k, ok in table.items()
         if k in cfg and not any(cfg[k] == v and type(cfg[k]) is type(v) for v in ok)]
  if bad:
    raise ValueError(f"open_clip {where}: {', '.join(bad)} not supported (saft_jax implements "
                     "open_clip's plain ViT CLIP)")


def _square(v, where: str) -> int:
  if isinstance(v, (list, tuple)):
    if len(set(v)) != 1:
      raise ValueError(f"open_clip {where}: non-square value {v} is not supported")
    v = v[0]
  return int(v)


def _ln_eps(cfg: Mapping[str, Any], where: str) -> float:
  kw = dict(cfg.get("norm_kwargs") or {})
  eps = float(kw.pop("eps", 1e-5))
  if kw:
    raise ValueError(f"open_clip {where}.norm_kwargs: only eps is supported, got {sorted(kw)}")
  return eps


def config_from_open_clip(model_cfg: Mapping[str, Any]) -> CLIPConfig:
  """Our `CLIPConfig` from an open_clip model config (`model_configs/*.json`, or the
  `model_cfg` of an `open_clip_config.json`); open_clip's defaults fill missing fields.

  The activation is `quick_gelu` when `model_cfg["quick_gelu"]` is true, else `gelu`
  (open_clip's default). Settings our towers do not implement raise a ValueError.
  """
  if "embed_dim" not in model_cfg or "vision_cfg" not in model_cfg:
    raise ValueError("open_clip model_cfg needs embed_dim and vision_cfg (a CLIP image-text "
                     f"model), got keys {sorted(model_cfg)}")
  _refuse(model_cfg, _UNSUPPORTED_TOP, "model_cfg")
  v, t = model_cfg["vision_cfg"], model_cfg.get("text_cfg") or {}
  _refuse(v, _UNSUPPORTED_VISION, "vision_cfg")
  _refuse(t, _UNSUPPORTED_TEXT, "text_cfg")
  if isinstance(v.get("layers", 12), (list, tuple)):
    raise ValueError("open_clip vision_cfg: a ModifiedResNet image tower (layers as a list) is "
                     "not supported")
  act = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
  embed = int(model_cfg["embed_dim"])
  v_width, t_width = int(v.get("width", 768)), int(t.get("width", 512))
  # open_clip's MLP width is int(width * mlp_ratio); ours is round(width * mlp_ratio)
  v_mlp = int(v_width * float(v.get("mlp_ratio", 4.0)))
  t_mlp = int(t_width * float(t.get("mlp_ratio", 4.0)))
  eos = None
  if t.get("pool_type", "argmax") == "eos":
    if not isinstance(t.get("eos_id"), int):
      raise ValueError("open_clip text_cfg: pool_type 'eos' needs an int eos_id")
    eos = t["eos_id"]
  head_width = int(v.get("head_width", 64))
  if v_width % head_width:
    raise ValueError(f"open_clip vision_cfg: width {v_width} is not a multiple of head_width "
                     f"{head_width}")
  vision = VisionConfig(
      image_size=_square(v.get("image_size", 224), "vision_cfg.image_size"),
      patch_size=_square(v.get("patch_size", 16), "vision_cfg.patch_size"), width=v_width,
      layers=int(v.get("layers", 12)), heads=v_width // head_width, output_dim=embed,
      mlp_ratio=v_mlp / v_width, act=act, ln_eps=_ln_eps(v, "vision_cfg"))
  text = TextConfig(
      context_length=int(t.get("context_length", 77)), vocab_size=int(t.get("vocab_size", 49408)),
      width=t_width, layers=int(t.get("layers", 12)), heads=int(t.get("heads", 8)),
      output_dim=embed, mlp_ratio=t_mlp / t_width, act=act, ln_eps=_ln_eps(t, "text_cfg"),
      eos_token_id=eos)
  # open_clip's default init_logit_scale, log(1 / 0.07), is our default (rounded)
  if "init_logit_scale" in model_cfg:
    return CLIPConfig(vision, text, float(model_cfg["init_logit_scale"]))
  return CLIPConfig(vision, text)


def _mlp_ratio(width: int, mlp_dim: int) -> float:
  """A ratio r with int(width * r) == mlp_dim (open_clip) and round(width * r) == mlp_dim."""
  r = mlp_dim / width
  while int(width * r) < mlp_dim:
    r = float(np.nextafter(r, np.inf))
  return r


def config_to_open_clip(cfg: CLIPConfig) -> Dict[str, Any]:
  """An open_clip `model_cfg` for `cfg` (inverse of `config_from_open_clip`)."""
  v, t = cfg.vision, cfg.text
  if v.act != t.act:
    raise ValueError(f"open_clip has one activation for both towers; got vision {v.act!r}, "
                     f"text {t.act!r}")
  if v.in_channels != 3:
    raise ValueError(f"open_clip's image tower takes 3 channels, got {v.in_channels}")
  vision = dict(image_size=v.image_size, patch_size=v.patch_size, width=v.width,
                layers=v.layers, head_width=v.head_dim, mlp_ratio=_mlp_ratio(v.width, v.mlp_dim))
  text = dict(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width,
              heads=t.heads, layers=t.layers, mlp_ratio=_mlp_ratio(t.width, t.mlp_dim))
  for d, tower in ((vision, v), (text, t)):
    if tower.ln_eps != 1e-5:
      d["norm_kwargs"] = {"eps": tower.ln_eps}
  if t.eos_token_id is not None:
    text.update(pool_type="eos", eos_id=t.eos_token_id)
  out: Dict[str, Any] = {"embed_dim": cfg.embed_dim}
  if v.act == "quick_gelu":
    out["quick_gelu"] = True
  out.update(vision_cfg=vision, text_cfg=text)
  if cfg.logit_scale_init != CLIPConfig().logit_scale_init:
    out["init_logit_scale"] = cfg.logit_scale_init
  return out


# ----------------------------------------------------------------------------- files
def is_open_clip_dir(path: str) -> bool:
  """A directory in open_clip's hub layout (open_clip_config.json next to the weights)."""
  return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE))


def read_model_cfg(path: str) -> Dict[str, Any]:
  """The `model_cfg` of `path/open_clip_config.json`."""
  with open(os.path.join(path, CONFIG_FILE)) as f:
    raw = json.load(f)
  if not isinstance(raw, dict) or not isinstance(raw.get("model_cfg"), dict):
    raise ValueError(f"{os.path.join(path, CONFIG_FILE)!r} has no model_cfg")
  return raw["model_cfg"]


def find_weights(path: str) -> str:
  """The weight file of an open_clip directory, in open_clip's order of preference."""
  for name in WEIGHTS_FILES:
    if os.path.isfile(os.path.join(path, name)):
      return os.path.join(path, name)
  raise ValueError(f"{path!r}: no weights next to {CONFIG_FILE} (looked for "
                   f"{', '.join(WEIGHTS_FILES)})")


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
  if path.endswith(".safetensors"):
    return cc.read_safetensors(path)
  return cc.read_torch(path)


def load_open_clip(path: str, *, config: Optional[CLIPConfig] = None, act: Optional[str] = None,
                   dtype=np.float32):
  """(config, params) from open_clip weights: a state-dict file (.safetensors, .pt, .pth,
  .bin; OpenAI's TorchScript .pt included) or a directory with open_clip_config.json.

  Args:
    path: the file or directory.
    config: overrides the config read from open_clip_config.json or inferred from the
      shapes (its act is used unless `act` is given; a checkpoint that records another
      activation raises).
    act: "gelu" or "quick_gelu"; always wins. Needed for a bare state dict without `config`.
    dtype: dtype of the float params (None keeps the file's).

  Raises:
    UnknownActivationError: a bare state dict with neither `act` nor `config`.
  """
  if act is not None:
    check_act(act)
  model_cfg, recorded, where = None, None, None
  if os.path.isdir(path):
    model_cfg = read_model_cfg(path)
    weights = find_weights(path)
    recorded = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
    where = f"{CONFIG_FILE}: quick_gelu={bool(model_cfg.get('quick_gelu', False))}"
  else:
    weights = path
    if not path.endswith(".safetensors") and cc.is_torchscript(path):
      recorded, where = "quick_gelu", "an OpenAI TorchScript archive"
  if act is None and config is None and recorded is None:
    raise unknown_activation_error(path)
  state = read_state_dict(weights)
  if config is not None:
    cfg = config
    if act is None and recorded is not None and {cfg.vision.act, cfg.text.act} != {recorded}:
      raise ValueError(
          f"{path!r} records the activation {recorded!r} ({where}) but config= has "
          f"vision {cfg.vision.act!r} / text {cfg.text.act!r}; pass act= to choose: "
          f"{ACT_CHOICES}")
  elif model_cfg is not None:
    cfg = config_from_open_clip(model_cfg)
  else:
    cfg = infer_config(state, act=act or recorded)
  if act is not None:
    cfg = with_act(cfg, act)
  return cfg, params_from_open_clip_state_dict(state, cfg, dtype=dtype)


def save_open_clip(cfg: CLIPConfig, params: Mapping, path: str) -> None:
  """Writes open_clip weights.

  A path ending in `.safetensors` gets a safetensors state dict, `.pt`/`.pth`/`.bin` a
  `torch.save` one (neither records the activation); any other path is a directory in
  open_clip's hub layout: `open_clip_config.json` (`{"model_cfg": ...}`, which records the
  activation and heads) and `open_clip_model.safetensors`, loadable by `load_clip` and by
  open_clip's `create_model("local-dir:PATH")`.
  """
  state = params_to_open_clip_state_dict(params, cfg)
  if path.endswith(".safetensors"):
    cc.write_safetensors(state, path)
  elif path.endswith(STATE_DICT_SUFFIXES):
    cc.write_torch(state, path)
  else:
    model_cfg = config_to_open_clip(cfg)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
      json.dump({"model_cfg": model_cfg}, f, indent=2)
    cc.write_safetensors(state, os.path.join(path, WEIGHTS_FILE))
