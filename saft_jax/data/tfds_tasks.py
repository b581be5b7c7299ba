"""The paper's eight tasks (SPEC §5) as streamed :class:`~saft_jax.data.Task` s.

Seven come from tensorflow-datasets builders, GTSRB from a folder of images:

=========  ===================  =======  ====================================
task       source               classes  train / val / test
=========  ===================  =======  ====================================
cars       ``cars196``          196      train (val: 10%) / test
dtd        ``dtd``              47       train+validation (val: 10%) / test
eurosat    ``eurosat/rgb``      10       own seeded 80/10/10 of the 27000
                                         images: 21600 / 2700 / 2700
gtsrb      folder               43       ``<root>/gtsrb/{train,test}/<class>``
mnist      ``mnist``            10       train (val: 10% ≤ 5000) / test
resisc45   ``resisc45``         45       own seeded 60/20/20 (18900 / 6300 /
                                         6300, torchgeo's sizes)
sun397     ``sun397/tfds``      397      train (val: 10% ≤ 5000) / test
svhn       ``svhn_cropped``     10       train (val: 10% ≤ 5000) / test
=========  ===================  =======  ====================================

"val: 10%" is the protocol's held-out share of the training split (at most
5000, seed 0; :func:`saft_jax.data.splits.protocol_val_split`). The own splits
draw the sizes of the reference code but not its file lists.

TFDS data must be prepared beforehand (no download happens at run time);
unprepared data raises a ``FileNotFoundError`` that says how to prepare it.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

from saft_jax.data import offline
from saft_jax.data import splits as splits_lib
from saft_jax.data.loader import Task


@dataclasses.dataclass(frozen=True)
class TFDSSpec:
  """How a paper task maps onto a TFDS builder."""
  builder: str
  num_classes: int
  train: str = "train"
  test: Optional[str] = "test"
  own_split: Optional[tuple[float, float, float]] = None
  manual: str = ""


FOLDER_TASKS = {"gtsrb": 43}

PAPER_TASKS: dict[str, TFDSSpec] = {
    "cars": TFDSSpec("cars196", 196, manual=(
        "The Stanford Cars URLs are often offline; if `tfds build` cannot download, "
        "place cars_train.tgz, cars_test.tgz, car_devkit.tgz and "
        "cars_test_annos_withlabels.mat in <data_dir>/downloads/manual first.")),
    "dtd": TFDSSpec("dtd", 47, train="train+validation"),
    "eurosat": TFDSSpec("eurosat/rgb", 10, test=None, own_split=(0.8, 0.1, 0.1)),
    "mnist": TFDSSpec("mnist", 10),
    "resisc45": TFDSSpec("resisc45", 45, test=None, own_split=(0.6, 0.2, 0.2), manual=(
        "RESISC45 needs a manual download: get NWPU-RESISC45.rar, extract it to "
        "<data_dir>/downloads/manual/NWPU-RESISC45.")),
    "sun397": TFDSSpec("sun397/tfds", 397),
    "svhn": TFDSSpec("svhn_cropped", 10),
}
_ALIASES = {spec.builder: name for name, spec in PAPER_TASKS.items()}
_ALIASES.update({"cars196": "cars", "eurosat": "eurosat", "sun397": "sun397",
                 "svhn_cropped": "svhn"})


def known_tasks() -> list[str]:
  """Every name :func:`load_task` accepts (paper tasks, builder names, offline tasks)."""
  return sorted(set(PAPER_TASKS) | set(FOLDER_TASKS) | set(_ALIASES) | set(offline.TASKS))


def default_data_dir() -> str:
  """``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets`` (TFDS's own default)."""
  return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def _not_prepared(name: str, spec: TFDSSpec, data_dir: Optional[str], err: Exception):
  d = data_dir or default_data_dir()
  manual = (" " + spec.manual.replace("<data_dir>", d)) if spec.manual else ""
  return FileNotFoundError(
      f"task {name!r}: TFDS dataset {spec.builder!r} is not prepared in {d!r}. Prepare it "
      f"on a machine with internet: `tfds build {spec.builder} --data_dir {d}` (or copy a "
      f"prepared {spec.builder.split('/')[0]}/ folder there).{manual} ({err})")


def _tfds_pool(spec: TFDSSpec, split: str, data_dir: Optional[str]):
  def make():
    import tensorflow_datasets as tfds
    return tfds.load(spec.builder, split=split, data_dir=data_dir, download=False,
                     shuffle_files=False,
                     decoders={"image": tfds.decode.SkipDecoding()})
  return make


def tfds_task(name: str, *, data_dir: Optional[str] = None, image_size: int = 224,
              shuffle_buffer: int = 10_000) -> Task:
  """A paper task streamed from its prepared TFDS builder (see module doc)."""
  from saft_jax.data.pipeline import StreamSource
  import tensorflow_datasets as tfds
  spec = PAPER_TASKS[name]
  pool_splits = {"all": spec.train} if spec.own_split else {"train": spec.train, "test": spec.test}
  pools = {k: _tfds_pool(spec, v, data_dir) for k, v in pool_splits.items()}
  source = StreamSource(name, pools, {}, image_size, shuffle_buffer)
  try:
    sizes = {k: source.pool_size(k) for k in pools}
  except (AssertionError, FileNotFoundError, tfds.core.registered.DatasetNotFoundError) as err:
    raise _not_prepared(name, spec, data_dir, err) from err
  if spec.own_split:
    parts = splits_lib.own_split(sizes["all"], spec.own_split)
    split_map = {k: ("all", v) for k, v in parts.items()}
  else:
    tr, va = splits_lib.protocol_val_split(sizes["train"])
    split_map = {"train": ("train", tr), "val": ("train", va), "test": ("test", None)}
  source._split_map = split_map  # pylint: disable=protected-access
  names = None
  try:
    names = tuple(tfds.builder(spec.builder, data_dir=data_dir).info.features["label"].names)
  except Exception:  # pylint: disable=broad-except  # class names are optional metadata
    pass
  return Task(name=name, num_classes=spec.num_classes, image_shape=(image_size, image_size, 3),
              stream=source, class_names=names, default_augment=True)


def load_task(name: str, *, data_dir: Optional[str] = None, folder_root: Optional[str] = None,
              image_size: int = 224, seed: int = 0) -> Task:
  """Any known task by name.

  Args:
    name: a paper task (``cars``, ``dtd``, ``eurosat``, ``gtsrb``, ``mnist``,
      ``resisc45``, ``sun397``, ``svhn``), a TFDS builder name of one of them, or
      an offline digits task (``digits``, ``rot90``, ...).
    data_dir: TFDS data directory (default ``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``).
    folder_root: parent of folder datasets (GTSRB at ``<folder_root>/gtsrb``;
      default ``$SAFT_DATA_DIR`` or ``~/saft_data``).
    image_size: output side of the streamed tasks.
    seed: seed of the offline suite's splits (offline tasks only).

  Returns:
    The :class:`~saft_jax.data.Task`.
  """
  name = _ALIASES.get(name, name)
  if name in offline.TASKS:
    return offline.offline_suite([name], seed=seed)[name]
  if name in FOLDER_TASKS:
    from saft_jax.data.folder import folder_task
    root = folder_root or os.environ.get("SAFT_DATA_DIR", os.path.expanduser("~/saft_data"))
    return folder_task(os.path.join(root, name), name=name, image_size=image_size,
                       num_classes=FOLDER_TASKS[name])
  if name in PAPER_TASKS:
    return tfds_task(name, data_dir=data_dir, image_size=image_size)
  raise ValueError(f"unknown dataset {name!r}; known names: {', '.join(known_tasks())}")
