"""T5 against transformers' PyTorch T5ForConditionalGeneration (independent reference).

Two layouts: T5 v1.0 (ReLU feed-forward, tied embeddings, scaled LM head) and T5 v1.1 /
Flan-T5 (gated-GELU, separate lm_head, here with more decoder than encoder layers).
"""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from saft_jax import models as M  # noqa: E402
from saft_jax.models import t5 as T  # noqa: E402

VOCAB = 100
LAYOUTS = {
    "v1_0": dict(feed_forward_proj="relu", tie_word_embeddings=True, num_decoder_layers=2),
    "v1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                 num_decoder_layers=3),
}
# std * sqrt(fan_in) of the redrawn projection weights: large enough for varied greedy
# outputs, small enough to keep float32 rounding (of transformers too) near 1e-6
WEIGHT_SCALE = {"v1_0": 2.0, "v1_1": 1.0}
REL_TOL = 1e-5  # atol = REL_TOL * max|reference|

# the methods of `T5` are jitted: calling them (rather than the bare functions) shares
# one compilation per config, shapes and options across the tests


def _tiny_torch(layout: str, seed: int = 0):
  """A tiny random transformers T5ForConditionalGeneration (float32, eval).

  Weights are redrawn with larger scales than transformers' init (random norm scales,
  O(1) relative-position biases) so that attention patterns and greedy outputs vary.
  """
  from transformers import T5Config, T5ForConditionalGeneration
  cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                 relative_attention_num_buckets=8, relative_attention_max_distance=16,
                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **LAYOUTS[layout])
  torch.manual_seed(seed)
  model = T5ForConditionalGeneration(cfg).eval()
  tied = model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr()
  if tied and not LAYOUTS[layout]["tie_word_embeddings"]:
    # transformers 5 always builds a tied head (and keeps a distinct one it loads): untie
    model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 32))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.copy_(1 + 0.2 * torch.randn_like(p))
      elif name in ("shared.weight", "lm_head.weight") or "relative_attention_bias" in name:
        p.copy_(torch.randn_like(p))
      else:
        p.copy_(WEIGHT_SCALE[layout] * torch.randn_like(p) / p.shape[1] ** 0.5)
  return model


def _inputs(seed: int = 0):
  """Right-padded encoder inputs of lengths 11, 7, 3 and labels padded with -100."""
  rng = np.random.default_rng(seed)
  lengths = (11, 7, 3)
  ids = np.zeros((3, 11), np.int64)
  mask = np.zeros((3, 11), np.int64)
  for i, n in enumerate(lengths):
    ids[i, :n - 1] = rng.integers(3, VOCAB, size=n - 1)
    ids[i, n - 1] = 1
    mask[i, :n] = 1
  labels = rng.integers(3, VOCAB, size=(3, 6)).astype(np.int64)
  labels[1, 4:] = -100
  labels[2, 2:] = -100
  return ids, mask, labels


def _torch_logits(model, ids, mask, dec, dec_mask=None):
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                decoder_input_ids=torch.from_numpy(np.asarray(dec, np.int64)),
                decoder_attention_mask=None if dec_mask is None else torch.from_numpy(dec_mask))
  return out.logits.numpy()


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
  """transformers' generate is many small ops: with the CPU shared, one thread is ~20x
  faster than torch's default pool."""
  prev = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(prev)


def _close(ours, ref, rel=REL_TOL):
  np.testing.assert_allclose(ours, ref, rtol=0, atol=rel * float(np.abs(ref).max()))


_BUILT = {}


def _build(layout, tmp_path_factory):
  """The tiny torch model of `layout`, saved and loaded back, with inputs and reference
  logits (built once per session)."""
  if layout not in _BUILT:
    model = _tiny_torch(layout)
    path = str(tmp_path_factory.mktemp("t5") / layout)
    model.save_pretrained(path)
    assert os.path.isfile(os.path.join(path, "model.safetensors"))
    ids, mask, labels = _inputs()
    dec = np.asarray(T.shift_right(labels, 0, 0))
    _BUILT[layout] = dict(layout=layout, model=model, path=path, t5=M.load_t5(path), ids=ids,
                          mask=mask, labels=labels, dec=dec,
                          ref=_torch_logits(model, ids, mask, dec))
  return _BUILT[layout]


