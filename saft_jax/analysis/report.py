"""Markdown tables and JSON-ready conversion of analysis results."""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np


def _fmt(v, floatfmt: str) -> str:
  if isinstance(v, (float, np.floating)):
    return "nan" if math.isnan(float(v)) else format(float(v), floatfmt)
  if isinstance(v, (np.integer,)):
    return str(int(v))
  return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
                   floatfmt: str = ".4f") -> str:
  """A GitHub-flavoured markdown table; floats formatted with `floatfmt`."""
  headers = [str(h) for h in headers]
  if not headers:
    raise ValueError("headers is empty")
  lines = ["| " + " | ".join(_fmt(h, floatfmt) for h in headers) + " |",
           "|" + "|".join("---" for _ in headers) + "|"]
  for i, r in enumerate(rows):
    r = list(r)
    if len(r) != len(headers):
      raise ValueError(f"row {i} has {len(r)} cells, expected {len(headers)}")
    lines.append("| " + " | ".join(_fmt(v, floatfmt) for v in r) + " |")
  return "\n".join(lines) + "\n"


def write_markdown_table(path, headers, rows, *, title: str | None = None,
                         floatfmt: str = ".4f") -> str:
  """Writes `markdown_table(...)` (with an optional `## title`) to `path`; returns the text."""
  text = (f"## {title}\n\n" if title else "") + markdown_table(headers, rows, floatfmt)
  path = os.fspath(path)
  if os.path.dirname(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  return text


def to_jsonable(obj: Any) -> Any:
  """Converts results (NamedTuples, dicts, NumPy/JAX arrays, scalars) to JSON types.

  NamedTuples become dicts of their fields; NaN/inf become None.
  """
  if hasattr(obj, "_asdict"):
    return {k: to_jsonable(v) for k, v in obj._asdict().items()}
  if isinstance(obj, dict):
    return {str(k): to_jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_jsonable(v) for v in obj]
  if obj is None or isinstance(obj, (str, bool)):
    return obj
  if hasattr(obj, "__array__") or isinstance(obj, (int, float, np.generic)):
    arr = np.asarray(obj)
    if arr.dtype == bool:
      return arr.tolist()
    if np.issubdtype(arr.dtype, np.integer):
      return arr.tolist()
    arr = arr.astype(np.float64)
    out = np.where(np.isfinite(arr), arr, np.nan).tolist()
    return _nan_to_none(out)
  return str(obj)


def _nan_to_none(x):
  if isinstance(x, list):
    return [_nan_to_none(v) for v in x]
  return None if isinstance(x, float) and math.isnan(x) else x
