"""Helpers shared by the conversion tests: tiny transformers CLIP models and inputs."""
import numpy as np

VOCAB, EOS, CTX = 99, 98, 16


def tiny_hf_model(act: str, legacy_eos: bool, seed: int = 0, *, vocab_size: int = VOCAB,
                  text=(32, 4), vision=(48, 3)):
  """A tiny random transformers CLIPModel (float32, eval) with randomized LayerNorms;
  `text` / `vision` are (width, heads)."""
  import torch
  from transformers import CLIPConfig, CLIPModel
  cfg = CLIPConfig(
      text_config=dict(vocab_size=vocab_size, hidden_size=text[0], intermediate_size=37,
                       num_hidden_layers=2, num_attention_heads=text[1],
                       max_position_embeddings=CTX, hidden_act=act,
                       eos_token_id=2 if legacy_eos else EOS, bos_token_id=97, pad_token_id=0),
      vision_config=dict(image_size=16, patch_size=4, hidden_size=vision[0],
                         intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=vision[1], hidden_act=act, num_channels=3),
      projection_dim=24)
  torch.manual_seed(seed)
  model = CLIPModel(cfg).eval()
  with torch.no_grad():
    for _, p in model.named_parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


def inputs(seed: int = 0, n_img: int = 3, n_txt: int = 4):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(n_img, 16, 16, 3)).astype(np.float32)  # NHWC
  tokens = np.zeros((n_txt, CTX), np.int32)
  for i in range(n_txt):
    n = int(rng.integers(2, CTX - 1))
    tokens[i, 0] = 97
    tokens[i, 1:n] = rng.integers(3, 90, size=n - 1)
    tokens[i, n] = EOS
  return images, tokens


def torch_outputs(model, images, tokens):
  """(image_features, text_features, logits_per_image), unnormalized features, numpy."""
  import torch
  with torch.no_grad():
    pix = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    ids = torch.from_numpy(tokens.astype(np.int64))
    img = model.visual_projection(model.vision_model(pixel_values=pix).pooler_output)
    txt = model.text_projection(model.text_model(input_ids=ids).pooler_output)
    logits = model(input_ids=ids, pixel_values=pix).logits_per_image
  return img.numpy(), txt.numpy(), logits.numpy()


def open_clip_state_dict(model):
  """open_clip key names and layouts, written directly from the transformers tensors."""
  import torch
  sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
  out = {}
  vm, tm = "vision_model", "text_model"
  out["visual.conv1.weight"] = sd[f"{vm}.embeddings.patch_embedding.weight"]
  out["visual.class_embedding"] = sd[f"{vm}.embeddings.class_embedding"]
  out["visual.positional_embedding"] = sd[f"{vm}.embeddings.position_embedding.weight"]
  out["visual.ln_pre.weight"] = sd[f"{vm}.pre_layrnorm.weight"]
  out["visual.ln_pre.bias"] = sd[f"{vm}.pre_layrnorm.bias"]
  out["visual.ln_post.weight"] = sd[f"{vm}.post_layernorm.weight"]
  out["visual.ln_post.bias"] = sd[f"{vm}.post_layernorm.bias"]
  out["visual.proj"] = sd["visual_projection.weight"].T.contiguous()
  out["token_embedding.weight"] = sd[f"{tm}.embeddings.token_embedding.weight"]
  out["positional_embedding"] = sd[f"{tm}.embeddings.position_embedding.weight"]
  out["ln_final.weight"] = sd[f"{tm}.final_layer_norm.weight"]
  out["ln_final.bias"] = sd[f"{tm}.final_layer_norm.bias"]
  out["text_projection"] = sd["text_projection.weight"].T.contiguous()
  out["logit_scale"] = sd["logit_scale"]
  for src, dst in ((vm, "visual.transformer"), (tm, "transformer")):
    i = 0
    while f"{src}.encoder.layers.{i}.layer_norm1.weight" in sd:
      s, d = f"{src}.encoder.layers.{i}", f"{dst}.resblocks.{i}"
      out[f"{d}.ln_1.weight"] = sd[f"{s}.layer_norm1.weight"]
      out[f"{d}.ln_1.bias"] = sd[f"{s}.layer_norm1.bias"]
      out[f"{d}.ln_2.weight"] = sd[f"{s}.layer_norm2.weight"]
      out[f"{d}.ln_2.bias"] = sd[f"{s}.layer_norm2.bias"]
      out[f"{d}.attn.in_proj_weight"] = torch.cat(
          [sd[f"{s}.self_attn.{n}_proj.weight"] for n in "qkv"], 0)
      out[f"{d}.attn.in_proj_bias"] = torch.cat(
          [sd[f"{s}.self_attn.{n}_proj.bias"] for n in "qkv"], 0)
      out[f"{d}.attn.out_proj.weight"] = sd[f"{s}.self_attn.out_proj.weight"]
      out[f"{d}.attn.out_proj.bias"] = sd[f"{s}.self_attn.out_proj.bias"]
      out[f"{d}.mlp.c_fc.weight"] = sd[f"{s}.mlp.fc1.weight"]
      out[f"{d}.mlp.c_fc.bias"] = sd[f"{s}.mlp.fc1.bias"]
      out[f"{d}.mlp.c_proj.weight"] = sd[f"{s}.mlp.fc2.weight"]
      out[f"{d}.mlp.c_proj.bias"] = sd[f"{s}.mlp.fc2.bias"]
      i += 1
  ctx = out["positional_embedding"].shape[0]
  out["attn_mask"] = torch.full((ctx, ctx), float("-inf")).triu_(1)  # open_clip's buffer
  return out


