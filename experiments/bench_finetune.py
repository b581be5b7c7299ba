"""Training-step time of the main job's six fine-tuning modes, against PyTorch.

    python3 experiments/bench_finetune.py                       # tiny ViT, CPU smoke run
    python3 experiments/bench_finetune.py --preset b32 b16 --batch 128   # on a GPU

JAX rows use exactly the compiled steps of `saft reproduce` (saft_jax.experiment.finetune:
SGD, SAFT-ASAM, FTTS, FTTS+ASAM, FTLO, FTLO+ASAM; AdamW + clip + warm-up/cosine, donated
state, bf16 compute with --bf16). PyTorch rows (when torch and timm import) follow the
reference procedure: timm `vit_base_patch{32,16}_clip_224`, frozen linear head, fused
AdamW, and the two-pass ASAM step (ascent with T = |w| + 0.01 on weight tensors, second
forward/backward at the perturbed point, restore, base step), eager and torch.compile,
bf16 autocast. Prints ms/step, images/s, the ratio to SGD, and MFU where a peak is known.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from saft_jax import models
from saft_jax.experiment import config as config_lib
from saft_jax.experiment.finetune import _program
from saft_jax.experiment.suites import Suite

PRESETS = {"tiny": models.VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=2,
                                       output_dim=32),
           "b32": models.VIT_B_32, "b16": models.VIT_B_16}
TRAIN_GFLOP = {"b32": 26.5, "b16": 105.4}  # per image, ≈ 3 × forward (GPU_NOTES)
MODES = [("sgd", "none"), ("sgd", "asam"), ("ftts", "none"), ("ftts", "asam"),
         ("ftlo", "none"), ("ftlo", "asam")]


def _time(fn, warmup, steps):
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times) * 1e3


def bench_jax(preset, batch, bf16, warmup, steps):
  cfg = PRESETS[preset]
  params = models.init_vision_params(cfg, jax.random.key(0))
  head = jax.random.normal(jax.random.key(1), (cfg.output_dim, 10), jnp.float32)
  suite = Suite("bench", {}, params, {"t": head}, cfg, jnp.bfloat16 if bf16 else jnp.float32)
  config = config_lib.ReproduceConfig(steps=10_000, batch_size=batch,
                                      compute_dtype="bfloat16" if bf16 else "float32")
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, cfg.image_size, cfg.image_size, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
  rows = {}
  for finetune, saft in MODES:
    tx, step, _, trainable, make_frozen = _program(suite, finetune, saft, config, None)
    from saft_jax import train
    state = [train.init_train_state(trainable, tx)]
    frozen = make_frozen(head)

    def run():
      state[0], m = step(state[0], frozen, (x, y))
      jax.block_until_ready(m["loss"])
    rows[(finetune, saft)] = _time(run, warmup, steps)
  return rows


def bench_torch(preset, batch, warmup, steps):
  try:
    import timm
    import torch
  except Exception as e:  # noqa: BLE001
    print(f"  (PyTorch rows skipped: {type(e).__name__}: {e})")
    return {}
  if preset not in ("b32", "b16") or not torch.cuda.is_available():
    print("  (PyTorch rows need --preset b32/b16 and a CUDA GPU)")
    return {}
  name = {"b32": "vit_base_patch32_clip_224", "b16": "vit_base_patch16_clip_224"}[preset]
  out = {}
  for compiled in (False, True):
    model = timm.create_model(name, pretrained=False, num_classes=10).cuda()
    model.head.requires_grad_(False)
    fwd = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                            weight_decay=0.1, fused=True)
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    y = torch.randint(0, 10, (batch,), device="cuda")
    params = [p for p in model.parameters() if p.requires_grad]

    def loss():
      with torch.autocast("cuda", dtype=torch.bfloat16):
        return torch.nn.functional.cross_entropy(fwd(x), y)

    def sgd():
      opt.zero_grad(set_to_none=True)
      loss().backward()
      torch.nn.utils.clip_grad_norm_(params, 1.0)
      opt.step()
      torch.cuda.synchronize()

    def asam(rho=0.5, eta=0.01):
      opt.zero_grad(set_to_none=True)
      loss().backward()
      with torch.no_grad():
        ts = [(p.abs() + eta) if p.ndim > 1 else torch.ones_like(p) for p in params]
        tg = [t * p.grad for t, p in zip(ts, params)]
        norm = torch.norm(torch.stack([g.norm() for g in tg])) + 1e-12
        eps = [t * g * (rho / norm) for t, g in zip(ts, tg)]
        for p, e in zip(params, eps):
          p.add_(e)
      opt.zero_grad(set_to_none=True)
      loss().backward()
      with torch.no_grad():
        for p, e in zip(params, eps):
          p.sub_(e)
      torch.nn.utils.clip_grad_norm_(params, 1.0)
      opt.step()
      torch.cuda.synchronize()

    tag = "torch.compile" if compiled else "eager"
    out[(tag, "none")] = _time(sgd, warmup, steps)
    out[(tag, "asam")] = _time(asam, warmup, steps)
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--preset", nargs="+", default=["tiny"], choices=sorted(PRESETS))
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--bf16", action="store_true", help="bf16 compute (f32 params)")
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--peak-tflops", type=float, default=989.0,
                  help="dense bf16 peak for MFU (H100 SXM: 989)")
  args = ap.parse_args()
  print(f"devices: {jax.devices()}")
  for preset in args.preset:
    print(f"\n## {preset}, batch {args.batch}, {'bf16' if args.bf16 else 'f32'} compute")
    print("| impl | mode | ms/step | images/s | ×SGD | MFU |")
    print("|---|---|---|---|---|---|")
    rows = bench_jax(preset, args.batch, args.bf16, args.warmup, args.steps)
    base = rows[("sgd", "none")]
    for (ft, saft), ms in rows.items():
      label = ft.upper() + ("+ASAM" if saft == "asam" else "")
      passes = 2 if saft == "asam" else 1
      mfu = (f"{passes * TRAIN_GFLOP[preset] * args.batch / (ms / 1e3) / 1e3 / args.peak_tflops:.1%}"
             if preset in TRAIN_GFLOP and jax.devices()[0].platform == "gpu" else "n/a")
      print(f"| JAX | {label} | {ms:.2f} | {args.batch / ms * 1e3:.0f} | {ms / base:.2f} | {mfu} |")
    for (tag, saft), ms in bench_torch(preset, args.batch, args.warmup, args.steps).items():
      print(f"| PyTorch {tag} | {'ASAM' if saft == 'asam' else 'SGD'} | {ms:.2f} | "
            f"{args.batch / ms * 1e3:.0f} | | |")


if __name__ == "__main__":
  main()
