"""Leaf-by-leaf checkpoint access for streaming merges (orbax and safetensors).

Readers expose the leaf paths (``/``-joined, as :func:`saft_jax.merging.path_str`), shapes
and dtypes from metadata only, and read any subset of leaves as NumPy arrays. Writers take
the output layout up front and accept leaves in that order, so nothing but the leaves being
written is held in memory.

- safetensors: ``safetensors.safe_open(..., framework="numpy")`` reads one tensor at a time;
  the writer streams the standard layout (8-byte header size, JSON header, raw
  little-endian data) itself, because ``safetensors.numpy.save_file`` needs every tensor in
  memory. Keys are the leaf paths verbatim.
- orbax: a params pytree saved with ``StandardCheckpointer``/``PyTreeCheckpointer``.
  Reading restores only the wanted leaves (``ocp.PLACEHOLDER`` for the others). Writing
  uses orbax's partial saves (``orbax.checkpoint.v1.partial``) one chunk at a time, then
  moves the finalized pytree to the output path and writes a ``StandardCheckpointHandler``
  step metadata file, so ``StandardCheckpointer().restore(out)`` reads it like the input.
  Leaves inside a list/tuple are written together with their whole list.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Dict, List, Sequence, Tuple

import numpy as np

from ._task_vectors import path_str

_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
              "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
              "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool"}


def _np_dtype(name: str) -> np.dtype:
  if name == "bfloat16":
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


def _st_name(dtype) -> str:
  dtype = np.dtype(dtype)
  for k, v in _ST_DTYPES.items():
    if dtype == _np_dtype(v):
      return k
  raise TypeError(f"dtype {dtype} cannot be stored in safetensors")


def checkpoint_format(path: str) -> str:
  """``"safetensors"`` for a file, ``"orbax"`` for a directory holding ``_METADATA``."""
  if os.path.isfile(path):
    return "safetensors"
  if os.path.isdir(path) and os.path.exists(os.path.join(path, "_METADATA")):
    return "orbax"
  raise ValueError(f"{path!r} is neither a safetensors file nor an orbax pytree checkpoint "
                   "directory (with a _METADATA file)")


class SafetensorsReader:
  """Reads tensors of one ``.safetensors`` file one at a time.

  Tensors are read with plain positioned reads of their byte range (the layout in the
  header), not through ``safe_open``'s memory map, so pages of tensors already merged do
  not stay mapped in the process (its resident set stays about one chunk).
  """

  format = "safetensors"

  def __init__(self, path: str):
    self.path = path
    with open(path, "rb") as f:
      n = int.from_bytes(f.read(8), "little")
      header = json.loads(f.read(n))
    self._base = 8 + n
    self._offsets = {k: v["data_offsets"] for k, v in header.items() if k != "__metadata__"}
    self.metadata = header.pop("__metadata__", None)
    # File order (by data offset) so reads are sequential on disk.
    keys = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    self.paths: List[str] = keys
    self.shapes = {k: tuple(header[k]["shape"]) for k in keys}
    self.dtypes = {k: _np_dtype(_ST_DTYPES[header[k]["dtype"]]) for k in keys}

  def read(self, paths: Sequence[str]) -> Dict[str, np.ndarray]:
    out = {}
    with open(self.path, "rb") as f:
      for p in paths:
        start, end = self._offsets[p]
        dtype = self.dtypes[p].newbyteorder("<")
        count = (end - start) // dtype.itemsize
        f.seek(self._base + start)
        a = np.fromfile(f, dtype=dtype, count=count)
        if a.size != count:
          raise ValueError(f"{self.path}: tensor {p!r} is truncated")
        out[p] = a.astype(self.dtypes[p], copy=False).reshape(self.shapes[p])
    return out

  def units(self) -> Dict[str, str]:
    return {p: p for p in self.paths}


def _md_key(k):
  return getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))


class OrbaxReader:
  """Reads leaves of an orbax pytree checkpoint without restoring the others."""

  format = "orbax"

  def __init__(self, path: str):
    import jax
    import orbax.checkpoint as ocp
    self._ocp, self._jax = ocp, jax
    self.path = os.path.abspath(path)
    self._ckptr = ocp.PyTreeCheckpointer()
    md = self._ckptr.metadata(self.path)
    tree = getattr(md, "item_metadata", md)
    tree = getattr(tree, "tree", tree)
    self._tree = tree
    flat, self._treedef = jax.tree_util.tree_flatten_with_path(tree)
    self.paths = [path_str(p) for p, _ in flat]
    self._keys = {path_str(p): tuple(p) for p, _ in flat}
    self.shapes = {path_str(p): tuple(m.shape) for p, m in flat}
    self.dtypes = {path_str(p): np.dtype(m.dtype) for p, m in flat}
    self.metadata = None

  def units(self) -> Dict[str, str]:
    """Leaf path -> the path of the container written as one piece (its first list)."""
    out = {}
    for p, keys in self._keys.items():
      unit = []
      for k in keys:
        if not hasattr(k, "key"):  # a sequence index: the whole list is one unit
          break
        unit.append(str(k.key))
      out[p] = "/".join(unit) if len(unit) < len(keys) else p
    return out

  def read(self, paths: Sequence[str]) -> Dict[str, np.ndarray]:
    ocp, jax = self._ocp, self._jax
    want = set(paths)
    item = jax.tree_util.tree_map_with_path(
        lambda p, m: np.zeros((), np.dtype(m.dtype)) if path_str(p) in want else ocp.PLACEHOLDER,
        self._tree)
    rargs = jax.tree_util.tree_map_with_path(
        lambda p, m: ocp.RestoreArgs(restore_type=np.ndarray) if path_str(p) in want
        else ocp.PLACEHOLDER, self._tree)
    out = self._ckptr.restore(self.path, args=ocp.args.PyTreeRestore(item=item,
                                                                     restore_args=rargs))
    flat, _ = jax.tree_util.tree_flatten_with_path(
        out, is_leaf=lambda x: x is ocp.PLACEHOLDER)
    res = {path_str(p): np.asarray(x) for p, x in flat if path_str(p) in want}
    missing = want - set(res)
    if missing:
      raise ValueError(f"{self.path}: could not read leaves {sorted(missing)[:3]}")
    return res


def open_checkpoint(path: str):
  return SafetensorsReader(path) if checkpoint_format(path) == "safetensors" else OrbaxReader(path)


class SafetensorsWriter:
  """Streams a safetensors file: header first, then tensors in the declared order."""

  def __init__(self, path: str, layout: Sequence[Tuple[str, tuple, np.dtype]], metadata=None):
    header, off = {}, 0
    self._order = []
    for p, shape, dtype in layout:
      n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
      header[p] = {"dtype": _st_name(dtype), "shape": list(shape), "data_offsets": [off, off + n]}
      self._order.append((p, tuple(shape), np.dtype(dtype)))
      off += n
    if metadata:
      header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    self._tmp = path + ".partial"
    self.path = path
    self._f = open(self._tmp, "wb")
    self._f.write(len(blob).to_bytes(8, "little"))
    self._f.write(blob)
    self._next = 0

  def write(self, leaves: Dict[str, np.ndarray]) -> None:
    while self._next < len(self._order) and self._order[self._next][0] in leaves:
      p, shape, dtype = self._order[self._next]
      a = np.asarray(leaves[p]).astype(dtype, copy=False)
      if a.shape != shape:
        raise ValueError(f"leaf {p!r}: shape {a.shape}, expected {shape}")
      self._f.write(np.asarray(a, order="C").astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
      self._next += 1
    if set(leaves) - {o[0] for o in self._order[:self._next]}:
      raise ValueError("leaves must be written in the layout order")

  def close(self) -> None:
    self._f.close()
    if self._next != len(self._order):
      os.remove(self._tmp)
      raise ValueError(f"only {self._next} of {len(self._order)} tensors were written")
    os.replace(self._tmp, self.path)


class OrbaxWriter:
  """Writes an orbax pytree checkpoint chunk by chunk through partial saves."""

  def __init__(self, path: str, template: OrbaxReader):
    self.path = os.path.abspath(path)
    self._tmp = self.path + ".partial_merge"
    if os.path.exists(self._tmp):
      shutil.rmtree(self._tmp)
    self._tpl = template
    self._t0 = time.time_ns()

  def write(self, leaves: Dict[str, np.ndarray]) -> None:
    from orbax.checkpoint import v1
    tree: dict = {}
    units = self._tpl.units()
    done = set()
    for p in leaves:
      u = units[p]
      if u in done:
        continue
      done.add(u)
      keys = self._tpl._keys[p]
      depth = len(u.split("/")) if u else 0
      sub = self._tpl._tree
      for k in keys[:depth]:
        sub = sub[_md_key(k)]
      prefix = u
      if sub is self._tpl._tree:
        raise ValueError("cannot stream a checkpoint whose root is a list")
      import jax
      filled = jax.tree_util.tree_map_with_path(
          lambda q, m: np.asarray(leaves[_join(prefix, path_str(q))]), sub) \
          if isinstance(sub, (list, tuple, dict)) else np.asarray(leaves[p])
      node = tree
      for k in keys[:depth - 1]:
        node = node.setdefault(_md_key(k), {})
      node[_md_key(keys[depth - 1])] = filled
    v1.partial.save(self._tmp, tree)

  def close(self) -> None:
    from orbax.checkpoint import v1
    v1.partial.finalize(self._tmp)
    inner = [d for d in os.listdir(self._tmp)
             if os.path.exists(os.path.join(self._tmp, d, "_METADATA"))]
    if len(inner) != 1:
      raise RuntimeError(f"unexpected orbax partial-save layout in {self._tmp}: {inner}")
    os.replace(os.path.join(self._tmp, inner[0]), self.path)
    shutil.rmtree(self._tmp)
    meta = {"item_handlers":
            "orbax.checkpoint._src.handlers.standard_checkpoint_handler."
            "StandardCheckpointHandler",
            "metrics": {}, "performance_metrics": {}, "init_timestamp_nsecs": self._t0,
            "commit_timestamp_nsecs": time.time_ns(), "custom_metadata": {}}
    with open(os.path.join(self.path, "_CHECKPOINT_METADATA"), "w") as f:
      json.dump(meta, f)


def _join(prefix: str, rest: str) -> str:
  return f"{prefix}/{rest}" if prefix and rest else (prefix or rest)


def create_writer(path: str, template, overwrite: bool = False):
  """A writer in ``template``'s format with its layout (paths, shapes, dtypes)."""
  if os.path.exists(path):
    if not overwrite:
      raise FileExistsError(f"{path!r} exists (pass overwrite=True to replace it)")
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  if template.format == "safetensors":
    layout = [(p, template.shapes[p], template.dtypes[p]) for p in template.paths]
    return SafetensorsWriter(path, layout, template.metadata)
  return OrbaxWriter(path, template)
