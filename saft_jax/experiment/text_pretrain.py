"""θ0 of the offline text suite: a small T5 pre-trained on a pretext.

The pretext mixes, in every batch, T5 span corruption
(:func:`saft_jax.data.text_offline.span_corruption`) on grammatical sentences of the
suite's grammar (:func:`saft_jax.data.text_offline.pretext_corpus`) and, for a share
``text.pretrain_task_share`` of the rows, labelled examples of the four tasks drawn
apart from the suite's splits (:func:`saft_jax.data.text_offline.instruction_mixture`):
the small-scale analogue of Flan-T5, whose instruction-tuning mixture contains the GLUE
tasks the paper fine-tunes on. Both use the fine-tuning loss
(:func:`saft_jax.experiment.text_finetune.logits_cross_entropy`) and the protocol's
AdamW chain (warm-up over the first 10 % of the steps, then cosine decay).
"""
from __future__ import annotations

import logging

import jax
import numpy as np

from saft_jax import train as train_lib
from saft_jax.data import text_offline
from saft_jax.experiment.text_finetune import label_logits, logits_cross_entropy
from saft_jax.experiment.text_suite import target_ids
from saft_jax.models import t5 as t5_lib

logger = logging.getLogger("saft_jax.experiment")


def pretrain_text_t5(t5_cfg, vocab, text, seed: int = 0, exclude=()):
  """θ0: ``text.pretrain_steps`` AdamW steps of the pretext mixture from a random init.

  Args:
    t5_cfg: the model's :class:`saft_jax.models.T5Config`.
    vocab: tokenizer (:class:`saft_jax.models.WordVocab` or :class:`~saft_jax.models.ByteVocab`).
    text: the :class:`saft_jax.experiment.config.TextConfig` (``pretrain_steps``,
      ``pretrain_batch_size``, ``pretrain_lr``, ``pretrain_task_share``,
      ``max_input_len``, ``max_target_len``).
    seed: initialization, corpus and masking seed.
    exclude: task inputs never to pre-train on (the suite's train/val/test inputs).

  Returns:
    The pre-trained parameters (nested dict).
  """
  rng = np.random.default_rng([seed, 11])
  corpus = text_offline.pretext_corpus(seed, n=max(1000, text.pretrain_steps * 4))
  n_tasks = int(round(text.pretrain_batch_size * text.pretrain_task_share))
  tasks = text_offline.instruction_mixture(seed, n_tasks * text.pretrain_steps, exclude=exclude,
                                           level=text.level)
  params = t5_lib.init_t5_params(t5_cfg, jax.random.key(seed))

  def loss_fn(trainable, frozen, batch):
    ii, im, lab = batch
    return logits_cross_entropy(label_logits(t5_cfg, trainable, ii, im, lab), lab), {}

  tx = train_lib.make_base_optimizer(text.pretrain_lr, text.pretrain_steps,
                                     max(1, text.pretrain_steps // 10), weight_decay=0.01)
  state = train_lib.init_train_state(params, tx)
  step = train_lib.make_train_step(loss_fn, tx)
  metrics = {"loss": float("nan")}
  for i in range(text.pretrain_steps):
    pairs = tasks[i * n_tasks:(i + 1) * n_tasks] + [
        text_offline.span_corruption(corpus[j], rng)
        for j in rng.integers(len(corpus), size=text.pretrain_batch_size - n_tasks)]
    ii, im = vocab.encode([p[0] for p in pairs], text.max_input_len)
    lab = target_ids(vocab, [p[1] for p in pairs], text.max_target_len)
    state, metrics = step(state, None, (ii, im, lab))
    if (i + 1) % max(1, text.pretrain_steps // 4) == 0:
      logger.info("pretext step %d/%d: loss %.4f", i + 1, text.pretrain_steps,
                  float(metrics["loss"]))
  return state.params
