"""Benchmark of the saft_jax.analysis hot paths on a ViT (device-agnostic).

Times, on whatever `jax.devices()` gives (CPU by default, the same script on a GPU):
  - a full G × G disentanglement grid (two tasks, each its own head, N images per task),
  - the same grid for the linearized model (jvps + `disentanglement_error_linear`),
  - per-layer CTL at α = 0.5 (every block's residual output, embedding, logits),
  - a 20-iteration Lanczos for the top Hessian eigenvalue of a task's cross-entropy.

The ViT is written inline (pre-LN CLIP-style image tower with random weights: timings
only, nothing is downloaded). Presets: `tiny` (CPU default) and `vit-b32` (CLIP ViT-B/32
shapes: 224 px, patch 32, width 768, 12 layers, 12 heads, 512-d embedding; for a GPU).

Usage:
  python3 experiments/bench_analysis.py                       # tiny, CPU
  python3 experiments/bench_analysis.py --preset vit-b32      # on a GPU
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from saft_jax import analysis

PRESETS = {
    "tiny": dict(image=32, patch=8, width=64, layers=4, heads=4, embed=32, examples=32,
                 classes=10, chunk=21, batch=None),
    "vit-b32": dict(image=224, patch=32, width=768, layers=12, heads=12, embed=512,
                    examples=128, classes=10, chunk=8, batch=64),
}


def init_vit(key, c, dtype):
  d, p = c["width"], c["patch"]
  t = (c["image"] // p) ** 2 + 1
  ks = iter(jax.random.split(key, 8 + 6 * c["layers"]))
  nrm = lambda shape, std: (std * jax.random.normal(next(ks), shape)).astype(dtype)
  ln = lambda: {"scale": jnp.ones((d,), dtype), "bias": jnp.zeros((d,), dtype)}
  blocks = [{"ln1": ln(), "qkv": nrm((d, 3 * d), d ** -0.5), "qkv_b": jnp.zeros((3 * d,), dtype),
             "out": nrm((d, d), d ** -0.5), "ln2": ln(), "fc1": nrm((d, 4 * d), d ** -0.5),
             "fc2": nrm((4 * d, d), (4 * d) ** -0.5)} for _ in range(c["layers"])]
  return {"patch": nrm((p * p * 3, d), (p * p * 3) ** -0.5), "cls": nrm((d,), 0.02),
          "pos": nrm((t, d), 0.02), "ln_pre": ln(), "blocks": blocks, "ln_post": ln(),
          "proj": nrm((d, c["embed"]), d ** -0.5)}


def _ln(x, p):
  xf = x.astype(jnp.float32)
  mu = xf.mean(-1, keepdims=True)
  var = ((xf - mu) ** 2).mean(-1, keepdims=True)
  y = (xf - mu) * jax.lax.rsqrt(var + 1e-5)
  return (y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)


def encode(params, images, c, return_blocks=False):
  b, p, h = images.shape[0], c["patch"], c["heads"]
  g = c["image"] // p
  x = images.reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, p * p * 3)
  x = x.astype(params["patch"].dtype) @ params["patch"]
  cls = jnp.broadcast_to(params["cls"], (b, 1, x.shape[-1]))
  x = _ln(jnp.concatenate([cls, x], 1) + params["pos"], params["ln_pre"])
  blocks = []
  for bp in params["blocks"]:
    y = _ln(x, bp["ln1"]) @ bp["qkv"] + bp["qkv_b"]
    q, k, v = jnp.split(y.reshape(b, -1, 3 * h, y.shape[-1] // (3 * h)), 3, axis=2)
    att = jax.nn.dot_product_attention(q, k, v)
    x = x + att.reshape(b, -1, x.shape[-1]) @ bp["out"]
    z = _ln(x, bp["ln2"]) @ bp["fc1"]
    x = x + (z * jax.nn.sigmoid(1.702 * z)) @ bp["fc2"]
    blocks.append(x)
  emb = _ln(x[:, 0], params["ln_post"]) @ params["proj"]
  return (emb, blocks) if return_blocks else emb


def timed(fn):
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn())
  t1 = time.perf_counter()
  jax.block_until_ready(fn())
  return out, t1 - t0, time.perf_counter() - t1


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
  ap.add_argument("--grid", type=int, default=21, help="points per grid axis in [-2, 2]")
  ap.add_argument("--examples", type=int, default=None, help="images per task")
  ap.add_argument("--chunk", type=int, default=None, help="grid points per vmapped chunk")
  ap.add_argument("--batch-size", type=int, default=None)
  ap.add_argument("--lanczos-iters", type=int, default=20)
  ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  args = ap.parse_args()
  c = dict(PRESETS[args.preset])
  n = args.examples or c["examples"]
  chunk = args.chunk or c["chunk"]
  bs = args.batch_size or c["batch"]
  dtype = jnp.dtype(args.dtype)

  key = jax.random.PRNGKey(0)
  k0, k1, k2, k3, k4 = jax.random.split(key, 5)
  theta0 = init_vit(k0, c, dtype)
  taus = [jax.tree.map(lambda a, k=k: (0.002 * jax.random.normal(k, a.shape)).astype(a.dtype)
                       * (1 + jnp.abs(a)), theta0) for k in (k1, k2)]
  heads = [jax.random.normal(k, (c["embed"], c["classes"])) for k in jax.random.split(k3, 2)]
  heads = [(h / jnp.linalg.norm(h, axis=0, keepdims=True)).astype(dtype) for h in heads]
  xs = [jax.random.normal(k, (n, c["image"], c["image"], 3), dtype)
        for k in jax.random.split(k4, 2)]

  def head_logits(emb, h):
    emb = emb / jnp.linalg.norm(emb.astype(jnp.float32), axis=-1, keepdims=True).astype(emb.dtype)
    return (100.0 * (emb @ h).astype(jnp.float32))

  applies = [lambda p, x, h=h: head_logits(encode(p, x, c), h) for h in heads]

  def feats(p, x):
    emb, blocks = encode(p, x, c, return_blocks=True)
    d = {f"block_{i}": b for i, b in enumerate(blocks)}
    d["embedding"] = emb
    d["logits"] = head_logits(emb, heads[0])
    return d

  alphas = np.linspace(-2, 2, args.grid, dtype=np.float32)
  rows = []
  nparams = sum(a.size for a in jax.tree.leaves(theta0))
  res, t_first, t_steady = timed(lambda: analysis.disentanglement_error(
      applies, theta0, taus, xs, alphas, chunk_size=chunk, batch_size=bs))
  rows.append([f"disentanglement {args.grid}x{args.grid}", f"2 x {n} img", t_first, t_steady])

  def linear():
    outs = [analysis.linearized_outputs(applies[t], theta0, taus, xs[t], batch_size=bs)
            for t in range(2)]
    f0, jv = zip(*outs)
    return analysis.disentanglement_error_linear(f0, jv, alphas)

  _, t_first, t_steady = timed(linear)
  rows.append([f"linearized disent. {args.grid}x{args.grid} (incl. jvps)", f"2 x {n} img",
               t_first, t_steady])

  p1 = jax.tree.map(jnp.add, theta0, taus[0])
  p2 = jax.tree.map(jnp.add, theta0, taus[1])
  ctl, t_first, t_steady = timed(lambda: analysis.cross_task_linearity(
      feats, p1, p2, xs, batch_size=bs))
  rows.append([f"CTL alpha=0.5 ({len(ctl.names)} layers)", f"2 x {n} img", t_first, t_steady])

  labels = jnp.arange(n) % c["classes"]
  nl = min(n, bs or n)

  def ce(p):
    logits = applies[0](p, xs[0][:nl])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:nl, None], 1))

  lam, t_first, t_steady = timed(lambda: analysis.top_hessian_eigenvalue(
      ce, p1, method="lanczos", num_iters=args.lanczos_iters))
  rows.append([f"Lanczos {args.lanczos_iters} it (top eig {float(lam):.3g})", f"{nl} img",
               t_first, t_steady])

  dev = jax.devices()[0]
  print(f"\npreset={args.preset} params={nparams / 1e6:.2f}M dtype={args.dtype} "
        f"device={dev.platform}:{dev.device_kind} chunk={chunk} batch={bs} "
        f"mean xi={float(res.error.mean()):.3f}")
  print(analysis.markdown_table(["operation", "data", "first call s (compile+run)", "steady s"],
                                rows, floatfmt=".2f"))


if __name__ == "__main__":
  main()
