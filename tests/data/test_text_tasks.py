"""TextTask, text batching and GLUE through TFDS (`tfds.testing.mock_data`, no network)."""
import numpy as np
import pytest

import saft_jax.data as data
from saft_jax.data import splits as splits_lib
from saft_jax.data import text_tasks
from saft_jax.data.text_tasks import TextSplit, TextTask

ONE = dict(process_index=0, process_count=1)


def _toy(n_train=10, n_val=3, n_test=7):
  def part(prefix, n):
    return TextSplit([f"{prefix} {i}" for i in range(n)], np.arange(n) % 3)
  return TextTask("toy", ("a", "b", "c"),
                  {"train": part("tr", n_train), "val": part("va", n_val),
                   "test": part("te", n_test)})


def test_text_task_accessors():
  task = _toy()
  assert task.num_classes == 3 and task.num_examples("test") == 7
  assert task.labels("train").dtype == np.int32
  assert task.targets("val") == ["a", "b", "c"]
  assert task.inputs("val") == ["va 0", "va 1", "va 2"]
  assert task.label_of(" b\n") == 1 and task.label_of("d") == -1
  with pytest.raises(ValueError, match="unknown split"):
    task.num_examples("validation")


def test_text_task_validation():
  good = TextSplit(["x", "y"], [0, 1])
  splits = {"train": good, "val": good, "test": good}
  with pytest.raises(ValueError, match="label_words"):
    TextTask("t", ("a", "a"), splits)
  with pytest.raises(ValueError, match="splits must be exactly"):
    TextTask("t", ("a", "b"), {"train": good, "test": good})
  with pytest.raises(ValueError, match="labels must lie"):
    TextTask("t", ("a", "b"), {**splits, "test": TextSplit(["x"], [2])})
  with pytest.raises(ValueError, match="one entry per input"):
    TextSplit(["x"], [0, 1])
  with pytest.raises(TypeError, match="strings"):
    TextSplit([b"x"], [0])
  with pytest.raises(TypeError, match="integers"):
    TextSplit(["x"], [0.5])


def test_train_batches_are_a_function_of_seed_and_step():
  task = _toy()
  it = data.text_train_batches(task, 4, seed=3, **ONE)
  batches = [next(it) for _ in range(6)]
  for step, b in enumerate(batches):
    idx = splits_lib.batch_indices(10, 4, 3, step)
    assert b["index"].tolist() == idx.tolist()
    assert b["inputs"] == [f"tr {i}" for i in idx]
    assert b["labels"].dtype == np.int32 and b["labels"].tolist() == (idx % 3).tolist()
    assert b["targets"] == ["abc"[i % 3] for i in idx]
  # 2 batches per epoch (tail of 2 dropped); each epoch has no repeats, epochs differ
  for e in range(3):
    rows = np.concatenate([batches[2 * e]["index"], batches[2 * e + 1]["index"]])
    assert len(set(rows.tolist())) == 8
  assert batches[0]["index"].tolist() != batches[2]["index"].tolist()
  resumed = next(data.text_train_batches(task, 4, 3, 5, **ONE))
  assert resumed["index"].tolist() == batches[5]["index"].tolist()
  other = next(data.text_train_batches(task, 4, seed=4, **ONE))
  assert other["index"].tolist() != batches[0]["index"].tolist()


def test_train_batches_split_rows_across_processes():
  task = _toy()
  full = next(data.text_train_batches(task, 4, seed=0, start_step=3, **ONE))
  parts = [next(data.text_train_batches(task, 4, seed=0, start_step=3, process_index=p,
                                        process_count=2)) for p in range(2)]
  assert parts[0]["inputs"] + parts[1]["inputs"] == full["inputs"]
  assert np.concatenate([p["labels"] for p in parts]).tolist() == full["labels"].tolist()
  with pytest.raises(ValueError, match="not divisible"):
    data.text_train_batches(task, 5, seed=0, process_index=0, process_count=2)
  with pytest.raises(ValueError, match="exceeds"):
    data.text_train_batches(task, 12, seed=0, **ONE)
  with pytest.raises(ValueError, match="start_step"):
    data.text_train_batches(task, 4, seed=0, start_step=-1, **ONE)


def test_eval_batches_cover_split_once_with_padding():
  task = _toy()
  batches = list(data.text_eval_batches(task, "test", 4, **ONE))
  assert len(batches) == 2
  last = batches[1]
  assert last["mask"].tolist() == [True, True, True, False]
  assert last["inputs"] == ["te 4", "te 5", "te 6", ""] and last["targets"][-1] == ""
  assert last["labels"].tolist() == [1, 2, 0, 0] and last["index"].tolist() == [4, 5, 6, 0]
  got = [s for b in batches for s, m in zip(b["inputs"], b["mask"]) if m]
  assert got == task.inputs("test")
  # two processes: rows of each global batch, union == single process
  halves = [list(data.text_eval_batches(task, "test", 4, process_index=p, process_count=2))
            for p in range(2)]
  for k, b in enumerate(batches):
    assert halves[0][k]["inputs"] + halves[1][k]["inputs"] == b["inputs"]
    assert np.concatenate([halves[0][k]["mask"], halves[1][k]["mask"]]).tolist() == \
        b["mask"].tolist()
  assert halves[1][1]["mask"].tolist() == [True, False]


