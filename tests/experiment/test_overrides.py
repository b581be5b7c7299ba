"""``key=value`` overrides of ReproduceConfig (dotted keys, typed parsing, sweeps)."""
from __future__ import annotations

import dataclasses

import pytest

from saft_jax.experiment import defaults
from saft_jax.experiment.config import (OptimConfig, ReproduceConfig, TextConfig,
                                        apply_overrides,
                                        config_keys, parse_sweep_values, parse_value,
                                        set_value)


@pytest.fixture
def cfg():
  return defaults.offline_config()


def test_config_keys(cfg):
  keys = config_keys(cfg)
  assert {"steps", "tasks", "seeds", "optim.asam_rho", "optim.lr"} <= set(keys)
  assert "optim" not in keys
  assert len(keys) == len(set(keys))
  assert len(keys) == (len(dataclasses.fields(ReproduceConfig)) - 2
                       + len(dataclasses.fields(OptimConfig))
                       + len(dataclasses.fields(TextConfig)))


def test_nested_key_set(cfg):
  new = apply_overrides(cfg, ["optim.asam_rho=0.02"])
  assert new.optim.asam_rho == 0.02
  assert new.optim == dataclasses.replace(cfg.optim, asam_rho=0.02)
  assert dataclasses.replace(new, optim=cfg.optim) == cfg
  assert cfg.optim.asam_rho == defaults.offline_config().optim.asam_rho  # input unchanged


def test_set_value_top_level(cfg):
  new = set_value(cfg, "steps", 7)
  assert new.steps == 7 and dataclasses.replace(new, steps=cfg.steps) == cfg


@pytest.mark.parametrize("key,text,expected", [
    ("steps", "12", 12),
    ("steps", " 12 ", 12),
    ("optim.lr", "1e-4", 1e-4),
    ("optim.lr", "0.5", 0.5),
    ("optim.lr", "2", 2.0),
    ("augment", "true", True),
    ("augment", "YES", True),
    ("augment", "1", True),
    ("augment", "False", False),
    ("augment", "no", False),
    ("augment", "0", False),
    ("compute_dtype", "bfloat16", "bfloat16"),
    ("seeds", "0,1,2", (0, 1, 2)),
    ("seeds", "3", (3,)),
    ("tasks", "digits,rot90", ("digits", "rot90")),
    ("tasks", "digits, rot90", ("digits", "rot90")),
    ("tasks", "None", None),
    ("finetunes", "sgd,ftts", ("sgd", "ftts")),
    ("mesh_shape", "none", None),
    ("mesh_shape", "NULL", None),
    ("mesh_shape", "2", 2),
    ("data_dir", "null", None),
    ("data_dir", "/data/tfds", "/data/tfds"),
])
def test_parse_value(cfg, key, text, expected):
  value = parse_value(cfg, key, text)
  assert value == expected and type(value) is type(expected)
  if isinstance(expected, tuple):
    assert all(type(v) is type(e) for v, e in zip(value, expected))


def test_apply_overrides_types_and_order(cfg):
  new = apply_overrides(cfg, ["seeds=0,1", "tasks=digits,rot90", "mesh_shape=none",
                              "steps=10", "steps=20", "augment=yes", "optim.lr=1e-4"])
  assert new.seeds == (0, 1) and all(type(s) is int for s in new.seeds)
  assert new.tasks == ("digits", "rot90")
  assert new.mesh_shape is None and new.steps == 20 and new.augment is True
  assert new.optim.lr == 1e-4
  assert apply_overrides(cfg, []) == cfg


def test_value_may_contain_equals(cfg):
  assert apply_overrides(cfg, ["data_dir=/a=b"]).data_dir == "/a=b"


def test_unknown_top_level_key(cfg):
  with pytest.raises(ValueError, match="stepz") as err:
    apply_overrides(cfg, ["stepz=3"])
  msg = str(err.value)
  assert "did you mean 'steps'" in msg and "batch_size" in msg


def test_unknown_nested_key(cfg):
  with pytest.raises(ValueError, match="optim.rhoo") as err:
    parse_value(cfg, "optim.rhoo", "1")
  msg = str(err.value)
  assert "asam_rho" in msg and "sam_rho" in msg
  assert "batch_size" not in msg  # only the keys of the optim level
  with pytest.raises(ValueError, match="did you mean 'optim.asam_rho'"):
    parse_value(cfg, "optim.asam_rhoo", "1")


def test_nested_name_at_top_level_suggests_dotted_key(cfg):
  with pytest.raises(ValueError, match="did you mean 'optim.asam_rho'"):
    apply_overrides(cfg, ["asam_rho=0.1"])


