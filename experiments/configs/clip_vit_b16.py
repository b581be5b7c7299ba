"""CLIP ViT-B/16 on the paper's 8 tasks with the paper's protocol (SPEC §5).

  CLIP_CHECKPOINT=... TFDS_DATA_DIR=... \
    saft reproduce --config experiments/configs/clip_vit_b16.py --out runs/clip_vit_b16

Needs, on local disk (nothing is downloaded at run time): the OpenAI ViT-B/16 weights as a
Hugging Face CLIP directory (with tokenizer files) or an open_clip state dict (then also
CLIP_TOKENIZER_DIR), and the 8 datasets prepared for tensorflow-datasets in TFDS_DATA_DIR
(GTSRB as an image folder under SAFT_DATA_DIR/gtsrb); an unprepared dataset fails with
instructions. Produces results.{json,md} in the paper's table layout for SGD/FTTS/FTLO ×
{AdamW, SAFT-ASAM} × {weight averaging, task arithmetic, TIES}: 48 fine-tunings of 8000
steps (batch 128, AdamW lr 1e-5, wd 0.1, 500 warm-up steps, cosine, clip 1.0, bf16 compute).
"""
from saft_jax.experiment.defaults import clip_config


def get_config():
  return clip_config("ViT-B-16")
