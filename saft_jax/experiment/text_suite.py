"""The text suites of the main job: a T5 θ0, text-to-text tasks and their tokenized splits.

* ``text`` — the four grammar tasks of :mod:`saft_jax.data.text_offline`
  (sentiment, acceptability, paraphrase, entailment; no downloads) and a small T5 on
  the grammar's word-level vocabulary (:func:`offline_vocab`; ``text.vocab="byte"``:
  ByT5's bytes) whose θ0 is
  pre-trained on the grammar's pretext
  (:func:`saft_jax.experiment.text_pretrain.pretrain_text_t5`). θ0 is cached in the run
  directory (``theta0.msgpack``, keyed in ``suite.json`` by the model and pre-training
  settings of ``config.text``).
* ``glue`` — a Hugging Face T5 directory on disk (``text.t5_checkpoint``, e.g.
  Flan-T5-base), its tokenizer (``text.tokenizer_dir``, default the checkpoint
  directory) and GLUE cola/mrpc/rte/sst2 prepared for tensorflow-datasets
  (``text.data_dir``; :func:`saft_jax.data.load_glue_task`: validation = held-out part
  of GLUE train, test = GLUE validation).

A :class:`TextSuite` tokenizes every split once. The *candidates* are the label words
of all tasks of the suite (each word once); evaluation teacher-forces every candidate
(:mod:`saft_jax.experiment.text_eval`), which gives rank classification, exact match
of the greedy output and whether that output is a label word of the task, of another
task or neither.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from saft_jax import models
from saft_jax import train as train_lib
from saft_jax.data import text_offline, text_tasks
from saft_jax.experiment import regime as regime_lib
from saft_jax.experiment.store import load_tree, save_tree
from saft_jax.models import t5 as t5_lib

logger = logging.getLogger("saft_jax.experiment")

TEXT_TASKS = tuple(text_offline.TASKS)          # sentiment, acceptability, paraphrase, entailment
GLUE_TASKS = ("cola", "mrpc", "rte", "sst2")
# Flan-T5-base (untied LM head): the reference size of the dimension-matched ASAM radius.
FLAN_T5_BASE_PARAMS = 247_577_856
T5_CHECKPOINT_ENV = "T5_CHECKPOINT"
# Fields of TextConfig that define the offline θ0 (besides every ``pretrain_*`` field).
_THETA0_FIELDS = ("vocab", "d_model", "num_layers", "num_decoder_layers", "num_heads", "d_ff",
                  "feed_forward_proj", "tie_word_embeddings", "max_input_len", "max_target_len",
                  "sizes", "level")  # pre-training excludes every split's inputs


def target_ids(tokenizer, texts, max_len: int) -> np.ndarray:
  """``[N, max_len]`` int32 target ids of ``texts`` with EOS, padding as -100 (ignored).

  Works with :class:`saft_jax.models.WordVocab`, :class:`saft_jax.models.ByteVocab` and
  transformers tokenizers.
  """
  ids, mask = models.encode_texts(tokenizer, list(texts), max_len)
  return np.where(mask > 0, ids, -100).astype(np.int32)


@dataclasses.dataclass(eq=False)  # hashed by identity: compiled programs are cached per suite
class TextSuite:
  """Tasks, θ0 and tokenized data of a text suite.

  Attributes:
    name: "text" or "glue".
    tasks: ``{name: saft_jax.data.TextTask}``.
    params0: θ0, the T5 parameters.
    t5: the :class:`saft_jax.models.T5Config`.
    tokenizer: a ``WordVocab``, a ``ByteVocab`` or a transformers tokenizer.
    max_input_len, max_target_len: token lengths of inputs and targets.
    score: "exact" or "rank" (see :class:`saft_jax.experiment.config.TextConfig`).
    compute_dtype: activation dtype of the T5.
    candidates: every label word of the suite, each once, in task order.
    candidate_ids: ``[C, T]`` int32 token ids of the candidates (EOS included, -100
      padding; ``T`` is the longest candidate).
    task_candidates: ``{task: [K] int32}`` candidate index of each class of the task.
    inputs: ``{task: {split: (ids, mask)}}`` tokenized inputs (``[N, max_input_len]``).
    word_ids: ``{task: [K, max_target_len]}`` target ids of each class (training labels).
  """
  name: str
  tasks: dict
  params0: Any
  t5: t5_lib.T5Config
  tokenizer: Any
  max_input_len: int
  max_target_len: int
  score: str = "exact"
  compute_dtype: Any = jnp.float32
  candidates: tuple = ()
  candidate_ids: np.ndarray | None = None
  task_candidates: dict = dataclasses.field(default_factory=dict)
  inputs: dict = dataclasses.field(default_factory=dict)
  word_ids: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    words = list(dict.fromkeys(w for t in self.tasks.values() for w in t.label_words))
    self.candidates = tuple(words)
    ids = target_ids(self.tokenizer, words, self.max_target_len)
    length = int(max(np.sum(ids >= 0, axis=1)))
    self.candidate_ids = ids[:, :length]
    for name, task in self.tasks.items():
      self.task_candidates[name] = np.asarray([words.index(w) for w in task.label_words],
                                              np.int32)
      self.word_ids[name] = target_ids(self.tokenizer, task.label_words, self.max_target_len)
      self.inputs[name] = {s: models.encode_texts(self.tokenizer, task.inputs(s),
                                                  self.max_input_len)
                           for s in text_tasks.SPLITS}

  def candidate_mask(self, task: str) -> np.ndarray:
    """``[C]`` bool: which candidates are label words of ``task``."""
    mask = np.zeros(len(self.candidates), bool)
    mask[self.task_candidates[task]] = True
    return mask

  def train_batches(self, task: str, batch_size: int, seed: int,
                    start_step: int = 0) -> Iterator[tuple]:
    """Training batches ``(input_ids, attention_mask, labels)`` from ``start_step`` on.

    The order is :func:`saft_jax.data.text_train_batches`' (a function of seed and step);
    ``labels`` are the class's label-word ids with -100 padding.
    """
    ids, mask = self.inputs[task]["train"]
    words = self.word_ids[task]
    for b in text_tasks.text_train_batches(self.tasks[task], batch_size, seed, start_step):
      yield ids[b["index"]], mask[b["index"]], words[b["labels"]]

  def eval_batches(self, task: str, split: str, batch_size: int) -> Iterator[tuple]:
    """Every example of ``split`` once: ``(input_ids, attention_mask, label_candidate,
    row_mask)``, the last batch padded (``row_mask`` False on padding rows)."""
    ids, mask = self.inputs[task][split]
    cands = self.task_candidates[task]
    for b in text_tasks.text_eval_batches(self.tasks[task], split, batch_size):
      yield ids[b["index"]], mask[b["index"]], cands[b["labels"]], b["mask"]


def _task_names(config, known: tuple) -> list:
  names = list(config.tasks or known)
  unknown = [t for t in names if t not in known]
  if unknown:
    raise ValueError(f"unknown task(s) {unknown} of the {config.suite} suite; known: "
                     f"{', '.join(known)}")
  return names


# Span-corruption sentinels of the word vocabulary. Pretext sentences have at most 13
# words, so at most 2 are masked in one span, which the roll may cut in two: targets use
# at most 3 sentinels (a test checks this on the corpus).
WORD_SENTINELS = 8


def offline_vocab(text):
  """The ``text`` suite's tokenizer for ``text.vocab``: the grammar's words with
  :data:`WORD_SENTINELS` sentinels, or ByT5's bytes (sentinels spelled as bytes)."""
  if text.vocab == "word":
    return models.WordVocab(text_offline.vocabulary(), extra_ids=WORD_SENTINELS)
  if text.vocab == "byte":
    return models.ByteVocab(extra_ids=0)
  raise ValueError(f"unknown text.vocab {text.vocab!r}; known: word, byte")


