"""Worker for test_multihost.py: a few SAM+AdamW steps with gradient accumulation.

The run is done by ``train.fit`` in two calls: 2 steps (checkpointed with orbax), then a
resume from the checkpoint to step 3, so multi-process checkpointing is exercised too.

usage: multihost_worker.py OUT.npz CKPT_DIR NUM_PROCESSES PROCESS_ID LOCAL_DEVICES [COORDINATOR]
"""
import os
import sys

out, ckpt_dir = sys.argv[1], sys.argv[2]
nproc, pid, ndev = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
coordinator = sys.argv[6] if len(sys.argv) > 6 else None
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_helpers import init_mlp, make_batch, model_loss, start_worker, tiny_sam  # noqa: E402

start_worker(nproc, pid, ndev, coordinator)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from saft_jax import train  # noqa: E402

GLOBAL_B, STEPS = 16, 3
mesh = train.make_mesh()
tx = tiny_sam(train.make_base_optimizer(1e-2, 10, 2, 0.1, 1.0), rho=0.05)
step = train.make_train_step(train.partitioned_loss(model_loss), tx, mesh=mesh, accum_steps=2)
state = train.init_train_state(init_mlp(0), tx, mesh=mesh)
n_local = GLOBAL_B // nproc


def batches_fn(start):
  for s in range(start, STEPS):
    full = make_batch(GLOBAL_B, seed=s)
    local = {k: v[pid * n_local:(pid + 1) * n_local] for k, v in full.items()}  # this host's rows
    yield train.shard_batch(local, mesh)


part = train.fit(step, state, None, batches_fn, total_steps=STEPS, checkpoint_dir=ckpt_dir,
                 save_every=100, log_every=0, max_steps=2)
assert int(part.state.step) == 2
fresh = train.init_train_state(init_mlp(0), tx, mesh=mesh)
state = train.fit(step, fresh, None, batches_fn, total_steps=STEPS, checkpoint_dir=ckpt_dir,
                  save_every=100, log_every=1).state
assert int(state.step) == STEPS
flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in
        jax.tree_util.tree_leaves_with_path(state.params)}
if pid == 0:
  np.savez(out, **flat)
if nproc > 1:
  jax.distributed.shutdown()
