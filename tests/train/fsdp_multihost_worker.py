"""Worker for test_fsdp.py: ASAM+AdamW steps with params split over a ``model`` axis.

Like ``multihost_worker.py`` (``train.fit`` in two calls: 2 steps checkpointed with
orbax, then a resume to step 3), on a ``("data", "model")`` mesh when MODEL_AXIS > 1.

usage: fsdp_multihost_worker.py OUT.npz CKPT_DIR NUM_PROCESSES PROCESS_ID LOCAL_DEVICES
       MODEL_AXIS [COORDINATOR]
"""
import os
import sys

out, ckpt_dir = sys.argv[1], sys.argv[2]
nproc, pid, ndev, model = (int(a) for a in sys.argv[3:7])
coordinator = sys.argv[7] if len(sys.argv) > 7 else None
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_helpers import init_mlp, model_loss, start_worker  # noqa: E402

start_worker(nproc, pid, ndev, coordinator)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from saft_jax import optim, train  # noqa: E402

SIZES, MIN, GLOBAL_B, STEPS = (6, 32, 24, 4), 128, 16, 3
n = len(jax.devices())
mesh = (train.make_mesh((n // model, model), ("data", "model")) if model > 1
        else train.make_mesh())
tx = optim.asam(optax.adamw(1e-2, weight_decay=0.1), rho=0.5)
step = train.make_train_step(train.partitioned_loss(model_loss), tx, mesh=mesh)
state = train.init_train_state(init_mlp(0, SIZES), tx, mesh=mesh, min_size=MIN)
n_local = GLOBAL_B // nproc


def make_batch(seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(GLOBAL_B, SIZES[0])).astype(np.float32)
  return {"x": x, "y": (x[:, 0] > 0).astype(np.int32) + 2 * (x[:, 1] > 0).astype(np.int32)}


def batches_fn(start):
  for s in range(start, STEPS):
    local = {k: v[pid * n_local:(pid + 1) * n_local] for k, v in make_batch(s).items()}
    yield train.shard_batch(local, mesh)


part = train.fit(step, state, None, batches_fn, total_steps=STEPS, checkpoint_dir=ckpt_dir,
                 save_every=100, log_every=0, max_steps=2, ckpt_async=False)
assert int(part.state.step) == 2
fresh = train.init_train_state(init_mlp(0, SIZES), tx, mesh=mesh, min_size=MIN)
state = train.fit(step, fresh, None, batches_fn, total_steps=STEPS, checkpoint_dir=ckpt_dir,
                  save_every=100, log_every=1, ckpt_async=False).state
assert int(state.step) == STEPS
split = sum("model" in x.sharding.spec for x in jax.tree.leaves(state))
assert split == (6 if model > 1 else 0), split  # 2 kernels and their 2 Adam moments each
flat = {jax.tree_util.keystr(p): x for p, x in
        jax.tree_util.tree_leaves_with_path(train.to_host(state.params))}
if pid == 0:
  np.savez(out, **flat)
if nproc > 1:
  jax.distributed.shutdown()
