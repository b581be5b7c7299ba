"""Stacked fine-tuning (one compiled program for several task × seed runs) equals one at a time."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saft_jax.experiment import config as config_lib, evaluate, finetune, runner

# digits has 10 classes, parity 2: the stacked heads are padded.
MEMBERS = [("digits", 0), ("parity", 0), ("parity", 1)]


def _config(**kw):
  base = dict(suite="offline", tasks=("digits", "parity"), steps=6, batch_size=32,
              eval_every=3, checkpoint_every=3, pretrain_steps=10, eval_batch_size=64,
              mesh_shape=1, async_checkpoint=False,
              optim=config_lib.OptimConfig(lr=1e-3, warmup_steps=2))
  base.update(kw)
  return config_lib.ReproduceConfig(**base)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
  return runner.build_suite(_config(), str(tmp_path_factory.mktemp("suite")))


def _rel_norm(a, b):
  """‖a − b‖ / ‖b‖ over all leaves."""
  num = sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  return (num / sum(float(jnp.sum(y ** 2)) for y in jax.tree.leaves(b))) ** 0.5


def _max_diff(a, b):
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a),
                                                             jax.tree.leaves(b)))


@pytest.mark.parametrize("method,saft", [("sgd", "asam"), ("ftts", "none")])
def test_stacked_equals_one_at_a_time(suite, tmp_path, method, saft):
  cfg = _config()
  stacked = finetune.finetune_stacked(suite, MEMBERS, method, saft, cfg, str(tmp_path / "g"))
  for i, ((task, seed), (tv, best)) in enumerate(zip(MEMBERS, stacked)):
    ref_tv, ref_best = finetune.finetune_task(suite, task, method, saft, seed, cfg,
                                              str(tmp_path / f"one{i}"))
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(ref_tv))
    assert scale > 0
    # Adam normalizes tiny gradient differences into lr-sized steps on a few coordinates
    # (float summation order differs between the vmapped and the single program): the
    # difference is tiny as a whole (measured ≤ 8e-4 relative), bounded per coordinate.
    assert _rel_norm(tv, ref_tv) < 1e-2
    assert _max_diff(tv, ref_tv) < 0.1 * scale
    assert best["accuracy"] == pytest.approx(ref_best["accuracy"], abs=1e-9)
    assert best["count"] == ref_best["count"]


def test_stacked_on_a_mesh_equals_no_mesh(suite, tmp_path):
  cfg = _config()
  mesh = runner.make_run_mesh(config_lib.replace(cfg, mesh_shape=None))
  assert mesh is not None and mesh.size == 8
  a = finetune.finetune_stacked(suite, MEMBERS[:2], "ftlo", "asam", cfg, str(tmp_path / "m"),
                                mesh=mesh)
  b = finetune.finetune_stacked(suite, MEMBERS[:2], "ftlo", "asam", cfg, str(tmp_path / "n"))
  for (tv_a, best_a), (tv_b, best_b) in zip(a, b):
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(tv_b))
    # sharded reductions round differently; Adam turns that into at most a few lr-sized steps
    assert _max_diff(tv_a, tv_b) < 0.05 * scale
    assert best_a["accuracy"] == pytest.approx(best_b["accuracy"])


def test_finetune_all_stacks_and_reuses(suite, tmp_path, monkeypatch):
  calls = []
  real = finetune.finetune_stacked

  def counting(suite, members, *a, **kw):
    calls.append(list(members))
    return real(suite, members, *a, **kw)

  monkeypatch.setattr(runner, "finetune_stacked", counting)
  cfg = _config(stack_runs=0)
  tvs = runner.finetune_all(suite, cfg, str(tmp_path), "sgd", "none", (0, 1), None)
  assert calls == [[("digits", 0), ("parity", 0), ("digits", 1), ("parity", 1)]]
  assert sorted(tvs) == [0, 1] and len(tvs[0]) == 2
  again = runner.finetune_all(suite, cfg, str(tmp_path), "sgd", "none", (0, 1, 2), None)
  assert calls[1] == [("digits", 2), ("parity", 2)]  # only the new seed is trained
  assert _max_diff(again[0], tvs[0]) == 0.0
  # Per-member files as the one-at-a-time path writes them (read by `saft analyze`).
  run = tmp_path / "sgd-none" / "seed1" / "parity"
  for f in ("task_vector.msgpack", "best.json", "metrics.jsonl"):
    assert (run / f).exists()
  # groups of 3: ceil(2 tasks × 2 seeds / 3) = 2 programs
  calls.clear()
  runner.finetune_all(suite, _config(stack_runs=3), str(tmp_path / "g3"), "sgd", "none",
                      (0, 1), None)
  assert [len(c) for c in calls] == [3, 1]


def test_padded_head_matches_unpadded():
  rng = np.random.default_rng(0)
  feats, head = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32), jnp.asarray(
      rng.normal(size=(4, 3)), jnp.float32)
  padded = evaluate.pad_head(head, 7)
  a, b = evaluate.head_logits(feats, head), evaluate.head_logits(feats, padded)
  np.testing.assert_allclose(b[:, :3], a, rtol=1e-6)
  np.testing.assert_array_equal(np.argmax(b, -1), np.argmax(a, -1))
  np.testing.assert_allclose(jax.nn.log_softmax(b)[:, :3], jax.nn.log_softmax(a), atol=1e-6)
  with pytest.raises(ValueError, match="more than the padded size"):
    evaluate.pad_head(head, 2)
