"""Split arithmetic shared by every data source (pure NumPy, no I/O).

* Validation protocol (SPEC §5): 10% of the training split, at most 5000
  examples, chosen by a fixed seed (0). Indices come from
  ``np.random.default_rng(seed).permutation(n)``: the first ``n_val`` are the
  validation set, the rest stay in training. (The reference code draws the same
  sizes with ``torch.utils.data.random_split``; the exact members differ.)
* Own splits (EuroSAT, RESISC45): one seeded permutation of the whole set is cut
  at fixed fractional boundaries; EuroSAT's 80/10/10 of 27000 gives
  21600/2700/2700.
* Training order: step ``s`` with global batch ``B`` over ``n`` examples lives in
  epoch ``s // (n // B)`` at position ``s % (n // B)``; each epoch is a fresh
  permutation drawn from ``(seed, epoch)`` and the ragged tail of an epoch is
  dropped. Order therefore depends only on ``(seed, step)``: a run resumed at
  step ``s`` sees exactly the batches an uninterrupted run sees.
* Multi-host rule: global batch ``b`` (``B`` rows) is split by process index;
  process ``p`` of ``P`` gets rows ``[p*B/P, (p+1)*B/P)``. ``B`` must be a
  multiple of ``P``. This matches ``jax.make_array_from_process_local_data`` on a
  mesh whose ``data`` axis lists process ``p``'s devices in position ``p``
  (the layout ``jax.make_mesh`` produces).
"""
from __future__ import annotations

import numpy as np

VAL_FRACTION = 0.1
MAX_VAL = 5000
SPLIT_SEED = 0


def num_val(n: int, fraction: float = VAL_FRACTION, max_val: int = MAX_VAL) -> int:
  """Validation size of the protocol: ``min(int(fraction * n), max_val)``."""
  if n < 0:
    raise ValueError(f"n must be >= 0, got {n}")
  return min(int(fraction * n), max_val)


def protocol_val_split(n: int, seed: int = SPLIT_SEED, fraction: float = VAL_FRACTION,
                       max_val: int = MAX_VAL) -> tuple[np.ndarray, np.ndarray]:
  """Splits ``range(n)`` into (train, val) index arrays, both sorted.

  Args:
    n: size of the original training split.
    seed: the protocol's fixed seed (0).
    fraction: validation share (0.1).
    max_val: cap on the validation size (5000).

  Returns:
    ``(train_idx, val_idx)``: disjoint sorted int64 arrays covering ``range(n)``.
  """
  perm = np.random.default_rng(seed).permutation(n)
  k = num_val(n, fraction, max_val)
  return np.sort(perm[k:]), np.sort(perm[:k])


def own_split_bounds(n: int, fractions: tuple[float, float, float]) -> tuple[int, int]:
  """Boundaries ``(a, b)``: train = perm[:a], val = perm[a:b], test = perm[b:].

  ``a = round(f_train * n)``, ``b = a + round(f_val * n)``; EuroSAT (27000,
  (0.8, 0.1, 0.1)) gives (21600, 24300), i.e. 21600/2700/2700.
  """
  if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
    raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, got {fractions}")
  a = int(round(fractions[0] * n))
  b = a + int(round(fractions[1] * n))
  return a, min(b, n)


def own_split(n: int, fractions: tuple[float, float, float],
              seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
  """Seeded train/val/test partition of ``range(n)`` (sorted index arrays)."""
  perm = np.random.default_rng(seed).permutation(n)
  a, b = own_split_bounds(n, fractions)
  return {"train": np.sort(perm[:a]), "val": np.sort(perm[a:b]), "test": np.sort(perm[b:])}


def steps_per_epoch(n: int, batch_size: int) -> int:
  """Full batches per epoch (the tail is dropped); raises if there are none."""
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if n < batch_size:
    raise ValueError(f"batch_size {batch_size} exceeds the {n} training examples")
  return n // batch_size


def epoch_seed(seed: int, epoch: int) -> int:
  """A 31-bit seed derived from (seed, epoch), for shuffles and augmentation."""
  return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0] >> 1)


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
  """The order of ``range(n)`` in epoch ``epoch`` (a function of (seed, epoch))."""
  return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """Example indices of global training batch ``step`` (see module docstring)."""
  spe = steps_per_epoch(n, batch_size)
  epoch, pos = divmod(int(step), spe)
  return epoch_permutation(n, seed, epoch)[pos * batch_size:(pos + 1) * batch_size]


def host_rows(batch_size: int, process_index: int, process_count: int) -> slice:
  """Rows of a global batch owned by ``process_index`` (contiguous equal shares)."""
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise ValueError(f"bad process_index={process_index} for process_count={process_count}")
  if batch_size % process_count:
    raise ValueError(f"global batch {batch_size} is not divisible by {process_count} processes")
  per = batch_size // process_count
  return slice(process_index * per, (process_index + 1) * per)


def resolve_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """Fills ``None`` with ``jax.process_index()`` / ``jax.process_count()``."""
  if process_index is None or process_count is None:
    import jax  # local: keeps this module importable without JAX initialised
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return int(process_index), int(process_count)
