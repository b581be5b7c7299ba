"""`saft merge` on Hugging Face sharded checkpoints (a tiny Llama written by transformers)."""
import os

import numpy as np
import pytest

from saft_jax import cli

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _llama(seed):
  cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=32)
  torch.manual_seed(seed)
  return transformers.LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  d = tmp_path_factory.mktemp("llama")
  base = _llama(0)
  base.save_pretrained(str(d / "base"), max_shard_size="40KB")
  gen = torch.Generator().manual_seed(1)
  for i in range(3):
    ft = _llama(0)
    with torch.no_grad():
      for p in ft.parameters():
        p.add_(0.02 * torch.randn(p.shape, generator=gen))
    ft.save_pretrained(str(d / f"ft{i}"), max_shard_size="60KB" if i == 1 else "40KB")
  return d


def _params(path):
  model = transformers.LlamaForCausalLM.from_pretrained(path)
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def test_task_arithmetic_on_sharded_checkpoints(dirs, tmp_path, capsys):
  assert len([f for f in os.listdir(dirs / "base") if f.endswith(".safetensors")]) > 2
  out = str(tmp_path / "merged")
  assert cli.main(["merge", "--base", str(dirs / "base"), "--models"]
                  + [str(dirs / f"ft{i}") for i in range(3)]
                  + ["--method", "task_arithmetic", "--lam", "0.3", "--out", out]) == 0
  assert "streaming" in capsys.readouterr().out
  assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
  assert os.path.exists(os.path.join(out, "config.json"))
  base, merged = _params(str(dirs / "base")), _params(out)
  fts = [_params(str(dirs / f"ft{i}")) for i in range(3)]
  for k, b in base.items():
    want = b + 0.3 * sum(ft[k] - b for ft in fts)
    np.testing.assert_allclose(merged[k], want, rtol=1e-5, atol=1e-6, err_msg=k)


def test_sharded_checkpoints_refuse_in_memory_merges(dirs, tmp_path, capsys):
  args = ["merge", "--base", str(dirs / "base"), "--models", str(dirs / "ft0"),
          str(dirs / "ft1")]
  for extra in (["--method", "magmax"], ["--method", "ties", "--no-stream"],
                ["--method", "ties", "--format", "safetensors"]):
    assert cli.main(args + extra + ["--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "sharded Hugging Face checkpoint" in err and "streaming only" in err
    assert not os.path.exists(tmp_path / "x")
