"""`saft finetune` / `saft eval` on a CLIP checkpoint written by transformers (mock TFDS
data): the export loads in transformers, and missing task data names the command that
prepares it."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tfds = pytest.importorskip("tensorflow_datasets")

import hf_utils  # noqa: E402

from saft_jax import cli  # noqa: E402

SETTINGS = ["steps=2", "batch_size=8", "eval_every=2", "checkpoint_every=2",
            "eval_batch_size=16", "mesh_shape=1", "compute_dtype=float32",
            # tfds.testing.mock_data patches file I/O that orbax's background commit
            # thread relies on; synchronous saves are unaffected.
            "async_checkpoint=false"]


def _sets(extra=()):
  return [a for s in SETTINGS + list(extra) for a in ("--set", s)]


def _run(*argv):
  return cli.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("clip"))
  hf_utils.tiny_hf_model("quick_gelu", legacy_eos=True).save_pretrained(d)
  hf_utils.write_tiny_tokenizer(d)
  return d


def test_missing_task_data_names_the_prepare_command(checkpoint, tmp_path, capsys):
  empty = tmp_path / "tfds"
  empty.mkdir()
  for argv in (["finetune", "--model", checkpoint, "--task", "eurosat"],
               ["eval", "--model", checkpoint, "--tasks", "eurosat"]):
    out = tmp_path / argv[0]
    assert _run(*argv, *_sets([f"data_dir={empty}"]), "--out", out) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"saft {argv[0]}: error: ") and "'eurosat'" in err
    assert f"tfds build eurosat" in err and str(empty) in err


@pytest.fixture(scope="module")
def finetuned(checkpoint, tmp_path_factory):
  out = tmp_path_factory.mktemp("ft") / "mnist"
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    assert _run("finetune", "--model", checkpoint, "--task", "mnist", "--saft", "none",
                *_sets(), "--out", out) == 0
  return out


def test_finetune_exports_a_transformers_checkpoint(checkpoint, finetuned):
  from transformers import CLIPModel
  before = {k: v.numpy() for k, v in CLIPModel.from_pretrained(checkpoint).state_dict().items()}
  after = {k: v.numpy() for k, v in
           CLIPModel.from_pretrained(str(finetuned / "model")).state_dict().items()}
  assert set(after) == set(before)
  moved = [k for k in before if not np.array_equal(before[k], after[k])]
  assert moved and all(k.startswith(("vision_model.", "visual_projection.")) for k in moved)
  assert os.path.exists(finetuned / "model" / "vocab.json")  # tokenizer files travel along
  assert json.load(open(finetuned / "run.json"))["model"] == checkpoint


def test_eval_with_zero_shot_heads(checkpoint, finetuned, tmp_path):
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    assert _run("eval", "--model", finetuned / "model", "--base", checkpoint, "--tasks",
                "mnist", *_sets(), "--out", tmp_path / "eval.json") == 0
  result = json.load(open(tmp_path / "eval.json"))
  assert result["suite"] == "clip" and 0.0 <= result["accuracy"]["mnist"] <= 1.0
