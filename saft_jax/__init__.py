"""saft_jax: sharpness-aware fine-tuning (SAFT) for model merging in JAX.

Subpackages (import them explicitly; this module only re-exports):
  optim     -- SAM/ASAM and the SAM family as optax gradient transformations.
  merging   -- task vectors and merges (task arithmetic, TIES, ...), streaming merges.
  models    -- Flax CLIP port, weight import/export, zero-shot heads, FTLO masks.
  linearize -- exact tangent-space linearization (FTTS) with jax.jvp.
  data      -- tensorflow-datasets pipelines and the offline digits suite.
  train     -- sharded, checkpointed fine-tuning loop.
  analysis  -- disentanglement, cross-task linearity, joint-task loss, sharpness.
"""

__version__ = "0.1.0"