def write_tiny_tokenizer(d):
  """A tiny CLIP BPE vocabulary (characters, a few merges, start/end tokens) in `d`."""
  import json
  import os
  os.makedirs(d, exist_ok=True)
  chars = list("abcdefghijklmnopqrstuvwxyz0123456789.:\"!'-/")
  vocab = {}
  for c in chars:
    vocab[c] = len(vocab)
  for c in chars:
    vocab[c + "</w>"] = len(vocab)
  merges = ["p h", "ph o", "pho t", "phot o</w>"]
  for m in merges:
    vocab[m.replace(" ", "")] = len(vocab)
  vocab["<|startoftext|>"] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)
  with open(os.path.join(d, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  with open(os.path.join(d, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
  return len(vocab)


def random_params(init_fn, cfg, seed=0, std=0.1):
  """Random params with the structure of `init_fn(cfg, key)`, drawn with NumPy (fast:
  no per-leaf XLA compilation); LayerNorm scales around 1."""
  import jax
  import jax.numpy as jnp
  shapes = jax.eval_shape(lambda: init_fn(cfg, jax.random.key(0)))
  rng = np.random.default_rng(seed)

  def draw(path, s):
    a = std * rng.normal(size=s.shape)
    if str(getattr(path[-1], "key", "")) == "scale":
      a = a + 1.0
    return jnp.asarray(a, s.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def random_like(tree, seed=0, std=0.05):
  import jax
  import jax.numpy as jnp
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(std * rng.normal(size=a.shape), a.dtype), tree)


def save_torchscript(state_dict, path, extras=True):
  """A TorchScript archive (`torch.jit.script(...).save`) whose state dict is `state_dict`,
  as OpenAI's original CLIP .pt files; `extras` adds OpenAI's integer entries."""
  import torch

  class Holder(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
      return x

  root = Holder()
  items = dict(state_dict)
  if extras:
    ctx = items["positional_embedding"].shape[0]
    items.update(input_resolution=torch.tensor(224), context_length=torch.tensor(ctx),
                 vocab_size=torch.tensor(items["token_embedding.weight"].shape[0]))
  for key, value in items.items():
    *names, leaf = key.split(".")
    module = root
    for name in names:
      if not hasattr(module, name):
        module.add_module(name, Holder())
      module = getattr(module, name)
    value = torch.as_tensor(value)
    if value.is_floating_point() and key != "attn_mask":
      module.register_parameter(leaf, torch.nn.Parameter(value.clone(), requires_grad=False))
    else:
      module.register_buffer(leaf, value.clone())
  import warnings
  with warnings.catch_warnings():  # torch.jit.script's own deprecation notice
    warnings.simplefilter("ignore", DeprecationWarning)
    torch.jit.script(root).save(path)
