"""Text-to-text classification tasks: :class:`TextTask`, batching, GLUE via TFDS.

A :class:`TextTask` holds its three splits in memory as strings: each
:class:`TextSplit` has the model ``inputs`` (``list[str]``), int32 class
``labels`` and optional source example ``ids``. Class ``c`` is written as the
target string ``label_words[c]`` (T5 style: the model generates the label word).
Tokenization happens elsewhere.

Batching mirrors :mod:`saft_jax.data.loader` for image tasks:

* :func:`text_train_batches` yields global batch ``s`` (of ``B`` examples) as a
  pure function of ``(seed, s)`` (:func:`saft_jax.data.splits.batch_indices`:
  a fresh permutation per epoch, the ragged tail dropped), so ``start_step``
  resumes exactly.
* :func:`text_eval_batches` yields every example of a split once, in order, the
  last batch padded (empty strings, label 0, index 0) with ``mask`` False on
  padding rows.
* ``batch_size`` is the *global* batch; process ``p`` of ``P`` gets rows
  ``[p*B/P, (p+1)*B/P)`` of every global batch
  (:func:`saft_jax.data.splits.host_rows`).

Batches are dicts: ``inputs`` and ``targets`` (lists of strings), ``labels``
(int32), ``index`` (int64 positions in the split, e.g. to gather from a split
tokenized once) and, for evaluation, ``mask`` (bool).

GLUE (:func:`load_glue_task`) reads prepared TFDS ``glue/<task>`` data, never
downloads:

======  ===========  ====================  =================================
task    builder      fields                label words (TFDS label order)
======  ===========  ====================  =================================
cola    glue/cola    sentence              unacceptable, acceptable
mrpc    glue/mrpc    sentence1, sentence2  not_equivalent, equivalent
rte     glue/rte     sentence1, sentence2  entailment, not_entailment
sst2    glue/sst2    sentence              negative, positive
======  ===========  ====================  =================================

The label words are the TFDS ``ClassLabel`` names of each config (checked
against the builder's metadata at load time). Inputs follow the T5 GLUE
preprocessor (Raffel et al., 2020, ``t5.data.preprocessors.glue``): the task
name, then ``<field>: <text>`` for each field, fields in sorted order, e.g.
``"cola sentence: ..."``, ``"rte sentence1: ... sentence2: ..."``. That is the
text-to-text form T5 was trained on for these tasks and it keeps the two
segments of a pair explicitly named; Flan's natural-language instruction
templates vary per example and are left to the caller.

Splits: the GLUE ``test`` split has no public labels, so the GLUE
``validation`` split is the test set, and the protocol's held-out share of
``train`` (10%, at most 5000, seed 0;
:func:`saft_jax.data.splits.protocol_val_split`) is the validation set.
Examples are ordered by their GLUE ``idx`` before splitting, so the split
members depend only on the data, not on the order of the prepared files.

TensorFlow and tensorflow-datasets are imported inside :func:`load_glue_task`
only.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np

from saft_jax.data import splits as splits_lib

SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True, eq=False)
class TextSplit:
  """One split of a :class:`TextTask`.

  Attributes:
    inputs: model input strings.
    labels: int32 class ids, one per input.
    ids: optional int64 ids of the examples in their source (e.g. GLUE ``idx``).
  """
  inputs: list
  labels: np.ndarray
  ids: Optional[np.ndarray] = None

  def __post_init__(self):
    inputs = list(self.inputs)
    for text in inputs:
      if not isinstance(text, str):
        raise TypeError(f"inputs must be strings, got {type(text).__name__}")
    labels = np.asarray(self.labels)
    if labels.ndim != 1 or len(labels) != len(inputs):
      raise ValueError(f"labels must be 1-D with one entry per input; got shape "
                       f"{labels.shape} for {len(inputs)} inputs")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
      raise TypeError(f"labels must be integers, got dtype {labels.dtype}")
    object.__setattr__(self, "inputs", inputs)
    object.__setattr__(self, "labels", labels.astype(np.int32))
    if self.ids is not None:
      ids = np.asarray(self.ids, np.int64)
      if ids.shape != labels.shape:
        raise ValueError(f"ids must have shape {labels.shape}, got {ids.shape}")
      object.__setattr__(self, "ids", ids)

  def __len__(self) -> int:
    return len(self.inputs)


@dataclasses.dataclass(frozen=True, eq=False)
class TextTask:
  """A text-to-text classification task with in-memory splits.

  Attributes:
    name: task name; inputs start with it (GLUE style).
    label_words: target string of each class (index = class id).
    splits: ``{"train", "val", "test"} -> TextSplit``.
  """
  name: str
  label_words: tuple
  splits: Mapping[str, TextSplit]

  def __post_init__(self):
    words = tuple(self.label_words)
    if len(words) < 2 or len(set(words)) != len(words) or not all(
        isinstance(w, str) and w for w in words):
      raise ValueError(f"task {self.name!r}: label_words must be >= 2 distinct non-empty "
                       f"strings, got {words}")
    object.__setattr__(self, "label_words", words)
    if set(self.splits) != set(SPLITS):
      raise ValueError(f"task {self.name!r}: splits must be exactly {SPLITS}, got "
                       f"{sorted(self.splits)}")
    for split, part in self.splits.items():
      if not isinstance(part, TextSplit):
        raise TypeError(f"task {self.name!r}: split {split!r} must be a TextSplit")
      if part.labels.size and (part.labels.min() < 0 or part.labels.max() >= len(words)):
        raise ValueError(f"task {self.name!r}: {split} labels must lie in "
                         f"[0, {len(words)}), got [{part.labels.min()}, {part.labels.max()}]")

  @property
  def num_classes(self) -> int:
    """Number of classes (``len(label_words)``)."""
    return len(self.label_words)

  def num_examples(self, split: str) -> int:
    """Number of examples in ``split`` ("train", "val" or "test")."""
    return len(self._split(split))

  def inputs(self, split: str) -> list:
    """Input strings of ``split`` (a copy)."""
    return list(self._split(split).inputs)

  def labels(self, split: str) -> np.ndarray:
    """int32 class ids of ``split``."""
    return self._split(split).labels

  def targets(self, split: str) -> list:
    """Target strings of ``split``: ``label_words[label]`` per example."""
    return [self.label_words[int(y)] for y in self._split(split).labels]

  def label_of(self, text: str) -> int:
    """Class id of a target string (surrounding whitespace ignored), -1 if none.

    Used to score generated text: anything that is not exactly a label word
    counts as wrong.
    """
    try:
      return self.label_words.index(text.strip())
    except ValueError:
      return -1

  def _split(self, split: str) -> TextSplit:
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return self.splits[split]


def _gather(task: TextTask, split: str, idx: np.ndarray) -> dict:
  part = task.splits[split]
  labels = part.labels[idx]
  return {"inputs": [part.inputs[i] for i in idx],
          "targets": [task.label_words[int(y)] for y in labels],
          "labels": labels,
          "index": np.asarray(idx, np.int64)}


def text_train_batches(task: TextTask, batch_size: int, seed: int, start_step: int = 0, *,
                       process_index: Optional[int] = None,
                       process_count: Optional[int] = None) -> Iterator[dict]:
  """Infinite training batches of ``task`` from global step ``start_step`` on.

  Args:
    task: the task.
    batch_size: global batch size (a multiple of ``process_count``, at most the
      number of training examples).
    seed: data-order seed; batch ``s`` depends on ``(seed, s)`` only.
    start_step: first global step to yield (resume point).
    process_index: this process (default ``jax.process_index()``).
    process_count: number of processes (default ``jax.process_count()``).

  Returns:
    An iterator of dicts with this process's ``B/P`` rows: ``inputs`` and
    ``targets`` (lists of str), ``labels`` (int32) and ``index`` (int64
    positions in the train split).
  """
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  p, count = splits_lib.resolve_process(process_index, process_count)
  rows = splits_lib.host_rows(batch_size, p, count)
  n = task.num_examples("train")
  splits_lib.steps_per_epoch(n, batch_size)  # validates eagerly
  return _train_iter(task, n, batch_size, int(seed), int(start_step), rows)


def _train_iter(task, n, batch_size, seed, start_step, rows):
  for step in itertools.count(start_step):
    idx = splits_lib.batch_indices(n, batch_size, seed, step)
    yield _gather(task, "train", idx[rows])


def text_eval_batches(task: TextTask, split: str, batch_size: int, *,
                      process_index: Optional[int] = None,
                      process_count: Optional[int] = None) -> Iterator[dict]:
  """Every example of ``split`` once, in order, in padded global batches.

  Args:
    task: the task.
    split: "train", "val" or "test".
    batch_size: global batch size (a multiple of ``process_count``).
    process_index: this process (default ``jax.process_index()``).
    process_count: number of processes (default ``jax.process_count()``).

  Returns:
    An iterator of dicts (this process's rows) as in :func:`text_train_batches`
    plus ``mask`` (bool, False on padding rows, whose ``inputs``/``targets`` are
    ``""`` and ``labels``/``index`` 0), so ``sum(correct & mask)`` over all
    batches and processes divided by ``num_examples`` is exact.
  """
  n = task.num_examples(split)
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  p, count = splits_lib.resolve_process(process_index, process_count)
  rows = splits_lib.host_rows(batch_size, p, count)
  return _eval_iter(task, split, n, batch_size, rows)


def _eval_iter(task, split, n, batch_size, rows):
  for start in range(0, n, batch_size):
    pos = np.arange(start, start + batch_size)[rows]
    valid = pos < n
    batch = _gather(task, split, pos[valid])
    pad = int((~valid).sum())
    batch["inputs"] += [""] * pad
    batch["targets"] += [""] * pad
    batch["labels"] = np.concatenate([batch["labels"], np.zeros(pad, np.int32)])
    batch["index"] = np.concatenate([batch["index"], np.zeros(pad, np.int64)])
    batch["mask"] = valid
    yield batch


# --------------------------------------------------------------------------- GLUE


@dataclasses.dataclass(frozen=True)
class GlueSpec:
  """How a GLUE task maps onto its TFDS config."""
  builder: str
  fields: tuple
  label_words: tuple


GLUE_TASKS: dict = {
    "cola": GlueSpec("glue/cola", ("sentence",), ("unacceptable", "acceptable")),
    "mrpc": GlueSpec("glue/mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent")),
    "rte": GlueSpec("glue/rte", ("sentence1", "sentence2"), ("entailment", "not_entailment")),
    "sst2": GlueSpec("glue/sst2", ("sentence",), ("negative", "positive")),
}


def glue_input(name: str, example: Mapping[str, str]) -> str:
  """The T5-style input of a GLUE example: ``"<name> <field>: <text> ..."``.

  Args:
    name: a key of :data:`GLUE_TASKS`.
    example: ``{field: text}`` with the task's fields.

  Returns:
    e.g. ``"mrpc sentence1: A. sentence2: B."``.
  """
  spec = GLUE_TASKS[name]
  parts = [name]
  for field in sorted(spec.fields):
    parts += [f"{field}:", example[field]]
  return " ".join(parts)


def _glue_name(name: str) -> str:
  key = name.lower().replace("-", "")
  key = key[len("glue/"):] if key.startswith("glue/") else key
  if key not in GLUE_TASKS:
    raise ValueError(f"unknown GLUE task {name!r}; known: {', '.join(sorted(GLUE_TASKS))}")
  return key


def _glue_not_prepared(spec: GlueSpec, data_dir: Optional[str], err: Exception):
  from saft_jax.data.tfds_tasks import default_data_dir
  d = data_dir or default_data_dir()
  return FileNotFoundError(
      f"TFDS dataset {spec.builder!r} is not prepared in {d!r}. Prepare it on a machine "
      f"with internet: `tfds build {spec.builder} --data_dir {d}` (or copy a prepared "
      f"glue/ folder there). ({err})")


def _read_glue(spec: GlueSpec, split: str, data_dir: Optional[str]):
  import tensorflow_datasets as tfds
  ds = tfds.load(spec.builder, split=split, data_dir=data_dir, download=False,
                 shuffle_files=False)
  rows = list(ds.as_numpy_iterator())
  ids = np.asarray([int(r["idx"]) for r in rows], np.int64)
  order = np.argsort(ids, kind="stable")
  texts = [{f: rows[i][f].decode("utf-8") for f in spec.fields} for i in order]
  labels = np.asarray([int(rows[i]["label"]) for i in order], np.int64)
  return texts, labels, ids[order]


def load_glue_task(name: str, data_dir: Optional[str] = None) -> TextTask:
  """A GLUE task from prepared TFDS data, in T5 text-to-text form (see module doc).

  Args:
    name: "cola", "mrpc", "rte" or "sst2" (also accepted: "glue/<name>", "sst-2").
    data_dir: TFDS data directory (default ``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``).

  Returns:
    The :class:`TextTask`: ``train``/``val`` from GLUE train (protocol split),
    ``test`` = GLUE validation; ``ids`` are the GLUE ``idx`` values.

  Raises:
    ValueError: unknown task name, or TFDS label names that differ from
      :data:`GLUE_TASKS`.
    FileNotFoundError: the TFDS data is not prepared (nothing is downloaded).
  """
  key = _glue_name(name)
  spec = GLUE_TASKS[key]
  import tensorflow_datasets as tfds
  try:
    builder = tfds.builder(spec.builder, data_dir=data_dir)
    names = tuple(builder.info.features["label"].names)
    train = _read_glue(spec, "train", data_dir)
    test = _read_glue(spec, "validation", data_dir)
  except (AssertionError, FileNotFoundError, tfds.core.registered.DatasetNotFoundError) as err:
    raise _glue_not_prepared(spec, data_dir, err) from err
  if names != spec.label_words:
    raise ValueError(f"TFDS {spec.builder} label names {names} differ from the expected "
                     f"{spec.label_words}")
  for split, (_, labels, _) in (("train", train), ("validation", test)):
    if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
      raise ValueError(f"TFDS {spec.builder} {split} split has labels outside "
                       f"[0, {len(names)}) (unlabeled data?)")

  def make(part, idx=None):
    texts, labels, ids = part
    idx = np.arange(len(labels)) if idx is None else idx
    return TextSplit([glue_input(key, texts[i]) for i in idx], labels[idx], ids[idx])

  tr, va = splits_lib.protocol_val_split(len(train[1]))
  return TextTask(name=key, label_words=spec.label_words,
                  splits={"train": make(train, tr), "val": make(train, va), "test": make(test)})


def known_text_tasks() -> list:
  """Every name :func:`load_text_task` accepts (GLUE and offline text tasks)."""
  from saft_jax.data import text_offline
  return sorted(set(GLUE_TASKS) | set(text_offline.TASKS))


def load_text_task(name: str, *, data_dir: Optional[str] = None, seed: int = 0,
                   sizes: Optional[Mapping[str, int] | Sequence[int]] = None) -> TextTask:
  """Any known text task by name: a GLUE task or an offline text task.

  Args:
    name: "cola", "mrpc", "rte", "sst2" (GLUE, see :func:`load_glue_task`) or an
      offline task ("sentiment", "acceptability", "paraphrase", "entailment").
    data_dir: TFDS data directory (GLUE only).
    seed: offline suite seed (offline only).
    sizes: offline split sizes (offline only; see
      :func:`saft_jax.data.text_offline.offline_text_suite`).

  Returns:
    The :class:`TextTask`.
  """
  from saft_jax.data import text_offline
  if name in text_offline.TASKS:
    return text_offline.offline_text_suite(seed=seed, sizes=sizes, tasks=[name])[name]
  try:
    key = _glue_name(name)
  except ValueError:
    raise ValueError(f"unknown text task {name!r}; known: "
                     f"{', '.join(known_text_tasks())}") from None
  return load_glue_task(key, data_dir=data_dir)
