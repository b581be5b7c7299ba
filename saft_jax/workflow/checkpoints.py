"""The checkpoint formats of ``saft merge`` / ``finetune`` / ``eval``: detect, read, write.

A checkpoint is read as the tensors it stores, under its own key names (a merge is done
on the file's tensors, as mergekit does, so the output has exactly the input's layout):

* ``hf`` — a Hugging Face CLIP directory (``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin``), as ``CLIPModel.save_pretrained`` writes it;
* ``open_clip`` — an open_clip state dict: a directory in open_clip's hub layout
  (``open_clip_config.json`` + weights), or a ``.safetensors`` file with open_clip's key
  names, or a ``.pt``/``.pth``/``.bin`` file (needs PyTorch);
* ``safetensors`` — any other ``.safetensors`` file (keys taken verbatim; the commands write
  saft_jax params with ``/``-joined paths as keys);
* ``orbax`` — an orbax pytree checkpoint directory (with a ``_METADATA`` file).

Conversions between formats go through saft_jax's CLIP params
(:func:`to_clip_params`, :func:`saft_jax.models.save_clip`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Dict, Optional

import jax
import numpy as np

from saft_jax import merging
from saft_jax.models import convert_common as cc
from saft_jax.models import convert_hf, convert_open_clip
from saft_jax.models import load as load_lib
from saft_jax.models.configs import CLIPConfig, with_act

FORMATS = ("hf", "open_clip", "safetensors", "orbax")
# Hugging Face sharded safetensors directories (any model family): merged by streaming,
# written in the base's shard layout with its index and config.
SHARDED = "hf_sharded"
CLIP_FORMATS = ("hf", "open_clip")
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                    "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")
_OPEN_CLIP_MARKERS = ("visual.conv1.weight", "token_embedding.weight", "visual.proj")
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """A checkpoint on disk and where its tensors are.

  Attributes:
    path: the path as given (file or directory).
    format: one of :data:`FORMATS`.
    weights: the file (or orbax directory) holding the tensors.
  """
  path: str
  format: str
  weights: str

  @property
  def streamable(self) -> bool:
    """Whether :func:`saft_jax.merging.stream_merge` can read it tensor by tensor."""
    return self.format in ("orbax", SHARDED) or self.weights.endswith(".safetensors")

  @property
  def is_dir(self) -> bool:
    return os.path.isdir(self.path)


def _safetensors_keys(path: str) -> list:
  with open(path, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(n))
  return [k for k in header if k != "__metadata__"]


def detect_checkpoint(path: str) -> Checkpoint:
  """The :class:`Checkpoint` at ``path``.

  Raises:
    FileNotFoundError: nothing at ``path``.
    ValueError: ``path`` is none of the formats (the message says what was looked for).
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint not found: {path!r}")
  if os.path.isdir(path) and os.path.exists(os.path.join(path, "_METADATA")):
    return Checkpoint(path, "orbax", path)
  if os.path.isdir(path) and any(n.endswith(".safetensors.index.json") for n in os.listdir(path)):
    return Checkpoint(path, SHARDED, path)
  if os.path.isdir(path):
    fmt = load_lib.detect_format(path)  # ValueError for an unknown directory
    if fmt == "hf":
      weights = next((os.path.join(path, n) for n in _HF_WEIGHT_FILES[:2]
                      if os.path.isfile(os.path.join(path, n))), None)
      if weights is None:
        raise ValueError(f"{path!r}: a Hugging Face directory without model.safetensors, "
                         "pytorch_model.bin or a model.safetensors.index.json")
      return Checkpoint(path, "hf", weights)
    return Checkpoint(path, "open_clip", convert_open_clip.find_weights(path))
  if path.endswith(".safetensors"):
    keys = set(_safetensors_keys(path))
    fmt = "open_clip" if keys & set(_OPEN_CLIP_MARKERS) else "safetensors"
    return Checkpoint(path, fmt, path)
  if path.endswith(_TORCH_SUFFIXES):
    return Checkpoint(path, "open_clip", path)
  raise ValueError(f"{path!r} is not a checkpoint: expected a Hugging Face CLIP directory, an "
                   "open_clip directory or state dict (.safetensors, .pt, .pth, .bin), a "
                   ".safetensors file or an orbax directory")


def buffer_filter(ckpt: Checkpoint):
  """Predicate on the keys of ``ckpt``'s format that are buffers, not parameters
  (open_clip's ``attn_mask``, Hugging Face's ``position_ids``): a merge keeps θ0's."""
  if ckpt.format == "open_clip":
    return lambda key: key in convert_open_clip._IGNORED  # pylint: disable=protected-access
  if ckpt.format == "hf":
    return convert_hf._ignored  # pylint: disable=protected-access
  return None


# ----------------------------------------------------------------------------- reading
@dataclasses.dataclass(frozen=True)
class Layout:
  """Leaf paths, shapes and dtypes of a checkpoint (what a merge needs to agree on)."""
  paths: list
  shapes: dict
  dtypes: dict


