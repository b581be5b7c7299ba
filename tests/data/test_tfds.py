"""TFDS tasks through the real pipeline on `tfds.testing.mock_data`.

`mock_data(policy=MockPolicy.USE_CODE)` generates random examples from each
builder's feature spec (no metadata files or downloads needed); it yields
`num_examples` records for *any* split string, in a fixed order, so pool
positions are reproducible between the task and the references below.
"""
import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")
from PIL import Image  # noqa: E402

import saft_jax.data as data  # noqa: E402
from saft_jax.data import preprocess  # noqa: E402

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
ONE = dict(process_index=0, process_count=1)


@pytest.fixture
def mock50():
  with tfds.testing.mock_data(num_examples=50, policy=tfds.testing.MockPolicy.USE_CODE):
    yield


def _raw(builder, split):
  ds = tfds.load(builder, split=split, shuffle_files=False)
  return [(ex["image"], int(ex["label"])) for ex in ds.as_numpy_iterator()]


def _hand_eval(img, size=224):
  """Independent eval transform: shorter side -> size (bicubic), center crop, normalize."""
  if img.shape[-1] == 1:
    img = np.repeat(img, 3, axis=-1)
  h, w = img.shape[:2]
  nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
  r = tf.image.resize(img.astype(np.float32), (nh, nw), method="bicubic", antialias=True)
  r = np.clip(r.numpy(), 0, 255)
  top, left = int(round((nh - size) / 2)), int(round((nw - size) / 2))
  crop = r[top:top + size, left:left + size]
  return (crop / 255.0 - MEAN) / STD, (img, nh, nw, top, left)


def _pil_eval(img, nh, nw, top, left, size=224):
  p = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BICUBIC), np.float32)
  return (p[top:top + size, left:left + size] / 255.0 - MEAN) / STD


@pytest.mark.parametrize("name,builder", [("mnist", "mnist"), ("dtd", "dtd"),
                                          ("svhn", "svhn_cropped")])
def test_eval_pipeline_matches_hand_computation(mock50, name, builder):
  task = data.load_task(name)
  raw = _raw(builder, "train+validation" if name == "dtd" else "train")
  n = len(raw)
  tr, va = data.protocol_val_split(n)
  assert (task.num_examples("train"), task.num_examples("val")) == (45, 5)
  assert np.array_equal(task.stream.split_indices("val")[1],
                        np.sort(np.random.default_rng(0).permutation(n)[:5]))
  assert len(np.intersect1d(tr, va)) == 0
  x, y, m = next(data.eval_batches(task, "val", 8, **ONE))
  assert x.shape == (8, 224, 224, 3) and x.dtype == np.float32 and y.dtype == np.int32
  assert m.tolist() == [True] * 5 + [False] * 3
  assert y[:5].tolist() == [raw[k][1] for k in va]
  for row in (0, 4):
    ref, (rgb, nh, nw, top, left) = _hand_eval(raw[va[row]][0])
    np.testing.assert_allclose(x[row], ref, atol=1e-4)
    # PIL's bicubic (CLIP's) agrees up to PIL's uint8 rounding and clipping between its
    # two 1-D passes (visible on the mock's white noise): compare in uint8 levels.
    levels = np.abs(x[row] - _pil_eval(rgb, nh, nw, top, left)) * STD * 255
    assert levels.mean() < 0.75 and np.percentile(levels, 90) < 2.0
  assert -MEAN.max() / STD.min() - 1e-4 <= x.min() and x.max() <= (1 - MEAN.min()) / STD.min() + 1e-4


def test_eurosat_own_split(mock50):
  task = data.load_task("eurosat/rgb", image_size=32)
  a, b = data.own_split_bounds(50, (0.8, 0.1, 0.1))
  assert [task.num_examples(s) for s in data.SPLITS] == [a, b - a, 50 - b] == [40, 5, 5]
  raw = _raw("eurosat/rgb", "train")
  test_idx = np.sort(np.random.default_rng(0).permutation(50)[b:])
  labels = np.concatenate([y[m] for _, y, m in data.eval_batches(task, "test", 4, **ONE)])
  assert labels.tolist() == [raw[k][1] for k in test_idx]
  parts = [task.stream.split_indices(s)[1] for s in data.SPLITS]
  assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(50))


