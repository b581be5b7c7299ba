"""Worker of test_multihost_reproduce.py: ``saft reproduce`` with the example ids it read.

usage: reproduce_worker.py IDS.json LOCAL_DEVICES -- SAFT_ARGS...

The multi-process set-up comes from the environment, as for the ``saft`` command
(``SAFT_COORDINATOR_ADDRESS``, ``SAFT_NUM_PROCESSES``, ``SAFT_PROCESS_ID``). Every batch
that ``saft_jax.data.train_batches`` / ``eval_batches`` yield is recorded as the split's
example ids of its rows (found by the row's pixels), in call order, and written to
IDS.json when the job ends: one event per iterator, ``{"task", "split", "whole",
"batches"}`` (``whole``: the caller asked for the whole global batch in every process).
With ``EXIT_AFTER_SAVE=N`` in the environment the process dies (exit status 17) right
after its N-th periodic checkpoint was written, as if killed.
"""
import json
import os
import sys

ids_path, ndev = sys.argv[1], int(sys.argv[2])
saft_args = sys.argv[sys.argv.index("--") + 1:]

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", ndev)

import numpy as np  # noqa: E402

from saft_jax import cli  # noqa: E402
from saft_jax import data as data_lib  # noqa: E402

EVENTS = []
_LOOKUP = {}


def _ids(task, split, images):
  """Row ids in ``task``'s ``split`` of ``images`` (-1: a padding row)."""
  key = (task.name, split)
  if key not in _LOOKUP:
    table = {}
    for i, x in enumerate(task.splits[split][0]):
      table.setdefault(np.asarray(x, np.float32).tobytes(), i)
    _LOOKUP[key] = table
  return [_LOOKUP[key].get(np.asarray(x, np.float32).tobytes(), -1) for x in images]


def _recorded(fn, split_of):
  def wrapper(task, *args, **kwargs):
    split = split_of(args, kwargs)
    event = {"task": task.name, "split": split, "batches": [],
             "whole": kwargs.get("process_count") == 1}
    EVENTS.append(event)
    for batch in fn(task, *args, **kwargs):
      ids = _ids(task, split, batch[0])
      if len(batch) == 3:  # eval batches: padding rows are masked
        ids = [i if m else -1 for i, m in zip(ids, np.asarray(batch[2]))]
      event["batches"].append(ids)
      yield batch
  return wrapper


data_lib.train_batches = _recorded(data_lib.train_batches, lambda a, k: "train")
data_lib.eval_batches = _recorded(data_lib.eval_batches, lambda a, k: a[0])

if os.environ.get("EXIT_AFTER_SAVE"):  # a kill right after the N-th periodic checkpoint
  from saft_jax.train import checkpoint as checkpoint_lib

  _save, _saved = checkpoint_lib.Checkpointer.save, []

  def _save_then_exit(self, *args, **kwargs):
    done = _save(self, *args, **kwargs)
    if done:
      _saved.append(1)
      if len(_saved) == int(os.environ["EXIT_AFTER_SAVE"]):
        self.wait()
        print("killed after a checkpoint", flush=True)
        os._exit(17)
    return done

  checkpoint_lib.Checkpointer.save = _save_then_exit

rc = cli.main(saft_args)
with open(ids_path, "w") as f:
  json.dump(EVENTS, f)
if jax.process_count() > 1:
  jax.distributed.shutdown()
sys.exit(rc)
