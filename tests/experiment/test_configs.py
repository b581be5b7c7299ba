"""Every config file in experiments/configs loads into a valid ReproduceConfig."""
import glob
import os

import pytest

from saft_jax.experiment import config as config_lib, defaults

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "configs")
FILES = sorted(glob.glob(os.path.join(ROOT, "*.py")))


def test_there_are_config_files():
  names = {os.path.basename(f) for f in FILES}
  assert {"offline.py", "offline_runlocal.py", "clip_vit_b32.py", "clip_vit_b16.py"} <= names


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_config_file_loads(path):
  cfg = config_lib.load_config_file(path)
  assert isinstance(cfg, config_lib.ReproduceConfig)
  assert "saft reproduce" in open(path).read()  # the docstring shows the command


def test_clip_protocol_defaults(monkeypatch):
  monkeypatch.setenv("CLIP_CHECKPOINT", "/x/ckpt")
  cfg = defaults.clip_config()
  o = cfg.optim
  assert (o.lr, o.weight_decay, o.warmup_steps, o.clip_norm, o.b1, o.b2, o.eps) == (
      1e-5, 0.1, 500, 1.0, 0.9, 0.999, 1e-8)
  assert (cfg.batch_size, cfg.steps, cfg.clip_checkpoint) == (128, 8000, "/x/ckpt")
  assert (o.asam_rho, o.asam_eta, o.sam_rho) == (0.5, 0.01, 0.05)


def test_bad_config_file(tmp_path):
  p = tmp_path / "c.py"
  p.write_text("x = 1\n")
  with pytest.raises(ValueError, match="get_config"):
    config_lib.load_config_file(str(p))
  with pytest.raises(FileNotFoundError):
    config_lib.load_config_file(str(tmp_path / "missing.py"))
