"""Plots write non-empty PNGs with a shared colour scale; markdown/JSON helpers."""
import json

import numpy as np
import pytest

from saft_jax import analysis

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
  with open(path, "rb") as f:
    head = f.read(8)
  return head == PNG


def test_grid_pair_shared_scale(tmp_path):
  a = np.linspace(-2, 2, 5)
  g1 = np.outer(a, a) * 0.1
  g2 = np.outer(a, a) * 0.3 + 0.5
  out = analysis.plot_grid_pair({"SGD": g1, "SAFT": g2}, a, a, tmp_path / "sub" / "xi.png",
                                title="ξ")
  assert _is_png(out["path"]) and (tmp_path / "sub" / "xi.png").stat().st_size > 1000
  assert out["vmin"] == pytest.approx(min(g1.min(), g2.min()))
  assert out["vmax"] == pytest.approx(max(g1.max(), g2.max()))
  fixed = analysis.plot_grid_pair({"A": g1}, a, a, tmp_path / "f.png", vmin=0.0, vmax=2.0,
                                  contour=False, mark=None)
  assert (fixed["vmin"], fixed["vmax"]) == (0.0, 2.0)
  with pytest.raises(ValueError, match="shape"):
    analysis.plot_grid_pair({"A": g1[:, :3]}, a, a, tmp_path / "bad.png")
  with pytest.raises(ValueError, match="empty"):
    analysis.plot_grid_pair({}, a, a, tmp_path / "bad.png")


def test_ctl_bars_and_loss_curves(tmp_path):
  res = {"SGD": {"block_0": 0.1, "block_1": 0.2, "logits": 0.3},
         "SAFT": {"block_0": 0.05, "block_1": 0.1, "logits": 0.2}}
  out = analysis.plot_ctl_bars(res, tmp_path / "ctl.png")
  assert _is_png(out["path"]) and out["values"]["SAFT"] == [0.05, 0.1, 0.2]
  with pytest.raises(ValueError, match="layers"):
    analysis.plot_ctl_bars({"A": {"x": 1.0}, "B": {"y": 1.0}}, tmp_path / "bad.png")
  loss = lambda p: (p["w"] ** 2).sum() - 2.0 * (p["w"] ** 4).sum()
  bar = analysis.loss_barrier(loss, {"w": np.full(2, -0.6, np.float32)},
                              {"w": np.full(2, 0.6, np.float32)}, num_points=7)
  out = analysis.plot_loss_curves({"SGD": bar, "raw": (np.arange(3.0), np.ones(3))},
                                  tmp_path / "loss.png")
  assert _is_png(out["path"]) and out["barriers"]["SGD"] == pytest.approx(bar.barrier)
  assert np.isnan(out["barriers"]["raw"])


def test_markdown_and_json(tmp_path):
  text = analysis.write_markdown_table(tmp_path / "t.md", ["method", "ξ(1,1)"],
                                       [["SGD", 0.12345], ["a|b", np.float32(1.0)]], title="T")
  assert text == ("## T\n\n| method | ξ(1,1) |\n|---|---|\n| SGD | 0.1235 |\n"
                  "| a\\|b | 1.0000 |\n")
  assert (tmp_path / "t.md").read_text() == text
  with pytest.raises(ValueError, match="row 0"):
    analysis.markdown_table(["a", "b"], [[1]])
  res = analysis.disentanglement_error_linear(
      [np.zeros((2, 3), np.float32)] * 2, [np.ones((2, 2, 3), np.float32)] * 2, [0.0, 1.0])
  js = json.loads(json.dumps(analysis.to_jsonable({"xi": res, "nan": np.nan})))
  assert js["xi"]["error"] == [[0.0, 0.0], [0.0, 0.0]] and js["xi"]["divergence"] is None
  assert js["nan"] is None
