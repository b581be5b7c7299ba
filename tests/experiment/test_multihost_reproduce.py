"""``saft reproduce`` as 2 processes x 2 CPU devices (loopback, gloo) == 1 process x 4.

One group of three processes (the single-process run and the two processes of the
multi-process run, side by side) runs a tiny offline job with SGD, FTTS (linearized) and
FTLO fine-tuning; the tests then compare:

* ``results.json``: the same records; every accuracy within 0.02. The remaining
  differences are float rounding only: the cross-process all-reduce of the gradients
  sums in another order than one process's, and the jitted head fit (300 Adam steps)
  rounds differently in an XLA:CPU process with 2 devices than with 4 (also in a single
  process; its inputs are bit-identical), so heads agree to a few 1e-3 and a merged
  model may flip one or two evaluation examples;
* θ0: bit-identical (a replicated pre-training, broadcast from process 0);
* the files of the run: written once (by process 0), the same set as one process;
* the example ids each process read: its rows of every global batch (per-process input),
  the whole batch for θ0's pre-training and the heads' features.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from saft_jax.experiment.store import load_tree

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reproduce_worker.py")
PYTHON = (sys.executable, "-X", "faulthandler", WORKER)
TIMEOUT = 900  # seconds for the whole group (about two minutes on an idle 2-core machine)
TASKS = "digits,rot90"
FINETUNES = ("sgd", "ftts", "ftlo")
ARGS = ["reproduce", "--tasks", TASKS, "--steps", "4", "--finetunes", ",".join(FINETUNES),
        "--safts", "none", "--merges", "task_arithmetic",
        "--set", "pretrain_steps=4", "--set", "eval_every=2", "--set", "checkpoint_every=2",
        "--set", "batch_size=32", "--set", "eval_batch_size=128"]
ACCURACIES = ("abs_acc", "norm_acc", "ft_acc", "val_acc", "norm_val_acc")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(**extra):
  env = dict(os.environ)
  for k in ("XLA_FLAGS", "SAFT_COORDINATOR_ADDRESS", "SAFT_NUM_PROCESSES", "SAFT_PROCESS_ID"):
    env.pop(k, None)
  env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3", **extra)
  return env


def _run_all(jobs, timeout=TIMEOUT):
  """Runs ``[(argv, env)]`` side by side; fails with the output of a failed process (on
  a timeout: with the Python stacks of the hung ones, dumped by faulthandler)."""
  procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for argv, env in jobs]
  outs = [None] * len(procs)
  try:
    deadline = time.monotonic() + timeout
    for i, p in enumerate(procs):
      try:
        outs[i] = p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0]
      except subprocess.TimeoutExpired:
        break
  finally:
    for i, p in enumerate(procs):  # always clean up, also on timeout
      if p.poll() is None:
        p.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack
        try:
          outs[i] = p.communicate(timeout=10)[0]
        except subprocess.TimeoutExpired:
          p.kill()
          outs[i] = p.communicate()[0]
  for i, (p, o) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i} of the group failed:\n{(o or '')[-6000:]}"
  return outs


def _jobs(tmp, args=ARGS):
  """The single-process run (``tmp/single``) and the two processes (``tmp/multi``)."""
  addr = f"127.0.0.1:{_free_port()}"
  single = ([*PYTHON, str(tmp / "ids_single.json"), "4", "--"]
            + args + ["--out", str(tmp / "single")], _env())
  multi = [([*PYTHON, str(tmp / f"ids_p{p}.json"), "2", "--"]
            + args + ["--out", str(tmp / "multi")],
            _env(SAFT_COORDINATOR_ADDRESS=addr, SAFT_NUM_PROCESSES="2", SAFT_PROCESS_ID=str(p)))
           for p in range(2)]
  return [single] + multi


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("multihost_reproduce")
  t0 = time.monotonic()
  outs = _run_all(_jobs(tmp))
  print(f"3 processes took {time.monotonic() - t0:.1f}s")
  return tmp, outs


def _records(path):
  with open(path) as f:
    return json.load(f)


def _key(r):
  return (r["finetune"], r["saft"], r["merge"], r["protocol"], r["seed"], r["task"])


@pytest.mark.slow
def test_results_equal_one_process(runs):
  tmp, _ = runs
  one, two = _records(tmp / "single" / "results.json"), _records(tmp / "multi" / "results.json")
  assert len(one) == len(FINETUNES) * 2 * 3 == len(two)  # methods x tasks x protocols
  assert {r["finetune"] for r in two} == set(FINETUNES)
  assert [_key(r) for r in one] == [_key(r) for r in two]
  worst = 0.0
  for a, b in zip(one, two):
    for k in ACCURACIES:
      assert b[k] == pytest.approx(a[k], abs=0.02), (_key(a), k)
      worst = max(worst, abs(a[k] - b[k]))
    assert b["hparams"] == a["hparams"]
  print(f"largest accuracy difference: {worst:.4f}")
  meta1 = _records(tmp / "single" / "meta.json")
  meta2 = _records(tmp / "multi" / "meta.json")
  for t, acc in meta1["regime"]["theta0_test_acc"].items():
    assert meta2["regime"]["theta0_test_acc"][t] == pytest.approx(acc, abs=0.02)


@pytest.mark.slow
def test_theta0_is_identical_and_heads_agree(runs):
  tmp, outs = runs
  theta1, theta2 = load_tree(tmp / "single" / "theta0.msgpack"), load_tree(
      tmp / "multi" / "theta0.msgpack")
  flat1, flat2 = _flat(theta1), _flat(theta2)
  assert flat1.keys() == flat2.keys()
  for k in flat1:
    np.testing.assert_array_equal(flat1[k], flat2[k], err_msg=k)
  h1, h2 = load_tree(tmp / "single" / "heads.msgpack"), load_tree(tmp / "multi" / "heads.msgpack")
  for t in TASKS.split(","):
    np.testing.assert_allclose(h1[t], h2[t], atol=2e-2, err_msg=t)
  # Both processes logged the same θ0 pre-training loss as the single process.
  losses = [[line.rsplit(" ", 1)[-1] for line in o.splitlines() if "pretext pre-training" in line]
            for o in outs]
  assert losses[0] and losses[0] == losses[1] == losses[2]


def _flat(tree, prefix=""):
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f"{prefix}/{k}"))
    return out
  return {prefix: np.asarray(tree)}


def _files(root):
  return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root)
                for f in fs)


@pytest.mark.slow
def test_run_directory_is_written_once(runs):
  tmp, _ = runs
  one, two = _files(tmp / "single"), _files(tmp / "multi")
  assert one == two
  assert not [f for f in two if f.endswith(".tmp")]  # no leftover of a concurrent write
  for name in ("results.json", "results.md", "meta.json", "config.json", "suite.json"):
    assert name in two
  # Finished stacked groups leave no checkpoints behind (removed by process 0 only).
  assert not [f for f in two if "/ckpt/" in f]


def _events(path):
  with open(path) as f:
    return json.load(f)


@pytest.mark.slow
def test_each_process_reads_its_rows(runs):
  """Per-process input: process p reads rows [p*B/2, (p+1)*B/2) of every global batch."""
  tmp, _ = runs
  one = _events(tmp / "ids_single.json")
  p0, p1 = _events(tmp / "ids_p0.json"), _events(tmp / "ids_p1.json")
  assert len(one) == len(p0) == len(p1) and one
  kinds = {"train": 0, "eval": 0, "whole": 0}
  for e, a, b in zip(one, p0, p1):
    assert (e["task"], e["split"], e["whole"]) == (a["task"], a["split"], a["whole"]) == (
        b["task"], b["split"], b["whole"])
    assert len(e["batches"]) == len(a["batches"]) == len(b["batches"])
    for full, rows0, rows1 in zip(e["batches"], a["batches"], b["batches"]):
      if e["whole"]:  # θ0 pre-training / head features: the whole batch everywhere
        assert rows0 == rows1 == full
      else:
        assert len(rows0) == len(rows1) == len(full) // 2
        assert rows0 + rows1 == full
    kinds["whole" if e["whole"] else ("train" if e["split"] == "train" else "eval")] += 1
  assert all(kinds.values()), kinds  # every kind of input was checked


RESUME_ARGS = ["-v", "reproduce", "--tasks", TASKS, "--steps", "4", "--finetunes", "ftlo",
               "--safts", "none", "--merges", "task_arithmetic", "--set", "stack_runs=1",
               "--set", "pretrain_steps=4", "--set", "eval_every=2", "--set", "checkpoint_every=2",
               "--set", "batch_size=32", "--set", "eval_batch_size=128",
               # Synchronous saves (multi-process runs force them anyway): with async ones
               # the restarted 2-process run once hung in orbax's finalize thread.
               "--set", "async_checkpoint=false"]


def _run_killed(jobs, victim: int, grace: float = 30.0):
  """Runs ``jobs`` side by side until ``jobs[victim]`` dies (exit 17 after a checkpoint);
  the other processes of its group are then killed too (as a scheduler would)."""
  procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for argv, env in jobs]
  try:
    out = procs[victim].communicate(timeout=TIMEOUT)[0]
    assert procs[victim].returncode == 17, out[-4000:]
    outs = {}
    deadline = time.monotonic() + grace
    for i, p in enumerate(procs):
      if i != victim:
        try:
          outs[i] = p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0]
        except subprocess.TimeoutExpired:
          p.kill()
          outs[i] = p.communicate()[0]
    return outs
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


@pytest.mark.slow
def test_killed_process_resumes_to_the_same_results(tmp_path):
  """Kill process 1 of a 2-process run right after its step-2 checkpoint (mid
  fine-tuning of the first task, one run at a time: ``stack_runs=1``, FTLO), restart
  both: the run resumes from that checkpoint and ends with the records of one process."""
  single, p0, p1 = _jobs(tmp_path, RESUME_ARGS)
  p1 = (p1[0], dict(p1[1], EXIT_AFTER_SAVE="2"))  # saves: step 1 (first), 2
  outs = _run_killed([single, p0, p1], victim=2)
  assert outs[0].count("fine-tuned ") >= 2  # the single-process run went to the end
  ckpt = tmp_path / "multi" / "ft" / "ftlo-none" / "seed0" / "digits" / "ckpt" / "state"
  assert "2" in os.listdir(ckpt)
  assert not (tmp_path / "multi" / "results.json").exists()
  _, p0, p1 = _jobs(tmp_path, RESUME_ARGS)  # the same command again, on a new port
  outs = _run_all([p0, p1], timeout=300)
  for o in outs:
    assert "resumed from step 2" in o
  one, two = _records(tmp_path / "single" / "results.json"), _records(
      tmp_path / "multi" / "results.json")
  assert [_key(r) for r in one] == [_key(r) for r in two] and len(one) == 2 * 3
  for a, b in zip(one, two):
    for k in ACCURACIES:
      assert b[k] == pytest.approx(a[k], abs=0.02), (_key(a), k)
