"""The glue suite of `saft reproduce`: a T5 directory on disk + TFDS GLUE (mock data)."""
import json
import os

import jax
import pytest

from saft_jax import cli, models
from saft_jax.experiment import config as config_lib, defaults, runner, text_suite

TASKS = ("cola", "rte")
# The model sizes of tests/experiment/test_text_suite.py: the compiled steps are shared.
TINY_TEXT = dict(d_model=16, num_layers=1, num_decoder_layers=1, num_heads=2, d_ff=32,
                 max_input_len=64, max_target_len=16, pretrain_steps=0, sizes=(24, 16, 16))
PIECES = ["▁the", "▁a", "▁", "_"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]


def _write_checkpoint(path):
  """A tiny Hugging Face T5 directory (save_t5) with a T5 Unigram tokenizer."""
  transformers = pytest.importorskip("transformers")
  cfg = text_suite.offline_t5_config(config_lib.TextConfig(**TINY_TEXT),
                                     models.ByteVocab(extra_ids=0))
  params = jax.jit(models.init_t5_params, static_argnums=0)(cfg, jax.random.key(1))
  models.save_t5(models.T5(cfg, params), path)
  vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [
      (p, -1.0 - 0.01 * i) for i, p in enumerate(PIECES)]
  transformers.T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(path)
  return cfg


def _config(ckpt, **kw):
  base = dict(suite="glue", tasks=TASKS, finetunes=("sgd",), safts=("none",),
              merges=("task_arithmetic",), steps=4, batch_size=8, eval_every=2,
              checkpoint_every=4, eval_batch_size=16, mesh_shape=1,
              optim=config_lib.OptimConfig(lr=1e-2, warmup_steps=1, schedule="linear"),
              text=config_lib.TextConfig(t5_checkpoint=ckpt, score="exact", **TINY_TEXT))
  base.update(kw)
  return config_lib.ReproduceConfig(**base)


@pytest.fixture(scope="module")
def glue_run(tmp_path_factory):
  tfds = pytest.importorskip("tensorflow_datasets")
  ckpt = str(tmp_path_factory.mktemp("t5"))
  cfg = _write_checkpoint(ckpt)
  out = str(tmp_path_factory.mktemp("glue_run"))
  with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
    records = runner.reproduce(_config(ckpt), out)
    suite = runner.build_suite(_config(ckpt), out)
  return out, records, suite, cfg


def test_glue_reproduce_end_to_end(glue_run):
  out, records, suite, cfg = glue_run
  for name in ("config.json", "results.json", "results.md", "meta.json"):
    assert os.path.exists(os.path.join(out, name)), name
  assert os.path.exists(os.path.join(out, "ft", "sgd-none", "seed0", "rte",
                                     "task_vector.msgpack"))
  assert records == json.load(open(os.path.join(out, "results.json")))
  assert len(records) == 3 * len(TASKS)  # protocols × tasks
  for r in records:
    assert r["abs_acc"] == r["exact_acc"]  # text.score = "exact"
    assert 0 <= r["rank_acc"] <= 1
    assert sum(r["label_words"].values()) == pytest.approx(1.0)
    if r["ft_acc"] > 0:
      assert r["norm_acc"] == pytest.approx(r["abs_acc"] / r["ft_acc"])
  meta = json.load(open(os.path.join(out, "meta.json")))
  assert meta["suite"] == "glue" and meta["score"] == "exact"
  assert meta["label_word_candidates"] == ["unacceptable", "acceptable", "entailment",
                                           "not_entailment"]
  assert "exact match" in open(os.path.join(out, "results.md")).read()


def test_glue_suite_model_tokens_and_splits(glue_run):
  _, _, suite, cfg = glue_run
  assert suite.t5 == cfg
  # test = GLUE validation (20 mock examples); val = held-out part of GLUE train
  for task in TASKS:
    t = suite.tasks[task]
    assert t.num_examples("test") == 20
    assert t.num_examples("train") + t.num_examples("val") == 20
    assert 0 < t.num_examples("val") < t.num_examples("train")
  # candidates are tokenized with the checkpoint's tokenizer, EOS last
  for word, ids in zip(suite.candidates, suite.candidate_ids):
    real = [int(i) for i in ids if i >= 0]
    assert real[-1] == cfg.eos_token_id and cfg.eos_token_id not in real[:-1]
    assert models.decode_texts(suite.tokenizer, [real])[0] == word


def test_missing_t5_checkpoint_errors(tmp_path, monkeypatch, capsys):
  with pytest.raises(ValueError, match="T5_CHECKPOINT"):
    runner.build_suite(_config(None), str(tmp_path))
  missing = str(tmp_path / "no_such_t5")
  with pytest.raises(FileNotFoundError, match="no_such_t5"):
    runner.build_suite(_config(missing), str(tmp_path))
  monkeypatch.delenv("T5_CHECKPOINT", raising=False)
  rc = cli.main(["reproduce", "--suite", "glue", "--out", str(tmp_path / "run")])
  assert rc == 2
  assert "T5_CHECKPOINT" in capsys.readouterr().err


def test_glue_config_is_the_papers_protocol(monkeypatch):
  monkeypatch.setenv("T5_CHECKPOINT", "/x/flan-t5-base")
  monkeypatch.setenv("TFDS_DATA_DIR", "/x/tfds")
  cfg = defaults.default_config("glue")
  o = cfg.optim
  assert (cfg.suite, cfg.tasks, cfg.steps, cfg.batch_size) == (
      "glue", ("cola", "mrpc", "rte", "sst2"), 8000, 16)
  assert (o.lr, o.warmup_steps, o.schedule) == (1e-4, 0, "linear")
  assert cfg.finetunes == ("sgd", "ftts", "ftlo") and cfg.safts == ("none", "asam")
  assert (cfg.text.t5_checkpoint, cfg.text.data_dir, cfg.text.score) == (
      "/x/flan-t5-base", "/x/tfds", "exact")
  path = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "configs",
                      "flan_t5_glue.py")
  assert config_lib.load_config_file(path) == cfg
