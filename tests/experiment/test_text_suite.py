"""The offline text suite of `saft reproduce`: end to end, FTTS/FTLO, exact match, configs."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saft_jax import cli, models, train as train_lib
from saft_jax.experiment import config as config_lib, defaults, runner, sweep
from saft_jax.experiment import text_eval, text_finetune, text_suite
from saft_jax.experiment.store import load_tree
from saft_jax.models import t5 as t5_lib

TASKS = ("sentiment", "acceptability")
TINY_TEXT = dict(d_model=16, num_layers=1, num_decoder_layers=1, num_heads=2, d_ff=32,
                 max_input_len=64, max_target_len=16, pretrain_steps=0, sizes=(24, 16, 16))


def _config(**kw):
  base = dict(suite="text", tasks=TASKS, finetunes=("sgd",), safts=("none", "asam"),
              merges=("task_arithmetic",), steps=4, batch_size=8, eval_every=2,
              checkpoint_every=4, eval_batch_size=16, mesh_shape=1,
              optim=config_lib.OptimConfig(lr=1e-2, warmup_steps=1, schedule="linear"),
              text=config_lib.TextConfig(score="rank", **TINY_TEXT))
  base.update(kw)
  return config_lib.ReproduceConfig(**base)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("text_run"))
  runner.reproduce(_config(), out)
  return out


def test_reproduce_text_files_and_records(run_dir):
  for name in ("config.json", "results.json", "results.md", "meta.json", "theta0.msgpack",
               "suite.json"):
    assert os.path.exists(os.path.join(run_dir, name)), name
  one = os.path.join(run_dir, "ft", "sgd-asam", "seed0", "acceptability")
  for name in ("task_vector.msgpack", "best.json", "metrics.jsonl", "ckpt"):
    assert os.path.exists(os.path.join(one, name)), name
  records = json.load(open(os.path.join(run_dir, "results.json")))
  assert len(records) == 2 * 1 * 3 * len(TASKS)  # safts × merges × protocols × tasks
  for r in records:
    for k in ("task", "finetune", "saft", "merge", "protocol", "seed", "abs_acc", "norm_acc",
              "ft_acc", "rank_acc", "exact_acc", "label_words"):
      assert k in r, k
    assert 0 < r["ft_acc"] <= 1 and 0 <= r["abs_acc"] <= 1
    assert r["norm_acc"] == pytest.approx(r["abs_acc"] / r["ft_acc"])
    assert r["abs_acc"] == r["rank_acc"]  # text.score = "rank"
    shares = r["label_words"]
    assert set(shares) == {"this_task", "other_task", "neither"}
    assert all(0 <= v <= 1 for v in shares.values())
    assert sum(shares.values()) == pytest.approx(1.0)
  meta = json.load(open(os.path.join(run_dir, "meta.json")))
  assert meta["suite"] == "text" and meta["score"] == "rank"
  assert meta["label_word_candidates"] == ["negative", "positive", "unacceptable", "acceptable"]
  assert set(meta["theta0_test"]) == set(TASKS)
  assert meta["regime"]["flan_t5_base_num_params"] == text_suite.FLAN_T5_BASE_PARAMS
  md = open(os.path.join(run_dir, "results.md")).read()
  assert "Label words of the merged models' outputs" in md and "SAFT-ASAM" in md
  assert "rank classification" in md


def test_ft_accuracy_matches_rank_classify(run_dir):
  """ft_acc (rank score) recomputed with t5.rank_classify on θ0 + τ."""
  config = _config()
  suite = runner.build_suite(config, run_dir)  # θ0 read from the cache
  records = json.load(open(os.path.join(run_dir, "results.json")))
  for task in TASKS:
    tv = jax.tree.map(jnp.asarray, load_tree(os.path.join(
        run_dir, "ft", "sgd-none", "seed0", task, "task_vector.msgpack")))
    params = jax.tree.map(jnp.add, suite.params0, tv)
    ids, mask = suite.inputs[task]["test"]
    words = text_suite.target_ids(suite.tokenizer, suite.tasks[task].label_words,
                                  suite.max_target_len)
    pred = np.asarray(models.T5(suite.t5, params).rank_classify(params, ids, mask, words))
    acc = float(np.mean(pred == suite.tasks[task].labels("test")))
    rec = next(r for r in records if r["task"] == task and r["saft"] == "none")
    assert rec["ft_acc"] == pytest.approx(acc, abs=1e-9)


def test_theta0_cache_key_follows_model_and_pretrain_fields(run_dir):
  key = json.load(open(os.path.join(run_dir, "suite.json")))
  assert key["pretrain_steps"] == 0 and key["d_model"] == 16 and key["suite"] == "text"
  assert "score" not in key and key["sizes"] == [24, 16, 16]  # pre-training avoids the splits
  changed = config_lib.apply_overrides(_config(), ["text.pretrain_steps=3"])
  assert text_suite.theta0_key(changed) != text_suite.theta0_key(_config())
  for change in ("text.vocab=byte", "text.level=standard", "text.sizes=30,16,16",
                 "text.pretrain_task_share=0.25"):
    other = config_lib.apply_overrides(_config(), [change])
    assert text_suite.theta0_key(other) != text_suite.theta0_key(_config()), change
  scored = config_lib.apply_overrides(_config(), ["text.score=exact", "text.compute_dtype=bfloat16"])
  assert text_suite.theta0_key(scored) == text_suite.theta0_key(_config())


def _train_losses(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [r["loss"] for r in map(json.loads, f) if r["event"] == "train"]


def test_ftlo_and_ftts_train(run_dir, tmp_path):
  config = _config(steps=3, eval_every=3, checkpoint_every=3)
  suite = runner.build_suite(config, run_dir)
  # FTLO: exactly the attention q/k/v/o kernels move (self- and cross-attention).
  tv, best = text_finetune.finetune_text_task(suite, "sentiment", "ftlo", "none", 0, config,
                                              str(tmp_path / "ftlo"))
  mask = models.ftlo_mask(suite.params0)
  moved = jax.tree.map(lambda t: bool(jnp.any(t != 0)), tv)
  assert jax.tree.leaves(moved) == jax.tree.leaves(mask)
  assert 0 <= best["accuracy"] <= 1
  # FTTS: the task vector is the trained offset dθ of the linearized model.
  tv, best = text_finetune.finetune_text_task(suite, "sentiment", "ftts", "none", 0, config,
                                              str(tmp_path / "ftts"))
  assert jax.tree.structure(tv) == jax.tree.structure(suite.params0)
  assert any(bool(jnp.any(t != 0)) for t in jax.tree.leaves(tv))
  losses = _train_losses(str(tmp_path / "ftts"))
  sgd = _train_losses(os.path.join(run_dir, "ft", "sgd-none", "seed0", "sentiment"))
  # first step: the linearized model at dθ = 0 is θ0 (same batch as the SGD run)
  assert losses[0] == pytest.approx(sgd[0], rel=1e-5)
  assert losses[-1] < 0.9 * losses[0]  # dθ is trained
  # the evaluator's linearized model at λ = 1 along τ = dθ is the one fit() validated
  stats = text_eval.evaluator(suite, True).stats(tv, [1.0], "sentiment", "val", 16)
  assert float(stats["rank"][0]) == pytest.approx(best["rank_acc"])
  assert float(stats["exact"][0]) == pytest.approx(best["exact_acc"])


# ----------------------------------------------------------------------------- exact match


def _cut(row, eos):
  """Tokens up to and including the first EOS, or None without EOS."""
  row = list(np.asarray(row))
  return tuple(row[:row.index(eos) + 1]) if eos in row else None


def _linear_greedy(cfg, params0, direction, lam, ids, mask, max_len):
  """Independent reference: step-by-step greedy decoding of f(θ0) + λ J f(θ0)·D."""
  @jax.jit
  def next_token(dec_in, t):
    f0, jd = jax.jvp(lambda p: t5_lib.t5_logits(cfg, p, ids, mask, dec_in), (params0,),
                     (direction,))
    return jnp.argmax((f0 + lam * jd)[:, t], axis=-1)

  b = ids.shape[0]
  dec_in = np.full((b, max_len), cfg.pad_token_id, np.int32)
  dec_in[:, 0] = cfg.decoder_start_token_id
  out = np.full((b, max_len), cfg.pad_token_id, np.int32)
  finished = np.zeros(b, bool)
  for t in range(max_len):
    nxt = np.where(finished, cfg.pad_token_id, np.asarray(next_token(jnp.asarray(dec_in), t)))
    out[:, t] = nxt
    finished |= nxt == cfg.eos_token_id
    if t + 1 < max_len:
      dec_in[:, t + 1] = nxt
  return out


def _expected_counts(outputs, cands, label_cand, task_mask, row_mask, eos):
  """[rank placeholder, exact, this, other, neither] counted from decoded outputs."""
  cand_seqs = [tuple(int(x) for x in c if x >= 0) for c in cands]
  exact = this = other = neither = 0
  for row, y, real in zip(outputs, label_cand, row_mask):
    if not real:
      continue
    seq = _cut(row, eos)
    hit = [i for i, c in enumerate(cand_seqs) if seq is not None and seq == c]
    exact += int(y in hit)
    if any(task_mask[i] for i in hit):
      this += 1
    elif hit:
      other += 1
    else:
      neither += 1
  return exact, this, other, neither


def _random_params(cfg, seed, std=1.0):
  """Random T5 parameters drawn with NumPy (norm scales 1, kernels N(0, std²/fan_in))."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda k: models.init_t5_params(cfg, k), jax.random.key(0))

  def draw(path, s):
    if "scale" in jax.tree_util.keystr(path):
      return jnp.full(s.shape, float(std == 1.0), jnp.float32)
    return jnp.asarray(std * rng.normal(size=s.shape) / np.sqrt(s.shape[0]), jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def test_teacher_forced_exact_match_equals_greedy_decoding():
  """On a tiny random T5 (8-token vocabulary, so outputs end early) whose greedy outputs
  are among the candidates: exact match and label-word shares from one teacher-forced
  pass equal real greedy decoding, for the plain and the linearized model."""
  cfg = t5_lib.T5Config(vocab_size=8, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                        num_decoder_layers=1, num_heads=2, feed_forward_proj="gated-gelu",
                        tie_word_embeddings=False)
  params = _random_params(cfg, 2)
  direction = _random_params(cfg, 5, std=0.3)
  lam = 0.8
  rng = np.random.default_rng(0)
  b, t_max = 64, 5
  ids = jnp.asarray(rng.integers(2, 8, size=(b, 6)), jnp.int32)
  mask = jnp.ones((b, 6), jnp.int32)
  plain_out = np.asarray(t5_lib.greedy_decode(cfg, params, ids, mask, max_len=t_max))
  lin_out = _linear_greedy(cfg, params, direction, jnp.float32(lam), ids, mask, t_max)
  seqs = sorted({s for s in map(lambda r: _cut(r, cfg.eos_token_id), list(plain_out)
                                + list(lin_out)) if s is not None}, key=lambda s: (len(s), s))
  assert len(seqs) >= 3, "the tiny model should end some outputs within 5 tokens"
  # candidates: greedy outputs, a prefix-with-EOS of one and a one-token change of another
  longest = max(seqs, key=len)
  distractors = [longest[:1] + (cfg.eos_token_id,),
                 (longest[0] % 6 + 2,) + longest[1:]]
  cand_list = list(dict.fromkeys(seqs[:5] + distractors))
  cands = np.full((len(cand_list), t_max), -100, np.int32)
  for i, c in enumerate(cand_list):
    cands[i, :len(c)] = c
  task_mask = np.arange(len(cand_list)) % 2 == 0
  label_cand = rng.integers(0, len(cand_list), size=b).astype(np.int32)
  row_mask = np.ones(b, bool)
  row_mask[-3:] = False  # padding rows are not counted
  plain, linear_outputs, linear_count = text_eval.make_counters_fns(cfg, "float32")
  zero = jax.tree.map(jnp.zeros_like, params)
  args = (jnp.asarray(cands), jnp.asarray(label_cand), jnp.asarray(task_mask),
          jnp.asarray(row_mask))
  got = np.asarray(plain(params, zero, jnp.float32(0.0), ids, mask, *args))
  want = _expected_counts(plain_out, cands, label_cand, task_mask, row_mask, cfg.eos_token_id)
  assert tuple(got[1:]) == want
  assert want[1] + want[2] > 0 and want[3] > 0  # some outputs hit candidates, some do not
  # linearized model at θ0 + λ D
  f0, jd = linear_outputs(params, direction, ids, mask, jnp.asarray(cands))
  got = np.asarray(linear_count(f0, jd, jnp.float32(lam), *args))
  want = _expected_counts(lin_out, cands, label_cand, task_mask, row_mask, cfg.eos_token_id)
  assert tuple(got[1:]) == want
  assert want[1] + want[2] > 0


# ----------------------------------------------------------------------------- configs


def test_linear_schedule_closed_form():
  peak, total, warm = 0.1, 20, 4
  fn = train_lib.warmup_linear_schedule(peak, total, warm)
  for t in range(total + 3):
    want = peak * (t + 1) / warm if t < warm else peak * max(0.0, (total - t) / (total - warm))
    assert float(fn(t)) == pytest.approx(want, rel=1e-6, abs=1e-9), t
  no_warm = train_lib.make_schedule("linear", peak, total, 0)
  assert float(no_warm(0)) == pytest.approx(peak)
  assert float(no_warm(total // 2)) == pytest.approx(peak / 2)
  assert float(no_warm(total)) == 0.0
  hf = train_lib.warmup_linear_schedule(peak, total, warm, warmup_offset=0)  # HF's convention
  assert float(hf(2)) == pytest.approx(peak * 2 / warm)
  with pytest.raises(ValueError, match="unknown schedule"):
    train_lib.make_schedule("step", peak, total, 0)
  with pytest.raises(ValueError, match="optim.schedule"):
    config_lib.OptimConfig(schedule="step")


def test_text_overrides_and_defaults():
  cfg = config_lib.apply_overrides(defaults.text_config(), [
      "text.pretrain_steps=7", "text.sizes=10,5,5", "text.score=rank", "optim.schedule=cosine"])
  assert cfg.text.pretrain_steps == 7 and cfg.text.sizes == (10, 5, 5)
  assert cfg.text.score == "rank" and cfg.optim.schedule == "cosine"
  assert "text.pretrain_steps" in config_lib.config_keys(cfg)
  with pytest.raises(ValueError, match="text.score"):
    config_lib.apply_overrides(cfg, ["text.score=bleu"])
  with pytest.raises(ValueError, match="unknown key"):
    config_lib.apply_overrides(cfg, ["text.pretrain_step=7"])
  base = defaults.text_config()
  assert (base.suite, base.steps, base.batch_size, base.optim.lr, base.optim.warmup_steps,
          base.optim.schedule) == ("text", 600, 32, 1e-3, 10, "linear")
  t = base.text
  assert (t.d_model, t.num_layers, t.num_decoder_layers, t.num_heads, t.d_ff,
          t.feed_forward_proj, t.tie_word_embeddings) == (64, 2, 1, 4, 256, "gated-gelu", False)
  assert (t.pretrain_steps, t.pretrain_batch_size, t.pretrain_lr, t.sizes) == (
      1000, 64, 1e-3, (2000, 100, 200))
  assert (t.vocab, t.level, t.pretrain_task_share, t.max_input_len) == ("word", "lexical", 0.5, 32)
  # ASAM's radius: dimension-matched to Flan-T5-base (0.5·√(d/247,577,856), rounded)
  cfg5 = text_suite.offline_t5_config(t, text_suite.offline_vocab(t))
  shapes = jax.eval_shape(lambda k: models.init_t5_params(cfg5, k), jax.random.key(0))
  d = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert base.optim.asam_rho == pytest.approx(0.5 * np.sqrt(d / 247_577_856), abs=5e-4)


def test_unknown_suite_errors(capsys):
  with pytest.raises(ValueError, match="unknown suite 'imdb'; known: offline, clip, text, glue"):
    config_lib.ReproduceConfig(suite="imdb")
  with pytest.raises(ValueError, match="unknown suite"):
    defaults.default_config("imdb")
  with pytest.raises(SystemExit):
    cli.main(["reproduce", "--suite", "imdb"])
  assert "invalid choice" in capsys.readouterr().err
  with pytest.raises(ValueError, match="unknown task"):
    text_suite.build_offline_text_suite(_config(tasks=("sst2",)), "/nonexistent")


def test_vision_fingerprints_are_unchanged():
  """Run fingerprints of the vision suites do not see the text settings nor a default
  schedule (digests as before those fields existed)."""
  base = defaults.offline_config()
  assert sweep._digest(sweep.finetune_fingerprint(base, "none")) == "bfedff6dddf5"
  assert sweep._digest(sweep.finetune_fingerprint(base, "asam")) == "74705b17cd6d"
  assert sweep._digest(sweep._suite_fields(base)) == "f0e509d026f8"
  fp = sweep.finetune_fingerprint(base, "none")
  assert "text" not in fp and "schedule" not in fp["optim"]
  other_text = dataclasses.replace(base, text=config_lib.TextConfig(d_model=8))
  assert sweep.finetune_fingerprint(other_text, "none") == fp
  linear = config_lib.apply_overrides(base, ["optim.schedule=linear"])
  assert sweep.finetune_fingerprint(linear, "none")["optim"]["schedule"] == "linear"
  text = _config()
  assert sweep.finetune_fingerprint(text, "none")["text"]["d_model"] == 16
  assert "text" in sweep._suite_fields(text)


def test_ftlo_mask_selects_t5_attention_kernels():
  cfg = t5_lib.T5Config(vocab_size=16, d_model=8, d_kv=4, d_ff=16, num_layers=2,
                        num_decoder_layers=1, num_heads=2, tie_word_embeddings=False)
  params = jax.eval_shape(lambda k: models.init_t5_params(cfg, k), jax.random.key(0))
  mask = models.ftlo_mask(params)
  chosen = {jax.tree_util.keystr(p, simple=True, separator="/")
            for p, m in jax.tree_util.tree_leaves_with_path(mask) if m}
  want = {f"encoder/blocks_{i}/self_attn/{x}/kernel" for i in range(2) for x in "qkvo"}
  want |= {f"decoder/blocks_0/{a}/{x}/kernel" for a in ("self_attn", "cross_attn")
           for x in "qkvo"}
  assert chosen == want
  # CLIP naming keeps its behaviour
  clip_like = {"blocks_0": {"attn": {"out": {"kernel": 0, "bias": 0}, "o": {"kernel": 0}},
                            "self_attn": {"out": {"kernel": 0}}}}
  flags = {jax.tree_util.keystr(p, simple=True, separator="/"): m
           for p, m in jax.tree_util.tree_leaves_with_path(models.ftlo_mask(clip_like))}
  assert flags == {"blocks_0/attn/out/kernel": True, "blocks_0/attn/out/bias": False,
                   "blocks_0/attn/o/kernel": False, "blocks_0/self_attn/out/kernel": False}


@pytest.mark.parametrize("vocab_name", ["word", "byte"])
def test_pretext_pretraining_changes_every_leaf_and_lowers_the_loss(vocab_name):
  from saft_jax.experiment.text_pretrain import pretrain_text_t5
  text = config_lib.TextConfig(**dict(TINY_TEXT, pretrain_steps=30, pretrain_batch_size=16,
                                      pretrain_lr=1e-2, vocab=vocab_name))
  vocab = text_suite.offline_vocab(text)
  cfg = text_suite.offline_t5_config(text, vocab)
  p0 = t5_lib.init_t5_params(cfg, jax.random.key(0))
  p1 = pretrain_text_t5(cfg, vocab, text, seed=0)
  assert jax.tree.structure(p0) == jax.tree.structure(p1)
  for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)):
    assert np.isfinite(np.asarray(b)).all()
    assert not np.allclose(np.asarray(a), np.asarray(b))
  # span-corruption loss on fresh pretext pairs: lower after pre-training than at init
  from saft_jax.data import text_offline
  rng = np.random.default_rng(123)
  pairs = [text_offline.span_corruption(s, rng) for s in text_offline.pretext_corpus(5, 32)]
  ii, im = vocab.encode([p[0] for p in pairs], text.max_input_len)
  lab = text_suite.target_ids(vocab, [p[1] for p in pairs], text.max_target_len)
  loss = lambda p: float(text_finetune.logits_cross_entropy(
      text_finetune.label_logits(cfg, p, ii, im, lab), lab))
  assert loss(p1) < loss(p0) - 0.5
