"""`saft merge` on real checkpoint formats: Hugging Face CLIP directories written by
transformers, open_clip state dicts, plain safetensors and orbax; the YAML form; errors."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import hf_utils  # noqa: E402

from saft_jax import cli, merging  # noqa: E402
from saft_jax.models import convert_common as cc  # noqa: E402
from saft_jax.workflow import merge_cmd, merge_methods  # noqa: E402

LAM = 0.3


def _state(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _finetuned(seed):
  """A transformers CLIPModel: the base (seed 0) plus a seeded perturbation."""
  model = hf_utils.tiny_hf_model("quick_gelu", legacy_eos=True, seed=0)
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.01 * torch.randn(p.shape, generator=gen))
  return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """θ0 and three fine-tuned models as Hugging Face directories (save_pretrained)."""
  root = tmp_path_factory.mktemp("hf")
  base = hf_utils.tiny_hf_model("quick_gelu", legacy_eos=True, seed=0)
  base.save_pretrained(str(root / "base"))
  models = [_finetuned(s) for s in (1, 2, 3)]
  for i, m in enumerate(models):
    m.save_pretrained(str(root / f"ft{i}"))
  return str(root), _state(base), [_state(m) for m in models]


def _run(*argv):
  return cli.main([str(a) for a in argv])


def _assert_task_arithmetic(got, theta0, thetas, lams):
  for k, x0 in theta0.items():
    want = x0 + sum(l * (t[k] - x0) for l, t in zip(lams, thetas))
    np.testing.assert_allclose(got[k], want, rtol=1e-6, atol=1e-7, err_msg=k)


def test_hf_task_arithmetic_loads_in_transformers(hf_dirs, tmp_path):
  from transformers import CLIPModel
  root, theta0, thetas = hf_dirs
  out = tmp_path / "merged"
  rc = _run("merge", "--base", f"{root}/base", "--models", f"{root}/ft0", f"{root}/ft1",
            f"{root}/ft2", "--method", "task_arithmetic", "--lam", LAM, "--out", out)
  assert rc == 0
  merged = _state(CLIPModel.from_pretrained(str(out)).eval())
  assert set(merged) == set(theta0)
  _assert_task_arithmetic(merged, theta0, thetas, [LAM] * 3)
  summary = json.load(open(tmp_path / "merged.merge.json"))
  assert summary["method"] == "task_arithmetic" and summary["parameters"] == {"lam": LAM}
  assert summary["mode"] == "streaming"
  assert [m["path"] for m in summary["models"]] == [f"{root}/ft{i}" for i in range(3)]
  assert all(len(m["sha256"]) == 64 for m in summary["models"] + [summary["base"]])
  assert summary["seconds"] > 0 and summary["peak_memory_mib"] > 0


def test_in_memory_equals_streaming(hf_dirs, tmp_path):
  root, _, _ = hf_dirs
  outs = []
  for flag in ([], ["--no-stream"]):
    out = tmp_path / f"m{len(outs)}"
    assert _run("merge", "--base", f"{root}/base", "--models", f"{root}/ft0", f"{root}/ft1",
                "--method", "ties", "--k", "0.3", "--lam", "0.8", "--out", out, *flag) == 0
    outs.append(cc.read_safetensors(str(out / "model.safetensors")))
  assert json.load(open(tmp_path / "m1.merge.json"))["mode"] == "in-memory"
  for k in outs[0]:
    np.testing.assert_array_equal(outs[0][k], outs[1][k], err_msg=k)


def test_conversion_to_open_clip(hf_dirs, tmp_path):
  """--format open_clip: the merged Hugging Face checkpoint written in open_clip's layout."""
  from saft_jax import models
  root, _, _ = hf_dirs
  args = ["merge", "--base", f"{root}/base", "--models", f"{root}/ft0", f"{root}/ft1",
          "--method", "task_arithmetic", "--lam", LAM]
  assert _run(*args, "--out", tmp_path / "hf") == 0
  assert _run(*args, "--format", "open_clip", "--out", tmp_path / "oc") == 0
  assert os.path.exists(tmp_path / "oc" / "open_clip_config.json")
  summary = json.load(open(tmp_path / "oc.merge.json"))
  assert summary["mode"] == "in-memory" and "conversion hf -> open_clip" in summary["mode_reason"]
  a, b = models.load_clip(str(tmp_path / "hf")), models.load_clip(str(tmp_path / "oc"))
  assert a.config == b.config
  for (p, x), y in zip(merging._task_vectors.flatten(a.params)[0],
                       [y for _, y in merging._task_vectors.flatten(b.params)[0]]):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=p)