def test_group_and_value_keys_are_not_interchangeable(cfg):
  with pytest.raises(ValueError, match="optim.lr"):
    apply_overrides(cfg, ["optim=1"])
  with pytest.raises(ValueError, match="steps"):
    apply_overrides(cfg, ["steps.x=1"])


@pytest.mark.parametrize("key,text,expected", [
    ("steps", "0.5", "an int"),
    ("steps", "abc", "an int"),
    ("optim.lr", "abc", "a float"),
    ("augment", "maybe", "a bool"),
    ("seeds", "", "tuple of ints"),
    ("seeds", "0,a", "tuple of ints"),
    ("seeds", "0,,1", "tuple of ints"),
    ("seeds", "none", "tuple of ints"),
    ("tasks", "", "tuple of strs"),
    ("mesh_shape", "two", "an int or none"),
])
def test_wrong_types(cfg, key, text, expected):
  with pytest.raises(ValueError) as err:
    parse_value(cfg, key, text)
  msg = str(err.value)
  assert key in msg and expected in msg and repr(text) in msg


def test_error_message_format(cfg):
  with pytest.raises(ValueError) as err:
    apply_overrides(cfg, ["optim.lr=abc"])
  assert str(err.value) == "--set optim.lr: expected a float, got 'abc'"


@pytest.mark.parametrize("assignment", ["steps", "=3", " =3", ""])
def test_assignment_without_key_or_equals(cfg, assignment):
  with pytest.raises(ValueError, match="key=value") as err:
    apply_overrides(cfg, [assignment])
  assert repr(assignment) in str(err.value)


def test_post_init_validation_still_runs(cfg):
  with pytest.raises(ValueError, match="finetunes: unknown or empty"):
    apply_overrides(cfg, ["finetunes=bogus"])
  with pytest.raises(ValueError, match="not divisible"):
    apply_overrides(cfg, ["accum_steps=3"])
  with pytest.raises(ValueError, match="compute_dtype"):
    set_value(cfg, "compute_dtype", "float16")


def test_empty_seeds_rejected(cfg):
  with pytest.raises(ValueError, match="seeds must be a non-empty tuple of ints"):
    ReproduceConfig(seeds=())
  with pytest.raises(ValueError, match="seeds must be a non-empty tuple of ints"):
    set_value(cfg, "seeds", ())
  with pytest.raises(ValueError, match="seeds must be a non-empty tuple of ints"):
    ReproduceConfig(seeds=("0",))


def test_sweep_floats(cfg):
  assert parse_sweep_values(cfg, "optim.asam_rho=0.01,0.02,5e-2") == (
      "optim.asam_rho", [0.01, 0.02, 0.05])
  assert parse_sweep_values(cfg, "steps=10") == ("steps", [10])


def test_sweep_tuple_fields_use_semicolons(cfg):
  assert parse_sweep_values(cfg, "tasks=digits,rot90;flip,invert") == (
      "tasks", [("digits", "rot90"), ("flip", "invert")])
  key, values = parse_sweep_values(cfg, "seeds=0,1;2")
  assert key == "seeds" and values == [(0, 1), (2,)]
  assert all(type(s) is int for v in values for s in v)
  assert parse_sweep_values(cfg, "tasks=none;digits") == ("tasks", [None, ("digits",)])


def test_sweep_errors(cfg):
  with pytest.raises(ValueError, match="duplicate"):
    parse_sweep_values(cfg, "optim.lr=1e-4,0.0001")
  with pytest.raises(ValueError, match="duplicate"):
    parse_sweep_values(cfg, "tasks=digits;digits")
  with pytest.raises(ValueError, match="empty value"):
    parse_sweep_values(cfg, "steps=1,,2")
  with pytest.raises(ValueError, match="expected an int, got 'x'"):
    parse_sweep_values(cfg, "steps=1,x")
  with pytest.raises(ValueError, match="stepz"):
    parse_sweep_values(cfg, "stepz=1,2")
  with pytest.raises(ValueError, match="key=value"):
    parse_sweep_values(cfg, "steps")


def test_overrides_round_trip_asdict(cfg):
  new = apply_overrides(cfg, ["optim.asam_rho=0.02", "seeds=0,1", "tasks=digits,rot90",
                              "mesh_shape=1", "augment=true"])
  raw = dataclasses.asdict(new)
  assert raw["optim"]["asam_rho"] == 0.02 and raw["seeds"] == (0, 1)
  raw["optim"] = OptimConfig(**raw["optim"])
  raw["text"] = TextConfig(**raw["text"])
  assert ReproduceConfig(**raw) == new
