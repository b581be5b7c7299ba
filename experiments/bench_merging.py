"""Benchmark of saft_jax.merging (a script, not a test).

1. TIES (global trim) on T synthetic task vectors shaped like the CLIP ViT-B/32 image
   encoder (~88M parameters each), jit-compiled bisection top-k, against a straightforward
   NumPy sort-based implementation in the same run. Runs on whatever ``jax.devices()``
   gives (CPU by default; the same script runs on a GPU).
2. Streaming merge of T safetensors checkpoints (ViT-like layout, >= 250M parameters each
   by default) written to a temporary folder: peak RSS of the merging process against the
   checkpoints' total size (deleted afterwards).

Examples::

    python3 experiments/bench_merging.py                      # full sizes
    python3 experiments/bench_merging.py --width 192 --stream-params 20e6   # quick
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
  """Straightforward TIES on a (T, N) matrix: sort-based threshold per task."""
  t, n = flat_tvs.shape
  n_keep = max(1, int(k * n))
  trimmed = np.empty_like(flat_tvs)
  for i in range(t):
    a = np.abs(flat_tvs[i])
    thr = np.sort(a)[n - n_keep]  # ascending sort: the n_keep-th largest
    trimmed[i] = np.where(a >= thr, flat_tvs[i], 0.0)
    del a
  sign = np.sign(trimmed.sum(0))
  sign[sign == 0] = np.sign(sign.sum())
  keep = np.where(sign > 0, trimmed > 0, trimmed < 0)
  del sign
  total = np.where(keep, trimmed, 0.0).sum(0)
  count = keep.sum(0)
  return total / np.maximum(count, 1)


def bench_ties(args):
  import jax
  import jax.numpy as jnp
  from saft_jax import merging as m

  shapes = vit_shapes(args.width, args.layers)
  n = sum(int(np.prod(s)) for s in shapes.values())
  print(f"# TIES (global trim, k={args.k}) on {args.tasks} task vectors of {n / 1e6:.1f}M "
        f"parameters, device {jax.devices()[0].device_kind}")
  key = jax.random.key(0)

  @jax.jit
  def make(key):
    keys = jax.random.split(key, len(shapes))
    return {p: 1e-3 * jax.random.normal(kk, s, jnp.float32)
            for kk, (p, s) in zip(keys, shapes.items())}
  tvs = [make(kk) for kk in jax.random.split(key, args.tasks)]
  jax.block_until_ready(tvs)
  fn = jax.jit(m.ties_merged_vector, static_argnames=("k", "trim"))
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(tvs, k=args.k))
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(tvs, k=args.k))
    times.append(time.perf_counter() - t0)
  jax_ms = 1e3 * float(np.median(times))
  rows = [("jax bisection (jit)", jax_ms, f"first call {compile_s:.1f} s incl. compile")]
  if not args.skip_numpy:
    keys = list(shapes)
    flat = np.stack([np.concatenate([np.asarray(tv[p]).ravel() for p in keys]) for tv in tvs])
    got = np.concatenate([np.asarray(out[p]).ravel() for p in keys])
    del tvs, out
    t0 = time.perf_counter()
    ref = numpy_ties(flat, args.k)
    np_ms = 1e3 * (time.perf_counter() - t0)
    err = float(np.max(np.abs(ref - got)))
    rows.append(("numpy sort-based", np_ms, f"max |diff| vs jax {err:.2e}"))
    rows.append(("speed-up", np_ms / jax_ms, "numpy / jax"))
  print("| implementation | ms | note |\n|---|---|---|")
  for name, v, note in rows:
    print(f"| {name} | {v:.1f} | {note} |" if name != "speed-up" else
          f"| {name} | {v:.1f}x | {note} |")
  return rows


_MEM_CHILD = textwrap.dedent("""
    import json, sys, threading, time
    from saft_jax import merging as m
    d, t, method, warm = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
    def run():
      return m.stream_merge(f"{d}/pre.safetensors", [f"{d}/ft{i}.safetensors"
                            for i in range(t)], f"{d}/out_{method}.safetensors", method,
                            lam=0.3, k=0.2, overwrite=True)
    if warm:  # a first identical run pays every one-off cost (op compilation, caches)
      run()
    def rss():
      for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
          return int(line.split()[1]) * 1024
    base, peak, stop = rss(), [0], [False]
    def sample():
      while not stop[0]:
        peak[0] = max(peak[0], rss()); time.sleep(0.005)
    th = threading.Thread(target=sample); th.start()
    t0 = time.time()
    st = run()
    stop[0] = True; th.join()
    print(json.dumps({"base": base, "peak": peak[0], "seconds": time.time() - t0, **st}))
