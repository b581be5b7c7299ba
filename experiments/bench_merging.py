"""Benchmark of saft_jax.merging, side by side in one run (a script, not a test).

1. In-memory global TIES (k = 0.2) on T synthetic task vectors (ViT-like leaves, float32):
   ``saft_jax`` (jit; the default engine of the backend, on CPU the host radix select),
   the XLA engine (fused counting passes; bisection on CPU), and a NumPy TIES whose
   thresholds come from ``np.partition``. Target on CPU: saft_jax <= 0.5 x NumPy.
   On a GPU, also T x 88M (CLIP ViT-B/32 sized) task vectors (target <= 50 ms).
2. Streaming merges of 1 pretrained + T fine-tuned safetensors files (float32, ViT-like):
   the time to read every input once, no math, four ways: into memory file by file
   (``safetensors.numpy.load_file``, and ``np.fromfile``), a plain read of each file into
   one reused buffer (the floor), and the merge's chunk reader into buffers (which full
   chunks on CPU skip: they are read in place from the memory-mapped files); streaming task
   arithmetic and TIES (targets <= 2x and <= 3x the read; the ratio to each read is
   printed), and each run's
   peak RSS against (T + 1) x the largest leaf (target: <= that + 10 %), each run in a
   fresh process after one warm-up merge (compilation excluded).
3. A tiny Llama written by transformers as sharded bf16 safetensors (``--llama``): saft_jax
   streaming task arithmetic / TIES, and mergekit's ``mergekit-yaml`` on the same shards
   when it is installed (``--mergekit-bin``; never a dependency of this project).

Examples::

    python3 experiments/bench_merging.py                     # all sections, CPU sizes
    python3 experiments/bench_merging.py --skip-stream --repeats 5
    python3 experiments/bench_merging.py --llama --mergekit-bin /tmp/mk_venv/bin/mergekit-yaml
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np


def vit_shapes(width: int, layers: int, patch: int = 32, tokens: int = 50, out: int = 512):
  """Leaf shapes of a CLIP ViT image encoder (open_clip layout)."""
  w = width
  s = {"conv1/kernel": (w, 3, patch, patch), "class_embedding": (w,),
       "positional_embedding": (tokens, w), "ln_pre/scale": (w,), "ln_pre/bias": (w,)}
  for i in range(layers):
    b = f"resblocks_{i}/"
    s.update({b + "attn/in_proj": (3 * w, w), b + "attn/in_proj_bias": (3 * w,),
              b + "attn/out_proj": (w, w), b + "attn/out_proj_bias": (w,),
              b + "ln_1/scale": (w,), b + "ln_1/bias": (w,),
              b + "ln_2/scale": (w,), b + "ln_2/bias": (w,),
              b + "mlp/c_fc": (4 * w, w), b + "mlp/c_fc_bias": (4 * w,),
              b + "mlp/c_proj": (w, 4 * w), b + "mlp/c_proj_bias": (w,)})
  s.update({"ln_post/scale": (w,), "ln_post/bias": (w,), "proj": (w, out)})
  return s


def numpy_ties(flat_tvs: np.ndarray, k: float) -> np.ndarray:
  """Plain NumPy TIES on a (T, N) matrix: exact thresholds by ``np.partition``."""
  t, n = flat_tvs.shape
  n_keep = max(1, int(k * n))
  trimmed = np.empty_like(flat_tvs)
  for i in range(t):
    a = np.abs(flat_tvs[i])
    thr = np.partition(a, n - n_keep)[n - n_keep]  # the n_keep-th largest
    trimmed[i] = np.where(a >= thr, flat_tvs[i], 0.0)
    del a
  sign = np.sign(trimmed.sum(0))
  sign[sign == 0] = np.sign(sign.sum())
  keep = np.where(sign > 0, trimmed > 0, trimmed < 0)
  del sign
  total = np.where(keep, trimmed, 0.0).sum(0)
  count = keep.sum(0)
  return total / np.maximum(count, 1)


def _best(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return 1e3 * min(times), 1e3 * float(np.median(times))


# ------------------------------------------------------------------------ in-memory TIES
def bench_ties(args, width, layers, tasks, with_numpy=True):
  import jax
  import jax.numpy as jnp
  from saft_jax import merging as m

  shapes = vit_shapes(width, layers)
  n = sum(int(np.prod(s)) for s in shapes.values())
  dev = jax.devices()[0]
  print(f"\n## In-memory global TIES (k = {args.k}): {tasks} task vectors x {n / 1e6:.1f}M "
        f"float32, {len(shapes)} leaves each, on {dev.platform} ({dev.device_kind}); "
        f"best / median of {args.repeats}")

  @jax.jit
  def make(key):
    keys = jax.random.split(key, len(shapes))
    return {p: 1e-3 * jax.random.normal(kk, s, jnp.float32)
            for kk, (p, s) in zip(keys, shapes.items())}
  tvs = [make(kk) for kk in jax.random.split(jax.random.key(0), tasks)]
  jax.block_until_ready(tvs)
  rows, outs = [], {}
  engines = [("saft_jax (default engine: %s)" % m._topk.engine(), None)]
  if dev.platform == "cpu" and not args.skip_xla_engine:
    engines.append(("saft_jax XLA engine (1-bit digits = bisection)", "xla"))
  for name, eng in engines:
    old = os.environ.get("SAFT_TOPK_ENGINE")
    if eng:
      os.environ["SAFT_TOPK_ENGINE"] = eng
    # A new function object per engine: jit caches traces by function, and the engine is
    # chosen at trace time.
    fn = jax.jit(lambda x: m.ties_merged_vector(x, k=args.k))
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(tvs))
    first = time.perf_counter() - t0
    best, med = _best(lambda: jax.block_until_ready(fn(tvs)), args.repeats)
    thr_fn = jax.jit(lambda x: m.ties_thresholds(x, args.k))
    jax.block_until_ready(thr_fn(tvs))
    tbest, _ = _best(lambda: jax.block_until_ready(thr_fn(tvs)), args.repeats)
    rows.append((name, best, med, f"thresholds alone {tbest:.0f} ms; first call "
                 f"{first:.1f} s incl. compile"))
    outs[name] = out
    if eng:
      if old is None:
        os.environ.pop("SAFT_TOPK_ENGINE")
      else:
        os.environ["SAFT_TOPK_ENGINE"] = old
  keys = list(shapes)
  if with_numpy:
    flat = np.stack([np.concatenate([np.asarray(tv[p]).ravel() for p in keys]) for tv in tvs])
    del tvs
    ref = None

    def run_np():
      nonlocal ref
      ref = numpy_ties(flat, args.k)
    best, med = _best(run_np, args.repeats)
    got = np.concatenate([np.asarray(outs[rows[0][0]][p]).ravel() for p in keys])
    err = float(np.max(np.abs(ref - got)))
    rows.append(("NumPy TIES (np.partition thresholds)", best, med,
                 f"max |saft_jax - NumPy| = {err:.1e}"))
  print("| implementation | best ms | median ms | note |\n|---|---|---|---|")
  for name, b, md, note in rows:
    print(f"| {name} | {b:.0f} | {md:.0f} | {note} |")
  if with_numpy:
    ratio = rows[0][1] / rows[-1][1]
    print(f"saft_jax / NumPy (best): {ratio:.2f}x (target <= 0.5x: "
          f"{'met' if ratio <= 0.5 else 'not met'})")
  return rows


# ---------------------------------------------------------------------------- streaming
# Prelude of the child scripts: `with_peak_rss(fn)` -> (RSS before, peak RSS during, fn()),
# the peak sampled every 2 ms by a thread.
_RSS_PRELUDE = textwrap.dedent("""
    import threading, time
    def _rss():
      for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
          return int(line.split()[1]) * 1024
    def with_peak_rss(fn):
      base, peak, stop = _rss(), [0], [False]
      def sample():
        while not stop[0]:
          peak[0] = max(peak[0], _rss()); time.sleep(0.002)
      th = threading.Thread(target=sample); th.start()
      try:
        out = fn()
      finally:
        stop[0] = True; th.join()
      return base, peak[0], out
