"""The ``clip`` suite: a CLIP checkpoint on disk, the paper's tasks, zero-shot heads.

Needs (all local; nothing is downloaded): ``config.clip_checkpoint`` (a Hugging
Face CLIP directory, an open_clip directory with open_clip_config.json, or an
open_clip state dict, whose activation ``config.clip_act`` must then give),
``config.tokenizer_dir`` (the tokenizer source: Hugging Face CLIP tokenizer files or
open_clip's ``bpe_simple_vocab_16e6.txt.gz``; defaults to the checkpoint directory),
and the datasets prepared for tensorflow-datasets in ``config.data_dir`` (GTSRB as an
image folder, see :mod:`saft_jax.data`). θ0 is the image tower; each task's head
is the frozen zero-shot head of SPEC §5, cached in the run directory.
"""
from __future__ import annotations

import os

import jax.numpy as jnp

from saft_jax import data as data_lib
from saft_jax import models
from saft_jax.experiment.suites import Suite

# saft_jax.data task name -> saft_jax.models template/class-name set
TEMPLATE_SETS = {"cars": "Cars", "dtd": "DTD", "eurosat": "EuroSAT", "gtsrb": "GTSRB",
                 "mnist": "MNIST", "resisc45": "RESISC45", "sun397": "SUN397", "svhn": "SVHN"}


def build_clip_suite(config, cache_dir: str, *, tasks=None) -> Suite:
  """The CLIP suite of ``config`` (see the module docstring)."""
  if not config.clip_checkpoint:
    raise ValueError("the clip suite needs clip_checkpoint (a Hugging Face CLIP directory or "
                     "an open_clip state-dict file) in the config")
  if not os.path.exists(config.clip_checkpoint):
    raise FileNotFoundError(f"CLIP checkpoint not found: {config.clip_checkpoint}")
  try:
    clip = models.load_clip(config.clip_checkpoint, act=config.clip_act)
  except models.UnknownActivationError as err:
    raise models.UnknownActivationError(
        f"{err}\nIn the clip suite: set clip_act (--set clip_act=gelu or --set "
        "clip_act=quick_gelu; CLIP_ACT for the built-in clip config).") from None
  tok_dir = config.tokenizer_dir or (config.clip_checkpoint
                                     if os.path.isdir(config.clip_checkpoint) else None)
  if tok_dir is None:
    found = models.open_clip_bpe_path()
    raise ValueError("the clip suite needs tokenizer_dir for an open_clip checkpoint file: a "
                     "directory with Hugging Face CLIP tokenizer files, or open_clip's "
                     f"{models.BPE_VOCAB_FILE}"
                     + (f" (open_clip is installed: tokenizer_dir={found})" if found else ""))
  tokenizer = models.load_tokenizer(tok_dir)
  names = list(tasks or config.tasks or TEMPLATE_SETS)
  image_size = clip.config.vision.image_size
  task_objs, heads = {}, {}
  for name in names:
    if name not in TEMPLATE_SETS:
      raise ValueError(f"unknown CLIP task {name!r}; known: {sorted(TEMPLATE_SETS)}")
    task_objs[name] = data_lib.load_task(name, data_dir=config.data_dir, image_size=image_size)
    ts = TEMPLATE_SETS[name]
    heads[name] = models.zeroshot_head(clip, tokenizer, models.get_classnames(ts),
                                       models.get_templates(ts),
                                       cache_dir=os.path.join(cache_dir, "heads"))
  return Suite("clip", task_objs, clip.params["visual"], heads, clip.config.vision,
               jnp.dtype(config.compute_dtype))