def _take(it, k):
  return [next(it) for _ in range(k)]


def test_train_stream_resume_hosts_and_epoch_coverage(mock50):
  task = data.load_task("mnist", image_size=32)  # 45 train examples: 5 steps of 9 per epoch
  kw = dict(seed=5, augment=True)
  full = _take(data.train_batches(task, 9, **kw, **ONE), 8)
  assert full[0][0].shape == (9, 32, 32, 3) and full[0][1].dtype == np.int32
  resumed = _take(data.train_batches(task, 9, start_step=3, **kw, **ONE), 5)
  for a, b in zip(full[3:], resumed):
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
  # Two epochs see the same examples in different orders.
  assert not np.array_equal(np.concatenate([b[1] for b in full[:3]]),
                            np.concatenate([b[1] for b in full[5:8]]))
  # Per-host shares of a global batch of 12 (3 steps/epoch) concatenate to the global batch.
  glob = _take(data.train_batches(task, 12, seed=5, start_step=2, **{**ONE}), 2)
  shares = [_take(data.train_batches(task, 12, seed=5, start_step=2, process_index=p,
                                     process_count=3), 2) for p in range(3)]
  for j in range(2):
    np.testing.assert_array_equal(np.concatenate([s[j][0] for s in shares]), glob[j][0])
    np.testing.assert_array_equal(np.concatenate([s[j][1] for s in shares]), glob[j][1])
  # Without augmentation an epoch holds each training example exactly once.
  epoch = _take(data.train_batches(task, 9, seed=5, augment=False, **ONE), 5)
  ev = [(x[m], y[m]) for x, y, m in data.eval_batches(task, "train", 16, **ONE)]
  ev_x = np.concatenate([e[0] for e in ev])
  got = np.concatenate([b[0] for b in epoch])
  key = lambda a: np.round(a.reshape(len(a), -1).sum(1), 2)  # noqa: E731
  np.testing.assert_allclose(np.sort(key(got)), np.sort(key(ev_x)), atol=1e-2)
  assert len(np.unique(key(got))) == 45


def test_random_resized_crop_box_bounds():
  areas = []
  for s in range(60):
    top, left, h, w = (int(v) for v in preprocess.random_resized_crop_box(
        100, 60, tf.constant([s, 7], tf.int64)))
    assert 0 <= top and top + h <= 100 and 0 <= left and left + w <= 60
    areas.append(h * w / 6000)
  assert 0.6 <= min(areas) and max(areas) <= 1.0 and len(set(areas)) > 10
  img = np.random.default_rng(0).integers(0, 256, (50, 70, 3)).astype(np.uint8)
  out = preprocess.train_preprocess(img, tf.constant([1, 2], tf.int64), 24)
  assert out.shape == (24, 24, 3) and out.dtype == tf.float32


def test_errors(tmp_path):
  with pytest.raises(ValueError, match="known names: .*mnist"):
    data.load_task("imagenet")
  with pytest.raises(FileNotFoundError, match="tfds build svhn_cropped"):
    data.load_task("svhn", data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="downloads/manual"):
    data.load_task("resisc45", data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="expected layout"):
    data.load_task("gtsrb", folder_root=str(tmp_path))
  assert os.listdir(tmp_path) == []  # nothing was downloaded


@pytest.mark.parametrize("shape", [(47, 17, 3), (17, 47, 1), (300, 230, 3)])
def test_eval_preprocess_non_square(shape):
  # (47, 17): resized to 619 x 224, crop offset round(197.5) = 198 (not floor's 197);
  # (300, 230): downsampling, where the antialiased bicubic matters.
  img = np.random.default_rng(1).integers(0, 256, shape).astype(np.uint8)
  out = preprocess.eval_preprocess(img, 224).numpy()
  ref, _ = _hand_eval(img)
  np.testing.assert_allclose(out, ref, atol=1e-4)
