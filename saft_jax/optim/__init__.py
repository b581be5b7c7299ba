"""SAM, ASAM and the SAM family as optax gradient transformations.

Every factory takes a base optax optimizer and returns an
``optax.GradientTransformationExtraArgs`` whose ``update`` is called as
``tx.update(grads, state, params, grad_fn=grad_fn)`` with ``grads`` the clean
gradient of the batch and ``grad_fn(params) -> grads`` on the same batch.
``TRANSFORMS`` maps every factory's name to the factory.

Frozen leaves: either pass ``mask=`` (perturb only trainable leaves; mask the
base optimizer yourself, e.g. ``optax.multi_transform``), or put the transform
inside ``optax.masked`` / ``optax.multi_transform`` and wrap the gradient
function with ``masked_grad_fn(grad_fn, params)``: there the transform sees
``optax.MaskedNode`` leaves, which the wrapper fills with the current frozen
values before calling your full-tree ``grad_fn``.

Data parallel: under ``jax.jit`` with a sharded batch the perturbation uses the
global batch. ``axis_name=`` + ``per_shard_update`` give one perturbation per
shard (m-sharpness), gradients averaged afterwards.
"""
from saft_jax.optim._averaging import (AveragingState, averaged_params, swa,
                                       unperturbed_params, wa_sam, weight_averaging)
from saft_jax.optim._base import (default_weight_predicate, masked_grad_fn,
                                  reference_weight_predicate)
from saft_jax.optim._cheap import (EveryKState, LookSAMState, MSAMState, looksam, msam,
                                   sam_every_k)
from saft_jax.optim._core import SharpnessState
from saft_jax.optim._perturb_random import RWPState, rwp
from saft_jax.optim._registry import TRANSFORMS
from saft_jax.optim._sam import asam, sam
from saft_jax.optim._sharding import per_shard_update
from saft_jax.optim._sparse import SparseSAMState, ssam_d, ssam_f
from saft_jax.optim._variants import FriendlySAMState, friendly_sam, gsam, pgn, sagm

__all__ = [
    "TRANSFORMS",
    "AveragingState",
    "EveryKState",
    "FriendlySAMState",
    "LookSAMState",
    "MSAMState",
    "RWPState",
    "SharpnessState",
    "SparseSAMState",
    "asam",
    "averaged_params",
    "default_weight_predicate",
    "friendly_sam",
    "gsam",
    "looksam",
    "masked_grad_fn",
    "msam",
    "per_shard_update",
    "pgn",
    "reference_weight_predicate",
    "rwp",
    "sagm",
    "sam",
    "sam_every_k",
    "ssam_d",
    "ssam_f",
    "swa",
    "unperturbed_params",
    "wa_sam",
    "weight_averaging",
]
