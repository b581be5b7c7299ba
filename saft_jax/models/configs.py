"""Frozen, hashable configurations of the CLIP towers and their presets.

The configs are frozen dataclasses so they can be passed as static arguments of
`jax.jit`. Presets follow OpenAI CLIP as distributed by open_clip.

References:
  Radford et al., "Learning Transferable Visual Models From Natural Language
  Supervision", ICML 2021 (arXiv:2103.00020).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

ACTIVATIONS = ("quick_gelu", "gelu")
# Which activation a CLIP checkpoint was trained with; said by every error that asks for it.
ACT_CHOICES = ('"gelu" for open_clip-trained weights (e.g. laion2b_*, datacomp_*, '
               'commonpool_*: open_clip\'s ViT-B-32 / ViT-B-16 / ViT-L-14 configs) or '
               '"quick_gelu" for OpenAI weights and open_clip\'s "-quickgelu" models '
               '(openai, laion400m_*, metaclip_*, dfn*)')


def check_act(act: str, where: str = "act") -> str:
  """`act` if it is one of `ACTIVATIONS`; a ValueError naming both choices otherwise."""
  if act not in ACTIVATIONS:
    raise ValueError(f"{where} must be one of {ACTIVATIONS}, got {act!r}: {ACT_CHOICES}")
  return act


def _check_common(name: str, width: int, layers: int, heads: int, mlp_ratio: float,
                  act: str, output_dim: int) -> None:
  if act not in ACTIVATIONS:
    raise ValueError(f"{name}: act must be one of {ACTIVATIONS}, got {act!r}")
  for field, value in (("width", width), ("layers", layers), ("heads", heads),
                       ("output_dim", output_dim)):
    if int(value) != value or value <= 0:
      raise ValueError(f"{name}: {field} must be a positive int, got {value!r}")
  if width % heads:
    raise ValueError(f"{name}: width {width} is not divisible by heads {heads}")
  if mlp_ratio <= 0:
    raise ValueError(f"{name}: mlp_ratio must be positive, got {mlp_ratio}")


class _TowerDims:
  """Sizes derived from `width`, `heads` and `mlp_ratio` (shared by both towers)."""
  width: int
  heads: int
  mlp_ratio: float

  @property
  def mlp_dim(self) -> int:
    return int(round(self.width * self.mlp_ratio))

  @property
  def head_dim(self) -> int:
    return self.width // self.heads


@dataclasses.dataclass(frozen=True)
class VisionConfig(_TowerDims):
  """Vision transformer (CLIP image tower).

  Attributes:
    image_size: side of the square input image in pixels.
    patch_size: side of a square patch (the stride of the patch convolution).
    width: residual stream width.
    layers: number of transformer blocks.
    heads: attention heads per block.
    output_dim: size of the projected image embedding.
    mlp_ratio: MLP hidden size / width (the MLP hidden size is `round(width * mlp_ratio)`).
    act: "quick_gelu" (OpenAI weights) or "gelu" (exact GELU, open_clip-trained weights
      such as laion2b).
    in_channels: image channels (3 for RGB).
    ln_eps: LayerNorm epsilon.
  """
  image_size: int = 224
  patch_size: int = 32
  width: int = 768
  layers: int = 12
  heads: int = 12
  output_dim: int = 512
  mlp_ratio: float = 4.0
  act: str = "quick_gelu"
  in_channels: int = 3
  ln_eps: float = 1e-5

  def __post_init__(self):
    _check_common("VisionConfig", self.width, self.layers, self.heads, self.mlp_ratio,
                  self.act, self.output_dim)
    if self.image_size % self.patch_size:
      raise ValueError(f"VisionConfig: image_size {self.image_size} is not divisible by "
                       f"patch_size {self.patch_size}")

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    """Patches plus the class token."""
    return self.grid_size ** 2 + 1


@dataclasses.dataclass(frozen=True)
class TextConfig(_TowerDims):
  """Causal text transformer (CLIP text tower).

  Attributes:
    context_length: number of token positions.
    vocab_size: token vocabulary size.
    width, layers, heads, output_dim, mlp_ratio, act, ln_eps: as in `VisionConfig`.
    eos_token_id: pooling rule. None pools at `argmax(token_ids)` (OpenAI CLIP /
      open_clip, where end-of-text has the largest id); an int pools at the first
      position whose id equals it (transformers' CLIPTextModel when its config's
      `eos_token_id != 2`; if no such token exists position 0 is used, as there).
  """
  context_length: int = 77
  vocab_size: int = 49408
  width: int = 512
  layers: int = 12
  heads: int = 8
  output_dim: int = 512
  mlp_ratio: float = 4.0
  act: str = "quick_gelu"
  ln_eps: float = 1e-5
  eos_token_id: Optional[int] = None

  def __post_init__(self):
    _check_common("TextConfig", self.width, self.layers, self.heads, self.mlp_ratio,
                  self.act, self.output_dim)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Both towers plus the initial value of the learned temperature."""
  vision: VisionConfig = VisionConfig()
  text: TextConfig = TextConfig()
  logit_scale_init: float = 2.6592  # log(1 / 0.07)

  def __post_init__(self):
    if self.vision.output_dim != self.text.output_dim:
      raise ValueError(f"CLIPConfig: vision.output_dim {self.vision.output_dim} != "
                       f"text.output_dim {self.text.output_dim}")

  @property
  def embed_dim(self) -> int:
    return self.vision.output_dim