def test_progress_line_and_read_watcher(caplog):
  import logging
  import time
  from saft_jax.workflow import progress
  p = progress.ByteProgress("merge", 1000, every=0.0)
  p._t0 = time.time() - 10
  assert p.line(500) == "merge:  50% of 1000 B, 50 B/s, ETA 0:00:10"
  reads = iter(range(100, 10**6, 300))
  with caplog.at_level(logging.INFO, logger="saft_jax.workflow"):
    with progress.watch_reads(p, poll=0.01, read_bytes=lambda: next(reads)):
      time.sleep(0.1)
  lines = [r.getMessage() for r in caplog.records]
  assert len(lines) >= 2 and lines[-1].startswith("merge: 100% of 1000 B")


def test_open_clip_state_dict_round_trip(hf_dirs, tmp_path):
  """open_clip state dicts (.safetensors streamed, .pt in memory) merge key by key, keep
  the attn_mask buffer, and load back with load_clip."""
  from safetensors.torch import save_file
  from saft_jax import models
  root, _, _ = hf_dirs
  from transformers import CLIPModel
  sds = [hf_utils.open_clip_state_dict(CLIPModel.from_pretrained(f"{root}/{n}"))
         for n in ("base", "ft0", "ft1", "ft2")]
  for suffix in (".safetensors", ".pt"):
    paths = []
    for i, sd in enumerate(sds):
      p = str(tmp_path / f"oc{i}{suffix}")
      if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, p)
      else:
        torch.save(sd, p)
      paths.append(p)
    out = str(tmp_path / f"merged{suffix}")
    assert _run("merge", "--base", paths[0], "--models", *paths[1:], "--method",
                "task_arithmetic", "--lam", LAM, "--out", out) == 0
    got = (cc.read_safetensors(out) if suffix == ".safetensors" else cc.read_torch(out))
    np_sds = [{k: v.numpy() for k, v in sd.items()} for sd in sds]
    assert np.array_equal(got["attn_mask"], np_sds[0]["attn_mask"])  # a buffer, not merged
    params = {k: v for k, v in np_sds[0].items() if k != "attn_mask"}
    _assert_task_arithmetic({k: got[k] for k in params}, params,
                            [{k: sd[k] for k in params} for sd in np_sds[1:]], [LAM] * 3)
    cfg = models.load_clip(f"{root}/base").config
    assert models.load_clip(out, config=cfg).config == cfg  # open_clip loads it back
    mode = json.load(open(tmp_path / f"merged.merge.json"))["mode"]
    assert mode == ("streaming" if suffix == ".safetensors" else "in-memory")
    os.remove(tmp_path / "merged.merge.json")


def test_ties_through_yaml_equals_library(hf_dirs, tmp_path):
  """The YAML form, with TIES, equals saft_jax.merging.ties on the loaded params."""
  from saft_jax import models
  root, _, _ = hf_dirs
  cfg = tmp_path / "merge.yaml"
  cfg.write_text(f"""merge_method: ties
base_model: {root}/base
models:
  - model: {root}/ft0
  - {root}/ft1
  - model: {root}/ft2
parameters:
  lam: 0.9
  k: 0.25
out: {tmp_path}/ties
""")
  assert _run("merge", "--config", cfg) == 0
  got = models.load_clip(str(tmp_path / "ties")).params
  base = models.load_clip(f"{root}/base").params
  fts = [models.load_clip(f"{root}/ft{i}").params for i in range(3)]
  want = merging.ties(base, [merging.task_vector(base, f) for f in fts], lam=0.9, k=0.25)
  for (p, a), b in zip(merging._task_vectors.flatten(got)[0],
                       [x for _, x in merging._task_vectors.flatten(want)[0]]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7, err_msg=p)
  summary = json.load(open(tmp_path / "ties.merge.json"))
  assert summary["parameters"]["k"] == 0.25 and summary["parameters"]["lam"] == 0.9