@pytest.fixture(scope="module", params=list(LAYOUTS))
def hf(request, tmp_path_factory):
  return _build(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def hf11(tmp_path_factory):
  """The T5 v1.1 layout alone, for the tests that need only one."""
  return _build("v1_1", tmp_path_factory)


# ----------------------------------------------------------------------------- parity
def test_config_from_checkpoint(hf):
  cfg = hf["t5"].config
  v10 = hf["layout"] == "v1_0"
  assert cfg.tie_word_embeddings is v10 and cfg.scale_decoder_outputs is v10
  assert cfg.feed_forward_proj == ("relu" if v10 else "gated-gelu")
  assert (cfg.num_layers, cfg.num_decoder_layers) == (2, 2 if v10 else 3)
  assert ("lm_head" in hf["t5"].params) is (not v10)
  assert cfg.inner_dim == 32 and cfg.relative_attention_num_buckets == 8
  for leaf in jax.tree.leaves(hf["t5"].params):
    assert leaf.dtype == jnp.float32


def test_logits_match_transformers(hf):
  t5, ids, mask, dec = hf["t5"], hf["ids"], hf["mask"], hf["dec"]
  # a decoder padding mask on top of the causal mask (None, the causal mask alone, is
  # what sequence_logprob uses: compared with transformers below)
  dec_mask = (hf["labels"] != -100).astype(np.int64)
  dec_mask[:, 0] = 1
  ref = _torch_logits(hf["model"], ids, mask, dec, dec_mask)
  ours = np.asarray(t5.logits(t5.params, ids, mask, dec, dec_mask))
  assert ours.shape == (3, 6, VOCAB) and ours.dtype == np.float32
  _close(ours, ref)
  # the causal mask hides the padded decoder keys from every real position
  real = dec_mask.astype(bool)
  _close(ours[real], hf["ref"][real])


def test_encoder_matches_transformers(hf):
  t5, ids, mask = hf["t5"], hf["ids"], hf["mask"]
  with torch.no_grad():
    ref = hf["model"].encoder(input_ids=torch.from_numpy(ids),
                              attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
  ours = np.asarray(t5.encode(t5.params, ids, mask))
  assert ours.shape == (3, 11, 32)
  _close(ours, ref)


def test_greedy_matches_generate(hf):
  t5, ids, mask, model = hf["t5"], hf["ids"], hf["mask"], hf["model"]
  max_len = 8
  # transformers' cache assumes as many decoder as encoder layers; recompute otherwise
  use_cache = t5.config.num_layers == t5.config.num_decoder_layers
  kw = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
            do_sample=False, num_beams=1, max_new_tokens=max_len, use_cache=use_cache)
  with torch.no_grad():
    free = model.generate(**kw).numpy()
  # end-of-sequence on a token that the first sequence produces, so that sequences end at
  # different steps (pad after EOS) and the generation may stop early
  eos = int(free[0, 3])
  with torch.no_grad():
    ref = model.generate(**kw, eos_token_id=eos, pad_token_id=0).numpy()
  assert (ref[:, 0] == 0).all()
  ref = np.pad(ref[:, 1:], ((0, 0), (0, max_len + 1 - ref.shape[1])))
  cfg = dataclasses.replace(t5.config, eos_token_id=eos)
  ours = np.asarray(T.greedy_decode(cfg, t5.params, ids, mask, max_len))
  assert ours.shape == (3, max_len) and ours.dtype == np.int32
  np.testing.assert_array_equal(ours, ref)
  assert (ours == eos).any()
  assert len({tuple(r) for r in ours.tolist()}) > 1  # not a degenerate model


def test_save_roundtrip(hf, tmp_path):
  from safetensors.numpy import load_file
  from transformers import T5ForConditionalGeneration
  t5, out = hf["t5"], str(tmp_path / "out")
  M.save_t5(t5, out)
  keys = set(load_file(os.path.join(out, "model.safetensors")))
  assert keys == set(load_file(os.path.join(hf["path"], "model.safetensors")))
  reloaded = T5ForConditionalGeneration.from_pretrained(out).eval()
  scaled = getattr(reloaded.config, "scale_decoder_outputs", reloaded.config.tie_word_embeddings)
  assert scaled is t5.config.scale_decoder_outputs
  ref = _torch_logits(reloaded, hf["ids"], hf["mask"], hf["dec"])
  np.testing.assert_array_equal(ref, hf["ref"])
  again = M.load_t5(out)
  assert again.config == t5.config
  jax.tree.map(np.testing.assert_array_equal, again.params, t5.params)


def test_sharded_safetensors_and_torch_bin(hf, tmp_path):
  model, t5 = hf["model"], hf["t5"]
  sharded = str(tmp_path / "sharded")
  model.save_pretrained(sharded, max_shard_size="20KB")
  assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
  assert not os.path.isfile(os.path.join(sharded, "model.safetensors"))
  jax.tree.map(np.testing.assert_array_equal, M.load_t5(sharded).params, t5.params)
  bin_dir = str(tmp_path / "bin")
  os.makedirs(bin_dir)
  with open(os.path.join(hf["path"], "config.json")) as f:
    hf_cfg = json.load(f)
  with open(os.path.join(bin_dir, "config.json"), "w") as f:
    json.dump(hf_cfg, f)
  torch.save(model.state_dict(), os.path.join(bin_dir, "pytorch_model.bin"))
  loaded = M.load_t5(bin_dir)  # state_dict() also lists the tied embedding copies
  assert loaded.config == t5.config
  jax.tree.map(np.testing.assert_array_equal, loaded.params, t5.params)


# ----------------------------------------------------------------------------- numerics options
def test_bf16_close_to_f32(hf11):
  hf = hf11
  t5, ids, mask, dec = hf["t5"], hf["ids"], hf["mask"], hf["dec"]
  f32 = hf["ref"]
  bf16 = t5.logits(t5.params, ids, mask, dec, compute_dtype=jnp.bfloat16)
  assert bf16.dtype == jnp.float32
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(t5.params))
  scale = float(np.abs(f32).max())
  err = np.abs(np.asarray(bf16) - f32)
  assert err.max() < 0.05 * scale and err.mean() < 0.01 * scale, (err.max(), err.mean(), scale)
  assert (np.argmax(np.asarray(bf16), -1) == np.argmax(f32, -1)).mean() > 0.8


