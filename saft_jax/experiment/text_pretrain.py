"""θ0 of the offline text suite: a small byte-level T5 pre-trained on a pretext.

(Provisional: span corruption on :func:`saft_jax.data.text_offline.pretext_corpus`.)
"""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax

from saft_jax.data import text_offline
from saft_jax.models import t5 as t5_lib
from saft_jax import train as train_lib

logger = logging.getLogger("saft_jax.experiment")


def label_ids(vocab, targets, max_len: int) -> np.ndarray:
  """Target ids with EOS, padding as -100 (ignored by the loss)."""
  ids, mask = vocab.encode(list(targets), max_len)
  return np.where(mask > 0, ids, -100).astype(np.int32)


def token_cross_entropy(cfg, params, input_ids, attention_mask, labels, compute_dtype=jnp.float32):
  """Mean cross-entropy of the target tokens (positions with label -100 ignored)."""
  dec_in = t5_lib.shift_right(labels, cfg.decoder_start_token_id, cfg.pad_token_id)
  logits = t5_lib.t5_logits(cfg, params, input_ids, attention_mask, dec_in,
                            compute_dtype=compute_dtype)
  valid = labels >= 0
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
  valid = valid.astype(ce.dtype)
  return jnp.sum(ce * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def pretrain_text_t5(t5_cfg, vocab, text, seed: int = 0):
  """θ0: ``text.pretrain_steps`` AdamW steps of span corruption from a random init."""
  rng = np.random.default_rng([seed, 11])
  corpus = text_offline.pretext_corpus(seed, n=max(1000, text.pretrain_steps * 4))
  params = t5_lib.init_t5_params(t5_cfg, jax.random.key(seed))

  def loss_fn(trainable, frozen, batch):
    ii, im, lab = batch
    return token_cross_entropy(t5_cfg, trainable, ii, im, lab), {}

  tx = train_lib.make_base_optimizer(text.pretrain_lr, text.pretrain_steps,
                                     max(1, text.pretrain_steps // 10), weight_decay=0.01)
  state = train_lib.init_train_state(params, tx)
  step = train_lib.make_train_step(loss_fn, tx)
  metrics = {"loss": float("nan")}
  for _ in range(text.pretrain_steps):
    pairs = [text_offline.span_corruption(corpus[i], rng)
             for i in rng.integers(len(corpus), size=text.pretrain_batch_size)]
    ii, im = vocab.encode([p[0] for p in pairs], text.max_input_len)
    state, metrics = step(state, None, (ii, im, label_ids(vocab, [p[1] for p in pairs],
                                                          text.max_target_len)))
  logger.info("text pretext pre-training: %d steps, final loss %.4f", text.pretrain_steps,
              float(metrics["loss"]))
  return state.params
