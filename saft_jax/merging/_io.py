"""Leaf-by-leaf checkpoint access for streaming merges (orbax and safetensors).

Readers expose the leaf paths (``/``-joined, as :func:`saft_jax.merging.path_str`), shapes
and dtypes from metadata only, and read any subset of leaves as NumPy arrays. Writers take
the output layout up front and accept leaves in that order, so nothing but the leaves being
written is held in memory.

- safetensors: the header is parsed once; the streaming merges copy flat element ranges
  straight from the page cache into their chunk buffers with ``os.preadv``
  (:meth:`SafetensorsReader.byte_range`, :meth:`SafetensorsReader.pread`); other reads
  memory-map a tensor or range at a time (:meth:`SafetensorsReader.view`), the mapping
  going away with the array (the resident set stays about one chunk). The writer streams
  the standard layout (8-byte header size, JSON header, raw little-endian data) itself, a
  tensor at a time or in parts, because ``safetensors.numpy.save_file`` needs every tensor
  in memory.
  Keys are the leaf paths verbatim.
- sharded safetensors (Hugging Face): a directory with ``model.safetensors.index.json``
  (``weight_map``: tensor -> shard file) and ``model-0000k-of-0000N.safetensors`` shards, or a
  directory with one ``model.safetensors``. The writer reproduces the template's shard split,
  file names, per-shard header metadata and an index with ``metadata.total_size`` and
  ``weight_map`` as ``transformers`` writes them, and copies the template directory's other
  files (``config.json``, tokenizer files, ...), so ``from_pretrained`` loads the output.
- orbax: a params pytree saved with ``StandardCheckpointer``/``PyTreeCheckpointer``.
  Reading restores only the wanted leaves (``ocp.PLACEHOLDER`` for the others). Writing
  uses orbax's partial saves (``orbax.checkpoint.v1.partial``) one chunk at a time, then
  moves the finalized pytree to the output path and writes a ``StandardCheckpointHandler``
  step metadata file, so ``StandardCheckpointer().restore(out)`` reads it like the input.
  Leaves inside a list/tuple are written together with their whole list.
"""
from __future__ import annotations

import glob
import json
import mmap
import math
import os
import shutil
import time
from typing import Dict, List, Optional, Sequence, Tuple

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


def _sharded_index(path: str) -> Optional[str]:
  """The ``*.safetensors.index.json`` of a directory, or ``""`` for a lone ``*.safetensors``."""
  idx = sorted(glob.glob(os.path.join(path, "*.safetensors.index.json")))
  if idx:
    return idx[0]
  files = glob.glob(os.path.join(path, "*.safetensors"))
  return "" if len(files) == 1 else None


def checkpoint_format(path: str) -> str:
  """``"safetensors"`` for a file; for a directory ``"safetensors_sharded"`` (Hugging Face
  layout: an ``*.safetensors.index.json`` or a single ``*.safetensors``) or ``"orbax"``
  (holding ``_METADATA``)."""
  if os.path.isfile(path):
    return "safetensors"
  if os.path.isdir(path) and os.path.exists(os.path.join(path, "_METADATA")):
    return "orbax"
  if os.path.isdir(path) and _sharded_index(path) is not None:
    return "safetensors_sharded"
  raise ValueError(f"{path!r} is neither a safetensors file, a directory of safetensors "
                   "shards (with a model.safetensors.index.json) nor an orbax pytree "
                   "checkpoint directory (with a _METADATA file)")


_PAGE = mmap.ALLOCATIONGRANULARITY
_PATCH_SPAN = 1 << 21  # bytes per mapped window of the output patches (aligned)


def _map_range(fd: int, offset: int, count: int, dtype: np.dtype):
  """``(mapping, array)``: ``count`` elements of ``dtype`` at byte ``offset`` of the open
  file ``fd``, through a read-only mapping of just their pages."""
  page = offset - offset % _PAGE
  mm = mmap.mmap(fd, offset - page + count * dtype.itemsize, prot=mmap.PROT_READ,
                 offset=page)
  return mm, np.frombuffer(mm, dtype, count, offset - page)


