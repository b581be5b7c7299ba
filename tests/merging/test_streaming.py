"""Streaming merges of checkpoints on disk equal the in-memory merges, with bounded memory."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from saft_jax import merging as m

T = 3
EXCL = lambda p: p.startswith("head")
CASES = [("weight_average", {}), ("task_arithmetic", {"lam": [0.3, 0.5, 0.7]}),
         ("ties", {"lam": 0.8, "k": 0.3, "trim": "global"}),
         ("ties", {"lam": 0.8, "k": 0.3, "trim": "per_leaf"}),
         ("ties", {"lam": 0.8, "k": 0.3, "trim": "global", "keep": "reference",
                   "disjoint": "sum"}),
         ("ties", {"lam": 0.8, "k": 0.3, "trim": "per_leaf", "keep": "reference"})]


def _model(rng, base=None):
  def f(shape, dtype=np.float32):
    return rng.normal(size=shape).astype(dtype)
  tree = {"blocks_0": {"w": f((6, 5)), "b": f((5,), ml_dtypes.bfloat16)},
          "blocks_1": {"w": f((8, 5)), "s": np.array(0.5, np.float32)},
          "head": f((5, 2)), "step": np.array(3, np.int32),
          "extra": [f((3,)), f((2, 2))]}
  if base is not None:  # fine-tuned: base + small noise, same integer leaf
    tree = jax.tree.map(lambda b, x: (b.astype(np.float32) + 0.1 * x.astype(np.float32)
                                      ).astype(b.dtype) if b.dtype != np.int32 else b,
                        base, tree)
  return tree


def _flat(tree):
  return {m.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _read_st(path):
  with safe_open(path, "numpy") as f:
    return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  d = tmp_path_factory.mktemp("ckpts")
  rng = np.random.default_rng(0)
  pre = _model(rng)
  fts = [_model(rng, pre) for _ in range(T)]
  ckptr = ocp.StandardCheckpointer()
  out = {}
  for fmt in ("safetensors", "orbax"):
    paths = []
    for name, tree in [("pre", pre)] + [(f"ft{i}", t) for i, t in enumerate(fts)]:
      if fmt == "safetensors":
        # safetensors has no lists: its keys are the flat leaf paths.
        p = str(d / f"{name}.safetensors")
        save_file(_flat(tree), p)
      else:
        p = str(d / f"{name}_orbax")
        ckptr.save(p, tree)
      paths.append(p)
    out[fmt] = paths
  ckptr.wait_until_finished()
  return d, out


def _load(fmt, path):
  if fmt == "safetensors":
    return {k: jnp.asarray(v) for k, v in _read_st(path).items()}
  return jax.tree.map(jnp.asarray, ocp.StandardCheckpointer().restore(path))


@pytest.mark.parametrize("fmt", ["safetensors", "orbax"])
def test_streaming_equals_in_memory(checkpoints, fmt):
  d, paths = checkpoints
  pre_p, ft_ps = paths[fmt][0], paths[fmt][1:]
  theta0 = _load(fmt, pre_p)
  thetas = [_load(fmt, p) for p in ft_ps]
  tvs = [m.task_vector(theta0, t, exclude=EXCL) for t in thetas]
  for method, kw in CASES:
    out_p = str(d / f"out_{fmt}_{method}_{kw.get('trim')}_{kw.get('keep')}") + (
        ".safetensors" if fmt == "safetensors" else "")
    stats = m.stream_merge(pre_p, ft_ps, out_p, method, exclude=EXCL, chunk_bytes=64, **kw)
    assert stats["chunks"] >= 3  # several (orbax chunks hold whole leaves)
    if method == "weight_average":
      ref = m.weight_average(thetas, exclude=EXCL)
    elif method == "task_arithmetic":
      ref = m.task_arithmetic(theta0, tvs, jnp.asarray(kw["lam"]), exclude=EXCL)
    else:
      ref = m.ties(theta0, tvs, kw["lam"], k=kw["k"], trim=kw["trim"],
                   keep=kw.get("keep", "exact"), disjoint=kw.get("disjoint", "mean"),
                   exclude=EXCL)
    got = _read_st(out_p) if fmt == "safetensors" else _flat(
        ocp.StandardCheckpointer().restore(out_p))
    ref = _flat(ref)
    assert set(got) == set(ref)
    for p in ref:
      assert got[p].dtype == ref[p].dtype and got[p].shape == ref[p].shape, p
      np.testing.assert_array_equal(got[p], ref[p], err_msg=f"{method} {kw} {p}")
    np.testing.assert_array_equal(got["head"], _flat(theta0 if method != "weight_average"
                                                     else thetas[0])["head"])


def test_streaming_bad_input(checkpoints, tmp_path):
  d, paths = checkpoints
  pre_p, ft_ps = paths["safetensors"][0], paths["safetensors"][1:]
  bad = str(tmp_path / "bad.safetensors")
  flat = _read_st(ft_ps[0])
  flat["blocks_1/w"] = flat["blocks_1/w"][:4]
  save_file(flat, bad)
  with pytest.raises(ValueError, match="blocks_1/w.*shape"):
    m.stream_merge(pre_p, [ft_ps[0], bad], str(tmp_path / "o.safetensors"))
  del flat["blocks_1/w"]
  save_file(flat, bad)
  with pytest.raises(ValueError, match="blocks_1/w"):
    m.stream_merge(pre_p, [bad], str(tmp_path / "o.safetensors"))
  with pytest.raises(ValueError, match="non-empty"):
    m.stream_merge(pre_p, [], str(tmp_path / "o.safetensors"))
  with pytest.raises(ValueError, match="k must be"):
    m.stream_merge(pre_p, ft_ps, str(tmp_path / "o.safetensors"), "ties", k=1.5)
  with pytest.raises(FileExistsError):
    m.stream_merge(pre_p, ft_ps, pre_p)


_MEM_SCRIPT = textwrap.dedent("""
    import json, sys, threading, time
    from saft_jax import merging as m
    d, t = sys.argv[1], int(sys.argv[2])
    def rss():
      for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
          return int(line.split()[1]) * 1024
    # Warm-up on a 2-leaf model with the same leaf shape (compiles every eager op).
    m.stream_merge(f"{d}/small_pre.safetensors", [f"{d}/small_ft{i}.safetensors"
                   for i in range(t)], f"{d}/small_out.safetensors", "ties", k=0.2)
    base, peak, stop = rss(), [0], [False]
    def sample():
      while not stop[0]:
        peak[0] = max(peak[0], rss()); time.sleep(0.002)
    th = threading.Thread(target=sample); th.start()
    m.stream_merge(f"{d}/pre.safetensors", [f"{d}/ft{i}.safetensors" for i in range(t)],
                   f"{d}/out.safetensors", "ties", k=0.2, trim="global")
    stop[0] = True; th.join()
    print(json.dumps({"base": base, "peak": peak[0]}))
