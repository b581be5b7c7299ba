"""Chunks of the streaming merges: the plan, reading, and the kernels' shared pieces.

The mergeable leaves are cut into flat pieces packed, in file order, into fixed-size
chunks of one dtype (:func:`_plan`); a chunk is ``R`` rows (the pretrained model, then the
fine-tuned ones): on CPU, rows of the memory-mapped files themselves where the chunk is
full and contiguous in every file (:class:`_Mapped`), else read into one ``(R, size)``
buffer with ``os.preadv`` (:func:`_load_chunk`), the next one in a reader thread
(:func:`_prefetched`). Used by :mod:`._streaming` and
:mod:`._streaming_ties`.
"""
from __future__ import annotations

import mmap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

_POOL_MIN = 1 << 14  # fewer entries are gathered from the inputs by one thread


# ------------------------------------------------------------------------------ the plan
@dataclass
class _Piece:
  path: str
  start: int  # flat element range of the leaf
  stop: int
  off: int  # position in the chunk buffer


@dataclass
class _Chunk:
  dtype: np.dtype
  size: int  # buffer length (elements), fixed per dtype
  index: int  # position in the plan's chunks
  pieces: List[_Piece] = field(default_factory=list)

  @property
  def used(self) -> int:
    return self.pieces[-1].off + self.pieces[-1].stop - self.pieces[-1].start if self.pieces else 0


