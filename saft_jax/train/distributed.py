"""Multi-process (multi-host) start-up: ``jax.distributed.initialize`` from flags or env."""
from __future__ import annotations

import os

import jax

ENV_COORDINATOR = "SAFT_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "SAFT_NUM_PROCESSES"
ENV_PROCESS_ID = "SAFT_PROCESS_ID"
ENV_AUTO = "SAFT_DISTRIBUTED_AUTO"  # "1": let JAX auto-detect (SLURM, Open MPI, TPU)


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None, *,
                                 local_device_ids=None, auto: bool | None = None,
                                 cpu_collectives: str | None = "gloo",
                                 initialization_timeout: int = 300) -> bool:
  """Calls ``jax.distributed.initialize`` when a multi-process run is requested.

  Arguments win over the environment variables ``SAFT_COORDINATOR_ADDRESS``
  (``host:port`` of process 0), ``SAFT_NUM_PROCESSES`` and ``SAFT_PROCESS_ID``;
  ``auto=True`` (or ``SAFT_DISTRIBUTED_AUTO=1``) lets JAX detect the cluster. It must be
  called before any JAX computation. On CPU, cross-process collectives need an
  implementation: ``cpu_collectives`` (default ``"gloo"``) is set before initializing.

  Returns:
    True if the distributed system was initialized by this call.
  """
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR)
  if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
    num_processes = int(os.environ[ENV_NUM_PROCESSES])
  if process_id is None and os.environ.get(ENV_PROCESS_ID):
    process_id = int(os.environ[ENV_PROCESS_ID])
  if auto is None:
    auto = os.environ.get(ENV_AUTO, "") == "1"
  explicit = coordinator_address is not None and (num_processes or 1) > 1
  if not (explicit or auto):
    return False
  if explicit and process_id is None:
    raise ValueError(f"multi-process run needs a process id (argument or ${ENV_PROCESS_ID})")
  if cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  if explicit:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids,
                               initialization_timeout=initialization_timeout)
  else:
    jax.distributed.initialize(initialization_timeout=initialization_timeout)
  return True


def is_primary() -> bool:
  """Whether this process writes the shared files of a run (process 0)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reached ``barrier(name)`` (no-op with one process).

  Used after process 0 wrote a shared file that the others read next.
  """
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def broadcast_from_primary(tree):
  """Process 0's values of a pytree of arrays on every process (NumPy leaves).

  Every process must pass leaves of the same shapes and dtypes. With one process it
  only converts the leaves to NumPy.
  """
  import numpy as np
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  from jax.experimental import multihost_utils
  return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(
      jax.tree.map(np.asarray, tree)))


def primary_flags(flags) -> list[bool]:
  """Process 0's values of the booleans ``flags`` on every process.

  Decisions taken from a shared run directory (is this cache there, is this run
  finished) must agree on every host, or the hosts run different collectives and hang.
  """
  import numpy as np
  flags = np.asarray([bool(f) for f in flags], np.int32)
  return [bool(f) for f in broadcast_from_primary(flags)] if flags.size else []