class SafetensorsReader:
  """Reads tensors of one ``.safetensors`` file, whole or as flat element ranges.

  :meth:`view` memory-maps just the requested byte range (page-aligned) and returns a
  read-only array on it; the mapping is released with the array, so pages of tensors
  already merged do not stay in the process (its resident set stays about one chunk).
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

    self._size = os.path.getsize(path)
    self._fd: Optional[int] = None

  def size(self, p: str) -> int:
    return math.prod(self.shapes[p])

  def view(self, p: str, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
    """Flat read-only array of elements ``[start, stop)`` of tensor ``p``, memory-mapped.

    No copy: the array reads the page cache; it holds its own mapping until released.
    """
    n = self.size(p)
    stop = n if stop is None else stop
    dtype = self.dtypes[p].newbyteorder("<")
    a0 = self._extent(p)
    if stop <= start:
      return np.zeros((0,), self.dtypes[p])
    _, arr = _map_range(self._open(), self._base + a0 + start * dtype.itemsize, stop - start,
                        dtype)
    return arr.view(self.dtypes[p])

  def blocks(self, p: str, starts: np.ndarray, width: int) -> np.ndarray:
    """``(len(starts), width)``: elements ``[s, s + width)`` of ``p`` for each flat offset
    ``s`` of ``starts``, one ``os.preadv`` each (a few random blocks: a system call each
    is cheaper than page faults on a fresh memory map)."""
    starts = np.asarray(starts, np.int64).reshape(-1)
    n = self.size(p)
    if starts.size and (starts.min() < 0 or starts.max() + width > n):
      raise ValueError(f"{self.path}: blocks of {width} outside tensor {p!r} ({n} elements)")
    dtype = self.dtypes[p]
    out = np.empty((starts.size, width), dtype)
    fd, base, isz = self._open(), self._base + self._extent(p), dtype.itemsize
    raw = out.view(np.uint8).reshape(starts.size, width * isz)
    for j, s in enumerate(starts.tolist()):
      self._pread(fd, raw[j], base + s * isz, f"tensor {p!r}")
    return out

  def _extent(self, p: str) -> int:
    """``p``'s first data byte (relative to the data section), after checking that the
    header's byte range holds the whole tensor and lies inside the file."""
    a0, a1 = self._offsets[p]
    if a1 - a0 != self.size(p) * self.dtypes[p].itemsize or self._base + a1 > self._size:
      raise ValueError(f"{self.path}: tensor {p!r} is truncated")
    return a0

  def byte_range(self, p: str, start: int, stop: int) -> Tuple["SafetensorsReader", int, int]:
    """``(file, offset, bytes)`` of elements ``[start, stop)`` of ``p``: the reader of the
    file holding them (this one) and their byte range in it, for :meth:`pread`."""
    n = self.size(p)
    if not 0 <= start <= stop <= n:
      raise ValueError(f"{self.path}: elements [{start}, {stop}) outside tensor {p!r} "
                       f"({n} elements)")
    isz = self.dtypes[p].itemsize
    return self, self._base + self._extent(p) + start * isz, (stop - start) * isz

  @property
  def nbytes(self) -> int:
    """The file's size in bytes."""
    return self._size

  def window(self, pos: int, nbytes: int, dtype) -> Tuple[mmap.mmap, np.ndarray]:
    """``(mapping, array)``: the file's bytes ``[pos, pos + nbytes)`` (clipped to the file;
    ``pos`` a multiple of :data:`mmap.ALLOCATIONGRANULARITY`) as a read-only ``dtype``
    array on a memory map of just them: no copy, pages fault in from the page cache as
    they are read."""
    if pos % _PAGE or not 0 <= pos < self._size:
      raise ValueError(f"{self.path}: no window at byte {pos} (file of {self._size} bytes)")
    dtype = np.dtype(dtype)
    return _map_range(self._open(), pos, min(nbytes, self._size - pos) // dtype.itemsize,
                      dtype)

  def pread(self, raw, pos: int) -> None:
    """Fill the writable bytes ``raw`` (a memoryview or uint8 array) from byte ``pos`` of
    the file with ``os.preadv``: one copy from the page cache, no mapping to set up and
    fault in (about twice as fast as copying from a fresh memory map)."""
    self._pread(self._open(), raw, pos, f"bytes from {pos}")

  def _open(self) -> int:
    if self._fd is None:
      self._fd = os.open(self.path, os.O_RDONLY)
    return self._fd

  def _pread(self, fd: int, raw, pos: int, what: str) -> None:
    """Fill the bytes ``raw`` from file offset ``pos`` (short reads resumed; ``what`` names
    the data in the error for a file that ends first)."""
    mv, done = memoryview(raw).cast("B"), 0
    while done < mv.nbytes:
      got = os.preadv(fd, [mv[done:]], pos + done)
      if got <= 0:
        raise ValueError(f"{self.path}: {what} is truncated (the file ends first)")
      done += got

  def prefetch(self, p: str, start: int = 0, stop: Optional[int] = None) -> None:
    """Ask the kernel to read elements ``[start, stop)`` of ``p`` ahead (no memory cost)."""
    fd = self._open()
    isz = self.dtypes[p].itemsize
    b0 = self._base + self._offsets[p][0] + start * isz
    n = ((self.size(p) if stop is None else stop) - start) * isz
    if hasattr(os, "posix_fadvise") and n > 0:
      os.posix_fadvise(fd, b0, n, os.POSIX_FADV_WILLNEED)

  def read(self, paths: Sequence[str]) -> Dict[str, np.ndarray]:
    """Whole tensors as (copied) arrays of their shapes."""
    return {p: np.array(self.view(p)).reshape(self.shapes[p]) for p in paths}

  def units(self) -> Dict[str, str]:
    return {p: p for p in self.paths}

  def close(self) -> None:
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None

  def __del__(self):
    try:
      self.close()
    except Exception:  # noqa: BLE001 - interpreter shutdown
      pass


