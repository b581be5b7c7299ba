"""Analysis of merged models: disentanglement, cross-task linearity, joint loss, sharpness."""
from saft_jax.analysis.disentanglement import (
    DisentanglementResult,
    default_alphas,
    disentanglement_error,
    disentanglement_error_linear,
    linearized_outputs,
)
from saft_jax.analysis.hessian import hvp, top_hessian_eigenvalue
from saft_jax.analysis.ctl import CTLResult, cross_task_linearity, layer_names
from saft_jax.analysis.joint_loss import (
    JointLossResult,
    LossBarrier,
    joint_loss_grid,
    jtl_linearity,
    loss_along_line,
    loss_barrier,
    merged_to_task_barriers,
)
from saft_jax.analysis.plots import plot_ctl_bars, plot_grid_pair, plot_loss_curves
from saft_jax.analysis.report import markdown_table, to_jsonable, write_markdown_table
