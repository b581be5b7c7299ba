"""Model merging: task vectors, weight averaging, task arithmetic, TIES and successors.

Streaming (out-of-core) merges of checkpoints on disk: :func:`stream_merge`.
"""
from ._task_vectors import (add_task_vectors, apply_task_vector, is_mergeable,
                            negate_task_vector, path_str, scale_task_vector,
                            subtract_task_vectors, task_vector)
from ._basic import sum_task_vectors, task_arithmetic, weight_average
from ._ties import ties, ties_merged_vector, ties_thresholds, ties_trim
from ._topk import (keep_count, kth_largest_bits, kth_largest_bits_groups,
                    kth_largest_bits_rows)
from ._sparse import (breadcrumbs_masks, breadcrumbs_merge, consensus_merge,
                      consensus_merged_vector, consensus_ties_merged_vector, dare, dare_merge,
                      dare_ties, dare_ties_merged_vector, magmax, magmax_merged_vector,
                      tall_masks)
from ._geometry import (default_layer_index, layer_indices, lines, lines_multitask_alpha,
                        lines_scales, model_stock, model_stock_ratio, reference_layer_fn, slerp)
from ._spectral import (iso_c, iso_c_merged_vector, iso_cts, iso_cts_merged_vector,
                        iso_cts_sizes, tsv_merge, tsv_merged_vector)
from ._analysis import cosine_similarity_matrix, global_norm, leaf_norms, sign_conflict_rate
from ._streaming import stream_merge
from ._io import checkpoint_format, open_checkpoint
from ._fisher import fisher_diagonal, fisher_merge, fisher_norm
from ._regmean import gram_axes, gram_matrices, reduce_non_diagonal, regmean
from ._adamerging import adamerging, merge_with_coefficients, softmax_entropy
