"""fit: resume after a kill, non-finite guard, best-on-validation, JSONL and log lines."""
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saft_jax import train
from train_helpers import assert_trees_close, init_mlp, make_batch, model_loss, tiny_sam

B, N = 16, 8


class Killed(Exception):
  pass


def _setup(mesh=None):
  tx = tiny_sam(train.make_base_optimizer(1e-2, N, 2, 0.1, 1.0), rho=0.05)
  step = train.make_train_step(train.partitioned_loss(model_loss), tx, mesh=mesh)
  return step, lambda: train.init_train_state(init_mlp(0), tx, mesh=mesh)


def _batches_fn(mesh=None, kill_at=None, nan_at=None):
  def batches(start):
    for s in range(start, 10 ** 6):
      if s == kill_at:
        raise Killed(f"killed before step {s}")
      b = make_batch(B, seed=s)
      if s == nan_at:
        b["x"] = np.full_like(b["x"], np.nan)
      yield train.shard_batch(b, mesh) if mesh is not None else jax.tree.map(jnp.asarray, b)
  return batches


def _eval_fn(params, frozen):
  b = jax.tree.map(jnp.asarray, make_batch(64, seed=999))
  loss, aux = model_loss(params, b)
  return {"accuracy": float(aux["accuracy"]), "loss": float(loss)}


def test_resume_after_kill_reaches_the_same_result(tmp_path):
  mesh = train.make_mesh()
  step, init = _setup(mesh)
  straight = train.fit(step, init(), None, _batches_fn(mesh), total_steps=N, log_every=0,
                       eval_fn=_eval_fn, eval_every=4)
  ckpt = str(tmp_path / "ckpt")
  with pytest.raises(Killed):
    train.fit(step, init(), None, _batches_fn(mesh, kill_at=5), total_steps=N,
              checkpoint_dir=ckpt, save_every=2, log_every=0, eval_fn=_eval_fn, eval_every=4)
  assert train.Checkpointer(ckpt).all_steps() == [2, 4]
  resumed = train.fit(step, init(), None, _batches_fn(mesh), total_steps=N,
                      checkpoint_dir=ckpt, save_every=2, log_every=0,
                      eval_fn=_eval_fn, eval_every=4)
  assert int(resumed.state.step) == N
  assert_trees_close(resumed.state.params, straight.state.params, rtol=0, atol=0)
  assert_trees_close(resumed.state.opt_state, straight.state.opt_state, rtol=0, atol=0)
  assert resumed.best_metrics == straight.best_metrics


def test_resume_after_max_steps(tmp_path):
  step, init = _setup()
  straight = train.fit(step, init(), None, _batches_fn(), total_steps=N, log_every=0)
  ckpt = str(tmp_path / "ckpt")
  part = train.fit(step, init(), None, _batches_fn(), total_steps=N, checkpoint_dir=ckpt,
                   save_every=100, log_every=0, max_steps=3)
  assert int(part.state.step) == 3
  rest = train.fit(step, init(), None, _batches_fn(), total_steps=N, checkpoint_dir=ckpt,
                   save_every=100, log_every=0)
  assert_trees_close(rest.state.params, straight.state.params, rtol=0, atol=0)


@pytest.mark.parametrize("save_every", [1, 4])
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, save_every):
  step, init = _setup()
  ckpt = str(tmp_path / "ckpt")
  with pytest.raises(train.NonFiniteLossError, match="step 5") as err:
    train.fit(step, init(), None, _batches_fn(nan_at=5), total_steps=N, checkpoint_dir=ckpt,
              save_every=save_every, log_every=0)
  assert err.value.step == 5
  ck = train.Checkpointer(ckpt)
  latest = ck.latest_step()
  assert latest == (5 if save_every == 1 else 4) and err.value.last_checkpoint == latest
  restored = ck.restore(init())
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(restored.params))
  # It is the state a clean run has after `latest` steps.
  clean = train.fit(step, init(), None, _batches_fn(), total_steps=N, log_every=0,
                    max_steps=latest)
  assert_trees_close(restored.params, clean.state.params, rtol=0, atol=0)


def test_best_on_validation(tmp_path):
  step, init = _setup()
  accs = iter([0.2, 0.9, 0.5, 0.7])
  seen = []

  def eval_fn(params, frozen):
    seen.append(jax.tree.map(np.asarray, params))
    return {"accuracy": next(accs)}

  ckpt = str(tmp_path / "ckpt")
  res = train.fit(step, init(), None, _batches_fn(), total_steps=N, eval_fn=eval_fn,
                  eval_every=2, checkpoint_dir=ckpt, save_every=100, log_every=0)
  assert len(seen) == 4 and res.best_metrics == {"accuracy": 0.9}
  assert_trees_close(res.best_params, seen[1], rtol=0, atol=0)
  assert not np.allclose(seen[1]["dense0"]["kernel"], seen[3]["dense0"]["kernel"])
  params, metrics, best_step = train.Checkpointer(ckpt).restore_best(init().params)
  assert best_step == 4 and metrics["accuracy"] == 0.9
  assert_trees_close(params, seen[1], rtol=0, atol=0)


def test_jsonl_metrics_and_progress_lines(tmp_path, caplog):
  step, init = _setup()
  path = tmp_path / "run" / "metrics.jsonl"
  with caplog.at_level(logging.INFO, logger="saft_jax.train"):
    res = train.fit(step, init(), None, _batches_fn(), total_steps=N, log_every=2,
                    eval_fn=_eval_fn, eval_every=4, metrics_path=str(path))
  records = [json.loads(line) for line in path.read_text().splitlines()]
  assert records == res.history
  train_recs = [r for r in records if r["event"] == "train"]
  eval_recs = [r for r in records if r["event"] == "eval"]
  assert [r["step"] for r in train_recs] == [2, 4, 6, 8]
  assert [r["step"] for r in eval_recs] == [4, 8]
  for r in train_recs:
    assert {"loss", "grad_norm", "accuracy", "steps_per_sec", "examples_per_sec", "eta_sec",
            "time"} <= set(r)
    assert r["examples_per_sec"] == pytest.approx(B * r["steps_per_sec"], rel=1e-6)
  assert train_recs[-1]["eta_sec"] == 0
  assert {"accuracy", "loss"} <= set(eval_recs[0])
  lines = [m for m in caplog.messages if m.startswith("step ")]
  assert len(lines) == 4
  assert all("steps/s" in m and "examples/s" in m and "ETA" in m for m in lines)


def test_clear_errors_for_short_data_and_missing_metric():
  step, init = _setup()
  with pytest.raises(ValueError, match="ran out of batches at step 2"):
    train.fit(step, init(), None, lambda s: (jax.tree.map(jnp.asarray, make_batch(B, seed=i))
                                             for i in range(s, 2)), total_steps=N, log_every=0)
  with pytest.raises(ValueError, match="lacks best_metric 'accuracy'"):
    train.fit(step, init(), None, _batches_fn(), total_steps=N, log_every=0,
              eval_fn=lambda p, f: {"acc": 1.0}, eval_every=2)
