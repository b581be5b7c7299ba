"""Forward and forward+backward time of the offline suite's encoder, JAX vs PyTorch.

    python3 experiments/bench_encoder.py             # batch 256 = 8 stacked runs × 32
    python3 experiments/bench_encoder.py --batch 64

The JAX rows run `saft_jax.models.encode_image` on the offline ViT (8×8 grey images,
patch 2, width 64, 4 layers, 4 heads, exact GELU), jitted, float32. The PyTorch row (when
torch imports) runs 4 pre-norm `nn.TransformerEncoderLayer`s of the same width, heads, MLP
size and token count (17) with GELU, on all CPU threads: the same floating-point work
without the patch embedding. Prints the median of `--reps` calls in ms.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from saft_jax import models
from saft_jax.experiment.suites import OFFLINE_VISION


def _median_ms(fn, reps: int) -> float:
  fn()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return 1e3 * statistics.median(times)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--reps", type=int, default=15)
  args = p.parse_args()
  cfg = OFFLINE_VISION
  key = jax.random.PRNGKey(0)
  params = models.init_vision_params(cfg, key)
  images = jax.random.normal(key, (args.batch, cfg.image_size, cfg.image_size, cfg.in_channels))
  fwd = jax.jit(lambda p, x: models.encode_image(cfg, p, x))
  grad = jax.jit(jax.grad(lambda p, x: jnp.sum(models.encode_image(cfg, p, x) ** 2)))
  print(f"offline encoder, batch {args.batch}, devices {jax.devices()}")
  print(f"JAX     forward          {_median_ms(lambda: fwd(params, images).block_until_ready(), args.reps):8.1f} ms")
  print(f"JAX     forward+backward "
        f"{_median_ms(lambda: jax.block_until_ready(grad(params, images)), args.reps):8.1f} ms")
  try:
    import torch
  except ImportError:
    print("PyTorch not installed: no reference row")
    return
  torch.manual_seed(0)
  width, tokens = cfg.width, cfg.num_tokens
  layers = torch.nn.Sequential(*[
      torch.nn.TransformerEncoderLayer(width, cfg.heads, 4 * width, dropout=0.0,
                                       activation="gelu", norm_first=True, batch_first=True)
      for _ in range(cfg.layers)])
  x = torch.randn(args.batch, tokens, width)

  def torch_fwd():
    with torch.no_grad():
      layers(x)

  def torch_grad():
    layers.zero_grad(set_to_none=True)
    layers(x).pow(2).sum().backward()

  print(f"PyTorch forward          {_median_ms(torch_fwd, args.reps):8.1f} ms "
        f"({torch.get_num_threads()} threads)")
  print(f"PyTorch forward+backward {_median_ms(torch_grad, args.reps):8.1f} ms")


if __name__ == "__main__":
  main()