# ------------------------------------------------------------------------- GLUE (mock)

EXPECTED_WORDS = {"cola": ("unacceptable", "acceptable"),
                  "mrpc": ("not_equivalent", "equivalent"),
                  "rte": ("entailment", "not_entailment"),
                  "sst2": ("negative", "positive")}


def _template(name, ex):
  """Hand-written T5 GLUE inputs (task name, then `field: text` in sorted field order)."""
  s = {k: v.decode() for k, v in ex.items() if isinstance(v, bytes)}
  if name in ("cola", "sst2"):
    return f"{name} sentence: {s['sentence']}"
  return f"{name} sentence1: {s['sentence1']} sentence2: {s['sentence2']}"


@pytest.fixture(scope="module")
def glue():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=50, policy=tfds.testing.MockPolicy.USE_CODE):
    tasks = {name: data.load_glue_task(name) for name in EXPECTED_WORDS}
    raw, names = {}, {}
    for name in EXPECTED_WORDS:
      builder = f"glue/{name}"
      names[name] = tuple(tfds.builder(builder).info.features["label"].names)
      raw[name] = {split: list(tfds.load(builder, split=split, shuffle_files=False)
                               .as_numpy_iterator()) for split in ("train", "validation")}
    again = data.load_glue_task("glue/rte")
  return tasks, raw, names, again


def test_glue_label_words_match_tfds_class_labels(glue):
  tasks, _, names, _ = glue
  for name, words in EXPECTED_WORDS.items():
    assert names[name] == words  # TFDS ClassLabel order
    assert tasks[name].label_words == words == data.GLUE_TASKS[name].label_words


def test_glue_templates_labels_and_splits(glue):
  tasks, raw, _, _ = glue
  for name, task in tasks.items():
    assert task.name == name
    assert [task.num_examples(s) for s in ("train", "val", "test")] == [45, 5, 50]
    for split, source in (("train", "train"), ("test", "validation")):
      rows = raw[name][source]
      order = np.argsort([int(r["idx"]) for r in rows], kind="stable")
      rows = [rows[i] for i in order]
      if split == "train":
        tr, va = splits_lib.protocol_val_split(len(rows))
        assert task.splits["val"].ids.tolist() == [int(rows[i]["idx"]) for i in va]
        assert task.inputs("val") == [_template(name, rows[i]) for i in va]
        rows = [rows[i] for i in tr]
      assert task.inputs(split) == [_template(name, r) for r in rows]
      assert task.targets(split) == [EXPECTED_WORDS[name][int(r["label"])] for r in rows]
      assert task.splits[split].ids.tolist() == [int(r["idx"]) for r in rows]
  assert tasks["mrpc"].inputs("test")[0].startswith("mrpc sentence1: ")
  assert " sentence2: " in tasks["rte"].inputs("train")[0]


def test_glue_is_deterministic(glue):
  tasks, _, _, again = glue
  for split in ("train", "val", "test"):
    assert again.inputs(split) == tasks["rte"].inputs(split)
    assert again.labels(split).tolist() == tasks["rte"].labels(split).tolist()


def test_glue_input_helper():
  assert data.glue_input("mrpc", {"sentence2": "B.", "sentence1": "A."}) == \
      "mrpc sentence1: A. sentence2: B."
  assert data.glue_input("sst2", {"sentence": "fine"}) == "sst2 sentence: fine"


def test_glue_unknown_name_lists_known():
  with pytest.raises(ValueError, match="cola, mrpc, rte, sst2"):
    data.load_glue_task("qnli")
  with pytest.raises(ValueError, match="known: .*entailment.*sst2"):
    data.load_text_task("qnli")


def test_glue_missing_data_says_how_to_prepare(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(FileNotFoundError, match=r"tfds build glue/rte --data_dir"):
    data.load_glue_task("rte", data_dir=str(tmp_path))


def test_glue_label_order_is_checked(monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  swapped = text_tasks.GlueSpec("glue/cola", ("sentence",), ("acceptable", "unacceptable"))
  monkeypatch.setitem(text_tasks.GLUE_TASKS, "cola", swapped)
  with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
    with pytest.raises(ValueError, match="label names"):
      data.load_glue_task("cola")
