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
from saft_jax.models.configs import CLIPConfig

FORMATS = ("hf", "open_clip")
_STATE_DICT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


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
  """"hf" for a directory with config.json, "open_clip" for a state-dict file."""
  if convert_hf.is_hf_dir(path):
    return "hf"
  if os.path.isfile(path) and path.endswith(_STATE_DICT_SUFFIXES):
    return "open_clip"
  if os.path.isdir(path):
    raise ValueError(f"{path!r} is a directory without config.json: not a Hugging Face CLIP "
                     "checkpoint")
  raise ValueError(f"{path!r}: not a Hugging Face CLIP directory nor an open_clip state-dict "
                   f"file ({', '.join(_STATE_DICT_SUFFIXES)})")


def load_clip(path: str, *, config: Optional[CLIPConfig] = None, act: str = "quick_gelu",
              dtype: Any = jnp.float32) -> CLIP:
  """Loads CLIP weights, detecting the format.

  Args:
    path: a Hugging Face CLIP directory (config.json + model.safetensors) or an open_clip
      state-dict file (.safetensors, .pt, .pth, .bin; the torch formats need PyTorch).
    config: overrides the config (needed for open_clip files whose heads are not
      width // 64); ignored for Hugging Face directories, which carry their config.
    act: activation for open_clip files ("quick_gelu" for OpenAI, "gelu" for LAION).
    dtype: dtype of the float params (None keeps the file's dtypes).

  Returns:
    A `CLIP` with `.config`, `.params`, `.encode_image`, `.encode_text`.
  """
  fmt = detect_format(path)
  np_dtype = None if dtype is None else np.dtype(jnp.dtype(dtype))
  if fmt == "hf":
    cfg, params = convert_hf.load_hf(path, dtype=np_dtype)
  else:
    cfg, params = convert_open_clip.load_open_clip(path, config=config, act=act,
                                                   dtype=np_dtype)
  return CLIP(cfg, jax.tree.map(jnp.asarray, params), fmt)


def save_clip(clip: CLIP, path: str, format: str = "hf") -> None:  # noqa: A002
  """Exports `clip` (e.g. fine-tuned or merged params) for PyTorch users.

  Args:
    clip: a `CLIP` (use `dataclasses.replace(clip, params=new_params)` for new params).
    path: a directory for "hf"; a file for "open_clip" (`.safetensors`, or `.pt`/`.bin`
      written with torch.save, which needs PyTorch).
    format: "hf" or "open_clip".
  """
  if format not in FORMATS:
    raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
  params = jax.tree.map(np.asarray, clip.params)
  if format == "hf":
    convert_hf.save_hf(clip.config, params, path)
  else:
    if not path.endswith(_STATE_DICT_SUFFIXES):
      raise ValueError(f"open_clip export path must end with one of {_STATE_DICT_SUFFIXES}, "
                       f"got {path!r}")
    convert_open_clip.save_open_clip(clip.config, params, path)