def test_remat_wraps_every_block(hf11):
  hf = hf11
  t5, ids, mask, dec = hf["t5"], hf["ids"], hf["mask"], hf["dec"]
  cfg = t5.config

  def loss(params, remat):
    return jnp.mean(T.t5_logits(cfg, params, ids, mask, dec, remat=remat))

  # tracing only: one rematerialized region per block (2 encoder + 3 decoder)
  for remat, count in ((True, 5), ("dots", 5)):
    jaxpr = jax.make_jaxpr(jax.grad(loss), static_argnums=1)(t5.params, remat)
    assert str(jaxpr).count("remat") == count, remat
  # rematerialization leaves the values unchanged
  np.testing.assert_array_equal(np.asarray(t5.encode(t5.params, ids, mask, remat=True)),
                                np.asarray(t5.encode(t5.params, ids, mask)))
  with pytest.raises(ValueError, match="remat"):
    T.t5_logits(cfg, t5.params, ids, mask, dec, remat="everything")


# ----------------------------------------------------------------------------- relative bias
def test_relative_position_bucket_matches_transformers():
  from transformers.models.t5.modeling_t5 import T5Attention
  rel = np.arange(-3000, 3000)
  for bidirectional in (True, False):
    for nb, md in ((32, 128), (8, 16), (64, 256), (128, 512)):
      ref = T5Attention._relative_position_bucket(
          torch.from_numpy(rel), bidirectional=bidirectional, num_buckets=nb,
          max_distance=md).numpy()
      ours = T.relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=nb,
                                        max_distance=md)
      np.testing.assert_array_equal(ours, ref)


def test_relative_bias_shared_across_layers(hf):
  model, t5 = hf["model"], hf["t5"]
  for stack, bidirectional in (("encoder", True), ("decoder", False)):
    blocks = getattr(model, stack).block
    # one table per stack, in the first layer, reused by the others
    assert blocks[0].layer[0].SelfAttention.has_relative_attention_bias
    assert not any(b.layer[0].SelfAttention.has_relative_attention_bias for b in blocks[1:])
    assert "relative_attention_bias" in t5.params[stack]
    assert not any("relative_attention_bias" in t5.params[stack][f"blocks_{i}"]
                   for i in range(len(blocks)))
    with torch.no_grad():
      ref = blocks[0].layer[0].SelfAttention.compute_bias(13, 13).numpy()
    ours = T.relative_position_bias(t5.config, t5.params[stack]["relative_attention_bias"],
                                    13, 13, bidirectional=bidirectional)
    assert ours.shape == (1, 4, 13, 13)
    np.testing.assert_array_equal(np.asarray(ours), ref)
  # every encoder layer sees the table: changing it changes the output
  p = dict(t5.params, encoder=dict(t5.params["encoder"]))
  table = p["encoder"]["relative_attention_bias"]
  p["encoder"]["relative_attention_bias"] = table + jnp.asarray(
      np.random.default_rng(0).normal(size=table.shape), jnp.float32)
  a = np.asarray(t5.encode(t5.params, hf["ids"], hf["mask"]))
  b = np.asarray(t5.encode(p, hf["ids"], hf["mask"]))
  assert np.abs(a - b).max() > 1e-3