""")


def bench_stream(args):
  from safetensors.numpy import save_file
  target = float(args.stream_params)
  w = args.stream_width
  per_block = 12 * w * w + 13 * w
  layers = max(1, int(np.ceil(target / per_block)))
  shapes = vit_shapes(w, layers, patch=14, tokens=257, out=w)
  n = sum(int(np.prod(s)) for s in shapes.values())
  largest = max(int(np.prod(s)) for s in shapes.values()) * 4
  d = tempfile.mkdtemp(prefix="bench_merging_", dir=args.tmp)
  print(f"\n# Streaming merge: {args.tasks} fine-tuned + 1 pretrained safetensors checkpoints "
        f"of {n / 1e6:.0f}M float32 parameters ({layers} blocks, width {w}) in {d}")
  rows = []
  try:
    rng = np.random.default_rng(0)
    t0 = time.time()
    for name in ["pre"] + [f"ft{i}" for i in range(args.tasks)]:
      save_file({p: rng.standard_normal(s, dtype=np.float32) for p, s in shapes.items()},
                os.path.join(d, f"{name}.safetensors"))
    total = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
    print(f"wrote {total / 2**30:.2f} GiB in {time.time() - t0:.0f} s")
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", ""))
    for method in args.stream_methods.split(","):
      res = subprocess.run([sys.executable, "-c", _MEM_CHILD, d, str(args.tasks), method,
                            str(int(args.warmup))],
                           capture_output=True, text=True, env=env)
      if res.returncode:
        print(res.stderr[-3000:])
        continue
      r = json.loads(res.stdout.strip().splitlines()[-1])
      rows.append((method, r["peak"] / 2**20, (r["peak"] - r["base"]) / 2**20,
                   total / 2**20, r["seconds"], r["passes"]))
  finally:
    shutil.rmtree(d, ignore_errors=True)
  print(f"largest leaf {largest / 2**20:.1f} MiB; peak RSS of the merging process "
        f"(including ~0.2-0.3 GiB of Python/JAX runtime); warm-up run first: {args.warmup}")
  print("| method | peak RSS MiB | growth over start MiB | checkpoints total MiB | "
        "peak / total | seconds | passes |\n|---|---|---|---|---|---|---|")
  for meth, peak, growth, tot, sec, passes in rows:
    print(f"| {meth} | {peak:.0f} | {growth:.0f} | {tot:.0f} | {peak / tot:.3f} | {sec:.0f} | "
          f"{passes} |")
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tasks", type=int, default=8)
  ap.add_argument("--k", type=float, default=0.2)
  ap.add_argument("--width", type=int, default=768, help="ViT width (768 = B/32, ~88M)")
  ap.add_argument("--layers", type=int, default=12)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--skip-numpy", action="store_true")
  ap.add_argument("--skip-ties", action="store_true")
  ap.add_argument("--skip-stream", action="store_true")
  ap.add_argument("--stream-params", type=float, default=250e6)
  ap.add_argument("--stream-width", type=int, default=1280)
  ap.add_argument("--stream-methods", default="task_arithmetic,ties")
  ap.add_argument("--tmp", default="/tmp")
  ap.add_argument("--warmup", action="store_true",
                  help="measure a second identical streaming run (one-off costs excluded)")
  args = ap.parse_args()
  if not args.skip_ties:
    bench_ties(args)
  if not args.skip_stream:
    bench_stream(args)


if __name__ == "__main__":
  main()
