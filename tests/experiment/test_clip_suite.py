"""The CLIP suite end to end: a tiny transformers CLIP checkpoint written by the test,
mock TFDS data, zero-shot heads from the text tower, fine-tune + merge + report."""
import json
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tfds = pytest.importorskip("tensorflow_datasets")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "models"))
import hf_utils  # noqa: E402

from saft_jax import models  # noqa: E402
from saft_jax.experiment import config as config_lib, runner  # noqa: E402
from saft_jax.experiment import clip_suite  # noqa: E402
from saft_jax.experiment.clip_suite import build_clip_suite  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("clip"))
  hf_utils.tiny_hf_model("quick_gelu", legacy_eos=True).save_pretrained(d)
  hf_utils.write_tiny_tokenizer(d)
  return d


def _config(ckpt, **kw):
  base = dict(suite="clip", tasks=("mnist", "svhn"), finetunes=("sgd",), safts=("none", "asam"),
              merges=("task_arithmetic", "ties"), steps=3, batch_size=8, eval_every=3,
              checkpoint_every=3, eval_batch_size=16, clip_checkpoint=ckpt,
              # tfds.testing.mock_data patches file I/O that orbax's background commit
              # thread relies on; synchronous saves are unaffected.
              async_checkpoint=False, mesh_shape=1)
  base.update(kw)
  return config_lib.ReproduceConfig(**base)


def test_clip_suite_reproduce(checkpoint, tmp_path):
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    records = runner.reproduce(_config(checkpoint), str(tmp_path))
  assert {r["task"] for r in records} == {"mnist", "svhn"}
  assert {r["saft"] for r in records} == {"none", "asam"}
  for r in records:
    assert 0.0 <= r["abs_acc"] <= 1.0
  assert os.path.exists(os.path.join(tmp_path, "results.md"))
  assert json.load(open(os.path.join(tmp_path, "meta.json")))["suite"] == "clip"


def test_clip_suite_heads_are_zero_shot_heads(checkpoint, tmp_path):
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    suite = build_clip_suite(_config(checkpoint), str(tmp_path))
  clip = models.load_clip(checkpoint)
  tok = models.load_tokenizer(checkpoint)
  want = models.zeroshot_head(clip, tok, models.get_classnames("MNIST"),
                              models.get_templates("MNIST"))
  np.testing.assert_allclose(np.asarray(suite.heads["mnist"]), np.asarray(want), rtol=1e-6)
  assert suite.vision == clip.config.vision


def test_clip_suite_errors(tmp_path, checkpoint):
  with pytest.raises(ValueError, match="clip_checkpoint"):
    build_clip_suite(_config(None), str(tmp_path))
  with pytest.raises(FileNotFoundError, match="not found"):
    build_clip_suite(_config(str(tmp_path / "nope")), str(tmp_path))
  with pytest.raises(ValueError, match="unknown CLIP task"):
    build_clip_suite(_config(checkpoint, tasks=("imagenet",)), str(tmp_path))


# ------------------------------------------------------- open_clip: activation and tokenizer
@pytest.fixture(scope="module")
def open_clip_file(tmp_path_factory):
  """A bare open_clip state dict (GELU weights, widths multiple of 64) and a BPE vocabulary
  file in open_clip's format (no merges: 514 tokens, the model's vocabulary)."""
  import gzip
  import safetensors.torch
  d = tmp_path_factory.mktemp("oc")
  model = hf_utils.tiny_hf_model("gelu", legacy_eos=True, vocab_size=514, text=(64, 1),
                                 vision=(128, 2))
  sd = hf_utils.open_clip_state_dict(model)
  path = str(d / "open_clip_model.safetensors")
  safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, path)
  bpe = str(d / "bpe_simple_vocab_16e6.txt.gz")
  with gzip.open(bpe, "wt") as f:
    f.write("\"bpe_simple_vocab_16e6.txt#version: 0.2\n")
  return path, bpe


def test_clip_suite_open_clip_file_needs_clip_act(open_clip_file, tmp_path, monkeypatch):
  path, bpe = open_clip_file
  with pytest.raises(models.UnknownActivationError, match=r"(?s)quick_gelu.*--set clip_act="):
    build_clip_suite(_config(path, tokenizer_dir=bpe), str(tmp_path))
  cfg = _config(path, tokenizer_dir=bpe, clip_act="gelu", tasks=("mnist",))
  # the data do not enter the heads: skip the (slow) mock-data pipeline
  monkeypatch.setattr(clip_suite.data_lib, "load_task", lambda name, **kw: name)
  suite = build_clip_suite(cfg, str(tmp_path / "a"))
  clip = models.load_clip(path, act="gelu")
  tok = models.load_tokenizer(bpe)
  assert isinstance(tok, models.BPETokenizer)
  want = models.zeroshot_head(clip, tok, models.get_classnames("MNIST"),
                              models.get_templates("MNIST"))
  np.testing.assert_allclose(np.asarray(suite.heads["mnist"]), np.asarray(want), rtol=1e-6)
  assert suite.vision == clip.config.vision and suite.vision.act == "gelu"
  # clip_act reaches load_clip as act= (which wins over what a checkpoint records)
  seen = []

  class Stop(Exception):
    pass

  def spy(p, **kw):
    seen.append((p, kw))
    raise Stop

  monkeypatch.setattr(models, "load_clip", spy)
  with pytest.raises(Stop):
    build_clip_suite(config_lib.replace(cfg, clip_act="quick_gelu"), str(tmp_path / "b"))
  assert seen == [(path, {"act": "quick_gelu"})]


def test_clip_act_config_field():
  cfg = config_lib.apply_overrides(_config("x"), ["clip_act=gelu"])
  assert cfg.clip_act == "gelu"
  assert config_lib.apply_overrides(cfg, ["clip_act=none"]).clip_act is None
  with pytest.raises(ValueError, match="clip_act.*gelu.*quick_gelu"):
    _config("x", clip_act="relu")