# ----------------------------------------------------------------------------- rank classification
def test_sequence_logprob_matches_bruteforce(hf):
  t5, ids, mask, model = hf["t5"], hf["ids"], hf["mask"], hf["model"]
  cands = np.array([[5, 9, 1], [17, 1, -100], [42, 1, -100], [33, 60, 1]], np.int64)
  b, c = ids.shape[0], cands.shape[0]
  brute = np.zeros((b, c))
  for j, cand in enumerate(cands):
    valid = cand != -100
    labels = np.where(valid, cand, 0)[None].repeat(b, 0)
    dec = model._shift_right(torch.from_numpy(labels)).numpy()  # transformers' own shift
    logits = _torch_logits(model, ids, mask, dec).astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    for i in range(b):
      brute[i, j] = sum(logp[i, t, labels[i, t]] for t in range(cands.shape[1]) if valid[t])
  if hf["layout"] == "v1_0":  # candidates shared by all inputs, padded with -100
    ours = np.asarray(t5.sequence_logprob(t5.params, ids, mask, cands))
    assert ours.shape == (b, c) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, brute, rtol=1e-5, atol=1e-4)
    pred = t5.rank_classify(t5.params, ids, mask, cands)
    np.testing.assert_array_equal(np.asarray(pred), brute.argmax(-1))
    return
  # per-example candidates (each row permuted), an explicit mask, length normalization
  perms = np.stack([np.roll(np.arange(c), i) for i in range(b)])
  per_example = cands[perms]
  args = (t5.params, ids, mask, np.where(per_example < 0, 0, per_example), per_example >= 0)
  ours = np.asarray(t5.sequence_logprob(*args, length_normalize=True))
  expected = np.take_along_axis(brute / (cands >= 0).sum(-1), perms, axis=1)
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-4)
  pred = t5.rank_classify(*args, length_normalize=True)
  np.testing.assert_array_equal(np.asarray(pred), expected.argmax(-1))


def test_shift_right_matches_transformers(hf):
  labels = hf["labels"]
  ref = hf["model"]._shift_right(torch.from_numpy(labels)).numpy()
  np.testing.assert_array_equal(np.asarray(T.shift_right(labels, 0, 0)), ref)
  np.testing.assert_array_equal(np.asarray(hf["t5"].shift_right(labels)), ref)
  np.testing.assert_array_equal(np.asarray(T.shift_right(np.array([[4, -100, 7]]), 5, 3)),
                                [[5, 4, 3]])


# ----------------------------------------------------------------------------- errors
def _write(d, cfg_dict, state):
  from safetensors.numpy import save_file
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump(cfg_dict, f)
  save_file(state, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
  return d


def test_load_errors_name_the_key(hf11, tmp_path):
  hf = hf11
  from safetensors.numpy import load_file
  path = hf["path"]
  state = load_file(os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "config.json")) as f:
    hf_cfg = json.load(f)
  key = "decoder.block.2.layer.1.EncDecAttention.k.weight"

  missing = {k: v for k, v in state.items() if k != key}
  with pytest.raises(ValueError, match=f"missing key '{key}'"):
    M.load_t5(_write(str(tmp_path / "missing"), hf_cfg, missing))

  bad = dict(state, **{key: np.zeros((32, 31), np.float32)})
  with pytest.raises(ValueError, match=key.replace(".", r"\.") + ".*shape"):
    M.load_t5(_write(str(tmp_path / "shape"), hf_cfg, bad))

  extra = dict(state, **{"encoder.block.7.layer.0.layer_norm.weight": np.ones(32, np.float32)})
  with pytest.raises(ValueError, match=r"unexpected keys.*encoder\.block\.7"):
    M.load_t5(_write(str(tmp_path / "extra"), hf_cfg, extra))

  no_head = {k: v for k, v in state.items() if k != "lm_head.weight"}
  untied_cfg = dict(hf_cfg, tie_word_embeddings=False)
  with pytest.raises(ValueError, match="missing key 'lm_head.weight'"):
    M.load_t5(_write(str(tmp_path / "head"), untied_cfg, no_head))

  emb = dict(state, **{"encoder.embed_tokens.weight": state["shared.weight"] + 1})
  with pytest.raises(ValueError, match="encoder.embed_tokens.weight"):
    M.load_t5(_write(str(tmp_path / "emb"), hf_cfg, emb))

  no_shared = {k: v for k, v in state.items() if k != "shared.weight"}
  with pytest.raises(ValueError, match="missing key 'shared.weight'"):
    M.load_t5(_write(str(tmp_path / "shared"), hf_cfg, no_shared))

  with pytest.raises(ValueError, match="no config.json"):
    M.load_t5(str(tmp_path))
  os.remove(os.path.join(str(tmp_path / "shared"), "model.safetensors"))
  with pytest.raises(ValueError, match="no model.safetensors"):
    M.load_t5(str(tmp_path / "shared"))
  with pytest.raises(ValueError, match="model_type"):
    M.load_t5(_write(str(tmp_path / "bert"), dict(hf_cfg, model_type="bert"), state))