def offline_t5_config(text, vocab) -> t5_lib.T5Config:
  """The T5 of the ``text`` suite from ``config.text``'s model sizes and ``vocab``."""
  if text.d_model % text.num_heads:
    raise ValueError(f"text.d_model {text.d_model} is not divisible by text.num_heads "
                     f"{text.num_heads}")
  return t5_lib.T5Config(
      vocab_size=vocab.vocab_size, d_model=text.d_model, d_kv=text.d_model // text.num_heads,
      d_ff=text.d_ff, num_layers=text.num_layers, num_decoder_layers=text.num_decoder_layers,
      num_heads=text.num_heads, feed_forward_proj=text.feed_forward_proj,
      tie_word_embeddings=text.tie_word_embeddings,
      pad_token_id=vocab.pad_id, eos_token_id=vocab.eos_id)


def theta0_key(config) -> dict:
  """The settings that define the ``text`` suite's θ0 (its cache key)."""
  fields = dataclasses.asdict(config.text)
  return dict(suite="text", **{k: v for k, v in fields.items()
                               if k in _THETA0_FIELDS or k.startswith("pretrain_")})


def _offline_theta0(config, cfg, vocab, cache_dir: str, tasks: dict):
  """θ0 of the ``text`` suite: pre-trained once, then read from ``cache_dir``.

  ``tasks`` are the suite's built tasks; pre-training excludes the inputs of all four
  tasks, so the ones not selected are built here (each task depends only on the seed,
  sizes and level, not on which others are built).
  """
  from saft_jax.experiment.text_pretrain import pretrain_text_t5
  key = json.loads(json.dumps(theta0_key(config)))  # tuples as lists, as read back
  theta_path = os.path.join(cache_dir, "theta0.msgpack")
  key_path = os.path.join(cache_dir, "suite.json")
  if os.path.exists(key_path) and os.path.exists(theta_path) and json.load(open(key_path)) == key:
    logger.info("text suite: θ0 read from %s", theta_path)
    return jax.tree.map(jnp.asarray, load_tree(theta_path))
  if config.text.pretrain_steps > 0:
    logger.info("text suite: pre-training θ0 (%d steps)", config.text.pretrain_steps)
    others = [t for t in TEXT_TASKS if t not in tasks]
    every_task = dict(tasks, **text_offline.offline_text_suite(
        seed=0, sizes=config.text.sizes, tasks=others, level=config.text.level))
    exclude = {x for task in every_task.values() for split in text_tasks.SPLITS
               for x in task.inputs(split)}
    params0 = pretrain_text_t5(cfg, vocab, config.text, seed=0, exclude=exclude)
  else:  # no pre-training: a random T5
    params0 = jax.jit(t5_lib.init_t5_params, static_argnums=0)(cfg, jax.random.key(0))
  os.makedirs(cache_dir, exist_ok=True)
  save_tree(theta_path, params0)
  with open(key_path, "w") as f:
    json.dump(key, f, indent=1)
  return params0


