"""Weight import/export against transformers' PyTorch CLIPModel (independent reference)."""
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


# ----------------------------------------------------------------------------- activation
def _other(act):
  return "gelu" if act == "quick_gelu" else "quick_gelu"


def _oc_setup(hf):
  """(state dict in open_clip layout, our config for it, torch reference, act)."""
  model, hf_path, (images, tokens), ref, act = hf
  hf_cfg = M.load_clip(hf_path).config
  cfg = dataclasses.replace(hf_cfg, text=dataclasses.replace(hf_cfg.text, eos_token_id=None))
  return H.open_clip_state_dict(model), cfg, (images, tokens), ref[:2], act


def _towers(clip, images, tokens):
  return (np.asarray(_ENC_I(clip.config.vision, clip.params["visual"], jnp.asarray(images))),
          np.asarray(_ENC_T(clip.config.text, clip.params["text"], jnp.asarray(tokens))))


def test_open_clip_dir_records_activation(hf, tmp_path):
  sd, cfg, (images, tokens), ref, act = _oc_setup(hf)
  # open_clip's hub layout, written by hand as open_clip's push_to_hf_hub does: the model_cfg
  # gives the heads (head_width 16 / heads 4) and the activation (no quick_gelu: GELU)
  model_cfg = {"embed_dim": 24,
               "vision_cfg": {"image_size": 16, "layers": 2, "width": 48, "patch_size": 4,
                              "head_width": 16, "mlp_ratio": 64 / 48},
               "text_cfg": {"context_length": H.CTX, "vocab_size": H.VOCAB, "width": 32,
                            "heads": 4, "layers": 2, "mlp_ratio": 37 / 32}}
  if act == "quick_gelu":
    model_cfg["quick_gelu"] = True
  d = tmp_path / "oc"
  d.mkdir()
  (d / "open_clip_config.json").write_text(json.dumps(
      {"model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}))
  torch.save(sd, str(d / "open_clip_pytorch_model.bin"))
  clip = M.load_clip(str(d))
  assert clip.source_format == "open_clip"
  assert (clip.config.vision.act, clip.config.text.act) == (act, act)
  assert clip.config.vision == cfg.vision and clip.config.text == cfg.text
  _assert_same(_towers(clip, images, tokens), ref)
  # an explicit act= wins over the file
  assert M.load_clip(str(d), act=_other(act)).config.text.act == _other(act)
  # save_clip to a directory writes the same layout, read back without act= or config=
  out = str(tmp_path / "export")
  M.save_clip(clip, out, format="open_clip")
  written = json.load(open(os.path.join(out, "open_clip_config.json")))["model_cfg"]
  assert written.get("quick_gelu", False) == (act == "quick_gelu")
  assert (written["vision_cfg"]["head_width"], written["text_cfg"]["heads"]) == (16, 4)
  back = M.load_clip(out)
  assert back.config.vision == cfg.vision and back.config.text == cfg.text
  jax.tree.map(np.testing.assert_array_equal, clip.params, back.params)
  # a directory with both layouts but only open_clip weights is read as open_clip
  (d / "config.json").write_text(json.dumps(convert_hf.config_to_hf(cfg)))
  assert M.detect_format(str(d)) == "open_clip"


def test_bare_state_dict_requires_act(hf, tmp_path):
  sd, cfg, (images, tokens), ref, act = _oc_setup(hf)
  import safetensors.torch
  paths = [str(tmp_path / "oc.safetensors"), str(tmp_path / "oc.pt")]
  safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, paths[0])
  torch.save(sd, paths[1])
  for p in paths:
    with pytest.raises(M.UnknownActivationError) as err:
      M.load_clip(p)
    msg = str(err.value)
    for needed in ('act=', '"gelu"', '"quick_gelu"', "laion2b", "OpenAI", "open_clip_config.json"):
      assert needed in msg, needed
  with pytest.raises(ValueError, match='"gelu".*"quick_gelu"'):
    M.load_clip(paths[0], act="relu")
  # explicit act= wins over config='s act
  clip = M.load_clip(paths[1], config=M.with_act(cfg, _other(act)), act=act)
  assert (clip.config.vision.act, clip.config.text.act) == (act, act)
  _assert_same(_towers(clip, images, tokens), ref)


def test_torchscript_archive_is_quick_gelu_and_loads_quietly(hf, tmp_path):
  import warnings
  sd, cfg, (images, tokens), ref, act = _oc_setup(hf)
  p = str(tmp_path / "ViT-tiny.pt")
  H.save_torchscript(sd, p)
  if act == "quick_gelu":
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      clip = M.load_clip(p, config=cfg)
  else:
    # the archive says QuickGELU: a config= saying otherwise is refused, act= decides
    with pytest.raises(ValueError, match="records the activation 'quick_gelu'.*act="):
      M.load_clip(p, config=cfg)
    clip = M.load_clip(p, config=cfg, act="gelu")
  assert (clip.config.vision.act, clip.config.text.act) == (act, act)
  _assert_same(_towers(clip, images, tokens), ref)


def test_torchscript_archive_without_config(tmp_path):
  import warnings
  # widths that are multiples of 64: heads = width // 64, as OpenAI's
  cfg = M.CLIPConfig(M.VisionConfig(image_size=8, patch_size=4, width=128, layers=1, heads=2,
                                    output_dim=16, act="gelu"),
                     M.TextConfig(context_length=8, vocab_size=20, width=64, layers=1, heads=1,
                                  output_dim=16, act="gelu"))
  params = H.random_params(M.init_clip_params, cfg, seed=1)
  state = convert_open_clip.params_to_open_clip_state_dict(params, cfg)
  p = str(tmp_path / "openai.pt")
  H.save_torchscript({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, p)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    clip = M.load_clip(p)
  assert clip.config == M.with_act(cfg, "quick_gelu")
  jax.tree.map(np.testing.assert_array_equal, params, clip.params)
  assert M.load_clip(p, act="gelu").config == cfg


def test_hf_act_override(hf):
  _, path, _, _, act = hf
  assert M.load_clip(path).config.text.act == act  # config.json's hidden_act
  clip = M.load_clip(path, act=_other(act))
  assert (clip.config.vision.act, clip.config.text.act) == (_other(act), _other(act))


# open_clip's own model configs (src/open_clip/model_configs/*.json), copied verbatim
OPEN_CLIP_B32 = {"embed_dim": 512,
                 "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512,
                              "heads": 8, "layers": 12}}
OPEN_CLIP_L14_QUICKGELU = {"embed_dim": 768, "quick_gelu": True,
                           "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024,
                                          "patch_size": 14},
                           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768,
                                        "heads": 12, "layers": 12}}


