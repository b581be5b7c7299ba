"""Weight import/export against transformers' PyTorch CLIPModel (independent reference)."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from saft_jax import models as M  # noqa: E402
from saft_jax.models import convert_hf, convert_open_clip  # noqa: E402

import hf_utils as H  # noqa: E402

RTOL, ATOL = 1e-5, 1e-5


def _save_hf(model, path):
  model.save_pretrained(path, safe_serialization=True)
  assert os.path.isfile(os.path.join(path, "model.safetensors"))


# module-level jits keyed on the (static, hashable) configs: compiled once per config
_ENC_I = jax.jit(M.encode_image, static_argnums=0)
_ENC_T = jax.jit(M.encode_text, static_argnums=0)
_LOGITS = jax.jit(M.clip_logits, static_argnums=0)


def _ours(clip, images, tokens):
  img = np.asarray(_ENC_I(clip.config.vision, clip.params["visual"], jnp.asarray(images)))
  txt = np.asarray(_ENC_T(clip.config.text, clip.params["text"], jnp.asarray(tokens)))
  logits = np.asarray(_LOGITS(clip.config, clip.params, images, tokens)[0])
  return img, txt, logits


def _assert_same(a, b):
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL)


@pytest.fixture(scope="module", params=[("quick_gelu", False), ("gelu", True)],
                ids=["quick_gelu-eos", "gelu-legacy_argmax"])
def hf(request, tmp_path_factory):
  act, legacy = request.param
  model = H.tiny_hf_model(act, legacy)
  path = str(tmp_path_factory.mktemp("hf") / "clip")
  _save_hf(model, path)
  images, tokens = H.inputs()
  return model, path, (images, tokens), H.torch_outputs(model, images, tokens), act


def test_hf_parity(hf):
  _, path, (images, tokens), ref, act = hf
  clip = M.load_clip(path)
  assert clip.source_format == "hf" and clip.config.vision.act == act
  assert clip.params["logit_scale"].shape == ()
  assert clip.config.text.eos_token_id == (None if act == "gelu" else H.EOS)
  _assert_same(_ours(clip, images, tokens), ref)


def test_open_clip_parity_and_round_trip(hf, tmp_path):
  model, hf_path, (images, tokens), ref, act = hf
  hf_cfg = M.load_clip(hf_path).config
  sd = H.open_clip_state_dict(model)
  # open_clip pools at argmax(token ids) and has no eos id in the file
  cfg = dataclasses.replace(hf_cfg, text=dataclasses.replace(hf_cfg.text, eos_token_id=None))
  for name, write in (("oc.safetensors", lambda p: __import__("safetensors.torch").torch
                       .save_file({k: v.contiguous() for k, v in sd.items()}, p)),
                      ("oc.pt", lambda p: torch.save(sd, p))):
    p = str(tmp_path / name)
    write(p)
    clip = M.load_clip(p, config=cfg)
    assert clip.source_format == "open_clip"
    _assert_same(_ours(clip, images, tokens), ref)
    # import -> export -> import is the identity (both formats)
    for fmt, out in (("open_clip", str(tmp_path / f"re_{name}")), ("hf", str(tmp_path / "re_hf"))):
      M.save_clip(clip, out, format=fmt)
      back = M.load_clip(out, config=cfg)
      jax.tree.map(np.testing.assert_array_equal, clip.params, back.params)
      assert back.config.vision == cfg.vision
  # infer_config: shapes give everything but heads (width // 64) and the activation
  inferred = convert_open_clip.infer_config({k: v.numpy() for k, v in sd.items()}, act=act,
                                            head_width=16)
  assert inferred.vision == dataclasses.replace(cfg.vision, heads=3)
  assert inferred.text.context_length == H.CTX and inferred.text.vocab_size == H.VOCAB


def test_hf_export_loads_in_transformers(hf, tmp_path):
  _, path, (images, tokens), ref, _ = hf
  from transformers import CLIPModel
  clip = M.load_clip(path)
  # perturb the params so the export is not just a copy of the input files
  params = jax.tree.map(lambda a: a * 1.01, clip.params)
  new = dataclasses.replace(clip, params=params)
  out = str(tmp_path / "export")
  M.save_clip(new, out, format="hf")
  back = CLIPModel.from_pretrained(out).eval()
  _assert_same(H.torch_outputs(back, images, tokens), _ours(new, images, tokens))
  again = M.load_clip(out)
  assert again.config == clip.config
  jax.tree.map(np.testing.assert_array_equal, new.params, again.params)


def test_errors_name_the_key(hf, tmp_path):
  model, path, _, _, _ = hf
  cfg = M.load_clip(path).config
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  bad = dict(sd)
  del bad["vision_model.encoder.layers.1.self_attn.k_proj.weight"]
  with pytest.raises(ValueError, match=r"missing key 'vision_model\.encoder\.layers\.1\.self_attn"
                                       r"\.k_proj\.weight'"):
    convert_hf.params_from_hf_state_dict(bad, cfg)
  bad = dict(sd)
  bad["text_model.final_layer_norm.weight"] = np.ones(5, np.float32)
  with pytest.raises(ValueError, match=r"'text_model\.final_layer_norm\.weight' has shape \(5,\)"):
    convert_hf.params_from_hf_state_dict(bad, cfg)
  bad = dict(sd)
  bad["text_model.extra.weight"] = np.ones(2, np.float32)
  with pytest.raises(ValueError, match=r"unexpected keys \['text_model\.extra\.weight'\]"):
    convert_hf.params_from_hf_state_dict(bad, cfg)
  oc = {k: v.numpy() for k, v in H.open_clip_state_dict(model).items()}
  del oc["transformer.resblocks.0.attn.in_proj_bias"]
  with pytest.raises(ValueError, match=r"missing key 'transformer\.resblocks\.0\.attn\.in_proj_bias'"):
    convert_open_clip.params_from_open_clip_state_dict(oc, cfg)
  with pytest.raises(ValueError, match="not a Hugging Face CLIP"):
    M.load_clip(str(tmp_path / "nothing.npz"))
