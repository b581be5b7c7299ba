"""Benchmark: CLIP image tower forward and one AdamW fine-tuning step, JAX vs PyTorch.

Per model (ViT-B/32, ViT-B/16; a tiny preset for CPU smoke tests):
  - JAX forward (jitted, bf16 compute, f32 params) through a frozen zero-shot-like head;
  - JAX AdamW step (jitted, donated params/optimizer state, bf16 compute, frozen head,
    global-norm clip 1.0, lr 1e-5, weight decay 0.1);
  - the same two with timm's `vit_base_patch{32,16}_clip_224` in PyTorch (eager and
    torch.compile, bf16 autocast, fused AdamW) when torch and timm are importable and
    the preset has a timm twin; rows are skipped otherwise.
Prints ms/step, images/s and MFU (training FLOPs = 3 x forward; forward FLOPs are
computed from the config: 8.82 GFLOP/image for B/32, 35.1 for B/16).

Usage:
  python3 experiments/bench_clip.py                       # tiny preset, CPU smoke test
  python3 experiments/bench_clip.py --preset b32 b16      # on an H100: batch 128, 224 px
Targets on one H100 (AdamW step): <= 10 ms (B/32), <= 32 ms (B/16).
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Callable, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from saft_jax import models as M

PRESETS = {
    "tiny": (M.VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=2,
                            output_dim=32), None, 8),
    "b32": (M.VIT_B_32, "vit_base_patch32_clip_224", 128),
    "b16": (M.VIT_B_16, "vit_base_patch16_clip_224", 128),
    "l14": (M.VIT_L_14, "vit_large_patch14_clip_224", 32),
}
NUM_CLASSES = 10
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def forward_flops(cfg: M.VisionConfig) -> float:
  """Multiply-add FLOPs (x2) of one image through the vision tower."""
  t, w, m = cfg.num_tokens, cfg.width, cfg.mlp_dim
  per_layer = t * 2 * (4 * w * w + 2 * w * m) + 2 * 2 * t * t * w
  patch = 2 * (t - 1) * cfg.patch_size ** 2 * cfg.in_channels * w
  return cfg.layers * per_layer + patch + 2 * w * cfg.output_dim


def peak_tflops(override: Optional[float]) -> Optional[float]:
  if override:
    return override
  dev = jax.devices()[0]
  if dev.platform != "gpu":
    return None
  kind = getattr(dev, "device_kind", "")
  for k, v in PEAK_TFLOPS.items():
    if k in kind:
      return v
  return None


def time_fn(fn: Callable, steps: int, warmup: int) -> float:
  """Median-free simple timing: ms per call after `warmup` calls (incl. compilation)."""
  for _ in range(warmup):
    fn()
  t0 = time.perf_counter()
  for _ in range(steps):
    fn()
  return 1e3 * (time.perf_counter() - t0) / steps


def frozen_head(key, dim: int) -> jax.Array:
  h = jax.random.normal(key, (dim, NUM_CLASSES), jnp.float32)
  return 100.0 * h / jnp.linalg.norm(h, axis=0, keepdims=True)


def bench_jax(cfg: M.VisionConfig, batch: int, steps: int, warmup: int, dtype,
              attention_impl: Optional[str], remat) -> Dict[str, float]:
  kp, kh, kx = jax.random.split(jax.random.key(0), 3)
  params = jax.jit(M.init_vision_params, static_argnums=0)(cfg, kp)
  head = frozen_head(kh, cfg.output_dim)
  images = jax.random.normal(kx, (batch, cfg.image_size, cfg.image_size, cfg.in_channels),
                             jnp.float32).astype(dtype)
  labels = jnp.arange(batch, dtype=jnp.int32) % NUM_CLASSES
  kw = dict(compute_dtype=dtype, attention_impl=attention_impl)

  @jax.jit
  def forward(p, x):
    return M.classify(head, M.encode_image(cfg, p, x, **kw))

  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(1e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1))

  def loss_fn(p, x, y):
    logits = M.classify(head, M.encode_image(cfg, p, x, remat=remat, **kw))
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def init_state(p):
    return tx.init(p)

  def step(p, s, x, y):
    loss, g = jax.value_and_grad(loss_fn)(p, x, y)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  step = jax.jit(step, donate_argnums=(0, 1))
  state = {"p": params, "s": init_state(params)}

  def run_fwd():
    forward(state["p"], images).block_until_ready()

  def run_step():
    state["p"], state["s"], loss = step(state["p"], state["s"], images, labels)
    loss.block_until_ready()

  fwd_ms = time_fn(run_fwd, steps, warmup)
  step_ms = time_fn(run_step, steps, warmup)
  return {"forward": fwd_ms, "adamw_step": step_ms}


def bench_torch(timm_name: str, batch: int, steps: int, warmup: int, compile_: bool
                ) -> Optional[Dict[str, float]]:
  try:
    import timm
    import torch
  except ImportError:
    return None
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  torch.backends.cuda.matmul.allow_tf32 = True
  torch.backends.cudnn.allow_tf32 = True
  model = timm.create_model(timm_name, pretrained=False, num_classes=0).to(dev)
  head = torch.nn.Linear(model.num_features, NUM_CLASSES, bias=False).to(dev)
  head.requires_grad_(False)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1,
                          fused=(dev == "cuda"))
  x = torch.randn(batch, 3, 224, 224, device=dev)
  y = torch.arange(batch, device=dev) % NUM_CLASSES
  fwd_model = torch.compile(model) if compile_ else model

  def sync():
    if dev == "cuda":
      torch.cuda.synchronize()

  def run_fwd():
    with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16):
      head(fwd_model(x))
    sync()

  def run_step():
    with torch.autocast(dev, dtype=torch.bfloat16):
      loss = torch.nn.functional.cross_entropy(head(fwd_model(x)), y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()

  return {"forward": time_fn(run_fwd, steps, warmup),
          "adamw_step": time_fn(run_step, steps, warmup)}


def main(argv: Optional[List[str]] = None) -> List[dict]:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--preset", nargs="+", default=["tiny"], choices=sorted(PRESETS))
  ap.add_argument("--batch", type=int, default=None, help="default: 8 tiny, 128 B/32 B/16")
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  ap.add_argument("--attention", default=None, choices=["xla", "dpa", "cudnn"],
                  help="default: auto (cuDNN for >= 128 tokens on GPU, else XLA)")
  ap.add_argument("--remat", action="store_true")
  ap.add_argument("--no-torch", action="store_true")
  ap.add_argument("--peak-tflops", type=float, default=None)
  ap.add_argument("--json", default=None, help="also write the rows to this file")
  args = ap.parse_args(argv)

  dtype = jnp.dtype(args.dtype)
  peak = peak_tflops(args.peak_tflops)
  dev = jax.devices()[0]
  print(f"device: {dev.platform} {getattr(dev, 'device_kind', '')} | jax {jax.__version__} | "
        f"compute {args.dtype} | peak {peak or 'n/a'} TFLOP/s")
  rows = []
  for name in args.preset:
    cfg, timm_name, default_batch = PRESETS[name]
    batch = args.batch or default_batch
    fwd_gflop = forward_flops(cfg) / 1e9
    results = [("jax", bench_jax(cfg, batch, args.steps, args.warmup, dtype, args.attention,
                                 args.remat))]
    if not args.no_torch and timm_name is not None:
      for compile_ in (False, True):
        r = bench_torch(timm_name, batch, args.steps, args.warmup, compile_)
        label = "torch.compile" if compile_ else "torch eager"
        if r is None:
          print(f"  [{name}] {label}: skipped (torch/timm not importable)")
          break
        results.append((label, r))
    for impl, r in results:
      for what, ms in r.items():
        flops = fwd_gflop * (3 if what == "adamw_step" else 1) * batch * 1e9
        tflops = flops / (ms / 1e3) / 1e12
        rows.append({"model": name, "impl": impl, "what": what, "batch": batch,
                     "ms": ms, "img_s": batch / (ms / 1e3), "tflops": tflops,
                     "mfu": (tflops / peak) if peak else None})
  print(f"{'model':6} {'impl':14} {'what':11} {'batch':>5} {'ms/step':>9} {'img/s':>9} "
        f"{'TFLOP/s':>8} {'MFU':>6}")
  for r in rows:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    print(f"{r['model']:6} {r['impl']:14} {r['what']:11} {r['batch']:5d} {r['ms']:9.2f} "
          f"{r['img_s']:9.1f} {r['tflops']:8.2f} {mfu:>6}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=2)
  return rows


if __name__ == "__main__":
  main()