def test_params_and_input_errors(hf):
  t5, ids, mask, dec = hf["t5"], hf["ids"], hf["mask"], hf["dec"]
  cfg = t5.config
  with pytest.raises(ValueError, match="'shared'"):
    T.t5_logits(cfg, t5.params["encoder"], ids, mask, dec)
  fewer = dict(t5.params, decoder={k: v for k, v in t5.params["decoder"].items()
                                   if k != "blocks_1"})
  with pytest.raises(ValueError, match="decoder/blocks_1"):
    jax.eval_shape(lambda p: T.t5_logits(cfg, p, ids, mask, dec), fewer)
  with pytest.raises(ValueError, match="attention_mask"):
    T.encode(cfg, t5.params, ids, mask[:, :5])
  with pytest.raises(TypeError, match="integers"):
    T.encode(cfg, t5.params, ids.astype(np.float32))
  with pytest.raises(ValueError, match="max_len"):
    T.greedy_decode(cfg, t5.params, ids, mask, 0)
  with pytest.raises(ValueError, match="candidates"):
    T.sequence_logprob(cfg, t5.params, ids, mask, np.zeros((2, 2, 2, 2), np.int32))


def test_config_validation_and_hf_dict():
  cfg = T.T5Config.from_hf_dict({"model_type": "t5", "d_model": 64, "num_layers": 3,
                                 "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
                                 "eos_token_id": [1, 5]})
  assert cfg.num_decoder_layers == 3 and not cfg.scale_decoder_outputs and cfg.eos_token_id == 1
  assert cfg.decoder_start_token_id == 0 and cfg.is_gated
  # transformers 5 writes tie_word_embeddings: true with scale_decoder_outputs: false
  cfg5 = T.T5Config.from_hf_dict({"tie_word_embeddings": True, "scale_decoder_outputs": False})
  assert cfg5.tie_word_embeddings and not cfg5.scale_decoder_outputs
  assert T.T5Config.from_hf_dict(cfg.to_hf_dict()) == cfg
  assert T.T5Config().scale_decoder_outputs and T.T5Config(tie_word_embeddings=False) \
      .scale_decoder_outputs is False
  for kwargs, match in ((dict(feed_forward_proj="swish"), "feed_forward_proj"),
                        (dict(d_model=0), "d_model"), (dict(num_heads=2.5), "num_heads"),
                        (dict(relative_attention_num_buckets=2), "buckets"),
                        (dict(relative_attention_max_distance=8), "max_distance"),
                        (dict(eos_token_id=40000), "eos_token_id"),
                        (dict(layer_norm_epsilon=0.0), "epsilon")):
    with pytest.raises(ValueError, match=match):
      T.T5Config(**kwargs)
  with pytest.raises(ValueError, match="feed_forward_proj"):
    T.T5Config.from_hf_dict({"feed_forward_proj": "gated-silu"})
  shapes = jax.eval_shape(lambda: T.init_t5_params(cfg, jax.random.key(0)))
  assert shapes["lm_head"]["kernel"].shape == (64, 32128)
  assert shapes["decoder"]["blocks_2"]["cross_attn"]["q"]["kernel"].shape == (64, 512)
  assert "wi_0" in shapes["encoder"]["blocks_0"]["mlp"]