def test_yaml_weights_scale_task_arithmetic(tmp_path):
  from safetensors.numpy import save_file
  rng = np.random.default_rng(0)
  theta0 = {"w": rng.normal(size=(4, 3)).astype(np.float32), "step": np.array(3, np.int32)}
  paths = []
  for i in range(3):
    x = dict(theta0, w=theta0["w"] + rng.normal(size=(4, 3)).astype(np.float32)) if i else theta0
    paths.append(str(tmp_path / f"m{i}.safetensors"))
    save_file(x, paths[-1])
  cfg = tmp_path / "m.yaml"
  cfg.write_text(f"method: task_arithmetic\nbase: {paths[0]}\nmodels:\n"
                 f"  - model: {paths[1]}\n    weight: 2.0\n"
                 f"  - model: {paths[2]}\n    parameters: {{weight: 0.5}}\n"
                 f"parameters: {{lam: 0.3}}\n")
  out = str(tmp_path / "out.safetensors")
  assert _run("merge", "--config", cfg, "--out", out) == 0
  got = cc.read_safetensors(out)
  ms = [cc.read_safetensors(p) for p in paths]
  want = ms[0]["w"] + 0.6 * (ms[1]["w"] - ms[0]["w"]) + 0.15 * (ms[2]["w"] - ms[0]["w"])
  np.testing.assert_allclose(got["w"], want, rtol=1e-6)
  assert got["step"] == 3
  # weighted average of two models needs no base
  out2 = str(tmp_path / "avg.safetensors")
  assert _run("merge", "--models", paths[1], paths[2], "--method", "weight_average",
              "--weights", "3,1", "--out", out2) == 0
  np.testing.assert_allclose(cc.read_safetensors(out2)["w"],
                             0.75 * ms[1]["w"] + 0.25 * ms[2]["w"], rtol=1e-6, atol=1e-7)


