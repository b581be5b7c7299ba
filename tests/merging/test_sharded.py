"""Streaming merges of Hugging Face sharded safetensors checkpoints (a tiny Llama written by
transformers), and TIES's in-place majority-sign patches, against the in-memory merges."""
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from saft_jax import merging as m

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

T = 3
CASES = [("task_arithmetic", {"lam": [0.3, 0.5, 0.7]}),
         ("ties", {"lam": 0.8, "k": 0.3, "trim": "global"}),
         ("ties", {"lam": 0.8, "k": 0.2, "trim": "per_leaf", "keep": "reference"}),
         ("weight_average", {})]


def _tiny_llama(dtype, seed):
  cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=64)
  torch.manual_seed(seed)
  return transformers.LlamaForCausalLM(cfg).to(dtype)


def _np(t):
  """torch tensor -> NumPy (bf16 through its bit pattern)."""
  t = t.detach().contiguous()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def _read_dir(d):
  out = {}
  for f in sorted(os.listdir(d)):
    if f.endswith(".safetensors"):
      with safe_open(os.path.join(d, f), "numpy") as g:
        out.update({k: g.get_tensor(k) for k in g.keys()})
  return out


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def llama_dirs(request, tmp_path_factory):
  dtype = request.param
  d = tmp_path_factory.mktemp(f"llama_{str(dtype).split('.')[-1]}")
  pre = _tiny_llama(dtype, 0)
  pre.save_pretrained(str(d / "pre"), max_shard_size="50KB")
  sd = pre.state_dict()
  gen = torch.Generator().manual_seed(1)
  for i in range(T):
    ft = _tiny_llama(dtype, 0)
    with torch.no_grad():
      for name, p in ft.named_parameters():
        p.add_((0.02 * torch.randn(p.shape, generator=gen)).to(dtype))
    # A different shard size for one model: the merge goes by tensor name, not by shard.
    ft.save_pretrained(str(d / f"ft{i}"), max_shard_size="80KB" if i == 1 else "50KB")
  del sd
  return d


def test_sharded_stream_merge_loads_in_transformers(llama_dirs, tmp_path):
  d = llama_dirs
  pre_p, ft_ps = str(d / "pre"), [str(d / f"ft{i}") for i in range(T)]
  assert m.checkpoint_format(pre_p) == "safetensors_sharded"
  shards = [f for f in os.listdir(pre_p) if f.endswith(".safetensors")]
  assert len(shards) > 2
  theta0 = {k: jnp.asarray(v) for k, v in _read_dir(pre_p).items()}
  thetas = [{k: jnp.asarray(v) for k, v in _read_dir(p).items()} for p in ft_ps]
  tvs = [m.task_vector(theta0, t) for t in thetas]
  with open(os.path.join(pre_p, "model.safetensors.index.json")) as f:
    index_in = json.load(f)
  for method, kw in CASES:
    out_p = str(tmp_path / f"out_{method}_{kw.get('trim')}")
    stats = m.stream_merge(pre_p, ft_ps, out_p, method, chunk_bytes=4096, **kw)
    assert stats["chunks"] > 10
    if method == "weight_average":
      ref = m.weight_average(thetas)
    elif method == "task_arithmetic":
      ref = m.task_arithmetic(theta0, tvs, jnp.asarray(kw["lam"]))
    else:
      ref = m.ties(theta0, tvs, kw["lam"], k=kw["k"], trim=kw["trim"],
                   keep=kw.get("keep", "exact"))
    # Same files, same index (shard split and total size) as transformers wrote them.
    assert sorted(os.listdir(out_p)) == sorted(os.listdir(pre_p))
    with open(os.path.join(out_p, "model.safetensors.index.json")) as f:
      index_out = json.load(f)
    assert index_out["weight_map"] == index_in["weight_map"]
    assert index_out["metadata"]["total_size"] == index_in["metadata"]["total_size"]
    got = _read_dir(out_p)
    assert set(got) == set(ref)
    for k, v in ref.items():
      assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
      np.testing.assert_array_equal(got[k], np.asarray(v), err_msg=f"{method} {kw} {k}")
    # transformers loads the merged directory, with exactly the merged weights.
    model = transformers.LlamaForCausalLM.from_pretrained(out_p)
    sd = model.state_dict()
    for k, v in ref.items():
      np.testing.assert_array_equal(_np(sd[k]), np.asarray(v), err_msg=k)
    assert not any(f.endswith(".partial") for f in os.listdir(tmp_path))


def test_sharded_output_into_existing_dir_needs_overwrite(llama_dirs, tmp_path):
  d = llama_dirs
  out_p = str(tmp_path / "out")
  os.makedirs(out_p)
  with pytest.raises(FileExistsError):
    m.stream_merge(str(d / "pre"), [str(d / "ft0")], out_p)
  m.stream_merge(str(d / "pre"), [str(d / "ft0")], out_p, overwrite=True)
  assert os.path.exists(os.path.join(out_p, "config.json"))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_ties_majority_patch_matches_in_memory(tmp_path, sign):
  # Grid values: many entries whose elected sum is exactly 0 with kept entries, so the
  # majority sign decides them; ``sign`` makes the majority positive or negative.
  rng = np.random.default_rng(4)
  pre = {"a": rng.integers(-4, 5, (300, 7)).astype(np.float32) / 4,
         "b": (rng.integers(-4, 5, (500,)) / 4).astype(ml_dtypes.bfloat16)}
  fts = []
  for i in range(T):
    ft = {}
    for k_, v in pre.items():
      d = rng.integers(-2, 3, v.shape) / 4 + sign * 0.25 * (rng.random(v.shape) < 0.2)
      ft[k_] = (v.astype(np.float32) + d).astype(v.dtype)
    fts.append(ft)
  save_file(pre, str(tmp_path / "pre.safetensors"))
  for i, ft in enumerate(fts):
    save_file(ft, str(tmp_path / f"ft{i}.safetensors"))
  theta0 = {k_: jnp.asarray(v) for k_, v in pre.items()}
  tvs = [m.task_vector(theta0, {k_: jnp.asarray(v) for k_, v in ft.items()}) for ft in fts]
  for trim in ("global", "per_leaf"):
    out = str(tmp_path / f"out_{trim}.safetensors")
    stats = m.stream_merge(str(tmp_path / "pre.safetensors"),
                           [str(tmp_path / f"ft{i}.safetensors") for i in range(T)], out,
                           "ties", lam=0.7, k=0.5, trim=trim, chunk_bytes=512)
    ref = m.ties(theta0, tvs, 0.7, k=0.5, trim=trim)
    with safe_open(out, "numpy") as f:
      got = {k_: f.get_tensor(k_) for k_ in f.keys()}
    for k_ in pre:
      np.testing.assert_array_equal(got[k_], np.asarray(ref[k_]), err_msg=f"{trim} {k_}")
    assert (stats["patched"] > 0) == (sign > 0), stats
    assert stats["passes"] == 2, stats
