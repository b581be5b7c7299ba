"""Times one jitted optimizer step of every saft_jax.optim transform.

Each step is loss + gradients + optimizer update + apply, jitted with the params
and optimizer state donated, on a small ViT written inline (flax.linen). The
baseline is the plain base optimizer (clip_by_global_norm(1.0) + AdamW) on the
same model and batch. Device-agnostic: runs on whatever ``jax.devices()[0]`` is.

    python3 experiments/bench_optim.py                      # tiny ViT (CPU)
    python3 experiments/bench_optim.py --preset vit-b32     # CLIP B/32 shapes, batch 128
    python3 experiments/bench_optim.py --preset tiny --batch 64 --only sam,asam

Prints ms/step (median and best over --repeats timed blocks of --block steps,
interleaved round-robin across transforms, after --warmup steps) and the
ratio to the base step. SAM/ASAM need two gradient evaluations, so ~2x is the
floor for them; the cheaper variants (LookSAM, SAM every k, MSAM) amortize it.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from saft_jax import optim

PRESETS = {
    # name: (image, patch, width, depth, heads, mlp, classes, batch)
    "tiny": (32, 8, 64, 2, 4, 128, 10, 32),
    "small": (64, 16, 192, 4, 3, 768, 10, 64),
    "vit-b32": (224, 32, 768, 12, 12, 3072, 1000, 128),
}


class Block(nn.Module):
  width: int
  heads: int
  mlp: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.heads, dtype=self.dtype)(y, y)
    x = x + y
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.Dense(self.mlp, dtype=self.dtype)(y)
    y = nn.Dense(self.width, dtype=self.dtype)(nn.gelu(y))
    return x + y


class ViT(nn.Module):
  patch: int
  width: int
  depth: int
  heads: int
  mlp: int
  classes: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, img):
    x = nn.Conv(self.width, (self.patch, self.patch), strides=self.patch,
                dtype=self.dtype, name="patch_embed")(img.astype(self.dtype))
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, c)).astype(x.dtype), x], axis=1)
    pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1, h * w + 1, c))
    x = x + pos.astype(x.dtype)
    for i in range(self.depth):
      x = Block(self.width, self.heads, self.mlp, self.dtype, name=f"block{i}")(x)
    x = nn.LayerNorm(dtype=self.dtype)(x[:, 0])
    return nn.Dense(self.classes, dtype=self.dtype, name="head")(x).astype(jnp.float32)


def transforms(base):
  """name -> transform, or (transform, k) for a host-side static schedule.

  Defaults of the package (paper settings). ``(tx, k)`` rows pass the static
  extra argument ``sharpness_step = (t % k == 0)``: two programs are compiled
  and no ``lax.cond`` is emitted (XLA:CPU runs big cond branches slowly).
  """
  return {
      "base (clip+adamw)": base,
      "sam": optim.sam(base),
      "asam": optim.asam(base),
      "asam (released)": optim.asam(base, variant="released"),
      "friendly_sam": optim.friendly_sam(base),
      "gsam": optim.gsam(base),
      "sagm": optim.sagm(base),
      "pgn": optim.pgn(base),
      "ssam_f": optim.ssam_f(base),
      "ssam_d": optim.ssam_d(base),
      "rwp": optim.rwp(base, key=0),
      "swa": optim.swa(base),
      "wa_sam": optim.wa_sam(base),
      "looksam (k=5)": optim.looksam(base, k=5),
      "looksam (k=5, static)": (optim.looksam(base, k=5), 5),
      "sam_every_k (k=2)": optim.sam_every_k(base, k=2),
      "sam_every_k (k=2, static)": (optim.sam_every_k(base, k=2), 2),
      "sam_every_k (k=5)": optim.sam_every_k(base, k=5),
      "sam_every_k (k=5, static)": (optim.sam_every_k(base, k=5), 5),
      "msam": optim.msam(base),
  }


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
  ap.add_argument("--batch", type=int, default=None, help="override the preset batch")
  ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                  help="compute dtype of the model (params stay float32)")
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--repeats", type=int, default=10, help="timed blocks per transform")
  ap.add_argument("--block", type=int, default=10,
                  help="steps per timed block (a multiple of the periods 2 and 5, "
                  "so periodic variants are timed at their average cost)")
  ap.add_argument("--only", default="", help="comma-separated subset of names")
  args = ap.parse_args(argv)

  image, patch, width, depth, heads, mlp, classes, batch = PRESETS[args.preset]
  batch = args.batch or batch
  model = ViT(patch, width, depth, heads, mlp, classes, jnp.dtype(args.dtype))
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  imgs = jax.random.normal(k1, (batch, image, image, 3), jnp.float32)
  labels = jax.random.randint(k2, (batch,), 0, classes)
  params0 = model.init(k3, imgs[:1])["params"]
  n_params = sum(x.size for x in jax.tree.leaves(params0))

  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch[0])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

  base = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(1e-5, weight_decay=0.1))
  txs = transforms(base)
  if args.only:
    keep = {s.strip() for s in args.only.split(",")}
    txs = {k: v for k, v in txs.items() if k.split(" ")[0] in keep or k in keep
           or k.startswith("base")}

  def make_step(tx):
    """Returns call(params, opt_state, batch, t) running one jitted step."""
    # GradientTransformations are NamedTuples too: (tx, k) rows have an int k
    tx, k = tx if isinstance(tx[1], int) else (tx, None)

    def step(params, opt_state, batch, sharpness_step=None):
      loss, g = jax.value_and_grad(loss_fn)(params, batch)
      grad_fn = lambda p: jax.grad(loss_fn)(p, batch)  # noqa: E731
      kw = {} if sharpness_step is None else {"sharpness_step": sharpness_step}
      updates, opt_state = tx.update(g, opt_state, params, grad_fn=grad_fn, **kw)
      return optax.apply_updates(params, updates), opt_state, loss

    jitted = jax.jit(step, donate_argnums=(0, 1), static_argnames="sharpness_step")
    if k is None:
      return tx, lambda p, s, b, t: jitted(p, s, b)
    return tx, lambda p, s, b, t: jitted(p, s, b, sharpness_step=(t % k == 0))

  dev = jax.devices()[0]
  print(f"device: {dev.device_kind} ({dev.platform}); preset {args.preset}: "
        f"{n_params / 1e6:.2f}M params, batch {batch}, image {image}, "
        f"dtype {args.dtype}; {args.repeats} timed blocks of {args.block} steps "
        f"per transform, interleaved round-robin, after {args.warmup} warm-up steps")
  data = (imgs, labels)
  runs = {}
  for name, tx in txs.items():  # compile + warm up everything first
    tx, step = make_step(tx)
    params = jax.tree.map(jnp.copy, params0)
    state = tx.init(params)
    t = 0
    for _ in range(max(args.warmup, 2)):  # >= 2: both kinds of static step
      params, state, loss = step(params, state, data, t)
      t += 1
    jax.block_until_ready((params, state, loss))
    runs[name] = [step, params, state, t]
    print(f"  compiled {name}", file=sys.stderr, flush=True)
  times = {name: [] for name in runs}
  for _ in range(args.repeats):
    # round-robin so that load drift on a shared machine hits all rows alike
    for name, run in runs.items():
      step, params, state, t = run
      t0 = time.perf_counter()
      for _ in range(args.block):
        params, state, loss = step(params, state, data, t)
        t += 1
      jax.block_until_ready((params, state, loss))
      times[name].append((time.perf_counter() - t0) / args.block)
      run[1], run[2], run[3] = params, state, t
  rows = [(n, 1e3 * statistics.median(t), 1e3 * min(t)) for n, t in times.items()]
  base_ms, base_min = rows[0][1], rows[0][2]
  print(f"| {'transform':<26} | {'median ms/step':>14} | {'x base':>6} | "
        f"{'best ms/step':>12} | {'x base':>6} |")
  print(f"|{'-' * 28}|{'-' * 16}|{'-' * 8}|{'-' * 14}|{'-' * 8}|")
  for name, ms, best in rows:
    print(f"| {name:<26} | {ms:>14.2f} | {ms / base_ms:>6.2f} | {best:>12.2f} | "
          f"{best / base_min:>6.2f} |")


if __name__ == "__main__":
  main()
