"""The dimensionless regime quantities (ρ per coordinate, relative distances)."""
import math

import numpy as np
import pytest

from saft_jax import models
from saft_jax.experiment import config as config_lib, regime
from saft_jax.experiment.suites import OFFLINE_VISION


def test_vit_b32_parameter_count():
  # OpenAI CLIP ViT-B/32's image tower: 87,849,216 parameters.
  assert regime.vision_param_count(models.VIT_B_32) == 87_849_216


def test_dimension_matched_rho_closed_form():
  d = regime.vision_param_count(OFFLINE_VISION)
  rho = regime.dimension_matched_rho(d)
  assert rho / math.sqrt(d) == pytest.approx(0.5 / math.sqrt(87_849_216))
  assert regime.dimension_matched_rho(400, rho_ref=1.0, d_ref=100) == pytest.approx(2.0)
  with pytest.raises(ValueError):
    regime.dimension_matched_rho(0)


def test_norms_and_quantities():
  params0 = {"a": np.full((2, 2), 2.0), "b": np.zeros(4)}
  assert regime.rms(params0) == pytest.approx(math.sqrt(16 / 8))
  assert regime.global_norm(params0) == pytest.approx(4.0)
  tvs = [{"a": np.full((2, 2), 0.5), "b": np.zeros(4)}, {"a": np.zeros((2, 2)), "b": np.ones(4)}]
  q = regime.task_vector_quantities(params0, tvs)
  assert q["relative_distance_mean"] == pytest.approx((1.0 / 4 + 2.0 / 4) / 2)
  assert q["relative_distance_max"] == pytest.approx(0.5)
  cfg = config_lib.ReproduceConfig(optim=config_lib.OptimConfig(lr=1e-3, asam_rho=0.2))
  c = regime.config_quantities(params0, cfg)
  assert c["num_params"] == 8 and c["asam_rho_per_coordinate"] == pytest.approx(0.2 / math.sqrt(8))
  assert c["lr_over_rms_theta0"] == pytest.approx(1e-3 / math.sqrt(2))
