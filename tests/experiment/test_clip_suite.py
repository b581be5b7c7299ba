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