class ShardedSafetensorsReader:
  """A Hugging Face sharded safetensors directory read as one checkpoint.

  Leaves are ordered shard by shard (index order of the shard files), then by data offset,
  so a pass over :attr:`paths` reads each shard file sequentially.
  """

  format = "safetensors_sharded"

  def __init__(self, path: str):
    self.path = path
    index = _sharded_index(path)
    if index:
      with open(index) as f:
        self.index = json.load(f)
      wmap = self.index["weight_map"]
      self.index_name = os.path.basename(index)
    else:
      only = glob.glob(os.path.join(path, "*.safetensors"))[0]
      self.index, self.index_name = None, None
      wmap = {k: os.path.basename(only) for k in SafetensorsReader(only).paths}
    self.shard_names = sorted(set(wmap.values()))
    self._shards = {s: SafetensorsReader(os.path.join(path, s)) for s in self.shard_names}
    self.shard_of: Dict[str, str] = {}
    self.paths: List[str] = []
    for s in self.shard_names:
      r = self._shards[s]
      for k in r.paths:
        if k in wmap and wmap[k] != s:
          continue
        self.shard_of[k] = s
        self.paths.append(k)
    missing = set(wmap) - set(self.shard_of)
    if missing:
      raise ValueError(f"{path}: tensors of the index missing in the shards: "
                       f"{sorted(missing)[:3]}")
    self.shapes = {k: self._shards[self.shard_of[k]].shapes[k] for k in self.paths}
    self.dtypes = {k: self._shards[self.shard_of[k]].dtypes[k] for k in self.paths}
    self.metadata = None

  def shard(self, name: str) -> SafetensorsReader:
    return self._shards[name]

  def size(self, p: str) -> int:
    return math.prod(self.shapes[p])

  def view(self, p: str, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
    return self._shards[self.shard_of[p]].view(p, start, stop)

  def blocks(self, p: str, starts: np.ndarray, width: int) -> np.ndarray:
    return self._shards[self.shard_of[p]].blocks(p, starts, width)

  def byte_range(self, p: str, start: int, stop: int):
    return self._shards[self.shard_of[p]].byte_range(p, start, stop)

  def prefetch(self, p: str, start: int = 0, stop: Optional[int] = None) -> None:
    self._shards[self.shard_of[p]].prefetch(p, start, stop)

  def read(self, paths: Sequence[str]) -> Dict[str, np.ndarray]:
    return {p: np.array(self.view(p)).reshape(self.shapes[p]) for p in paths}

  def units(self) -> Dict[str, str]:
    return {p: p for p in self.paths}

  def close(self) -> None:
    for r in self._shards.values():
      r.close()


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

  def size(self, p: str) -> int:
    return math.prod(self.shapes[p])

  def view(self, p: str, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
    """Flat elements ``[start, stop)`` of leaf ``p`` (restores the whole leaf)."""
    return self.read([p])[p].reshape(-1)[start:stop]

  def prefetch(self, p: str, start: int = 0, stop: Optional[int] = None) -> None:
    del p, start, stop

  def close(self) -> None:
    pass


def open_checkpoint(path: str):
  """A reader for ``path`` (format from :func:`checkpoint_format`)."""
  fmt = checkpoint_format(path)
  if fmt == "safetensors":
    return SafetensorsReader(path)
  if fmt == "safetensors_sharded":
    return ShardedSafetensorsReader(path)
  return OrbaxReader(path)


class SafetensorsWriter:
  """Streams a safetensors file: header first, then tensors in the declared order.

  A tensor is written whole (:meth:`write`) or in consecutive flat parts
  (:meth:`write_part`); :meth:`patch` overwrites single elements of tensors already written
  (applied at :meth:`close`). The file appears under its name only when complete.
  """

  format = "safetensors"

  def __init__(self, path: str, layout: Sequence[Tuple[str, tuple, np.dtype]], metadata=None):
    header, off = {}, 0
    self._order = []
    self._offsets = {}
    for p, shape, dtype in layout:
      n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
      header[p] = {"dtype": _st_name(dtype), "shape": list(shape), "data_offsets": [off, off + n]}
      self._order.append((p, tuple(shape), np.dtype(dtype)))
      self._offsets[p] = off
      off += n
    if metadata:
      header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    self._tmp = path + ".partial"
    self.path = path
    self._base = 8 + len(blob)
    self._f = open(self._tmp, "wb")
    self._f.write(len(blob).to_bytes(8, "little"))
    self._f.write(blob)
    self._next = 0
    self._done_elems = 0  # elements of tensor self._next already written
    self._patches: List[Tuple[str, np.ndarray, np.ndarray]] = []

  def tensors(self) -> List[str]:
    return [o[0] for o in self._order]

  def write_part(self, p: str, flat: np.ndarray) -> None:
    """Append the next elements of tensor ``p`` (the current tensor of the layout)."""
    if self._next >= len(self._order) or self._order[self._next][0] != p:
      raise ValueError(f"leaf {p!r} is not next in the layout order")
    _, shape, dtype = self._order[self._next]
    n = math.prod(shape)
    a = np.ascontiguousarray(flat).reshape(-1)
    if a.dtype != dtype:
      a = a.astype(dtype)
    if self._done_elems + a.size > n:
      raise ValueError(f"leaf {p!r}: more than {n} elements written")
    self._f.write(a.astype(dtype.newbyteorder("<"), copy=False).view(np.uint8).data)
    self._done_elems += a.size
    if self._done_elems == n:
      self._next += 1
      self._done_elems = 0

  def write(self, leaves: Dict[str, np.ndarray]) -> None:
    """Write whole tensors (a dict in layout order)."""
    for p, a in leaves.items():
      if self._next < len(self._order) and self._order[self._next][0] == p:
        a = np.asarray(a)
        if a.shape != self._order[self._next][1]:
          raise ValueError(f"leaf {p!r}: shape {a.shape}, expected {self._order[self._next][1]}")
        if a.size == 0:
          self._next += 1
        else:
          self.write_part(p, a)
      else:
        raise ValueError("leaves must be written in the layout order")

  def patch(self, p: str, flat_index: np.ndarray, values: np.ndarray) -> None:
    """Overwrite elements ``flat_index`` of tensor ``p`` with ``values`` (at close)."""
    self._patches.append((p, np.asarray(flat_index, np.int64), np.asarray(values)))

  def _apply_patches(self) -> None:
    if not self._patches:
      return
    # Through shared mappings of the file's aligned _PATCH_SPAN (2 MiB) windows holding
    # patches, one at a time, no msync: the page cache holds the writes, the process maps
    # one window at once, and aligned windows map the page cache's large folios whole
    # (unaligned or smaller mappings fault page by page, several times slower). Entries
    # patched twice keep the later value.
    dtypes = {p: dtype for p, _, dtype in self._order}
    size = os.path.getsize(self._tmp)
    fd = os.open(self._tmp, os.O_RDWR)
    try:
      for p, idx, vals in self._patches:
        if not idx.size:
          continue
        dtype = dtypes[p].newbyteorder("<")
        isz = dtype.itemsize
        raw = vals.astype(dtype).reshape(-1).view(np.uint8).reshape(-1, isz)
        pos = self._base + self._offsets[p] + idx * isz
        if idx.size > 1 and np.any(pos[1:] < pos[:-1]):
          order = np.argsort(pos, kind="stable")
          pos, raw = pos[order], raw[order]
        win = pos // _PATCH_SPAN
        cut = np.flatnonzero(win[1:] != win[:-1]) + 1
        for a, b in zip([0, *cut.tolist()], [*cut.tolist(), idx.size]):
          start = int(win[a]) * _PATCH_SPAN
          # (+ itemsize: an entry may straddle the window's end)
          mm = mmap.mmap(fd, min(_PATCH_SPAN + isz, size - start), offset=start,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE)
          view = np.frombuffer(mm, np.uint8)
          view[(pos[a:b] - start)[:, None] + np.arange(isz)] = raw[a:b]
          del view
          mm.close()
    finally:
      os.close(fd)
    self._patches = []

  def abort(self) -> None:
    self._f.close()
    if os.path.exists(self._tmp):
      os.remove(self._tmp)

  def close(self) -> None:
    # Zero-size tensors at the end of the layout have nothing to write.
    while self._next < len(self._order) and not int(np.prod(self._order[self._next][1])):
      self._next += 1
    self._f.close()
    if self._next != len(self._order):
      os.remove(self._tmp)
      raise ValueError(f"only {self._next} of {len(self._order)} tensors were written")
    self._apply_patches()
    os.replace(self._tmp, self.path)


class ShardedSafetensorsWriter:
  """Writes a Hugging Face sharded safetensors directory like a template reader.

  Same shard files (names, tensor split, header metadata) and an index
  ``{"metadata": {"total_size": ...}, "weight_map": {...}}``; the template directory's other
  files are copied. Tensors arrive in the template's :attr:`paths` order (shard by shard).
  """

  format = "safetensors_sharded"

  def __init__(self, path: str, template: ShardedSafetensorsReader):
    self.path = path
    self._tmp = path.rstrip("/") + ".partial"
    if os.path.exists(self._tmp):
      shutil.rmtree(self._tmp)
    os.makedirs(self._tmp)
    self._tpl = template
    self._writers: Dict[str, SafetensorsWriter] = {}
    for name in template.shard_names:
      r = template.shard(name)
      keep = [p for p in r.paths if template.shard_of.get(p) == name]
      self._writers[name] = SafetensorsWriter(
          os.path.join(self._tmp, name), [(p, r.shapes[p], r.dtypes[p]) for p in keep],
          r.metadata)

  def _w(self, p: str) -> SafetensorsWriter:
    return self._writers[self._tpl.shard_of[p]]

  def write_part(self, p: str, flat: np.ndarray) -> None:
    self._w(p).write_part(p, flat)

  def write(self, leaves: Dict[str, np.ndarray]) -> None:
    for p, a in leaves.items():
      self._w(p).write({p: a})

  def patch(self, p: str, flat_index: np.ndarray, values: np.ndarray) -> None:
    self._w(p).patch(p, flat_index, values)

  def abort(self) -> None:
    for w in self._writers.values():
      w.abort()
    shutil.rmtree(self._tmp, ignore_errors=True)

  def close(self) -> None:
    for w in self._writers.values():
      w.close()
    tpl = self._tpl
    if tpl.index_name is not None:
      total = sum(tpl.size(p) * tpl.dtypes[p].itemsize for p in tpl.paths)
      meta = dict(tpl.index.get("metadata") or {})
      meta["total_size"] = total
      index = {"metadata": meta, "weight_map": {p: tpl.shard_of[p] for p in tpl.paths}}
      with open(os.path.join(self._tmp, tpl.index_name), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")
    for name in os.listdir(tpl.path):
      src = os.path.join(tpl.path, name)
      if (name.endswith(".safetensors") or name.endswith(".safetensors.index.json")
          or not os.path.isfile(src)):
        continue
      shutil.copy2(src, os.path.join(self._tmp, name))
    os.replace(self._tmp, self.path)


class OrbaxWriter:
  """Writes an orbax pytree checkpoint chunk by chunk through partial saves."""

  format = "orbax"

  def abort(self) -> None:
    shutil.rmtree(self._tmp, ignore_errors=True)

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
  if template.format == "safetensors_sharded":
    return ShardedSafetensorsWriter(path, template)
  return OrbaxWriter(path, template)