def with_act(cfg: CLIPConfig, act: str) -> CLIPConfig:
  """`cfg` with the activation of both towers set to `act`."""
  check_act(act)
  return dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, act=act),
                             text=dataclasses.replace(cfg.text, act=act))


# ----------------------------------------------------------------------------- presets
VIT_B_32 = VisionConfig(image_size=224, patch_size=32, width=768, layers=12, heads=12,
                        output_dim=512)
VIT_B_16 = VisionConfig(image_size=224, patch_size=16, width=768, layers=12, heads=12,
                        output_dim=512)
VIT_L_14 = VisionConfig(image_size=224, patch_size=14, width=1024, layers=24, heads=16,
                        output_dim=768)
VIT_TINY = VisionConfig(image_size=8, patch_size=2, width=32, layers=2, heads=2,
                        output_dim=16)

TEXT_B = TextConfig(width=512, layers=12, heads=8, output_dim=512)
TEXT_L = TextConfig(width=768, layers=12, heads=12, output_dim=768)
TEXT_TINY = TextConfig(context_length=16, vocab_size=64, width=32, layers=2, heads=2,
                       output_dim=16)

CLIP_PRESETS = {
    "ViT-B-32": CLIPConfig(VIT_B_32, TEXT_B),
    "ViT-B-16": CLIPConfig(VIT_B_16, TEXT_B),
    "ViT-L-14": CLIPConfig(VIT_L_14, TEXT_L),
    "tiny": CLIPConfig(VIT_TINY, TEXT_TINY),
}
VISION_PRESETS = {name: cfg.vision for name, cfg in CLIP_PRESETS.items()}


def _canon(name: str) -> str:
  return name.replace("/", "-").replace("_", "-")


def clip_config(name: str, **vision_overrides) -> CLIPConfig:
  """Preset CLIP config: "ViT-B-32", "ViT-B-16", "ViT-L-14" or "tiny" ("/" and "_" ok).

  Keyword arguments override fields of the vision config (e.g. `act="gelu"`); `act`
  is applied to both towers.
  """
  key = _canon(name)
  if key not in CLIP_PRESETS:
    raise ValueError(f"unknown CLIP preset {name!r}; known: {sorted(CLIP_PRESETS)}")
  cfg = CLIP_PRESETS[key]
  if vision_overrides:
    text = cfg.text
    if "act" in vision_overrides:
      text = dataclasses.replace(text, act=vision_overrides["act"])
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, **vision_overrides),
                              text=text)
  return cfg


def vision_config(name: str, **overrides) -> VisionConfig:
  """Preset vision config by name (see `clip_config`), with field overrides."""
  key = _canon(name)
  if key not in VISION_PRESETS:
    raise ValueError(f"unknown vision preset {name!r}; known: {sorted(VISION_PRESETS)}")
  return dataclasses.replace(VISION_PRESETS[key], **overrides)