def test_open_clip_model_configs():
  b32 = convert_open_clip.config_from_open_clip(OPEN_CLIP_B32)
  assert b32.vision == M.clip_config("ViT-B-32", act="gelu").vision
  assert b32.text == M.clip_config("ViT-B-32", act="gelu").text
  l14 = convert_open_clip.config_from_open_clip(OPEN_CLIP_L14_QUICKGELU)
  preset = M.clip_config("ViT-L-14")  # OpenAI's: QuickGELU
  assert (l14.vision, l14.text) == (preset.vision, preset.text)
  for cfg in (b32, l14, M.with_act(M.clip_config("ViT-B-16"), "gelu")):
    model_cfg = convert_open_clip.config_to_open_clip(cfg)
    assert convert_open_clip.config_from_open_clip(model_cfg) == cfg
  bad = dict(OPEN_CLIP_B32, vision_cfg=dict(OPEN_CLIP_B32["vision_cfg"], attentional_pool=True))
  with pytest.raises(ValueError, match="attentional_pool=True not supported"):
    convert_open_clip.config_from_open_clip(bad)
  bad = dict(OPEN_CLIP_B32, text_cfg=dict(OPEN_CLIP_B32["text_cfg"], hf_model_name="roberta-base"))
  with pytest.raises(ValueError, match="hf_model_name"):
    convert_open_clip.config_from_open_clip(bad)
