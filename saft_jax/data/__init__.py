"""Data: TFDS / folder pipelines for the paper's tasks and the offline digits suite.

Importing this package needs neither TensorFlow nor tensorflow-datasets; they
are imported inside the functions that build tf.data pipelines.
"""
from saft_jax.data.loader import SPLITS, Task, eval_batches, pad_batch, train_batches
from saft_jax.data.offline import (TASKS as OFFLINE_TASKS, offline_suite, pretext_task,
                                   shift_augment)
from saft_jax.data.preprocess import CLIP_MEAN, CLIP_STD
from saft_jax.data.prefetch import prefetch_to_mesh
from saft_jax.data.splits import (batch_indices, host_rows, own_split, own_split_bounds,
                                  protocol_val_split)
from saft_jax.data.tfds_tasks import PAPER_TASKS, known_tasks, load_task, tfds_task
from saft_jax.data.folder import folder_task
from saft_jax.data.text_tasks import (GLUE_TASKS, TextSplit, TextTask, glue_input,
                                      known_text_tasks, load_glue_task, load_text_task,
                                      text_eval_batches, text_train_batches)
from saft_jax.data.text_offline import (TASKS as OFFLINE_TEXT_TASKS, offline_text_suite,
                                        pretext_corpus, span_corruption)