""")

_STREAM_CHILD = _RSS_PRELUDE + textwrap.dedent("""
    import json, sys, threading, time
    import numpy as np
    d, t, what, repeats = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    files = [f"{d}/pre.safetensors"] + [f"{d}/ft{i}.safetensors" for i in range(t)]
    from saft_jax import merging as m
    from saft_jax.merging import _io, _streaming
    def chunked():
      # The readers and the merges' chunks (default chunk size) of every input.
      readers = [_io.open_checkpoint(f) for f in files]
      pre = readers[0]
      largest = max(pre.size(p) * pre.dtypes[p].itemsize for p in pre.paths)
      cb = _streaming._default_chunk(largest, len(files))
      items, _ = _streaming._plan(pre, {p: True for p in pre.paths}, cb, True)
      return readers, [c for k, c in items if k == "chunk"]
    def read_once():
      # Every input once through the merge's own reader and chunk buffers, no math.
      readers, chunks = chunked()
      pool = _streaming._BufferPool()
      for ch, buf in _streaming._prefetched(chunks,
                                            lambda c: _streaming._load_chunk(readers, c, pool)):
        del buf
      for r in readers: r.close()
      return {"passes": 1}
    def kernels(method):
      # The merge kernels alone over every chunk (loaded untimed, one at a time, mapped in
      # place where a merge maps them): the compute a streaming merge cannot avoid, without
      # reading or writing.
      import jax, resource
      from saft_jax.merging import _chunks, _streaming_ties
      readers, chunks = chunked()
      mapped = _chunks._Mapped()
      lam = np.float32(0.3)
      cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
      wall = used = 0.0
      thr = None
      for ch in chunks:
        block = _chunks._load_chunk(readers, ch, None, mapped)
        if method == "task_arithmetic":
          call = lambda: _streaming._k_task_arithmetic(block, lam, _chunks._ZERO)
        else:
          if thr is None:  # each task's 80th percentile |tau| on the first chunk
            rows = _chunks._host_rows(block)
            thr = np.asarray([np.quantile(np.abs(x - rows[0]).view(np.int32), 0.8)
                              for x in rows[1:]], np.int32)
            lo, hi = thr - (1 << 14), thr + (1 << 14)
          call = lambda: _streaming_ties._k_ties_bracket(block, thr, lo, hi, lam,
                                                          _chunks._ZERO, "mean")
        jax.block_until_ready(call())  # compiled, and the chunk in cache as in a merge
        t0, c0 = time.perf_counter(), cpu()
        jax.block_until_ready(call())
        wall, used = wall + time.perf_counter() - t0, used + cpu() - c0
      mapped.clear()
      for r in readers: r.close()
      return {"passes": 0, "wall": wall, "cpu": used}
    def read_plain(fs):
      # Whole files in order into one reused 4 MiB buffer.
      buf = memoryview(bytearray(4 << 20))
      for f in fs:
        with open(f, "rb", buffering=0) as fh:
          while fh.readinto(buf):
            pass
    def read_raw():
      # Every input once, plainly: the floor.
      read_plain(files)
      return {"passes": 1}
    def read_raw2():
      # The plain read on two threads (alternate files, a buffer each): how far a second
      # core speeds up the floor.
      from concurrent.futures import ThreadPoolExecutor
      with ThreadPoolExecutor(2) as ex:
        list(ex.map(read_plain, [files[0::2], files[1::2]]))
      return {"passes": 1}
    def read_load():
      # Every input read whole into memory, one file at a time, by the format's own loader
      # (safetensors.numpy.load_file), as a script loads checkpoints before merging them.
      from safetensors.numpy import load_file
      for f in files:
        tensors = load_file(f)
        del tensors
      return {"passes": 1}
    def read_fromfile():
      # Every input read whole into a fresh array (np.fromfile), one file at a time.
      for f in files:
        x = np.fromfile(f, np.uint8)
        del x
      return {"passes": 1}
    import os
    outs = [f"{d}/out_{what.replace(':', '_')}_{i}.safetensors" for i in range(2)]
    def write_raw():
      # One output's bytes (the size of an input file) in 4 MiB writes to a new file.
      n, buf = os.path.getsize(files[0]), memoryview(bytearray(4 << 20))
      with open(outs[0], "wb", buffering=0) as fh:
        for pos in range(0, n, len(buf)):
          fh.write(buf[:min(len(buf), n - pos)])
      return {"passes": 0}
    plain_runs = {"read": read_once, "read_raw": read_raw, "read_raw2": read_raw2,
                  "read_load": read_load, "read_fromfile": read_fromfile,
                  "write_raw": write_raw}
    def run():
      if what in plain_runs:
        return plain_runs[what]()
      if what.startswith("kernels:"):
        return kernels(what.split(":")[1])
      return m.stream_merge(files[0], files[1:], outs[0], what, lam=0.3, k=0.2)
    def fresh():
      # Every run writes a new file: deleting the last run's output (untimed) is not
      # part of a merge (overwriting it made a merge about 10 % slower here).
      outs.reverse()
      if os.path.exists(outs[0]):
        os.remove(outs[0])
    fresh()
    run()  # warm-up: compilation, page cache
    import resource
    cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    def timed():
      times, cpus = [], []
      for _ in range(repeats):
        fresh()
        t0, c0 = time.perf_counter(), cpu()
        st = run()
        # the kernels' own timing leaves out the untimed chunk loads
        times.append(st.pop("wall", time.perf_counter() - t0))
        cpus.append(st.pop("cpu", cpu() - c0))
      return times, cpus, st
    base, peak, (times, cpus, st) = with_peak_rss(timed)
    print(json.dumps({"base": base, "peak": peak, "best": min(times),
                      "median": float(np.median(times)), "cpu": float(np.median(cpus)),
                      **st}))