def build_offline_text_suite(config, cache_dir: str) -> TextSuite:
  """The ``text`` suite of ``config`` (see the module docstring)."""
  text = config.text
  tasks = text_offline.offline_text_suite(seed=0, sizes=text.sizes,
                                          tasks=_task_names(config, TEXT_TASKS), level=text.level)
  vocab = offline_vocab(text)
  cfg = offline_t5_config(text, vocab)
  params0 = _offline_theta0(config, cfg, vocab, cache_dir, tasks)
  return TextSuite("text", tasks, params0, cfg, vocab, text.max_input_len, text.max_target_len,
                   text.score, jnp.dtype(text.compute_dtype))


def build_glue_suite(config, cache_dir: str) -> TextSuite:
  """The ``glue`` suite of ``config`` (see the module docstring)."""
  del cache_dir  # θ0 is the checkpoint itself
  text = config.text
  names = _task_names(config, GLUE_TASKS)
  ckpt = text.t5_checkpoint
  if not ckpt:
    raise ValueError("the glue suite needs a T5 checkpoint: set text.t5_checkpoint (--set "
                     f"text.t5_checkpoint=DIR) or, for the built-in glue config, the "
                     f"{T5_CHECKPOINT_ENV} environment variable (a Hugging Face T5 directory "
                     "such as google/flan-t5-base)")
  if not os.path.isdir(ckpt):
    raise FileNotFoundError(f"T5 checkpoint not found: {ckpt!r} (text.t5_checkpoint, from "
                            f"{T5_CHECKPOINT_ENV} in the built-in glue config); expected a "
                            "Hugging Face T5 directory with config.json and the weights")
  t5 = models.load_t5(ckpt)
  tokenizer = models.load_text_tokenizer(text.tokenizer_dir or ckpt)
  eos = getattr(tokenizer, "eos_token_id", None)
  if eos is not None and eos != t5.config.eos_token_id:
    raise ValueError(f"the tokenizer's EOS id {eos} differs from the checkpoint's "
                     f"{t5.config.eos_token_id}: tokenizer and checkpoint do not match")
  tasks = {n: text_tasks.load_glue_task(n, data_dir=text.data_dir) for n in names}
  return TextSuite("glue", tasks, t5.params, t5.config, tokenizer, text.max_input_len,
                   text.max_target_len, text.score, jnp.dtype(text.compute_dtype))


def build_text_suite(config, cache_dir: str) -> TextSuite:
  """The text suite named by ``config.suite`` ("text" or "glue")."""
  if config.suite == "text":
    return build_offline_text_suite(config, cache_dir)
  if config.suite == "glue":
    return build_glue_suite(config, cache_dir)
  raise ValueError(f"{config.suite!r} is not a text suite; known: text, glue")


def config_quantities(suite: TextSuite, config) -> dict:
  """ρ per coordinate and lr relative to the weight scale, with Flan-T5-base's values
  (the text counterpart of :func:`saft_jax.experiment.regime.config_quantities`)."""
  d = regime_lib.num_params(suite.params0)
  scale = regime_lib.rms(suite.params0)
  return dict(
      num_params=d, asam_rho=config.optim.asam_rho,
      asam_rho_per_coordinate=config.optim.asam_rho / math.sqrt(d),
      paper_asam_rho_per_coordinate=regime_lib.PAPER_ASAM_RHO / math.sqrt(FLAN_T5_BASE_PARAMS),
      dimension_matched_rho=regime_lib.dimension_matched_rho(d, d_ref=FLAN_T5_BASE_PARAMS),
      flan_t5_base_num_params=FLAN_T5_BASE_PARAMS, lr=config.optim.lr, rms_theta0=scale,
      lr_over_rms_theta0=config.optim.lr / scale, steps=config.steps,
      batch_size=config.batch_size)


def shard(batches, mesh):
  """``batches`` placed on ``mesh``'s data axis (unchanged without a mesh)."""
  if mesh is None:
    return batches
  return (train_lib.shard_batch(b, mesh) for b in batches)
