"""Offline digits suite: transforms, label maps, splits, batches (pure NumPy)."""
import subprocess
import sys

import numpy as np
import pytest
from sklearn.datasets import load_digits

import saft_jax.data as data
from saft_jax.data import offline


@pytest.fixture(scope="module")
def suite():
  return data.offline_suite()


@pytest.fixture(scope="module")
def raw():
  d = load_digits()
  return d.images, d.target


def _norm(x):
  return (x / 16.0 - 0.5) * 2.0


def _reference(name, img, y, perm):
  """Independent per-image recomputation of each task's definition."""
  out = np.empty((8, 8))
  for i in range(8):
    for j in range(8):
      if name == "rot90":  # 90° counter-clockwise: out[i, j] = img[j, 7 - i]
        out[i, j] = img[j, 7 - i]
      elif name == "flip":
        out[i, j] = img[i, 7 - j]
      elif name == "invert":
        out[i, j] = 16 - img[i, j]
      elif name == "permute":
        src = perm[i * 8 + j]
        out[i, j] = img[src // 8, src % 8]
      else:
        out[i, j] = img[i, j]
  label = {"parity": y % 2, "ge5": int(y >= 5), "mod3": y % 3}.get(name, y)
  return _norm(out), label


def test_transforms_and_labels(suite, raw):
  images, targets = raw
  perm = np.random.default_rng([0, 1]).permutation(64)
  assert set(suite) == {"digits", "rot90", "flip", "invert", "permute", "parity", "ge5", "mod3"}
  for name, task in suite.items():
    assert task.num_classes == {"parity": 2, "ge5": 2, "mod3": 3}.get(name, 10)
    for split in data.SPLITS:
      x, y = task.splits[split]
      assert x.dtype == np.float32 and x.shape[1:] == (8, 8, 1) and y.dtype == np.int32
      rows = task.indices[split]
      for k in (0, 5, len(rows) - 1):
        ref_x, ref_y = _reference(name, images[rows[k]], targets[rows[k]], perm)
        np.testing.assert_allclose(x[k, :, :, 0], ref_x, atol=1e-6)
        assert y[k] == ref_y
      assert y.min() >= 0 and y.max() < task.num_classes


def test_splits_disjoint_and_test_shared(suite):
  first = suite["digits"]
  idx = first.indices
  assert len(idx["test"]) == round(0.2 * 1797)
  allrows = np.concatenate([idx[s] for s in data.SPLITS])
  assert len(np.unique(allrows)) == len(allrows)
  for task in suite.values():
    for s in data.SPLITS:
      assert np.array_equal(task.indices[s], idx[s])
  np.testing.assert_array_equal(suite["parity"].splits["test"][0], first.splits["test"][0])
  pre = data.pretext_task()
  assert pre.num_classes == 10
  assert np.array_equal(pre.indices["test"], idx["test"])
  pre_rows = np.concatenate([pre.indices["train"], pre.indices["val"]])
  assert len(np.intersect1d(pre_rows, np.concatenate([idx["train"], idx["val"], idx["test"]]))) == 0
  assert len(pre_rows) + len(allrows) == 1797
  assert len(idx["val"]) == round(0.1 * (len(idx["val"]) + len(idx["train"])))


def test_unknown_offline_task():
  with pytest.raises(ValueError, match="known"):
    data.offline_suite(["digits", "nope"])


@pytest.mark.parametrize("count", [1, 4])
def test_eval_batches_cover_once(suite, count):
  task = suite["rot90"]
  x, y = task.splits["val"]
  got_x, got_y, got_m = [], [], []
  for p in range(count):
    for bx, by, bm in data.eval_batches(task, "val", 16, process_index=p, process_count=count):
      assert bx.shape == (16 // count, 8, 8, 1) and bm.dtype == bool
      got_x.append((p, bx)), got_y.append((p, by)), got_m.append((p, bm))
  # Reassemble global batches: batch j = concat over processes of their j-th share.
  nb = len(got_x) // count
  gx = np.concatenate([np.concatenate([got_x[p * nb + j][1] for p in range(count)])
                       for j in range(nb)])
  gy = np.concatenate([np.concatenate([got_y[p * nb + j][1] for p in range(count)])
                       for j in range(nb)])
  gm = np.concatenate([np.concatenate([got_m[p * nb + j][1] for p in range(count)])
                       for j in range(nb)])
  assert gm.sum() == len(y) == 108
  np.testing.assert_array_equal(gx[gm], x)
  np.testing.assert_array_equal(gy[gm], y)
  assert not gm[len(y):].any() and (gx[len(y):] == 0).all()


def _take(it, k):
  return [next(it) for _ in range(k)]


@pytest.mark.parametrize("augment", [False, True])
def test_train_resume_and_host_split(suite, augment):
  task = suite["flip"]
  kw = dict(seed=3, augment=augment, process_index=0, process_count=1)
  full = _take(data.train_batches(task, 64, **kw), 40)  # 15 steps/epoch: crosses epochs
  resumed = _take(data.train_batches(task, 64, start_step=17, **kw), 23)
  for a, b in zip(full[17:], resumed):
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
  shares = [_take(data.train_batches(task, 64, seed=3, augment=augment, start_step=5,
                                     process_index=p, process_count=4), 3) for p in range(4)]
  for j in range(3):
    np.testing.assert_array_equal(np.concatenate([s[j][0] for s in shares]), full[5 + j][0])
    np.testing.assert_array_equal(np.concatenate([s[j][1] for s in shares]), full[5 + j][1])
  x, y = task.splits["train"]
  # Without augmentation, each epoch's 15 batches hold 960 distinct training images.
  if not augment:
    idx = np.concatenate([data.batch_indices(len(y), 64, 3, s) for s in range(15)])
    np.testing.assert_array_equal(np.concatenate([b[0] for b in full[:15]]), x[idx])
    assert len(np.unique(idx)) == 960


def test_shift_augment_is_a_one_pixel_shift(suite):
  x = suite["digits"].splits["train"][0][:32]
  out = offline.shift_augment(x, seed=1, step=2)
  np.testing.assert_array_equal(out, offline.shift_augment(x, seed=1, step=2))
  assert not np.array_equal(out, offline.shift_augment(x, seed=1, step=3))
  seen = set()
  for i in range(32):
    img = x[i, :, :, 0]
    cands = []
    for dy in (-1, 0, 1):
      for dx in (-1, 0, 1):
        # Independent reference: out[r, c] = img[clip(r - dy), clip(c - dx)].
        r = np.clip(np.arange(8) - dy, 0, 7)
        c = np.clip(np.arange(8) - dx, 0, 7)
        if np.array_equal(out[i, :, :, 0], img[np.ix_(r, c)]):
          cands.append((dy, dx))
    assert cands, f"image {i} is not a 1-pixel shift"
    seen.update(cands)
  assert len(seen) > 3


def test_batch_larger_than_split_raises(suite):
  with pytest.raises(ValueError, match="exceeds"):
    data.train_batches(suite["digits"], 2048, seed=0, process_index=0, process_count=1)


def test_import_needs_no_tensorflow():
  code = ("import sys, saft_jax.data as d; d.offline_suite(['digits']); "
          "assert 'tensorflow' not in sys.modules and 'tensorflow_datasets' not in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True)
