"""Training: sharded jitted steps (SGD / FTTS / FTLO × any optax or SAM-family transform;
data-parallel, optionally FSDP over a ``model`` mesh axis), the protocol's AdamW +
warm-up/decay (cosine or linear) schedule, checkpoints, progress logs and ``fit``."""
from saft_jax.train.checkpoint import Checkpointer
from saft_jax.train.distributed import (barrier, broadcast_from_primary, is_primary,
                                        maybe_initialize_distributed, primary_flags)
from saft_jax.train.fsdp import (MIN_SHARD_SIZE, MODEL_AXIS, has_model_axis, param_sharding,
                                 param_spec, shard_params)
from saft_jax.train.loop import FitResult, NonFiniteLossError, fit
from saft_jax.train.losses import linearized_consts, linearized_loss, partitioned_loss
from saft_jax.train.mesh import (DATA_AXIS, batch_sharding, make_mesh, mesh_of, replicate,
                                 replicated_sharding, shard_batch, to_host)
from saft_jax.train.optimizer import make_base_optimizer
from saft_jax.train.partition import combine, mask_from_predicate, partition
from saft_jax.train.progress import MetricsWriter, Progress
from saft_jax.train.schedule import (make_schedule, warmup_cosine_schedule,
                                     warmup_linear_schedule)
from saft_jax.train.stacked import StackedFitResult, fit_stacked
from saft_jax.train.state import TrainState, init_train_state
from saft_jax.train.step import (cast_floating, evaluate, make_eval_step, make_stacked_eval_step,
                                 make_stacked_train_step, make_train_step,
                                 stacked_batch_sharding)

__all__ = [
    "Checkpointer", "DATA_AXIS", "MIN_SHARD_SIZE", "MODEL_AXIS", "has_model_axis",
    "param_sharding", "param_spec", "shard_params", "barrier", "broadcast_from_primary",
    "is_primary", "mesh_of", "primary_flags",
    "to_host", "FitResult", "MetricsWriter", "NonFiniteLossError", "Progress",
    "StackedFitResult", "TrainState", "batch_sharding", "cast_floating", "combine", "evaluate", "fit", "fit_stacked",
    "init_train_state", "linearized_consts", "linearized_loss", "make_base_optimizer",
    "make_eval_step", "make_stacked_eval_step", "make_stacked_train_step",
    "make_mesh", "make_train_step", "mask_from_predicate",
    "maybe_initialize_distributed", "partition", "partitioned_loss", "replicate",
    "replicated_sharding", "shard_batch", "stacked_batch_sharding", "warmup_cosine_schedule",
    "warmup_linear_schedule", "make_schedule",
]
