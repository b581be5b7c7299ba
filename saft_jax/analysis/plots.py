"""PNG plots of the analysis results (matplotlib, Agg canvas, imported lazily).

The functions never touch pyplot's global state: each builds a `Figure` on an Agg
canvas, writes one PNG, and returns the numbers a caller needs for its JSON (path,
shared colour limits, labels).
"""
from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

import numpy as np


def _figure(width, height):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def _save(fig, path) -> str:
  path = os.fspath(path)
  d = os.path.dirname(path)
  if d:
    os.makedirs(d, exist_ok=True)
  fig.savefig(path, format="png")
  return path


def plot_grid_pair(
    grids: Mapping[str, np.ndarray],
    alphas1,
    alphas2,
    path,
    *,
    title: Optional[str] = None,
    label: str = "ξ(α1, α2)",
    contour: bool = True,
    vmin: Optional[float] = None,
    vmax: Optional[float] = None,
    cmap: str = "viridis",
    mark: Optional[Sequence[float]] = (1.0, 1.0),
) -> dict:
  """Heatmaps (+ contours) of several (α1, α2) grids side by side, one shared colour scale.

  Args:
    grids: `{panel name: array (G1, G2)}` (row i ↔ alphas1[i]), e.g. {"SGD": ..., "SAFT": ...}.
    alphas1, alphas2: the grid axes (α1 on the x axis, α2 on the y axis).
    path: output PNG path.
    title, label: figure title and colour-bar label.
    contour: overlay contour lines.
    vmin, vmax: colour limits (default: min/max over all panels, so panels compare).
    cmap: matplotlib colour map name.
    mark: a point (α1, α2) to mark, e.g. the task-arithmetic point (1, 1); None for none.

  Returns:
    `{"path", "vmin", "vmax", "panels"}`.
  """
  if not grids:
    raise ValueError("grids is empty")
  a1, a2 = np.asarray(alphas1, np.float64), np.asarray(alphas2, np.float64)
  if a1.ndim != 1 or a2.ndim != 1 or a1.size == 0 or a2.size == 0:
    raise ValueError(f"alphas1/alphas2 must be non-empty 1-D, got {a1.shape}, {a2.shape}")
  arrs = {}
  for name, g in grids.items():
    g = np.asarray(g, np.float64)
    if g.shape != (a1.size, a2.size):
      raise ValueError(f"grid {name!r} has shape {g.shape}, expected {(a1.size, a2.size)}")
    arrs[name] = g
  lo = float(min(np.nanmin(g) for g in arrs.values())) if vmin is None else float(vmin)
  hi = float(max(np.nanmax(g) for g in arrs.values())) if vmax is None else float(vmax)
  if hi <= lo:
    hi = lo + 1e-12
  n = len(arrs)
  fig = _figure(4.2 * n + 0.8, 4.0)
  axes = fig.subplots(1, n, squeeze=False)[0]
  mesh = None
  levels = np.linspace(lo, hi, 8)
  for ax, (name, g) in zip(axes, arrs.items()):
    mesh = ax.pcolormesh(a1, a2, g.T, shading="nearest", cmap=cmap, vmin=lo, vmax=hi)
    if contour and a1.size > 1 and a2.size > 1 and np.nanmax(g) > np.nanmin(g):
      cs = ax.contour(a1, a2, g.T, levels=levels, colors="white", linewidths=0.7)
      ax.clabel(cs, fontsize=6, fmt="%.2g")
    if mark is not None:
      ax.plot([mark[0]], [mark[1]], marker="*", color="red", markersize=9)
    ax.set_title(str(name))
    ax.set_xlabel("α1")
  axes[0].set_ylabel("α2")
  fig.colorbar(mesh, ax=list(axes), label=label)
  if title:
    fig.suptitle(title)
  return {"path": _save(fig, path), "vmin": lo, "vmax": hi, "panels": list(arrs)}


def plot_ctl_bars(
    results: Mapping[str, Mapping[str, float]],
    path,
    *,
    title: Optional[str] = None,
    ylabel: str = "Dis_cos (lower = stronger CTL)",
) -> dict:
  """Grouped bars of per-layer CTL distances for several methods.

  Args:
    results: `{method: {layer: value}}` (e.g. `CTLResult.as_dict()` per method); every
      method must list the same layers.
    path: output PNG path.

  Returns:
    `{"path", "layers", "methods", "values"}` (values: {method: [per layer]}).
  """
  if not results:
    raise ValueError("results is empty")
  methods = list(results)
  layers = list(results[methods[0]])
  if not layers:
    raise ValueError(f"method {methods[0]!r} has no layers")
  for m in methods:
    if list(results[m]) != layers:
      raise ValueError(f"method {m!r} lists layers {list(results[m])}, expected {layers}")
  values = {m: [float(results[m][l]) for l in layers] for m in methods}
  fig = _figure(max(5.0, 0.45 * len(layers) * len(methods) + 2), 3.8)
  ax = fig.subplots()
  width = 0.8 / len(methods)
  x = np.arange(len(layers))
  for k, m in enumerate(methods):
    ax.bar(x + (k - (len(methods) - 1) / 2) * width, values[m], width, label=m)
  ax.set_xticks(x)
  ax.set_xticklabels(layers, rotation=45, ha="right", fontsize=8)
  ax.set_ylabel(ylabel)
  ax.legend()
  if title:
    ax.set_title(title)
  return {"path": _save(fig, path), "layers": layers, "methods": methods, "values": values}


def plot_loss_curves(
    curves: Mapping[str, object],
    path,
    *,
    title: Optional[str] = None,
    xlabel: str = "α",
    ylabel: str = "loss",
    show_linear: bool = True,
) -> dict:
  """Loss along straight lines (several curves on one axis).

  Args:
    curves: `{label: LossBarrier}` or `{label: (alphas, losses)}`.
    path: output PNG path.
    show_linear: for `LossBarrier` entries, draw the endpoint interpolation dashed.

  Returns:
    `{"path", "labels", "barriers"}` (barrier per label; NaN for plain curves).
  """
  if not curves:
    raise ValueError("curves is empty")
  fig = _figure(5.5, 4.0)
  ax = fig.subplots()
  barriers = {}
  for label, c in curves.items():
    if hasattr(c, "losses") and hasattr(c, "alphas"):
      al, ls = np.asarray(c.alphas), np.asarray(c.losses)
      barriers[label] = float(c.barrier)
      order = np.argsort(al)
      line, = ax.plot(al[order], ls[order], marker="o", markersize=3, label=str(label))
      if show_linear:
        ax.plot(al[order], np.asarray(c.linear)[order], linestyle="--", color=line.get_color(),
                linewidth=0.8)
    else:
      al, ls = (np.asarray(v) for v in c)
      if al.shape != ls.shape or al.ndim != 1:
        raise ValueError(f"curve {label!r}: alphas {al.shape} and losses {ls.shape} must be equal 1-D")
      barriers[label] = float("nan")
      order = np.argsort(al)
      ax.plot(al[order], ls[order], marker="o", markersize=3, label=str(label))
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.legend()
  if title:
    ax.set_title(title)
  return {"path": _save(fig, path), "labels": list(curves), "barriers": barriers}
