"""Folder-of-images tasks: layout, labels, splits and pixels (written here with PIL)."""
import numpy as np
import pytest

pytest.importorskip("tensorflow")
from PIL import Image  # noqa: E402

import saft_jax.data as data  # noqa: E402

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
ONE = dict(process_index=0, process_count=1)


def _write(root, split, cls, i, size, mode="RGB"):
  d = root / split / cls
  d.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(hash((split, cls, i)) % 2**32)
  # smooth content (upsampled noise) so PIL and TF bicubic are comparable
  small = rng.integers(0, 256, (size[1] // 4 + 1, size[0] // 4 + 1, 3)).astype(np.uint8)
  img = Image.fromarray(small).resize(size, Image.BILINEAR).convert(mode)
  path = d / f"img{i}.png"
  img.save(path)
  return path


def _pil_reference(path, size):
  img = Image.open(path).convert("RGB")
  w, h = img.size
  nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
  r = np.asarray(img.resize((nw, nh), Image.BICUBIC), np.float32)
  top, left = int(round((nh - size) / 2)), int(round((nw - size) / 2))
  return (r[top:top + size, left:left + size] / 255.0 - MEAN) / STD


def test_folder_task(tmp_path):
  classes = ["stop", "bumpy", "yield"]  # sorted: bumpy=0, stop=1, yield=2
  for cls in classes:
    for i in range(4):
      _write(tmp_path, "train", cls, i, (40 + 4 * i, 30), mode="L" if i == 0 else "RGB")
    for i in range(2):
      _write(tmp_path, "test", cls, i, (30, 50))
  (tmp_path / "train" / "bumpy" / "notes.txt").write_text("ignored")
  task = data.folder_task(str(tmp_path), image_size=24)
  assert task.class_names == ("bumpy", "stop", "yield") and task.num_classes == 3
  assert [task.num_examples(s) for s in data.SPLITS] == [11, 1, 6]  # 10% of 12 is val
  batches = list(data.eval_batches(task, "test", 4, **ONE))
  x = np.concatenate([b[0][b[2]] for b in batches])
  y = np.concatenate([b[1][b[2]] for b in batches])
  assert x.shape == (6, 24, 24, 3) and x.dtype == np.float32
  assert y.tolist() == [0, 0, 1, 1, 2, 2]
  paths = sorted(tmp_path.glob("test/bumpy/*.png"))
  for row, path in enumerate(paths):
    levels = np.abs(x[row] - _pil_reference(path, 24)) * STD * 255
    assert levels.max() < 3.0 and levels.mean() < 0.6
  xb, yb = next(data.train_batches(task, 5, seed=0, **ONE))
  assert xb.shape == (5, 24, 24, 3) and yb.dtype == np.int32


def test_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="expected layout"):
    data.folder_task(str(tmp_path / "missing"))
  _write(tmp_path, "train", "a", 0, (8, 8))
  _write(tmp_path, "test", "zzz", 0, (8, 8))
  with pytest.raises(ValueError, match="zzz"):
    data.folder_task(str(tmp_path))
  with pytest.raises(ValueError, match="expected 43 classes"):
    data.folder_task(str(tmp_path), num_classes=43)