def layout_of(tree) -> Layout:
  """The :class:`Layout` of an in-memory pytree (leaf paths as :func:`merging.path_str`)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  paths = [merging.path_str(p) for p, _ in flat]
  return Layout(paths, {merging.path_str(p): tuple(np.shape(x)) for p, x in flat},
                {merging.path_str(p): np.asarray(x).dtype for p, x in flat})


def read_layout(ckpt: Checkpoint) -> Layout:
  """The layout from metadata only (safetensors header, orbax metadata), or by reading a
  torch file."""
  if ckpt.streamable:
    r = merging.open_checkpoint(ckpt.weights)
    return Layout(list(r.paths), dict(r.shapes), dict(r.dtypes))
  return layout_of(read_tensors(ckpt))


def check_same_layout(base: Layout, others, names, base_name: str) -> None:
  """Raises a ValueError naming the first leaf where a checkpoint differs from the base."""
  for layout, name in zip(others, names):
    missing = [p for p in base.paths if p not in layout.shapes]
    extra = [p for p in layout.paths if p not in base.shapes]
    if missing or extra:
      where = f"missing leaf {missing[0]!r}" if missing else f"unexpected leaf {extra[0]!r}"
      raise ValueError(f"checkpoint {name!r} does not match {base_name!r}: {where}")
    for p in base.paths:
      for what, a, b in (("shape", layout.shapes[p], base.shapes[p]),
                         ("dtype", layout.dtypes[p], base.dtypes[p])):
        if a != b:
          raise ValueError(f"checkpoint {name!r}: leaf {p!r} has {what} {a}, "
                           f"{base_name!r} has {b}")


def read_tensors(ckpt: Checkpoint):
  """The stored tensors: a flat ``{key: np.ndarray}`` for state-dict formats, the restored
  pytree for orbax."""
  if ckpt.format == "orbax":
    import orbax.checkpoint as ocp
    return jax.tree.map(np.asarray, ocp.StandardCheckpointer().restore(
        os.path.abspath(ckpt.weights)))
  if ckpt.weights.endswith(".safetensors"):
    return cc.read_safetensors(ckpt.weights)
  return cc.read_torch(ckpt.weights)


def unflatten(flat: Dict[str, np.ndarray]) -> dict:
  """``{"a/b": x}`` -> ``{"a": {"b": x}}`` (the inverse of :func:`flatten`)."""
  out: dict = {}
  for key, value in flat.items():
    node = out
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def flatten(tree) -> Dict[str, np.ndarray]:
  """A pytree as ``{"/"-joined path: np.ndarray}`` (keys of a plain safetensors file)."""
  return {merging.path_str(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def read_params(ckpt: Checkpoint) -> dict:
  """A plain safetensors / orbax checkpoint as a nested params dict (saft_jax layout)."""
  if ckpt.format not in ("safetensors", "orbax"):
    raise ValueError(f"{ckpt.path!r} is a {ckpt.format} checkpoint, not a saft_jax params "
                     "file (.safetensors or orbax)")
  tensors = read_tensors(ckpt)
  return unflatten(tensors) if ckpt.format == "safetensors" else tensors


# ----------------------------------------------------------------------------- CLIP config
def clip_config(ckpt: Checkpoint, act: Optional[str] = None, tensors=None) -> CLIPConfig:
  """The CLIPConfig of a Hugging Face / open_clip checkpoint (``act`` for a bare state dict).

  Raises:
    ValueError: not a CLIP format, or a bare open_clip state dict without ``act``.
  """
  if ckpt.format == "hf":
    with open(os.path.join(ckpt.path, convert_hf.CONFIG_FILE)) as f:
      cfg = convert_hf.config_from_hf(json.load(f))
  elif ckpt.format == "open_clip" and ckpt.is_dir:
    cfg = convert_open_clip.config_from_open_clip(convert_open_clip.read_model_cfg(ckpt.path))
  elif ckpt.format == "open_clip":
    if act is None:
      raise convert_open_clip.unknown_activation_error(ckpt.path)
    state = tensors if tensors is not None else read_tensors(ckpt)
    return convert_open_clip.infer_config(state, act=act)
  else:
    raise ValueError(f"{ckpt.path!r} is a {ckpt.format} checkpoint: it records no CLIP config, "
                     "so it cannot be converted to hf or open_clip")
  return with_act(cfg, act) if act is not None else cfg


def to_clip_params(state: dict, ckpt: Checkpoint, cfg: CLIPConfig) -> dict:
  """A Hugging Face / open_clip state dict (in ``ckpt``'s format) as saft_jax CLIP params."""
  state = dict(state)
  if ckpt.format == "hf":
    return convert_hf.params_from_hf_state_dict(state, cfg, dtype=None)
  return convert_open_clip.params_from_open_clip_state_dict(state, cfg, dtype=None)


# ----------------------------------------------------------------------------- writing
def output_exists(path: str, overwrite: bool) -> None:
  """Raises FileExistsError when ``path`` exists and ``overwrite`` is false; else removes it."""
  if not os.path.exists(path):
    return
  if not overwrite:
    raise FileExistsError(f"output {path!r} exists (choose another path or pass --overwrite)")
  shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def copy_side_files(template: Checkpoint, out_dir: str) -> None:
  """Copies the non-weight files of a Hugging Face / open_clip directory (config.json,
  tokenizer and preprocessor files) into ``out_dir``."""
  if not template.is_dir:
    return
  skip = set(_HF_WEIGHT_FILES) | set(convert_open_clip.WEIGHTS_FILES)
  os.makedirs(out_dir, exist_ok=True)
  for name in sorted(os.listdir(template.path)):
    src = os.path.join(template.path, name)
    if os.path.isfile(src) and name not in skip:
      shutil.copy2(src, os.path.join(out_dir, name))


def weights_path(template: Checkpoint, out: str) -> str:
  """Where the tensors of an output shaped like ``template`` go (a file inside ``out`` for
  directory formats)."""
  if template.format == "hf":
    return os.path.join(out, convert_hf.WEIGHTS_FILE)
  if template.format == "open_clip" and template.is_dir:
    return os.path.join(out, convert_open_clip.WEIGHTS_FILE)
  return out


def write_tensors(state, template: Checkpoint, out: str) -> None:
  """Writes ``state`` (tensors under ``template``'s keys) at ``out`` in ``template``'s
  format; directory formats get the template's config and tokenizer files."""
  if template.format == "orbax":
    import orbax.checkpoint as ocp
    tree = unflatten(state) if _is_flat(state) else state
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.abspath(out), jax.tree.map(np.asarray, tree))
    ckptr.wait_until_finished()
    return
  flat = flatten(state)
  if template.is_dir:
    copy_side_files(template, out)
  target = weights_path(template, out)
  if target.endswith(".safetensors"):
    metadata = {"format": "pt"} if template.format == "hf" else None
    cc.write_safetensors(flat, target, metadata=metadata)
  elif target.endswith(_TORCH_SUFFIXES):
    cc.write_torch(flat, target)
  else:
    raise ValueError(f"--out {out!r}: an open_clip state-dict output must end in "
                     ".safetensors, .pt, .pth or .bin")


