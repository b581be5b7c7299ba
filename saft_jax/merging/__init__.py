"""Model merging: task vectors, weight averaging, task arithmetic, TIES and successors."""
from ._task_vectors import (add_task_vectors, apply_task_vector, negate_task_vector,
                            path_str, scale_task_vector, subtract_task_vectors, task_vector)
from ._basic import sum_task_vectors, task_arithmetic, weight_average
from ._ties import ties, ties_merged_vector, ties_thresholds, ties_trim
