"""Vision/text towers: shapes, attention paths, bf16, remat, errors (CPU, tiny configs)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saft_jax import models as M

import hf_utils as H  # noqa: E402

ENC = jax.jit(M.encode_image, static_argnums=0,
              static_argnames=("compute_dtype", "return_blocks", "attention_impl", "remat"))
CFG = M.VisionConfig(image_size=8, patch_size=2, width=32, layers=2, heads=2, output_dim=10,
                     in_channels=1)


def _np_reference_image(cfg, p, x):
  """Independent NumPy forward (float64) of the vision tower."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  x = np.asarray(x, np.float64)
  b, ps, g, w = x.shape[0], cfg.patch_size, cfg.grid_size, cfg.width
  # conv with stride = kernel = patch, written as explicit loops over the grid
  tok = np.zeros((b, g * g, w))
  for i in range(g):
    for j in range(g):
      patch = x[:, i * ps:(i + 1) * ps, j * ps:(j + 1) * ps, :]
      tok[:, i * g + j] = np.einsum("bhwc,hwco->bo", patch, p["conv1"]["kernel"])
  h = np.concatenate([np.broadcast_to(p["class_embedding"], (b, 1, w)), tok], 1)
  h = h + p["positional_embedding"]

  def ln(v, q):
    mu = v.mean(-1, keepdims=True)
    var = ((v - mu) ** 2).mean(-1, keepdims=True)
    return (v - mu) / np.sqrt(var + cfg.ln_eps) * q["scale"] + q["bias"]

  h = ln(h, p["ln_pre"])
  nh, dh = cfg.heads, w // cfg.heads
  for i in range(cfg.layers):
    blk = p[f"blocks_{i}"]
    a = ln(h, blk["ln_1"])
    proj = {n: a @ blk["attn"][n]["kernel"] + blk["attn"][n]["bias"] for n in "qkv"}
    q, k, v = (proj[n].reshape(b, -1, nh, dh) for n in "qkv")
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dh)
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", s, v).reshape(b, -1, w)
    h = h + o @ blk["attn"]["out"]["kernel"] + blk["attn"]["out"]["bias"]
    m = ln(h, blk["ln_2"]) @ blk["mlp"]["fc"]["kernel"] + blk["mlp"]["fc"]["bias"]
    m = m / (1 + np.exp(-1.702 * m)) if cfg.act == "quick_gelu" else m
    h = h + m @ blk["mlp"]["proj"]["kernel"] + blk["mlp"]["proj"]["bias"]
  return ln(h[:, 0], p["ln_post"]) @ p["proj"]["kernel"]


@pytest.fixture(scope="module")
def setup():
  p = H.random_params(M.init_vision_params, CFG, seed=0)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 8, 8, 1)), jnp.float32)
  return p, x


def test_matches_numpy_reference(setup):
  p, x = setup
  out = jax.jit(M.encode_image, static_argnums=0)(CFG, p, x)
  assert out.shape == (3, 10) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, _np_reference_image(CFG, p, x), rtol=1e-5, atol=1e-5)


def test_init_values():
  cfg = M.CLIPConfig(M.VisionConfig(image_size=4, patch_size=2, width=8, layers=1, heads=2,
                                    output_dim=4),
                     M.TextConfig(context_length=5, vocab_size=11, width=8, layers=1, heads=2,
                                  output_dim=4))
  p = jax.jit(M.init_clip_params, static_argnums=0)(cfg, jax.random.key(0))
  assert all(a.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(a)))
             for a in jax.tree.leaves(p))
  np.testing.assert_array_equal(p["visual"]["ln_pre"]["scale"], np.ones(8))
  np.testing.assert_array_equal(p["text"]["blocks_0"]["attn"]["q"]["bias"], np.zeros(8))
  assert float(jnp.std(p["text"]["token_embedding"])) > 0
  np.testing.assert_allclose(p["logit_scale"], np.log(1 / 0.07), rtol=1e-4)


def test_param_names_and_dtypes():
  p = jax.eval_shape(lambda: M.init_vision_params(CFG, jax.random.key(0)))
  assert set(p) == {"conv1", "class_embedding", "positional_embedding", "ln_pre", "blocks_0",
                    "blocks_1", "ln_post", "proj"}
  assert set(p["blocks_0"]["attn"]) == {"q", "k", "v", "out"}
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(p))