def _is_flat(state) -> bool:
  return isinstance(state, dict) and all(not isinstance(v, dict) for v in state.values())


def write_params(params, out: str, fmt: str, cfg: Optional[CLIPConfig] = None,
                 template: Optional[Checkpoint] = None) -> None:
  """Writes saft_jax params at ``out`` in ``fmt``.

  Args:
    params: a params pytree (CLIP params ``{"visual", "text", "logit_scale"}`` for the CLIP
      formats).
    out: the output path.
    fmt: one of :data:`FORMATS`.
    cfg: the CLIPConfig (CLIP formats only).
    template: a source directory whose tokenizer/preprocessor files are copied (CLIP
      directory outputs).
  """
  if fmt in CLIP_FORMATS:
    if cfg is None:
      raise ValueError(f"writing {fmt} needs a CLIP config")
    load_lib.save_clip(load_lib.CLIP(cfg, params), out, fmt)
    if template is not None and template.is_dir and os.path.isdir(out):
      skip = {convert_hf.CONFIG_FILE, convert_open_clip.CONFIG_FILE}
      for name in sorted(os.listdir(template.path)):
        src, dst = os.path.join(template.path, name), os.path.join(out, name)
        if (os.path.isfile(src) and not os.path.exists(dst) and name not in skip
            and name not in _HF_WEIGHT_FILES and name not in convert_open_clip.WEIGHTS_FILES):
          shutil.copy2(src, dst)
  elif fmt == "safetensors":
    cc.write_safetensors(flatten(params), out)
  elif fmt == "orbax":
    write_tensors(params, Checkpoint(out, "orbax", out), out)
  else:
    raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")


# ----------------------------------------------------------------------------- checksums
def sha256(ckpt: Checkpoint, chunk: int = 1 << 22) -> str:
  """SHA-256 of the checkpoint's tensors file (every file, in path order, for orbax)."""
  h = hashlib.sha256()
  files = [ckpt.weights]
  if os.path.isdir(ckpt.weights):
    files = sorted(os.path.join(root, n) for root, _, names in os.walk(ckpt.weights)
                   for n in names)
  for name in files:
    if os.path.isdir(ckpt.weights):
      h.update(os.path.relpath(name, ckpt.weights).encode())
    with open(name, "rb") as f:
      while block := f.read(chunk):
        h.update(block)
  return h.hexdigest()


def size_bytes(ckpt: Checkpoint) -> int:
  """Bytes of the checkpoint's tensors file(s)."""
  if os.path.isdir(ckpt.weights):
    return sum(os.path.getsize(os.path.join(root, n))
               for root, _, names in os.walk(ckpt.weights) for n in names)
  return os.path.getsize(ckpt.weights)