""")


def test_streaming_peak_memory_is_bounded(tmp_path):
  rng = np.random.default_rng(0)
  leaf, nleaves = 262144, 48  # 1 MiB float32 leaves, 48 MiB per model
  for tag, n in (("small_", 2), ("", nleaves)):
    for name in ["pre"] + [f"ft{i}" for i in range(T)]:
      save_file({f"blocks_{j}/w": rng.normal(size=leaf).astype(np.float32) for j in range(n)},
                str(tmp_path / f"{tag}{name}.safetensors"))
  total = (T + 1) * nleaves * leaf * 4
  env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
  res = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, str(tmp_path), str(T)],
                       capture_output=True, text=True, env=env, timeout=300)
  assert res.returncode == 0, res.stderr[-2000:]
  r = json.loads(res.stdout.strip().splitlines()[-1])
  growth = r["peak"] - r["base"]
  # Peak growth is a few leaves per model (measured ~13 MiB here), far below the
  # 192 MiB the four checkpoints hold.
  assert growth < 0.2 * total, (growth / 2**20, total / 2**20)
  with safe_open(str(tmp_path / "out.safetensors"), "numpy") as f:
    assert len(list(f.keys())) == nleaves


def test_default_chunk_fits_the_cache(tmp_path, monkeypatch):
  """On CPU the default chunk is a quarter of the largest leaf (1-64 MiB) and at most
  8 MiB over all the models, but at least 1 MiB; elsewhere only the leaf rule holds."""
  from saft_jax.merging import _streaming
  mib = 1 << 20
  assert _streaming._default_chunk(36 * mib, 7) == (8 * mib) // 7
  assert _streaming._default_chunk(36 * mib, 2) == 4 * mib
  assert _streaming._default_chunk(36 * mib, 16) == mib  # not below 1 MiB
  assert _streaming._default_chunk(2 * mib, 2) == mib  # the leaf rule's minimum
  assert _streaming._default_chunk(12 * mib, 2) == 3 * mib  # a quarter of the leaf
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert _streaming._default_chunk(36 * mib, 7) == 9 * mib
  assert _streaming._default_chunk(1024 * mib, 7) == 64 * mib
  monkeypatch.undo()
  # stream_merge uses it: one 16 MiB float32 leaf, 1 + 3 models -> 2 MiB chunks, 8 of them
  rng = np.random.default_rng(0)
  x = rng.normal(size=4 * mib).astype(np.float32)
  paths = []
  for i in range(4):
    paths.append(str(tmp_path / f"m{i}.safetensors"))
    save_file({"w": x + i}, paths[-1])
  stats = m.stream_merge(paths[0], paths[1:], str(tmp_path / "out.safetensors"),
                         "task_arithmetic", lam=0.5)
  assert stats["chunks"] == 8
  theta0 = {"w": jnp.asarray(x)}
  tvs = [m.task_vector(theta0, {"w": jnp.asarray(x + i)}) for i in range(1, 4)]
  ref = m.task_arithmetic(theta0, tvs, 0.5)["w"]
  with safe_open(str(tmp_path / "out.safetensors"), "numpy") as f:
    np.testing.assert_array_equal(f.get_tensor("w"), np.asarray(ref))


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_writer_patches_match_numpy(tmp_path, monkeypatch, dtype):
  """Patches (unsorted, repeated, far apart, across the read-modify-write windows, on two
  tensors) give the file NumPy's assignment would: later values win, other bytes kept."""
  from saft_jax.merging import _io
  monkeypatch.setattr(_io, "_PATCH_SPAN", 4096)  # one-page windows: many of them
  rng = np.random.default_rng(0)
  a = rng.standard_normal(20001).astype(dtype)
  b = rng.standard_normal((40, 30)).astype(dtype)
  c = np.arange(3, dtype=ml_dtypes.bfloat16)  # 6 bytes first: entries straddle the pages
  path = str(tmp_path / "p.safetensors")
  w = _io.SafetensorsWriter(path, [("c", c.shape, c.dtype), ("a", a.shape, a.dtype),
                                   ("b", b.shape, b.dtype)])
  w.write({"c": c})
  w.write_part("a", a[:1234])
  w.write_part("a", a[1234:])
  w.write({"b": b})
  want_a, want_b = a.copy(), b.reshape(-1).copy()
  first = w._base + w._offsets["a"]  # byte position of a[0] in the file
  across = [j for j in range(a.size) if (first + a.itemsize * j) % 4096 > 4096 - a.itemsize]
  assert bool(across) == (a.itemsize == 4)
  w.patch("a", np.array(across), np.full(len(across), 7.0, dtype))
  want_a[across] = 7.0
  for _ in range(3):
    idx = rng.integers(0, a.size, 300)
    idx[:5] = [0, a.size - 1, 1000, 1001, 1001]  # ends, a window edge, a repeat
    vals = rng.standard_normal(idx.size).astype(dtype)
    w.patch("a", idx, vals)
    want_a[idx] = vals
  idx = np.array([1199, 7, 7, 600])
  vals = np.array([1.0, 2.0, 3.0, 4.0], dtype)
  w.patch("b", idx, vals)
  want_b[idx] = vals
  w.close()
  with safe_open(path, "np") as f:
    got_a, got_b, got_c = f.get_tensor("a"), f.get_tensor("b"), f.get_tensor("c")
  assert got_c.view(np.uint8).tobytes() == c.view(np.uint8).tobytes()
  assert got_a.view(np.uint8).tobytes() == want_a.view(np.uint8).tobytes()
  assert got_b.reshape(-1).view(np.uint8).tobytes() == want_b.view(np.uint8).tobytes()
  assert want_b[7] == 3.0