@pytest.mark.parametrize("impl", ["xla", "dpa"])
def test_attention_paths_and_blocks(setup, impl):
  p, x = setup
  ref = ENC(CFG, p, x, attention_impl="xla")
  emb, blocks = ENC(CFG, p, x, attention_impl=impl, return_blocks=True)
  # "dpa" pads 17 tokens to 24 and masks the padded keys: same result.
  np.testing.assert_allclose(emb, ref, rtol=1e-5, atol=1e-5)
  assert len(blocks) == CFG.layers and blocks[0].shape == (3, CFG.num_tokens, CFG.width)


def test_bf16_close_to_f32_and_remat_grads(setup):
  p, x = setup
  f32 = ENC(CFG, p, x)
  bf16 = ENC(CFG, p, x, compute_dtype=jnp.bfloat16)
  assert bf16.dtype == jnp.float32
  # bf16 has an 8-bit mantissa: relative error ~ 2^-8 per op; stated tolerance 5e-2 of scale.
  scale = float(jnp.max(jnp.abs(f32)))
  assert float(jnp.max(jnp.abs(bf16 - f32))) < 5e-2 * scale
  loss = lambda q, remat: jnp.sum(M.encode_image(CFG, q, x, remat=remat) ** 2)
  g0 = jax.jit(jax.grad(loss), static_argnums=1)(p, False)
  g1 = jax.jit(jax.grad(loss), static_argnums=1)(p, True)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g0, g1)


def test_bad_inputs(setup):
  p, x = setup
  with pytest.raises(ValueError, match="NHWC"):
    M.encode_image(CFG, p, x[..., 0])
  q = dict(p)
  del q["blocks_1"]
  with pytest.raises(ValueError, match="blocks_1"):
    M.encode_image(CFG, q, x)
  with pytest.raises(ValueError, match="attention_impl"):
    M.encode_image(CFG, p, x, attention_impl="flash")
  with pytest.raises(ValueError, match="divisible"):
    M.VisionConfig(image_size=9, patch_size=2)


def test_presets_hashable():
  assert M.vision_config("ViT-B/32") == M.VIT_B_32
  assert M.VIT_B_16.num_tokens == 197 and M.VIT_L_14.num_tokens == 257
  assert len({M.VIT_B_32, M.VIT_B_16, M.VIT_L_14, M.VIT_TINY}) == 4


def test_text_tower_paths_causal_and_pooling():
  cfg = M.TextConfig(context_length=13, vocab_size=20, width=16, layers=2, heads=2,
                     output_dim=6)
  p = H.random_params(M.init_text_params, cfg, seed=5)
  rng = np.random.default_rng(0)
  tok = rng.integers(1, 18, size=(3, 13)).astype(np.int32)
  tok[:, 7] = 19  # end-of-text (largest id) at position 7
  enc = jax.jit(M.encode_text, static_argnums=0,
                static_argnames=("attention_impl", "return_blocks", "compute_dtype"))
  ref, blocks = enc(cfg, p, tok, attention_impl="xla", return_blocks=True)
  assert len(blocks) == 2 and blocks[0].shape == (3, 13, 16)
  # "dpa" pads 13 -> 16 tokens; the causal mask hides the padded keys
  np.testing.assert_allclose(enc(cfg, p, tok, attention_impl="dpa"), ref, rtol=1e-5, atol=1e-5)
  # causal: tokens after the end-of-text position cannot change the embedding
  tok2 = tok.copy()
  tok2[:, 8:] = rng.integers(1, 18, size=(3, 5))
  np.testing.assert_allclose(enc(cfg, p, tok2), ref, rtol=1e-6, atol=1e-6)
  # eos-id pooling (first occurrence) equals argmax pooling when eos is the largest id
  cfg_eos = M.TextConfig(**{**cfg.__dict__, "eos_token_id": 19})
  np.testing.assert_allclose(enc(cfg_eos, p, tok), ref, rtol=1e-6, atol=1e-6)
  bf16 = enc(cfg, p, tok, compute_dtype=jnp.bfloat16)
  assert float(jnp.max(jnp.abs(bf16 - ref))) < 5e-2 * float(jnp.max(jnp.abs(ref)))
