"""`load_clip` / `save_clip`: one entry point for Hugging Face and open_clip weights."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from saft_jax.models import clip as clip_lib
from saft_jax.models import convert_hf, convert_open_clip
from saft_jax.models.configs import CLIPConfig, check_act, with_act
from saft_jax.models.convert_open_clip import UnknownActivationError  # noqa: F401

FORMATS = ("hf", "open_clip")
_STATE_DICT_SUFFIXES = convert_open_clip.STATE_DICT_SUFFIXES


@dataclasses.dataclass
class CLIP:
  """A CLIP model: its config, its params and the tower functions bound to the config.

  Attributes:
    config: the `CLIPConfig`.
    params: `{"visual": ..., "text": ..., "logit_scale": ...}` (plain nested dict).
    source_format: "hf", "open_clip" or None (built in memory).
  """
  config: CLIPConfig
  params: dict
  source_format: Optional[str] = None

  def encode_image(self, params: dict, images: jax.Array, **kwargs) -> jax.Array:
    """`[B, D]` image embeddings (not normalized); `params` is the full params dict.

    Keyword arguments go to `saft_jax.models.encode_image` (compute_dtype, ...).
    """
    return clip_lib.encode_image(self.config.vision, params["visual"], images, **kwargs)

  def encode_text(self, params: dict, token_ids: jax.Array, **kwargs) -> jax.Array:
    """`[B, D]` text embeddings (not normalized); `params` is the full params dict."""
    return clip_lib.encode_text(self.config.text, params["text"], token_ids, **kwargs)

  def logits(self, params: dict, images: jax.Array, token_ids: jax.Array, **kwargs):
    """`(logits_per_image, logits_per_text)` as transformers' CLIPModel."""
    return clip_lib.clip_logits(self.config, params, images, token_ids, **kwargs)


def detect_format(path: str) -> str:
  """"hf" for a Hugging Face CLIP directory (config.json), "open_clip" for a directory in
  open_clip's hub layout (open_clip_config.json) or a state-dict file.

  A directory with both (as LAION's hub repositories) is read as Hugging Face when its
  Hugging Face weights are there, else as open_clip.
  """
  if convert_hf.is_hf_dir(path):
    if convert_open_clip.is_open_clip_dir(path) and not convert_hf.has_hf_weights(path):
      return "open_clip"
    return "hf"
  if convert_open_clip.is_open_clip_dir(path):
    return "open_clip"
  if os.path.isfile(path) and path.endswith(_STATE_DICT_SUFFIXES):
    return "open_clip"
  if os.path.isdir(path):
    raise ValueError(f"{path!r} is a directory without config.json (Hugging Face CLIP) or "
                     f"{convert_open_clip.CONFIG_FILE} (open_clip)")
  raise ValueError(f"{path!r}: not a Hugging Face CLIP directory, an open_clip directory nor "
                   f"an open_clip state-dict file ({', '.join(_STATE_DICT_SUFFIXES)})")


def load_clip(path: str, *, config: Optional[CLIPConfig] = None, act: Optional[str] = None,
              dtype: Any = jnp.float32) -> CLIP:
  """Loads CLIP weights, detecting the format.

  The activation (GELU or QuickGELU) is read where the checkpoint records it: `hidden_act`
  in a Hugging Face config.json, `model_cfg.quick_gelu` in open_clip's
  open_clip_config.json, QuickGELU for OpenAI's TorchScript .pt archives. A bare open_clip
  state dict does not record it: pass `act` (or `config`).

  Args:
    path: a Hugging Face CLIP directory (config.json + model.safetensors), a directory in
      open_clip's hub layout (open_clip_config.json + open_clip_model.safetensors or
      open_clip_pytorch_model.bin), or an open_clip state-dict file (.safetensors, .pt,
      .pth, .bin; the torch formats need PyTorch).
    config: overrides the config of open_clip weights (needed for state-dict files whose
      heads are not width // 64); its act is used unless `act` is given. Ignored for
      Hugging Face directories, which carry their config.
    act: "gelu" (open_clip-trained weights such as laion2b) or "quick_gelu" (OpenAI
      weights). Always wins over what the checkpoint records; required for a bare open_clip
      state dict loaded without `config`.
    dtype: dtype of the float params (None keeps the file's dtypes).

  Returns:
    A `CLIP` with `.config`, `.params`, `.encode_image`, `.encode_text`.

  Raises:
    UnknownActivationError: (a ValueError) a bare open_clip state dict without `act` and
      `config`; the message says which value fits which weights.
  """
  if act is not None:
    check_act(act)
  fmt = detect_format(path)
  np_dtype = None if dtype is None else np.dtype(jnp.dtype(dtype))
  if fmt == "hf":
    cfg, params = convert_hf.load_hf(path, dtype=np_dtype)
    if act is not None:
      cfg = with_act(cfg, act)
  else:
    cfg, params = convert_open_clip.load_open_clip(path, config=config, act=act,
                                                   dtype=np_dtype)
  return CLIP(cfg, jax.tree.map(jnp.asarray, params), fmt)


def save_clip(clip: CLIP, path: str, format: str = "hf") -> None:  # noqa: A002
  """Exports `clip` (e.g. fine-tuned or merged params) for PyTorch users.

  Args:
    clip: a `CLIP` (use `dataclasses.replace(clip, params=new_params)` for new params).
    path: a directory for "hf". For "open_clip": a directory (open_clip's hub layout:
      open_clip_config.json, which records the activation and heads, and
      open_clip_model.safetensors), or a bare state-dict file (`.safetensors`, or
      `.pt`/`.pth`/`.bin` written with torch.save, which needs PyTorch), which records
      neither (load it back with `act=`).
    format: "hf" or "open_clip".
  """
  if format not in FORMATS:
    raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
  params = jax.tree.map(np.asarray, clip.params)
  if format == "hf":
    convert_hf.save_hf(clip.config, params, path)
  else:
    convert_open_clip.save_open_clip(clip.config, params, path)


