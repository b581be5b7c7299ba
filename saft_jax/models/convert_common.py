"""Shared machinery of the weight converters: key tables, layouts, strict checks.

A converter is a list of `Entry(ext_keys, paths, kind)`: external (PyTorch) state-dict
keys on one side, paths into our params dict on the other, and the layout change
between them. Import and export walk the same table, so they are exact inverses, and
every missing, unexpected or mis-shaped key raises a ValueError that names it.
"""
from __future__ import annotations

import dataclasses
import warnings
import zipfile
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np

Path = Tuple[str, ...]

# kind -> (to_ours: ext arrays -> our arrays, to_ext: our arrays -> ext arrays)
_KINDS: Dict[str, Tuple[Callable, Callable]] = {
    # same array on both sides
    "id": (lambda e: [e[0]], lambda o: [o[0]]),
    # torch Linear weight [out, in] <-> kernel [in, out]
    "linear": (lambda e: [e[0].T], lambda o: [o[0].T]),
    # torch Conv2d weight [O, C, kh, kw] <-> HWIO kernel [kh, kw, C, O]
    "conv": (lambda e: [e[0].transpose(2, 3, 1, 0)], lambda o: [o[0].transpose(3, 2, 0, 1)]),
    # fused in_proj_weight [3W, W] <-> q, k, v kernels [W, W]
    "fused_linear": (lambda e: [w.T for w in np.split(e[0], 3, axis=0)],
                     lambda o: [np.concatenate([w.T for w in o], axis=0)]),
    # fused in_proj_bias [3W] <-> q, k, v biases [W]
    "fused_bias": (lambda e: list(np.split(e[0], 3, axis=0)),
                   lambda o: [np.concatenate(list(o), axis=0)]),
}


@dataclasses.dataclass(frozen=True)
class Entry:
  ext_keys: Tuple[str, ...]
  paths: Tuple[Path, ...]
  kind: str = "id"


def entry(ext_key: str, path: Sequence, kind: str = "id") -> Entry:
  return Entry((ext_key,), (tuple(path),), kind)


def _get(tree, path: Path):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree: dict, path: Path, value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _path_str(path: Path) -> str:
  return "/".join(path)


def _contiguous(a: np.ndarray) -> np.ndarray:
  # np.ascontiguousarray would turn 0-d arrays (logit_scale) into shape (1,)
  return a if a.flags.c_contiguous else np.array(a, order="C")


def to_numpy(x) -> np.ndarray:
  return np.asarray(x)


def import_state_dict(state: Mapping[str, np.ndarray], table: Sequence[Entry],
                      expected: Mapping, *, dtype=np.float32,
                      ignore: Callable[[str], bool] = lambda k: False,
                      fmt: str = "checkpoint") -> dict:
  """Builds our params dict from an external state dict.

  Args:
    state: external key -> array.
    table: the converter's entries.
    expected: a pytree of `jax.ShapeDtypeStruct` (or arrays) with our layout; every
      converted array must match its shape.
    dtype: cast every float array to this dtype (None keeps the file's dtype).
    ignore: predicate on external keys that may be present and are dropped
      (buffers such as `attn_mask`, `position_ids`).
    fmt: name of the format, used in error messages.

  Raises:
    ValueError: naming the first missing key, every unexpected key, or a mis-shaped key.
  """
  used = set()
  params: dict = {}
  for e in table:
    for k in e.ext_keys:
      if k not in state:
        raise ValueError(f"{fmt}: missing key {k!r}")
    ext = [to_numpy(state[k]) for k in e.ext_keys]
    used.update(e.ext_keys)
    ours = _KINDS[e.kind][0](ext)
    for path, arr in zip(e.paths, ours):
      want = tuple(_get(expected, path).shape)
      if tuple(arr.shape) != want:
        raise ValueError(
            f"{fmt}: key {e.ext_keys[0]!r} has shape {tuple(ext[0].shape)}, which does not "
            f"match the config (expected {want} for parameter '{_path_str(path)}' after "
            f"layout conversion '{e.kind}')")
      if dtype is not None and (np.issubdtype(arr.dtype, np.floating)
                                or arr.dtype.name == "bfloat16"):
        arr = arr.astype(dtype)
      _set(params, path, _contiguous(arr))
  unexpected = sorted(k for k in state if k not in used and not ignore(k))
  if unexpected:
    raise ValueError(f"{fmt}: unexpected keys {unexpected[:20]}"
                     + (f" (+{len(unexpected) - 20} more)" if len(unexpected) > 20 else ""))
  return params