""")


def _child(script, argv, env=None):
  res = subprocess.run([sys.executable, "-c", script] + [str(a) for a in argv],
                       capture_output=True, text=True, env=env)
  if res.returncode:
    print(res.stderr[-3000:])
    return None
  return json.loads(res.stdout.strip().splitlines()[-1])


def bench_stream(args):
  from safetensors.numpy import save_file
  w = args.stream_width
  per_block = 12 * w * w + 13 * w
  layers = max(1, int(round(args.stream_params / per_block)))
  shapes = vit_shapes(w, layers, patch=14, tokens=257, out=w)
  n = sum(int(np.prod(s)) for s in shapes.values())
  largest = max(int(np.prod(s)) for s in shapes.values()) * 4
  d = tempfile.mkdtemp(prefix="bench_merging_", dir=args.tmp)
  t = args.stream_tasks
  print(f"\n## Streaming merges: 1 pretrained + {t} fine-tuned safetensors files of "
        f"{n / 1e6:.1f}M float32 ({len(shapes)} leaves; largest {largest / 2**20:.1f} MiB), "
        f"page cache warm; best / median of {args.repeats} in one process after a warm-up run, "
        f"each run writing a new output file")
  rows = []
  try:
    rng = np.random.default_rng(0)
    pre = {p: rng.standard_normal(s, dtype=np.float32) for p, s in shapes.items()}
    save_file(pre, os.path.join(d, "pre.safetensors"))
    for i in range(t):
      save_file({p: v + 1e-3 * rng.standard_normal(v.shape, dtype=np.float32)
                 for p, v in pre.items()}, os.path.join(d, f"ft{i}.safetensors"))
    del pre
    total = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    for what in ["read_load", "read_fromfile", "read_raw", "read_raw2", "read", "write_raw",
                 "task_arithmetic", "ties", "kernels:task_arithmetic", "kernels:ties"]:
      r = _child(_STREAM_CHILD, [d, t, what, args.repeats], env)
      if r is not None:
        rows.append((what, r))
  finally:
    shutil.rmtree(d, ignore_errors=True)
  res = dict(rows)
  # Reading every input once, no math, four ways (the targets' references):
  # - into memory: each file whole into fresh memory, one at a time, by safetensors' loader
  #   (how a script loads checkpoints) and by np.fromfile (the fastest such read here);
  # - "plain": each file in order into one reused 4 MiB buffer that stays in cache and is
  #   discarded (no merge can read that way: it holds every model's chunk at once): the floor;
  # - "chunks": the merges' own buffered reader (os.preadv of every model's chunk into the two
  #   chunk buffers; full chunks on CPU skip it, mapped in place).
  refs = [(label, res[key]) for key, label in (
      ("read_load", "load_file read"), ("read_fromfile", "fromfile read"),
      ("read_raw", "plain read"), ("read", "chunk read")) if key in res]
  budget = (t + 1) * largest
  print(f"inputs {total / 2**30:.2f} GiB; RSS budget (models + 1) x largest leaf = "
        f"{budget / 2**20:.0f} MiB (+10 % = {1.1 * budget / 2**20:.0f} MiB)")
  rel = lambda r, ref: f"{r['best'] / ref['best']:.2f}x"
  print("| run | best ms | median ms | CPU ms | "
        + " | ".join(f"/ {label}" for label, _ in refs)
        + " | passes | peak RSS MiB | RSS growth MiB | growth / budget |\n"
        + "|---" * (8 + len(refs)) + "|")
  names = {"read_load": "read into memory (safetensors.numpy.load_file, file by file)",
           "read_fromfile": "read into memory (np.fromfile, file by file)",
           "read_raw": "read (plain: one reused 4-MiB buffer)",
           "read_raw2": "read (plain, two threads)",
           "read": "read (chunks into buffers)",
           "write_raw": "write one output (plain, 4-MiB writes)",
           "kernels:task_arithmetic": "task_arithmetic kernels alone (no I/O)",
           "kernels:ties": "ties write kernels alone (no I/O)"}
  for what, r in rows:
    growth = r["peak"] - r["base"]
    print(f"| {names.get(what, what)} | {1e3 * r['best']:.0f} | {1e3 * r['median']:.0f} | "
          f"{1e3 * r['cpu']:.0f} | " + " | ".join(rel(r, ref) for _, ref in refs)
          + f" | {r.get('passes')} | {r['peak'] / 2**20:.0f} | {growth / 2**20:.0f} | "
          f"{growth / budget:.2f} |")
  print(f"CPU ms: median user + system time of the whole process (all threads) per run, on "
        f"{os.cpu_count()} CPUs; kernels alone: the merge kernels over every chunk already "
        f"in memory, as in a merge (best of {args.repeats})")
  for what, target in [("task_arithmetic", 2.0), ("ties", 3.0)]:
    if what in res and refs:
      parts = []
      for label, ref in refs:
        x = res[what]["best"] / ref["best"]
        parts.append(f"{x:.2f}x the {label} ({'met' if x <= target else 'not met'})")
      print(f"streaming {what}, target <= {target}x reading the inputs once: "
            + "; ".join(parts))
  # A lower bound of each merge on this machine: the CPU time of work it cannot skip (the
  # plain read, the plain write, its kernels), spread over every CPU with no overhead.
  plain, wrote = res.get("read_raw"), res.get("write_raw")
  for what in ("task_arithmetic", "ties"):
    k = res.get("kernels:" + what)
    if plain and wrote and k and what in res:
      floor = (plain["cpu"] + wrote["cpu"] + k["cpu"]) / (os.cpu_count() or 1)
      print(f"{what}: floor on {os.cpu_count()} CPUs = (CPU of plain read + plain write + "
            f"kernels) / CPUs = {1e3 * floor:.0f} ms = {floor / plain['best']:.2f}x the "
            f"plain read; the merge took {res[what]['best'] / floor:.2f}x its floor")
  for what in ("task_arithmetic", "ties"):
    if what in res:
      r = res[what]
      g = (r["peak"] - r["base"]) / budget
      print(f"{what}: RSS growth {g:.2f} x budget (target <= 1.1: "
            f"{'met' if g <= 1.1 else 'not met'}; the process's {r['base'] / 2**20:.0f} MiB "
            f"runtime before the merge excluded)")
  return rows


# --------------------------------------------------------------------- tiny Llama shards
_LLAMA_CHILD = _RSS_PRELUDE + textwrap.dedent("""
    import json, sys, time, threading
    d, t, what, trim, warm = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    from saft_jax import merging as m
    def run():
      return m.stream_merge(f"{d}/pre", [f"{d}/ft{i}" for i in range(t)], f"{d}/saft_{what}",
                            what, lam=0.3, k=0.2, trim=trim, overwrite=True)
    if warm == "1":
      run()
    def timed():
      t0 = time.perf_counter(); run(); return time.perf_counter() - t0
    base, peak, dt = with_peak_rss(timed)
    print(json.dumps({"seconds": dt, "peak": peak, "base": base}))
