"""Analysis of merged models: disentanglement, cross-task linearity, joint loss, sharpness."""
from saft_jax.analysis.disentanglement import (
    DisentanglementResult,
    default_alphas,
    disentanglement_error,
    disentanglement_error_linear,
    linearized_outputs,
)
from saft_jax.analysis.hessian import hvp, top_hessian_eigenvalue