def test_orbax_in_memory_method_and_conversion(tmp_path):
  """orbax in and out (a method that is not streamed), and safetensors -> orbax."""
  import orbax.checkpoint as ocp
  rng = np.random.default_rng(1)
  trees = [{"a": {"k": rng.normal(size=(5, 4)).astype(np.float32)},
            "b": rng.normal(size=(4,)).astype(np.float32)} for _ in range(3)]
  paths = []
  for i, t in enumerate(trees):
    paths.append(str(tmp_path / f"o{i}"))
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(paths[-1], t)
    ckptr.wait_until_finished()
  out = str(tmp_path / "magmax")
  assert _run("merge", "--base", paths[0], "--models", *paths[1:], "--method", "magmax",
              "--lam", "0.5", "--out", out) == 0
  got = ocp.StandardCheckpointer().restore(out)
  tvs = [merging.task_vector(trees[0], t) for t in trees[1:]]
  want = merging.magmax(trees[0], tvs, 0.5)
  np.testing.assert_allclose(np.asarray(got["a"]["k"]), np.asarray(want["a"]["k"]), rtol=1e-6)
  assert json.load(open(tmp_path / "magmax.merge.json"))["mode"].startswith("in-memory")
  out2 = str(tmp_path / "as.safetensors")
  assert _run("merge", "--base", paths[0], "--models", *paths[1:], "--method",
              "task_arithmetic", "--lam", "1", "--format", "safetensors", "--out", out2) == 0
  st = cc.read_safetensors(out2)
  np.testing.assert_allclose(st["a/k"], trees[1]["a"]["k"] + trees[2]["a"]["k"]
                             - trees[0]["a"]["k"], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- errors
def _error(capsys, *argv):
  assert _run(*argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith("saft merge: error: "), err
  return err[-1]


def test_mismatched_checkpoints_name_the_leaf(hf_dirs, tmp_path, capsys):
  root, _, _ = hf_dirs
  other = hf_utils.tiny_hf_model("quick_gelu", legacy_eos=True, vision=(64, 4))
  other.save_pretrained(str(tmp_path / "other"))
  for flag in ([], ["--no-stream"]):
    msg = _error(capsys, "merge", "--base", f"{root}/base", "--models", f"{root}/ft0",
                 tmp_path / "other", "--method", "task_arithmetic", "--lam", "0.3",
                 "--out", tmp_path / "x", *flag)
    assert "other" in msg and "vision_model.embeddings.class_embedding" in msg, msg
    assert not os.path.exists(tmp_path / "x")


def test_unknown_method_and_parameter(hf_dirs, tmp_path, capsys):
  root, _, _ = hf_dirs
  args = ["merge", "--base", f"{root}/base", "--models", f"{root}/ft0", "--out", tmp_path / "x"]
  msg = _error(capsys, *args, "--method", "fisher")
  assert "unknown merge method 'fisher'" in msg and "task_arithmetic" in msg and "iso_cts" in msg
  msg = _error(capsys, *args, "--method", "ties", "--rho", "0.1")
  assert "unknown parameter 'rho' for method ties" in msg
  assert "lam, k, trim, keep, disjoint" in msg
  msg = _error(capsys, *args, "--method", "task_arithmetic")
  assert "needs the parameter 'lam'" in msg
  msg = _error(capsys, *args, "--method", "ties", "--k", "many")
  assert "'k' expects a float" in msg
  msg = _error(capsys, *args, "--method", "ties", "--weights", "1")
  assert "does not take per-model weights" in msg
  msg = _error(capsys, *args, "--method", "ties", "--k", "0.1,0.2")
  assert "'k' takes one value" in msg
  msg = _error(capsys, *args, "--method", "weight_average", "--weights", "1,x")
  assert msg.endswith("--weights: expected numbers separated by commas, got '1,x'")


def test_output_exists(hf_dirs, tmp_path, capsys):
  root, _, _ = hf_dirs
  (tmp_path / "taken").mkdir()
  msg = _error(capsys, "merge", "--base", f"{root}/base", "--models", f"{root}/ft0",
               "--method", "task_arithmetic", "--lam", "0.3", "--out", tmp_path / "taken")
  assert "taken" in msg and "exists" in msg and "--overwrite" in msg


def test_every_method_runs_in_memory(tmp_path):
  """Every registered method runs with its defaults (plus required parameters)."""
  import jax
  rng = np.random.default_rng(2)
  base = {"l0": {"w": rng.normal(size=(6, 5)).astype(np.float32)},
          "l1": {"w": rng.normal(size=(5, 4)).astype(np.float32)}}
  models = [jax.tree.map(lambda x: x + 0.1 * rng.normal(size=x.shape).astype(np.float32), base)
            for _ in range(2)]
  required = {"lam": "0.5", "p": "0.2"}
  for name, method in merge_methods.METHODS.items():
    given = {k: v for k, v in required.items() if k in method.defaults()}
    params = merge_methods.resolve_parameters(name, given)
    out = merge_methods.merge_trees(name, base, models, params)
    assert jax.tree.structure(out) == jax.tree.structure(base), name
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(out)), name


def test_parameter_options_parsing():
  assert merge_cmd.parse_parameter_options(["--lam", "0.3", "--k=0.2", "--drop-top", "1"]) == {
      "lam": "0.3", "k": "0.2", "drop_top": "1"}
  with pytest.raises(ValueError, match="needs a value"):
    merge_cmd.parse_parameter_options(["--lam"])
  assert merge_methods.resolve_parameters("task_arithmetic", {"lam": "0.1,0.2"}) == {
      "lam": (0.1, 0.2)}
