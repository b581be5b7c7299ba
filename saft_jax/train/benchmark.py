"""Step-time benchmark of the train step: {SGD, FTTS, FTLO} x {AdamW, SAM}.

Device-agnostic (uses ``jax.devices()``; the batch is sharded over all of them)::

  python -m saft_jax.train.benchmark [--width 512] [--depth 4] [--batch 128] [--steps 10] [--repeats 5]

The model is a plain-JAX residual MLP (no Flax), so the numbers measure the training
machinery (jvp for FTTS, the second gradient for SAM, masking for FTLO), not a backbone.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax


def _init(width, depth, n_in, n_out, seed=0):
  rng = np.random.default_rng(seed)
  dense = lambda a, b: {"kernel": jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), jnp.float32),
                        "bias": jnp.zeros((b,), jnp.float32)}
  return {"embed": dense(n_in, width), "head": dense(width, n_out),
          **{f"block{i}": {"fc1": dense(width, width), "fc2": dense(width, width)}
             for i in range(depth)}}


def _apply(p, x):
  h = x @ p["embed"]["kernel"] + p["embed"]["bias"]
  for i in range(sum(k.startswith("block") for k in p)):
    b = p[f"block{i}"]
    h = h + jax.nn.gelu(h @ b["fc1"]["kernel"] + b["fc1"]["bias"]) @ b["fc2"]["kernel"] + b["fc2"]["bias"]
  return h @ p["head"]["kernel"] + p["head"]["bias"]


def _xent(logits, y):
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)), y[:, None], 1))


def run(width=512, depth=4, batch=128, steps=10, repeats=5, n_in=256, n_out=10):
  from saft_jax import train
  mesh = train.make_mesh()
  params = _init(width, depth, n_in, n_out)
  rng = np.random.default_rng(0)
  data = train.shard_batch({"x": rng.normal(size=(batch, n_in)).astype(np.float32),
                            "y": rng.integers(0, n_out, size=(batch,)).astype(np.int32)}, mesh)
  model_loss = lambda p, b: (_xent(_apply(p, b["x"]), b["y"]), {})
  configs = []
  for method in ("sgd", "ftts", "ftlo"):
    if method == "ftts":
      loss_fn = train.linearized_loss(lambda p, c, b: _apply(p, b["x"]),
                                      lambda out, c, b: (_xent(out, b["y"]), {}))
      trainable, frozen = jax.tree.map(jnp.zeros_like, params), train.linearized_consts(params)
    else:
      loss_fn = train.partitioned_loss(model_loss)
      mask = (lambda path, x: "fc1/kernel" in path) if method == "ftlo" else (lambda path, x: True)
      trainable, frozen = train.partition(params, mask)
    for opt in ("adamw", "sam"):
      base = train.make_base_optimizer(1e-5, 1000, 10, 0.1, 1.0)
      tx = _sam(base, 0.05) if opt == "sam" else base
      step = train.make_train_step(loss_fn, tx, mesh=mesh)
      state = train.init_train_state(trainable, tx, mesh=mesh)
      fr = train.replicate(frozen, mesh)
      state, m = step(state, fr, data)  # compile
      jax.block_until_ready(m["loss"])
      configs.append({"name": (method, opt), "step": step, "state": state, "frozen": fr, "t": []})
  for _ in range(repeats):  # interleaved rounds, median: robust to a shared, noisy machine
    for c in configs:
      t0 = time.perf_counter()
      for _ in range(steps):
        c["state"], m = c["step"](c["state"], c["frozen"], data)
      jax.block_until_ready(m["loss"])
      c["t"].append((time.perf_counter() - t0) / steps)
  rows = []
  for c in configs:
    dt = float(np.median(c["t"]))
    rows.append((*c["name"], 1.0 / dt, batch / dt))
  base_rate = rows[0][2]
  print(f"devices: {len(jax.devices())} x {jax.devices()[0].platform}; model width {width}, "
        f"depth {depth}, batch {batch}, median of {repeats} interleaved rounds x {steps} steps")
  print("| method | optimizer | steps/s | examples/s | rel. to SGD+AdamW |")
  print("|---|---|---|---|---|")
  for method, opt, r, ex in rows:
    print(f"| {method} | {opt} | {r:.2f} | {ex:.0f} | {r / base_rate:.2f} |")
  return rows


def _sam(base, rho):
  """Minimal SAM (the benchmark must not depend on saft_jax.optim)."""
  def update(grads, state, params, *, grad_fn, **_):
    norm = optax.tree.norm(grads)
    eps = jax.tree.map(lambda g: rho * g / (norm + 1e-12), grads)
    return base.update(grad_fn(jax.tree.map(jnp.add, params, eps)), state, params)
  return optax.GradientTransformationExtraArgs(base.init, update)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--width", type=int, default=512)
  ap.add_argument("--depth", type=int, default=4)
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--repeats", type=int, default=5)
  a = ap.parse_args(argv)
  run(a.width, a.depth, a.batch, a.steps, a.repeats)


if __name__ == "__main__":
  main()
