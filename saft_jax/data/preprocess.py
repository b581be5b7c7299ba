"""CLIP image preprocessing in TensorFlow (SPEC §5), for tf.data pipelines.

* eval: resize the shorter side to ``size`` (bicubic; the longer side becomes
  ``floor(size * long / short)`` as in torchvision's ``Resize(size)``), center
  crop ``size`` x ``size`` (offsets ``round((H - size) / 2)``, half to even, as
  torchvision), scale to [0, 1], normalize with the CLIP mean / std.
* train: random resized crop to ``size`` with area scale (0.9, 1.0) and aspect
  ratio (3/4, 4/3), bicubic, then the same normalization. The crop box comes
  from ``tf.random.stateless_uniform`` with a per-example seed, so it is a pure
  function of that seed. Unlike torchvision (which retries up to 10 times and
  falls back to a center crop), a box larger than the image is clipped to it.
* Resizing uses ``tf.image.resize(method="bicubic", antialias=True)`` (the
  Keys a=-0.5 cubic; with antialiasing its downsampling is close to PIL's
  bicubic, which CLIP uses), clipped to [0, 255] like PIL's uint8 output
  (without PIL's rounding to integers).
* Grey images become RGB by repeating the channel (PIL ``convert("RGB")``).

TensorFlow is imported inside each function, never at module import.
"""
from __future__ import annotations

import math

import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TRAIN_SCALE = (0.9, 1.0)
TRAIN_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def shorter_side_size(height: int, width: int, size: int) -> tuple[int, int]:
  """``(new_h, new_w)`` after resizing the shorter side to ``size`` (torchvision rule)."""
  if height <= width:
    return size, (size * width) // height
  return (size * height) // width, size


def normalize_np(images01: np.ndarray) -> np.ndarray:
  """NumPy reference of the normalization: ``(x - mean) / std`` on [0, 1] RGB."""
  mean = np.asarray(CLIP_MEAN, np.float32)
  std = np.asarray(CLIP_STD, np.float32)
  return ((np.asarray(images01, np.float32) - mean) / std).astype(np.float32)


def _to_rgb_float(image):
  import tensorflow as tf
  image = tf.convert_to_tensor(image)
  if image.shape.rank != 3:
    raise ValueError(f"expected an [H, W, C] image, got shape {image.shape}")
  if image.shape[-1] == 1:
    image = tf.image.grayscale_to_rgb(image)
  return tf.cast(image, tf.float32)


def _resize(image, hw):
  import tensorflow as tf
  out = tf.image.resize(image, hw, method="bicubic", antialias=True)
  return tf.clip_by_value(out, 0.0, 255.0)


def _normalize(image255):
  import tensorflow as tf
  mean = tf.constant(CLIP_MEAN, tf.float32)
  std = tf.constant(CLIP_STD, tf.float32)
  return (image255 / 255.0 - mean) / std


def eval_preprocess(image, size: int = 224):
  """Eval transform of one ``[H, W, C]`` uint8 image -> ``[size, size, 3]`` float32."""
  import tensorflow as tf
  image = _to_rgb_float(image)
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  short = tf.minimum(h, w)
  new_h = tf.where(h <= w, size, (size * h) // short)
  new_w = tf.where(h <= w, (size * w) // short, size)
  image = _resize(image, tf.stack([new_h, new_w]))
  top = tf.cast(tf.math.round(tf.cast(new_h - size, tf.float64) / 2.0), tf.int32)
  left = tf.cast(tf.math.round(tf.cast(new_w - size, tf.float64) / 2.0), tf.int32)
  image = image[top:top + size, left:left + size, :]
  image = tf.ensure_shape(image, [size, size, 3])
  return _normalize(image)


def random_resized_crop_box(height, width, seed, scale=TRAIN_SCALE, ratio=TRAIN_RATIO):
  """``(top, left, h, w)`` int32 tensors of a random resized crop (see module doc)."""
  import tensorflow as tf
  u = tf.random.stateless_uniform([4], seed=seed, dtype=tf.float32)
  hf = tf.cast(height, tf.float32)
  wf = tf.cast(width, tf.float32)
  area = hf * wf * (scale[0] + (scale[1] - scale[0]) * u[0])
  log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[1]
  aspect = tf.exp(log_r)
  cw = tf.clip_by_value(tf.math.round(tf.sqrt(area * aspect)), 1.0, wf)
  ch = tf.clip_by_value(tf.math.round(tf.sqrt(area / aspect)), 1.0, hf)
  top = tf.minimum(tf.floor(u[2] * (hf - ch + 1.0)), hf - ch)
  left = tf.minimum(tf.floor(u[3] * (wf - cw + 1.0)), wf - cw)
  return tuple(tf.cast(v, tf.int32) for v in (top, left, ch, cw))


def train_preprocess(image, seed, size: int = 224, scale=TRAIN_SCALE, ratio=TRAIN_RATIO):
  """Train transform (random resized crop) of one image; ``seed``: int ``[2]`` tensor."""
  import tensorflow as tf
  image = _to_rgb_float(image)
  shape = tf.shape(image)
  top, left, ch, cw = random_resized_crop_box(shape[0], shape[1], seed, scale, ratio)
  image = image[top:top + ch, left:left + cw, :]
  image = _resize(image, [size, size])
  image = tf.ensure_shape(image, [size, size, 3])
  return _normalize(image)