def export_state_dict(params: Mapping, table: Sequence[Entry], *, fmt: str = "checkpoint"
                      ) -> Dict[str, np.ndarray]:
  """Inverse of `import_state_dict`: our params -> external key -> numpy array."""
  out: Dict[str, np.ndarray] = {}
  covered = set()
  for e in table:
    ours = []
    for path in e.paths:
      try:
        ours.append(np.asarray(_get(params, path)))
      except (KeyError, TypeError) as err:
        raise ValueError(f"{fmt} export: params lack '{_path_str(path)}'") from err
      covered.add(path)
    for k, arr in zip(e.ext_keys, _KINDS[e.kind][1](ours)):
      out[k] = _contiguous(arr)
  leaves = jax.tree_util.tree_leaves_with_path(params)
  extra = sorted(_path_str(tuple(str(getattr(p, "key", p)) for p in path))
                 for path, _ in leaves
                 if tuple(str(getattr(p, "key", p)) for p in path) not in covered)
  if extra:
    raise ValueError(f"{fmt} export: parameters not covered by the format: {extra[:20]}")
  return out


def block_indices(keys: Iterable[str], prefix: str) -> int:
  """Number of consecutive blocks `{prefix}{i}.` present among `keys` (0 if none)."""
  found = set()
  for k in keys:
    if k.startswith(prefix):
      head = k[len(prefix):].split(".", 1)[0]
      if head.isdigit():
        found.add(int(head))
  n = 0
  while n in found:
    n += 1
  if found and n != max(found) + 1:
    raise ValueError(f"non-consecutive block indices under {prefix!r}: {sorted(found)}")
  return n


# ----------------------------------------------------------------------------- file I/O
def read_safetensors(path: str) -> Dict[str, np.ndarray]:
  """Reads a safetensors file into numpy arrays (bfloat16 via ml_dtypes)."""
  from safetensors import safe_open
  out = {}
  try:
    with safe_open(path, framework="numpy") as f:
      for k in f.keys():
        out[k] = f.get_tensor(k)
  except (TypeError, ValueError):  # e.g. bfloat16, which numpy's reader rejects
    from safetensors.flax import load_file
    out = {k: np.asarray(v) for k, v in load_file(path).items()}
  return out


def write_safetensors(state: Mapping[str, np.ndarray], path: str,
                      metadata: Optional[Dict[str, str]] = None) -> None:
  """Writes numpy arrays to safetensors (bfloat16 arrays go through safetensors.flax)."""
  if any(a.dtype.name == "bfloat16" for a in state.values()):
    import jax.numpy as jnp
    from safetensors.flax import save_file
    save_file({k: jnp.asarray(v) for k, v in state.items()}, path, metadata=metadata)
  else:
    from safetensors.numpy import save_file
    save_file(dict(state), path, metadata=metadata)


def is_torchscript(path: str) -> bool:
  """Whether `path` is a TorchScript archive (e.g. OpenAI's original CLIP `.pt` files).

  TorchScript archives are zip files whose records include `constants.pkl` (and `code/`),
  which plain `torch.save` zips lack; checked without PyTorch.
  """
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as z:
    return any(n.split("/", 1)[-1] == "constants.pkl" for n in z.namelist())


def _torch():
  try:
    import torch
  except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("reading PyTorch checkpoints (.pt, .pth, .bin) needs PyTorch (pip install "
                      "torch), or convert the checkpoint to safetensors") from err
  return torch


def _jit_state_dict(path: str):
  """The state dict of a TorchScript archive, through `torch.jit.load` (what `torch.load`
  would dispatch to, with a warning); its deprecation notice is not the caller's business."""
  torch = _torch()
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit")
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
    return torch.jit.load(path, map_location="cpu").state_dict()


def read_torch(path: str) -> Dict[str, np.ndarray]:
  """Reads a PyTorch state dict (`.pt`/`.bin`: plain, `{"state_dict": ...}` or TorchScript).

  TorchScript archives (OpenAI's original `.pt`) are loaded with `torch.jit.load`; every
  other file with `torch.load(weights_only=True)`, which never runs pickled code.
  """
  torch = _torch()
  if is_torchscript(path):
    obj = _jit_state_dict(path)
  else:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path!r} does not hold a state dict (got {type(obj).__name__})")
  out = {}
  for k, v in obj.items():
    if k.startswith("module."):
      k = k[len("module."):]
    if not hasattr(v, "detach"):
      continue
    v = v.detach().cpu()
    if v.dtype == torch.bfloat16:
      v = v.float()
    out[k] = v.numpy()
  return out


def write_torch(state: Mapping[str, np.ndarray], path: str) -> None:
  try:
    import torch
  except ImportError as err:  # pragma: no cover
    raise ImportError(f"writing {path!r} needs PyTorch; use a .safetensors path instead") from err
  torch.save({k: torch.from_numpy(np.array(v, dtype=v.dtype if v.dtype.name != "bfloat16"
                                           else np.float32)) for k, v in state.items()}, path)


def shape_of(init_fn, cfg) -> dict:
  """Our params' shapes for `cfg`, without allocating them."""
  return jax.eval_shape(lambda: init_fn(cfg, jax.random.key(0)))


def leaves_as_paths(tree) -> List[Path]:
  return [tuple(str(getattr(p, "key", p)) for p in path)
          for path, _ in jax.tree_util.tree_leaves_with_path(tree)]
