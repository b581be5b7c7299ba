"""Throughput of the data pipelines: ``python -m saft_jax.data.benchmark``.

Device-agnostic: the prefetch row uses every device of ``jax.devices()``. The
TFDS rows stream ``tfds.testing.mock_data`` examples of a builder (random
images of the builder's shape, PNG-encoded, so decoding is real) through the
real pipeline, so no prepared dataset is needed; they are skipped without
TensorFlow.
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def _rate(it, batches: int, batch_size: int) -> float:
  next(it)  # warm-up (pipeline construction, first compile / transfer)
  t = time.perf_counter()
  for _ in range(batches):
    out = next(it)
  import jax
  jax.tree.map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, out)
  return batches * batch_size / (time.perf_counter() - t)


def main(argv=None):
  import jax
  from jax.sharding import Mesh
  from saft_jax import data
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batches", type=int, default=20)
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--image-size", type=int, default=224)
  args = p.parse_args(argv)
  b, one = args.batch_size, dict(process_index=0, process_count=1)
  rows = []
  digits = data.offline_suite(["digits"])["digits"]
  for aug in (False, True):
    it = data.train_batches(digits, b, seed=0, augment=aug, **one)
    rows.append((f"offline train (augment={aug})", _rate(it, args.batches, b)))
  mesh = Mesh(np.array(jax.devices()), ("data",))
  big = np.zeros((b, args.image_size, args.image_size, 3), np.float32)
  it = data.prefetch_to_mesh(((big, np.zeros(b, np.int32)) for _ in iter(int, 1)), mesh, depth=2)
  rows.append((f"prefetch_to_mesh {b}x{args.image_size}^2 f32 ({len(jax.devices())} dev)",
               _rate(it, args.batches, b)))
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    tfds = None
  if tfds is not None:
    with tfds.testing.mock_data(num_examples=b * (args.batches + 2),
                                policy=tfds.testing.MockPolicy.USE_CODE):
      for name in ("mnist", "eurosat"):
        task = data.load_task(name, image_size=args.image_size)
        it = data.train_batches(task, b, seed=0, **one)
        rows.append((f"tfds mock {name} train (RRC, {args.image_size})",
                     _rate(it, args.batches // 2, b)))
        it = iter(data.eval_batches(task, "train", b, **one))
        rows.append((f"tfds mock {name} eval ({args.image_size})",
                     _rate(it, args.batches // 2, b)))
  print(f"devices: {jax.devices()[0].platform} x{len(jax.devices())}, batch {b}")
  print(f"| {'pipeline':<48} | {'images/s':>10} |")
  print(f"|{'-' * 50}|{'-' * 12}|")
  for name, r in rows:
    print(f"| {name:<48} | {r:>10.0f} |")


if __name__ == "__main__":
  main()
