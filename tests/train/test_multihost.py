"""2 processes x 2 CPU devices (gloo collectives) == 1 process x 4 devices."""
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from train_helpers import init_mlp

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")
TIMEOUT = 90  # seconds for the whole group (~15 s on an idle 2-core machine)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
  return env


def _run_all(cmds):
  procs = [subprocess.Popen(c, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for c in cmds]
  try:
    deadline = time.monotonic() + TIMEOUT
    outs = [p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for p in procs]
  finally:
    for p in procs:  # always clean up, also on timeout
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, o in zip(procs, outs):
    assert p.returncode == 0, o[-3000:]


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
  single, multi = str(tmp_path / "single.npz"), str(tmp_path / "multi.npz")
  addr = f"127.0.0.1:{_free_port()}"
  ck1, ck2 = str(tmp_path / "ck_single"), str(tmp_path / "ck_multi")
  _run_all([[sys.executable, WORKER, single, ck1, "1", "0", "4"],
            [sys.executable, WORKER, multi, ck2, "2", "0", "2", addr],
            [sys.executable, WORKER, multi, ck2, "2", "1", "2", addr]])
  a, b = np.load(single), np.load(multi)
  assert sorted(a.files) == sorted(b.files) and len(a.files) == 4
  for k in a.files:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=k)
  # The run really trained (params moved away from the init).
  assert not np.allclose(a["['dense0']['kernel']"], init_mlp(0)["dense0"]["kernel"])
  # Both runs checkpointed step 2 (before the resume) and the final step 3.
  for ck in ("ck_single", "ck_multi"):
    assert sorted(os.listdir(tmp_path / ck / "state")) == ["2", "3"]