def test_chunk_reads_equal_the_tensors(tmp_path):
  """The chunk reader's ``preadv`` runs fill each chunk buffer with the pieces' elements
  (float32 and bfloat16, single file and a sharded copy split differently), join pieces
  adjacent in file and buffer, and name a truncated file or an out-of-range request."""
  from saft_jax.merging import _chunks, _io
  rng = np.random.default_rng(0)
  names = ["a", "b", "c", "d", "e"]
  tensors = {k: rng.normal(size=n).astype(np.float32) for k, n in zip(names, (700, 3, 1500, 64, 999))}
  tensors["h"] = rng.normal(size=(30, 11)).astype(ml_dtypes.bfloat16)
  save_file(tensors, str(tmp_path / "one.safetensors"))
  shards = tmp_path / "sharded"
  shards.mkdir()
  split = {"model-00001-of-00002.safetensors": ["a", "b", "h"],
           "model-00002-of-00002.safetensors": ["c", "d", "e"]}
  for f, keys in split.items():
    save_file({k: tensors[k] for k in keys}, str(shards / f))
  (shards / "model.safetensors.index.json").write_text(json.dumps(
      {"metadata": {}, "weight_map": {k: f for f, keys in split.items() for k in keys}}))
  pre = _io.open_checkpoint(str(tmp_path / "one.safetensors"))
  readers = [pre, _io.open_checkpoint(str(shards))]
  items, _ = m._streaming._plan(pre, {p: True for p in pre.paths}, 1000, True)
  chunks = [c for kind, c in items if kind == "chunk"]
  assert len(chunks) > 3 and any(len(c.pieces) > 2 for c in chunks)
  joined = 0
  for ch in chunks:
    block = _chunks._load_chunk(readers, ch)
    host, rows = [np.asarray(x) for x in block.data], _chunks._host_rows(block)
    assert all(h.shape == (ch.size + 64 // ch.dtype.itemsize,) and h.dtype == ch.dtype
               for h in host)
    for pc in ch.pieces:
      want = tensors[pc.path].reshape(-1)[pc.start:pc.stop]
      for r in range(2):
        np.testing.assert_array_equal(rows[r][pc.off:pc.off + want.size], want)
    for r, reader in enumerate(readers):
      s = int(block.shift[r])
      assert not host[r][:s].any() and not host[r][s + ch.used:].any()  # zero padding
      # the row sits at its file bytes' address modulo 64: aligned copies
      f, pos, dest, _ = _chunks._runs(reader, ch)[0]
      assert (host[r].ctypes.data + s * ch.dtype.itemsize + dest - pos) % 64 == 0
    runs = _chunks._runs(pre, ch)
    assert sum(n for *_, n in runs) == ch.used * ch.dtype.itemsize
    joined += len(ch.pieces) - len(runs)
    shard_runs = _chunks._runs(readers[1], ch)  # never joined across two shard files
    assert len({id(f) for f, *_ in shard_runs}) == len({readers[1].shard_of[pc.path]
                                                       for pc in ch.pieces})
  assert joined > 0
  with pytest.raises(ValueError, match="outside tensor 'c'"):
    pre.byte_range("c", 1000, 1501)
  for r in readers:
    r.close()
  # A file cut short: the read names the tensor (the header promises more bytes).
  path = str(tmp_path / "one.safetensors")
  data = open(path, "rb").read()
  open(path, "wb").write(data[:-100])
  cut = _io.open_checkpoint(path)
  with pytest.raises(ValueError, match="truncated"):
    _chunks._load_chunk([cut], chunks[-1])


def test_chunk_rows_are_whole_cache_lines(tmp_path):
  """Chunk buffers hold whole 64-byte lines per row for any ``chunk_bytes`` and leaf sizes
  (split pieces, and whole leaves as for orbax), so every row starts 64-byte aligned."""
  from saft_jax.merging import _chunks, _io
  rng = np.random.default_rng(0)
  tensors = {k: rng.normal(size=n).astype(np.float32) for k, n in (("a", 701), ("b", 3), ("c", 1999))}
  tensors["h"] = rng.normal(size=(31, 11)).astype(ml_dtypes.bfloat16)
  save_file(tensors, str(tmp_path / "one.safetensors"))
  pre = _io.open_checkpoint(str(tmp_path / "one.safetensors"))
  assert _chunks._whole_rows(299593, np.float32) == 299600
  assert _chunks._whole_rows(1, ml_dtypes.bfloat16) == 32
  for split in (True, False):
    for chunk_bytes in (4, 100, 1000, 1198372):
      items, _ = m._streaming._plan(pre, {p: True for p in pre.paths}, chunk_bytes, split)
      chunks = [c for kind, c in items if kind == "chunk"]
      got = {p for c in chunks for pc in c.pieces for p in [pc.path]}
      assert got == set(tensors)
      for c in chunks:
        assert (c.size * c.dtype.itemsize) % 64 == 0 and c.size >= c.used
        assert c.size * c.dtype.itemsize >= min(chunk_bytes, c.used * c.dtype.itemsize)
        block = _chunks._load_chunk([pre, pre], c)
        assert all(np.asarray(x).ctypes.data % 64 == 0 for x in block.data)
        for r in _chunks._host_rows(block):
          for pc in c.pieces:
            np.testing.assert_array_equal(
                r[pc.off:pc.off + pc.stop - pc.start],
                tensors[pc.path].reshape(-1)[pc.start:pc.stop])
  pre.close()


def test_pooled_chunks_are_read_through_reused_device_arrays(tmp_path):
  """The chunk pool makes device arrays per buffer (aliasing its rows on CPU), reused:
  every chunk loaded into a reused buffer reads as that chunk's data, in NumPy and in a
  kernel, with the buffers' count bounded by the pool's depth."""
  from saft_jax.merging import _chunks, _io
  rng = np.random.default_rng(0)
  x = rng.normal(size=5000).astype(np.float32)
  for i in range(3):
    save_file({"w": x * (i + 1)}, str(tmp_path / f"m{i}.safetensors"))
  readers = [_io.open_checkpoint(str(tmp_path / f"m{i}.safetensors")) for i in range(3)]
  items, _ = m._streaming._plan(readers[0], {"w": True}, 512, True)
  chunks = [c for kind, c in items if kind == "chunk"]
  assert len(chunks) > 4
  pool = _chunks._BufferPool()
  total = jax.jit(lambda b: sum(jnp.sum(r) for r in _chunks._rows(b)))
  seen = set()
  for ch in chunks:
    block = _chunks._load_chunk(readers, ch, pool)
    seen.add(id(block.data))
    want = x[ch.pieces[0].start:ch.pieces[0].stop]
    for r, row in enumerate(_chunks._host_rows(block)):
      np.testing.assert_array_equal(row[:want.size], want * (r + 1))
    np.testing.assert_allclose(float(total(block)), 6 * float(want.sum(dtype=np.float64)),
                               rtol=1e-5)
  assert len(seen) == 2  # two buffers, each with its rows' device arrays reused
  assert all(pool.device(b) is not None for bufs in pool._bufs.values() for b in bufs)
  for r in readers:
    r.close()


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_shifted_rows_fuse_without_copies(dtype):
  """The kernels read the shifted rows of a loaded chunk inside their loops: task
  arithmetic compiles to no temporary buffer (a copied-out slice of every row would show
  as R x size temporaries), and so does the fused TIES kernel on float32 chunks."""
  from saft_jax.merging import _chunks, _streaming, _streaming_ties
  n, pad = 4096, 64 // np.dtype(dtype).itemsize
  block = _chunks._Block(tuple(jnp.zeros((n + pad,), dtype) for _ in range(T + 1)),
                         np.arange(T + 1, dtype=np.int32))
  lam = jnp.float32(0.3)
  ta = _streaming._k_task_arithmetic.lower(block, lam, _chunks._ZERO).compile()
  assert ta.memory_analysis().temp_size_in_bytes == 0
  if dtype == np.float32:
    thr = np.zeros(T, np.int32)
    ties = _streaming_ties._k_ties_bracket.lower(block, thr, thr, thr, lam, _chunks._ZERO,
                                                 "mean").compile()
    assert ties.memory_analysis().temp_size_in_bytes == 0


def _layout_file(path, tensors, metadata=None):
  """A safetensors file with the tensors in the given order (byte offsets as they fall:
  a float32 tensor after an odd number of bfloat16 entries is misaligned)."""
  from saft_jax.merging import _io
  w = _io.SafetensorsWriter(str(path), [(k, v.shape, v.dtype) for k, v in tensors.items()],
                            metadata)
  w.write(tensors)
  w.close()


def test_full_chunks_are_mapped_in_place(tmp_path):
  """On CPU, full chunks whose every row is one aligned byte range of its file are read in
  place: rows aliasing the memory-mapped files (no copy), shaped like the buffered chunks
  of their dtype (one compilation), equal to the tensors; partial chunks, a tensor
  misaligned for its dtype, and the end of a file go through buffers. A kernel gives the
  same bits on either."""
  from saft_jax.merging import _chunks, _io, _streaming
  rng = np.random.default_rng(0)
  base = {"a": rng.normal(size=5000).astype(np.float32),
          "h": rng.normal(size=3001).astype(ml_dtypes.bfloat16),
          "c": rng.normal(size=4000).astype(np.float32),  # at an odd 2-byte offset
          "i": np.arange(10, dtype=np.int32),
          "d": rng.normal(size=2500).astype(np.float32)}
  models = [base] + [{k: (v + (0.1 * (t + 1)) * rng.normal(size=v.shape)).astype(v.dtype)
                      if v.dtype != np.int32 else v for k, v in base.items()}
                     for t in range(2)]
  for t, tensors in enumerate(models):  # headers of different lengths: other alignments
    _layout_file(tmp_path / f"m{t}.safetensors", tensors, {"pad": "x" * (7 * t)})
  readers = [_io.open_checkpoint(str(tmp_path / f"m{t}.safetensors")) for t in range(3)]
  mergeable = {p: p != "i" for p in readers[0].paths}
  items, _ = _streaming._plan(readers[0], mergeable, 1024, True)
  chunks = [c for kind, c in items if kind == "chunk"]
  mapped, shapes, seen = _chunks._Mapped(), {}, {"mapped": 0, "read": 0}
  lam = jnp.float32(0.3)
  for ch in chunks:
    block = _chunks._load_chunk(readers, ch, None, mapped)
    read = _chunks._load_chunk(readers, ch)
    is_mapped = mapped._done and mapped._done[-1][0][1] == _chunks._runs(readers[0], ch)[0][1]
    in_c = any(pc.path == "c" for pc in ch.pieces)
    if ch.used != ch.size or in_c:
      assert not is_mapped, ch
    seen["mapped" if is_mapped else "read"] += 1
    for r, reader in enumerate(readers):
      f, pos, _, _ = _chunks._runs(reader, ch)[0]
      ptr = np.asarray(block.data[r]).ctypes.data
      if is_mapped:  # the row is the file's own memory, from the 64-byte line of `pos`
        assert ptr == mapped._maps[id(f)][2].ctypes.data + pos - pos % 64
      assert ptr % 64 == 0
    shape = jax.tree.map(lambda x: (x.shape, x.dtype), (block.data, read.data))
    assert shape[0] == shape[1]
    shapes.setdefault(ch.dtype, set()).add(shape[0])
    for r, row in enumerate(_chunks._host_rows(block)):
      for pc in ch.pieces:
        np.testing.assert_array_equal(row[pc.off:pc.off + pc.stop - pc.start],
                                      models[r][pc.path].reshape(-1)[pc.start:pc.stop])
    got = np.asarray(_streaming._k_task_arithmetic(block, lam, _chunks._ZERO))[:ch.used]
    want = np.asarray(_streaming._k_task_arithmetic(read, lam, _chunks._ZERO))[:ch.used]
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
  mapped.finish()
  assert seen["mapped"] >= 10 and seen["read"] >= 3, seen
  assert all(len(s) == 1 for s in shapes.values())  # one block shape per dtype
  mapped.clear()
  for r in readers:
    r.close()


def test_mapped_chunks_release_their_pages(tmp_path):
  """Pages of mapped chunks already merged are unmapped as the pass goes on: the
  process's file-backed resident set grows by a few chunks (measured: 2 MiB a file, the
  page cache's folios), not by the inputs."""
  from saft_jax.merging import _chunks, _io, _streaming
  status = "/proc/self/status"
  if not os.path.exists(status):
    pytest.skip("no /proc")
  rss_file = lambda: next(int(line.split()[1]) * 1024 for line in open(status)
                          if line.startswith("RssFile"))
  rng = np.random.default_rng(0)
  n = 1 << 23  # 32 MiB of float32 per model (the page cache may map 2-MiB folios whole)
  for t in range(3):
    save_file({"w": rng.normal(size=n).astype(np.float32)}, str(tmp_path / f"m{t}.safetensors"))
  readers = [_io.open_checkpoint(str(tmp_path / f"m{t}.safetensors")) for t in range(3)]
  items, _ = _streaming._plan(readers[0], {"w": True}, 256 << 10, True)
  chunks = [c for kind, c in items if kind == "chunk"]
  mapped, pool = _chunks._Mapped(), _chunks._BufferPool()
  base, peak, total = rss_file(), 0, 0.0
  for ch, block in _chunks._prefetched(chunks, lambda c: _chunks._load_chunk(readers, c, pool,
                                                                           mapped)):
    total += sum(float(r.sum(dtype=np.float64)) for r in _chunks._host_rows(block))
    peak = max(peak, rss_file() - base)
    del block
  mapped.finish()
  want = sum(float(np.asarray(r.view("w"), np.float64).sum()) for r in readers)
  assert total == pytest.approx(want)
  inputs = 3 * n * 4
  assert len(mapped._maps) == 3 and peak < 0.25 * inputs, (peak / 2**20, inputs / 2**20)
  assert rss_file() - base < 0.1 * inputs
  mapped.clear()
  for r in readers:
    r.close()


def test_streaming_compiles_once_per_dtype(tmp_path):
  """A merge of sharded checkpoints (shard files of different sizes, chunks mapped in place
  and read into buffers) compiles its task-arithmetic kernel once per dtype, and writes the
  same bits as with every chunk read into buffers."""
  from saft_jax.merging import _chunks, _streaming
  rng = np.random.default_rng(1)
  split = {"model-00001-of-00002.safetensors": ["a", "h"],
           "model-00002-of-00002.safetensors": ["c", "d"]}
  models = []
  for t in range(3):
    tensors = {"a": rng.normal(size=3000).astype(np.float32),
               "h": rng.normal(size=(40, 51)).astype(ml_dtypes.bfloat16),
               "c": rng.normal(size=1700).astype(np.float32),
               "d": rng.normal(size=(9, 7)).astype(ml_dtypes.bfloat16)}
    d = tmp_path / f"m{t}"
    d.mkdir()
    for f, keys in split.items():
      save_file({k: tensors[k] for k in keys}, str(d / f))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, keys in split.items() for k in keys}}))
    models.append(str(d))
  before = _streaming._k_task_arithmetic._cache_size()
  m.stream_merge(models[0], models[1:], str(tmp_path / "out"), "task_arithmetic", lam=0.4,
                 chunk_bytes=1344)  # a chunk size no other test uses: fresh compilations
  assert _streaming._k_task_arithmetic._cache_size() - before == 2  # float32, bfloat16

  class NotMapped(_chunks._Mapped):
    def block(self, readers, chunk):
      return None

  orig = _streaming._Mapped
  try:
    _streaming._Mapped = NotMapped
    m.stream_merge(models[0], models[1:], str(tmp_path / "ref"), "task_arithmetic", lam=0.4,
                   chunk_bytes=1344)
  finally:
    _streaming._Mapped = orig
  for f in split:
    got, want = _read_st(str(tmp_path / "out" / f)), _read_st(str(tmp_path / "ref" / f))
    assert set(got) == set(want)
    for k in want:
      np.testing.assert_array_equal(got[k].view(np.uint8), want[k].view(np.uint8), err_msg=k)