""")


def _mergekit_config(d, t, method):
  lines = ["merge_method: " + method, f"base_model: {d}/pre", "dtype: bfloat16", "models:"]
  for i in range(t):
    lines += [f"  - model: {d}/ft{i}", "    parameters:", "      weight: 0.3"]
    if method == "ties":
      lines.append("      density: 0.2")
  if method == "ties":
    lines += ["parameters:", "  normalize: false"]
  return "\n".join(lines) + "\n"


def _time_cmd(cmd):
  """Wall seconds and peak RSS (MiB, children) of a command."""
  t0 = time.perf_counter()
  res = subprocess.run(["/usr/bin/time", "-f", "%M"] + cmd, capture_output=True, text=True)
  dt = time.perf_counter() - t0
  if res.returncode:
    return None, res.stderr[-1500:]
  return dt, int(res.stderr.strip().splitlines()[-1]) / 1024


def bench_llama(args):
  try:
    import torch
    import transformers
  except ImportError:
    print("\n## tiny Llama: transformers/torch not installed, skipped")
    return
  t = args.stream_tasks
  d = tempfile.mkdtemp(prefix="bench_llama_", dir=args.tmp)
  cfg = transformers.LlamaConfig(vocab_size=args.llama_vocab, hidden_size=args.llama_hidden,
                                 intermediate_size=4 * args.llama_hidden,
                                 num_hidden_layers=args.llama_layers, num_attention_heads=8,
                                 num_key_value_heads=4, max_position_embeddings=256)
  try:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(f"{d}/pre", max_shard_size=args.llama_shard)
    g = torch.Generator().manual_seed(1)
    for i in range(t):
      with torch.no_grad():
        for p in model.parameters():
          p.add_((1e-3 * torch.randn(p.shape, generator=g)).to(p.dtype))
      model.save_pretrained(f"{d}/ft{i}", max_shard_size=args.llama_shard)
    shards = len([f for f in os.listdir(f"{d}/pre") if f.endswith(".safetensors")])
    print(f"\n## Tiny Llama (transformers {transformers.__version__}): {n / 1e6:.1f}M bf16 "
          f"parameters in {shards} shards, 1 base + {t} fine-tuned, lam = 0.3, TIES k = 0.2")
    print("| tool | method | seconds | peak RSS MiB |\n|---|---|---|---|")
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    for what, trim in [("task_arithmetic", "global"), ("ties", "global"), ("ties", "per_leaf")]:
      name = what if what != "ties" else f"ties (trim={trim})"
      r = _child(_LLAMA_CHILD, [d, t, what, trim, 1], env)
      if r:
        print(f"| saft_jax stream_merge, warm (merge only) | {name} | {r['seconds']:.2f} | "
              f"{r['peak'] / 2**20:.0f} |")
      dt, rss = _time_cmd([sys.executable, "-c", _LLAMA_CHILD, d, str(t), what, trim, "0"])
      if dt is not None:
        print(f"| saft_jax, fresh process (incl. start-up, compilation) | {name} | {dt:.2f} | "
              f"{rss:.0f} |")
    mk = args.mergekit_bin or shutil.which("mergekit-yaml")
    if not mk:
      print("| mergekit | - | not installed (pip install mergekit in a separate venv and pass "
            "--mergekit-bin) | |")
      return
    for what in ["task_arithmetic", "ties"]:
      cfg_p = f"{d}/mk_{what}.yml"
      with open(cfg_p, "w") as f:
        f.write(_mergekit_config(d, t, what))
      dt, rss = _time_cmd([mk, cfg_p, f"{d}/mk_out_{what}", "--lazy-unpickle",
                           "--allow-crimes", "--out-shard-size", "1B"])
      if dt is None:
        print(f"| mergekit | {what} | failed: {rss!r} | |")
      else:
        name = what if what != "ties" else "ties (per-tensor density)"
        print(f"| mergekit-yaml, fresh process (incl. start-up) | {name} | {dt:.2f} | "
              f"{rss:.0f} |")
  finally:
    shutil.rmtree(d, ignore_errors=True)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--k", type=float, default=0.2)
  ap.add_argument("--tasks", type=int, default=8, help="task vectors (in-memory TIES)")
  ap.add_argument("--width", type=int, default=256, help="ViT width, in-memory TIES")
  ap.add_argument("--layers", type=int, default=5, help="ViT blocks (256 x 5: ~4.1M)")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--skip-ties", action="store_true")
  ap.add_argument("--skip-xla-engine", action="store_true")
  ap.add_argument("--skip-stream", action="store_true")
  ap.add_argument("--stream-tasks", type=int, default=6)
  ap.add_argument("--stream-params", type=float, default=23.6e6)
  ap.add_argument("--stream-width", type=int, default=768)
  ap.add_argument("--llama", action="store_true", help="run the tiny-Llama section")
  ap.add_argument("--llama-hidden", type=int, default=256)
  ap.add_argument("--llama-layers", type=int, default=4)
  ap.add_argument("--llama-vocab", type=int, default=32000)
  ap.add_argument("--llama-shard", default="10MB")
  ap.add_argument("--mergekit-bin", default=None, help="path of mergekit-yaml")
  ap.add_argument("--tmp", default="/tmp")
  args = ap.parse_args()
  import jax
  print(f"# bench_merging: jax {jax.__version__}, backend {jax.default_backend()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
  if not args.skip_ties:
    bench_ties(args, args.width, args.layers, args.tasks)
    if jax.default_backend() == "gpu":  # GPU rows: CLIP ViT-B/32-sized task vectors
      bench_ties(args, 768, 12, args.tasks, with_numpy=False)
  if not args.skip_stream:
    bench_stream(args)
  if args.llama:
    bench_llama(args)


if __name__ == "__main__":
  main()
