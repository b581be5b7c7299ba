"""Small pytree files of a run directory (θ0, heads, task vectors): msgpack via flax."""
from __future__ import annotations

import os
import tempfile

import jax
import numpy as np
from flax import serialization


def save_tree(path: str, tree) -> str:
  """Writes a pytree of arrays atomically (temp file + rename)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  data = serialization.msgpack_serialize(jax.tree.map(np.asarray, tree))
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
  with os.fdopen(fd, "wb") as f:
    f.write(data)
  os.replace(tmp, path)
  return path


def load_tree(path: str):
  """Reads a pytree written by :func:`save_tree` (NumPy arrays)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"missing file of the run directory: {path}")
  with open(path, "rb") as f:
    return serialization.msgpack_restore(f.read())