def _plan(pre, mergeable: Dict[str, bool], chunk_bytes: int, split: bool):
  """Work items in file order: ``("copy", path)`` or ``("chunk", _Chunk)``, and leaf sizes.

  ``split``: leaves are cut into pieces that fill fixed-size chunks (safetensors).
  Otherwise chunks hold whole leaves, and the leaves of one writer unit (an orbax list)
  stay in one chunk.
  """
  sizes = {p: int(np.prod(pre.shapes[p], dtype=np.int64)) for p in pre.paths}
  cap: Dict[np.dtype, int] = {}
  for p in pre.paths:
    dt = np.dtype(pre.dtypes[p])
    cap[dt] = max(cap.get(dt, 1), _whole_rows(chunk_bytes // dt.itemsize, dt))
  units = pre.units()
  items: List[Tuple[str, object]] = []
  chunks: List[_Chunk] = []
  cur: Optional[_Chunk] = None

  def new_chunk(dt):
    ch = _Chunk(dt, cap[dt], len(chunks))
    chunks.append(ch)
    items.append(("chunk", ch))
    return ch

  for p in pre.paths:
    n = sizes[p]
    if not mergeable[p] or n == 0:
      cur = None
      items.append(("copy", p))
      continue
    dt = np.dtype(pre.dtypes[p])
    if split:
      start = 0
      while start < n:
        if cur is None or cur.dtype != dt or cur.used >= cur.size:
          cur = new_chunk(dt)
        stop = min(n, start + cur.size - cur.used)
        cur.pieces.append(_Piece(p, start, stop, cur.used))
        start = stop
      continue
    same_unit = (cur is not None and cur.pieces and units[p] != p
                 and units[cur.pieces[-1].path] == units[p])
    if cur is None or cur.dtype != dt or (cur.used + n > cur.size and not same_unit):
      cur = new_chunk(dt)
    cur.pieces.append(_Piece(p, 0, n, cur.used))
    cur.size = max(cur.size, _whole_rows(cur.used, dt))
  return items, sizes


def _whole_rows(n: int, dtype) -> int:
  """``n`` entries rounded up to whole 64-byte lines (at least one). Chunk buffer rows then
  start 64-byte aligned: XLA:CPU's merge kernels ran 3-8x slower per entry over rows of an
  odd length (measured: 299593 float32 entries per row vs 299584 or 299592)."""
  unit = _pad(dtype)  # entries per 64-byte line
  return max(-(-n // unit), 1) * unit


# ----------------------------------------------------------------------------- reading
def _aligned_empty(shape, dtype) -> np.ndarray:
  """A zero-filled array in its own anonymous memory map (zeroed by the OS as its pages
  are first touched, so the zeros cost nothing up front): page-aligned (so
  ``jax.device_put`` aliases it on CPU instead of copying) and handed back to the OS when
  the last array on it is gone (malloc arenas would keep freed chunk buffers resident)."""
  dtype = np.dtype(dtype)
  n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  return np.frombuffer(mmap.mmap(-1, max(n, 1)), np.uint8, n).view(dtype).reshape(shape)


class _BufferPool:
  """Chunk buffers reused round-robin (``depth`` per shape), so steady-state reading
  neither page-faults fresh memory nor grows the allocator's heap. A buffer must be
  refilled only after the chunk in it is done: the merge passes finish chunk ``i`` once
  chunk ``i + 1`` is loaded (:func:`._streaming._write_pass`), so loading in line needs 2
  buffers, and a reader thread (which starts on chunk ``i + 2`` when the loop takes chunk
  ``i + 1``) needs 3. On CPU each buffer's rows have one device array each, aliasing them
  (:meth:`device`), which sees every refill."""

  def __init__(self, depth: int = 2):
    self._depth = depth
    self._bufs: Dict[tuple, List[np.ndarray]] = {}
    self._next: Dict[tuple, int] = {}
    self._devs: Dict[int, Optional[tuple]] = {}

  def clear(self) -> None:
    """Hand the buffers back (they are re-made on demand)."""
    self._bufs.clear()
    self._next.clear()
    self._devs.clear()

  def get(self, shape, dtype) -> np.ndarray:
    key = (tuple(shape), np.dtype(dtype).str)
    bufs = self._bufs.setdefault(key, [])
    i = self._next.get(key, 0)
    self._next[key] = (i + 1) % self._depth
    if i == len(bufs):
      bufs.append(_aligned_empty(shape, dtype))
    return bufs[i]

  def device(self, buf: np.ndarray) -> Optional[tuple]:
    """The device arrays aliasing the rows of the pool buffer ``buf``, made once per
    buffer and reused for every chunk read into it (``jax.device_put`` per chunk cost
    about 120 µs, 12 % of the chunk reads); ``None`` where they would be copies (off CPU)."""
    key = buf.ctypes.data
    if key not in self._devs:
      rows = tuple(_alias(row) for row in buf)
      self._devs[key] = None if any(r is None for r in rows) else rows
    return self._devs[key]


_ALIGN = 64  # bytes: jax aliases host buffers aligned to it; copies run fastest (about 1.4x
# here) when source and destination addresses agree modulo it


def _pad(dtype) -> int:
  """Entries of padding per buffer row: room to shift a row's start by up to 63 bytes."""
  return _ALIGN // np.dtype(dtype).itemsize


class _Put:
  """Device arrays on the memory of 64-byte aligned host arrays, no copy (CPU only). Per
  array, ``jax.device_put`` costs about 50 µs; jax's internal batched put (used where it
  works, checked once) about 10 µs, which matters at 7 rows per chunk."""

  def __init__(self):
    self._dev = jax.devices("cpu")[0]
    self._sharding = jax.sharding.SingleDeviceSharding(self._dev)
    self._avals: Dict[tuple, object] = {}
    try:
      from jax._src import core  # noqa: PLC0415 - private: jax's own device put
      from jax._src.lib import _jax
      self._core, self._put = core, _jax.batched_device_put
      probe = _aligned_empty((16,), np.float32)
      ok = self._fast(probe).unsafe_buffer_pointer() == probe.ctypes.data
    except Exception:  # noqa: BLE001 - another jax: the public path
      ok = False
    if not ok:
      self._fast = lambda x: jax.device_put(x, self._dev)

  def _fast(self, x: np.ndarray) -> jax.Array:
    key = (x.shape, x.dtype)
    aval = self._avals.get(key)
    if aval is None:
      aval = self._avals[key] = self._core.ShapedArray(x.shape, x.dtype)
    return self._put(aval, self._sharding, [x], [self._dev])

  def __call__(self, x: np.ndarray, address: Optional[int] = None) -> Optional[jax.Array]:
    """The device array on ``x`` (at ``address``, if known), or ``None`` if it copied."""
    dev = self._fast(x)
    return dev if dev.unsafe_buffer_pointer() == (address or x.ctypes.data) else None


_PUTS: List[_Put] = []


def _put() -> _Put:
  """The process's :class:`_Put` (made on first use, on CPU)."""
  if not _PUTS:
    _PUTS.append(_Put())
  return _PUTS[0]


def _alias(x: np.ndarray, address: Optional[int] = None) -> Optional[jax.Array]:
  """A CPU device array on the memory of the 64-byte aligned host array ``x`` (at
  ``address``, if known), no copy; ``None`` off CPU, or where it would copy."""
  if jax.default_backend() != "cpu":
    return None
  return _put()(x, address)


class _Block(NamedTuple):
  """A chunk as loaded: ``data`` is a tuple of ``R`` rows (the pretrained model, then the
  fine-tuned ones), each a 64-byte aligned 1-D array of ``size + pad`` entries; row ``r``'s
  entries are ``data[r][shift[r]:shift[r] + size]``. A row is either part of a buffer the
  chunk was read into (padding zero), shifted so that it lies at the same address modulo 64
  bytes as its bytes in the file (safetensors data starts anywhere), so the reads copy
  between agreeing alignments; or the file itself, memory-mapped (:class:`_Mapped`), from
  the 64-byte line holding the row's first byte. Either way ``jax.device_put`` aliases the
  aligned rows instead of copying, and every chunk of a dtype has the same shapes (one
  compilation per kernel). The kernels take the rows with :func:`_rows`."""
  data: tuple
  shift: np.ndarray  # (R,) int32


def _block(buf: np.ndarray, shift: Optional[np.ndarray] = None) -> _Block:
  """A host ``(R, size + pad)`` buffer as a :class:`_Block` (unshifted by default)."""
  shift = np.zeros(buf.shape[0], np.int32) if shift is None else shift
  return _Block(tuple(jax.device_put(row) for row in buf), shift)


def _size(block: _Block) -> int:
  """Entries per row of the chunk (a row's length less the padding)."""
  return block.data[0].shape[0] - _pad(block.data[0].dtype)


def _nrows(block: _Block) -> int:
  """``R``: the pretrained model's row and the fine-tuned ones."""
  return len(block.data)


def _rows(block: _Block) -> list:
  """The ``R`` rows of ``size`` entries, in a kernel: reads XLA fuses into the loops that
  use them, no copies. Measured on XLA:CPU: ``dynamic_slice`` fuses for float32 (a gather
  there is copied out before the TIES kernels' two loops); for 16-bit floats the slice is
  copied out and an indexed read (a gather) fuses."""
  n = _size(block)
  if block.data[0].dtype.itemsize >= 4:
    return [jax.lax.dynamic_slice_in_dim(x, block.shift[r], n) for r, x in enumerate(block.data)]
  at = jnp.arange(n, dtype=jnp.int32)
  return [x[block.shift[r] + at] for r, x in enumerate(block.data)]


def _host_rows(block: _Block) -> List[np.ndarray]:
  """The rows as NumPy views of the host memory (the buffer, or the mapped files)."""
  n = _size(block)
  return [np.asarray(x)[s:s + n] for x, s in zip(block.data, block.shift.tolist())]


class _Mapped:
  """Full chunks read in place: no read, no copy. On CPU each safetensors file is
  memory-mapped once (read-only); a chunk whose every row is one contiguous byte range of
  its file becomes a :class:`_Block` of device arrays aliasing the mapped file, and the
  kernels read the page cache directly (pages fault in as they are read). Measured on a
  2-core Zen 4 with 7 files of 90 MB: summing the inputs in place 34-38 ms, against 50 ms
  for reading them once into a buffer. Pages of chunks done are unmapped
  (``MADV_DONTNEED``; they stay in the page cache), so the resident set stays a few
  chunks. Elsewhere (an accelerator, orbax inputs, chunks partly filled, split over files,
  ending within 64 bytes of a file's end, or misaligned for their dtype), :func:`_load_chunk`
  reads into a buffer."""

  def __init__(self):
    self.on = jax.default_backend() == "cpu"
    self._maps: Dict[int, tuple] = {}  # id(file) -> (file, map, uint8 array on it)
    self._done: List[list] = []  # per mapped chunk: [(map, first byte, end byte)]

  def clear(self) -> None:
    """Drop every mapping (unmapped once no kernel holds them)."""
    self._maps.clear()
    self._done.clear()

  def _map(self, f):
    if id(f) not in self._maps:
      mm, host = f.window(0, f.nbytes, np.uint8)
      # Pages one at a time (with the kernel's fault-around), not whole 2-MiB page-cache
      # folios: those map the neighbouring chunks' pages too. Measured on the 7 × 90 MB
      # benchmark: TIES's peak file pages 42-43 → 32 MiB over the process's own, TIES
      # medians 359-421 → 343-389 ms (3 A/B pairs), task arithmetic unchanged.
      if hasattr(mmap, "MADV_NOHUGEPAGE"):
        mm.madvise(mmap.MADV_NOHUGEPAGE)
      self._maps[id(f)] = (f, mm, host, host.ctypes.data)
    return self._maps[id(f)][1:]

  def block(self, readers, chunk: _Chunk) -> Optional[_Block]:
    """The chunk as rows of the mapped files, or ``None`` where it has to be read."""
    if not self.on or chunk.used != chunk.size:
      return None
    put = _put()
    isz = chunk.dtype.itemsize
    width = (chunk.size + _pad(chunk.dtype)) * isz
    rows, shift, spans = [], [], []
    for reader in readers:
      if reader.format == "orbax":
        return None
      runs = _runs(reader, chunk)
      if len(runs) != 1 or runs[0][1] % isz:
        return None
      f, pos, _, n = runs[0]
      mm, host, address = self._map(f)
      a = pos - pos % _ALIGN
      if a + width > host.size:
        return None
      dev = put(host[a:a + width].view(chunk.dtype), address + a)
      if dev is None:
        return None
      rows.append(dev)
      shift.append((pos - a) // isz)
      spans.append((mm, pos, pos + n))
    self.release(1)
    self._done.append(spans)
    return _Block(tuple(rows), np.asarray(shift, np.int32))

  def release(self, keep: int = 1) -> None:
    """Unmap the pages of the mapped chunks before the last ``keep``: about 5 ms of system
    time per 90 MB mapped, so a merge loop calls it while a kernel runs. Also called as
    chunk ``j`` is mapped: the merge loops finish chunk ``j - 2`` before they load chunk
    ``j`` (chunk ``j - 1``'s kernels may still run). Pages unmapped early would only fault
    in again."""
    while len(self._done) > keep:
      for mm, a, b in self._done.pop(0):
        a, b = -(-a // mmap.PAGESIZE) * mmap.PAGESIZE, b // mmap.PAGESIZE * mmap.PAGESIZE
        if b > a and hasattr(mm, "madvise"):
          mm.madvise(mmap.MADV_DONTNEED, a, b - a)

  def finish(self) -> None:
    """End of a pass: unmap the pages of every chunk."""
    self.release(0)


def _load_chunk(readers, chunk: _Chunk, pool: Optional[_BufferPool] = None,
                mapped: Optional[_Mapped] = None) -> _Block:
  """One chunk of every reader as a :class:`_Block`: mapped in place where ``mapped``
  can; else read into a buffer (zero padding; the buffer aliased by the device arrays, not
  copied: with a pool, the buffer's own, reused device arrays)."""
  if mapped is not None:
    block = mapped.block(readers, chunk)
    if block is not None:
      return block
  isz, pad = chunk.dtype.itemsize, _pad(chunk.dtype)
  shape = (len(readers), chunk.size + pad)
  buf = pool.get(shape, chunk.dtype) if pool is not None else _aligned_empty(shape, chunk.dtype)
  shift = np.zeros(len(readers), np.int32)
  for r, reader in enumerate(readers):
    if reader.format == "orbax":
      whole = reader.read([pc.path for pc in chunk.pieces])
      for pc in chunk.pieces:
        np.copyto(buf[r, pc.off:pc.off + pc.stop - pc.start],
                  whole[pc.path].reshape(-1)[pc.start:pc.stop])
    else:
      runs = _runs(reader, chunk)
      first = (runs[0][1] - buf[r].ctypes.data) % _ALIGN if runs else 0
      s = shift[r] = first // isz if first % isz == 0 else 0
      row = memoryview(buf[r].view(np.uint8))
      for f, pos, dest, n in runs:
        f.pread(row[s * isz + dest:s * isz + dest + n], pos)
    s = int(shift[r])
    buf[r, :s] = 0
    buf[r, s + chunk.used:] = 0
  dev = pool.device(buf) if pool is not None else None
  return _Block(dev, shift) if dev is not None else _block(buf, shift)


def _runs(reader, chunk: _Chunk) -> List[Tuple[object, int, int, int]]:
  """``(file, offset, buffer offset, bytes)``: the chunk's pieces in ``reader``'s files
  (:meth:`~._io.SafetensorsReader.byte_range`, in bytes), pieces adjacent in both the file
  and the buffer joined into one read."""
  isz = chunk.dtype.itemsize
  runs: List[List] = []
  for pc in chunk.pieces:
    f, pos, n = reader.byte_range(pc.path, pc.start, pc.stop)
    dest = pc.off * isz
    last = runs[-1] if runs else None
    if last and last[0] is f and last[1] + last[3] == pos and last[2] + last[3] == dest:
      last[3] += n
    else:
      runs.append([f, pos, dest, n])
  return [tuple(x) for x in runs]


def _prefetched(items, load) -> Iterator:
  """``(item, load(item))`` for each item, loading the next item in a reader thread."""
  items = list(items)
  if not items:
    return
  with ThreadPoolExecutor(1) as ex:
    fut = ex.submit(load, items[0])
    for i, it in enumerate(items):
      data = fut.result()
      if i + 1 < len(items):
        fut = ex.submit(load, items[i + 1])
      yield it, data
      del data


# ----------------------------------------------------------------------------- kernels
def _split(block: _Block):
  """In a kernel: the pretrained row and the fine-tuned rows of a chunk."""
  rows = _rows(block)
  return rows[0], rows[1:]


def _product(a, b, zero):
  """``a · b`` rounded to float32 on its own, like an eager multiply.

  ``zero`` is a uint32 0 passed at run time: OR-ing it into the bits is an identity the
  compiler cannot see through, so LLVM cannot contract the product with a following
  addition into a fused multiply-add (XLA:CPU does, and optimization barriers and
  ``reduce_precision`` are simplified away), and a jitted chunk rounds exactly like the
  op-by-op (eager) in-memory merge.
  """
  bits = jax.lax.bitcast_convert_type(a * b, jnp.uint32) | zero
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


_ZERO = np.uint32(0)


# ----------------------------------------------------------------------------- columns
def _piece_slices(chunk: _Chunk, offs: np.ndarray):
  """``(piece, slice of offs)`` for each piece of the chunk holding some of the sorted
  chunk offsets ``offs``."""
  bounds = np.searchsorted(offs, [pc.off for pc in chunk.pieces] + [chunk.used])
  return [(pc, slice(int(bounds[g]), int(bounds[g + 1])))
          for g, pc in enumerate(chunk.pieces) if bounds[g + 1] > bounds[g]]


def _gather_cols(readers, chunk: _Chunk, offs: np.ndarray, ex) -> np.ndarray:
  """The inputs' entries at the sorted chunk offsets ``offs``, ``(R, len)``, each reader
  read by one thread of ``ex`` (page faults of the memory maps dominate)."""
  cols = np.empty((len(readers), offs.size), chunk.dtype)
  slices = _piece_slices(chunk, offs)

  def fill(r):
    for pc, sl in slices:
      o = offs[sl]
      first = pc.start + int(o[0]) - pc.off
      v = readers[r].view(pc.path, first, first + int(o[-1] - o[0]) + 1)
      cols[r, sl] = v[o - o[0]]
      del v

  if ex is None or offs.size < _POOL_MIN:
    for r in range(len(readers)):
      fill(r)
  else:
    list(ex.map(fill, range(len(readers))))
  return cols


def _column_batches(chunks: List[_Chunk], fixes, rows: int):
  """The columns of ``fixes`` (``(chunk index, offsets, columns)``) packed per dtype into
  zero-padded buffers of one chunk's shape (so the kernels compiled for the chunks run
  them): yields ``(block, segments)``, a segment ``(chunk index, offsets, first column,
  end column)``."""
  open_: Dict[np.dtype, list] = {}
  for ci, offs, cols in fixes:
    ch, start = chunks[ci], 0
    while start < offs.size:
      if ch.dtype not in open_:
        gbuf = _aligned_empty((rows, ch.size + _pad(ch.dtype)), ch.dtype)  # fresh: zeros
        open_[ch.dtype] = [gbuf, []]
      gbuf, segs = open_[ch.dtype]
      c0 = segs[-1][3] if segs else 0
      take = min(offs.size - start, ch.size - c0)
      gbuf[:, c0:c0 + take] = cols[:, start:start + take]
      segs.append((ci, offs[start:start + take], c0, c0 + take))
      start += take
      if c0 + take == ch.size:
        gbuf, segs = open_.pop(ch.dtype)
        yield _block(gbuf), segs
  for gbuf, segs in open_.values():
    yield _block(gbuf), segs
