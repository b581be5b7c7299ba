"""Multi-head attention kernels used by the CLIP towers.

Three implementations of softmax(q kᵀ / sqrt(d)) v on `[batch, tokens, heads, head_dim]`:

- "xla": plain einsum attention (logits and softmax in float32). The default on CPU,
  and on GPU for short sequences (ViT-B/32's 50 tokens), where it is fastest.
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")` (fused flash
  attention; needs bf16/fp16 inputs and a token count that is a multiple of 8, so the
  towers pad the sequence and mask the padded keys, see `padded_length`).
- "dpa": the same call with `implementation="xla"`; it runs everywhere and exercises
  exactly the padding/masking path of "cudnn" (used by the CPU tests).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "dpa", "cudnn")
_PAD_MULTIPLE = 8


def resolve_impl(impl: Optional[str], num_tokens: int, compute_dtype) -> str:
  """Chooses an implementation when `impl` is None, validates it otherwise.

  Auto rule (GPU_NOTES.md, H100): cuDNN for >= 128 tokens with a 16-bit compute dtype
  on GPU, plain XLA attention everywhere else.
  """
  if impl is None:
    sixteen_bit = jnp.dtype(compute_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if jax.default_backend() == "gpu" and sixteen_bit and num_tokens >= 128:
      return "cudnn"
    return "xla"
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention_impl must be one of {IMPLEMENTATIONS} or None, got {impl!r}")
  if impl == "cudnn":
    sixteen_bit = jnp.dtype(compute_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if not sixteen_bit:
      raise ValueError("attention_impl='cudnn' needs compute_dtype bfloat16 or float16, "
                       f"got {jnp.dtype(compute_dtype).name}")
  return impl


def padded_length(impl: str, num_tokens: int) -> int:
  """Sequence length the tower runs at for `impl` (a multiple of 8 for the fused paths)."""
  if impl == "xla":
    return num_tokens
  return -(-num_tokens // _PAD_MULTIPLE) * _PAD_MULTIPLE


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str = "xla",
              causal: bool = False, valid_length: Optional[int] = None) -> jax.Array:
  """Scaled dot-product attention on `[B, T, H, Dh]` arrays.

  Args:
    q, k, v: queries, keys, values, all of the same dtype.
    impl: "xla", "dpa" or "cudnn" (see the module docstring).
    causal: mask keys after each query (text tower).
    valid_length: number of real tokens when the sequence is padded; keys at positions
      `>= valid_length` are masked out. None: no padding.

  Returns:
    `[B, T, H, Dh]` in the dtype of `q`.
  """
  batch, length, _, head_dim = q.shape
  scale = head_dim ** -0.5
  if impl == "xla":
    heads_first = lambda a: a.transpose(0, 2, 1, 3)
    out = attention_heads_first(heads_first(q), heads_first(k), heads_first(v),
                                causal=causal, valid_length=valid_length)
    return heads_first(out)
  implementation = "cudnn" if impl == "cudnn" else "xla"
  kv_lengths = None
  if valid_length is not None and valid_length < length:
    kv_lengths = jnp.full((batch,), valid_length, dtype=jnp.int32)
  return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                      key_value_seq_lengths=kv_lengths,
                                      implementation=implementation)


def attention_heads_first(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
                          valid_length: Optional[int] = None) -> jax.Array:
  """The "xla" attention on `[B, H, T, Dh]` arrays (heads before tokens).

  The layout of XLA's batched matmuls: the towers produce q, k, v in it directly, so
  neither matmul nor its gradient needs a transpose (about 2× faster on XLA:CPU than
  `[B, T, H, Dh]` einsums). Logits and softmax in float32; same arguments as `attention`.

  Returns:
    `[B, H, T, Dh]` in the dtype of `q`.
  """
  length, head_dim = q.shape[2], q.shape[3]
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  logits = logits * jnp.float32(head_dim ** -0.5)
  mask = None
  if causal:
    mask = jnp.tril(jnp.ones((length, length), dtype=bool))
  if valid_length is not None and valid_length < length:
    key_ok = jnp.arange(length) < valid_length
    mask = key_ok[None, :] if mask is None else mask & key_ok[None, :]
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bhkd->bhqd", weights, v,
                    preferred_element_type=jnp.float32).astype(q.dtype)
