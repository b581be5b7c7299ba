"""The researcher's workflow on real checkpoints: ``saft finetune``, ``saft merge``,
``saft eval``.

* :mod:`.checkpoints` — one view of the four checkpoint formats the commands read and
  write (Hugging Face CLIP directories, open_clip state dicts, plain safetensors files,
  orbax pytree directories).
* :mod:`.merge_methods` — every merge of :mod:`saft_jax.merging` by name, with its own
  validated parameters.
* :mod:`.merge_cmd`, :mod:`.finetune_cmd`, :mod:`.eval_cmd` — the three commands.
"""
from saft_jax.workflow.checkpoints import Checkpoint, detect_checkpoint
from saft_jax.workflow.merge_methods import METHODS, resolve_parameters
from saft_jax.workflow.merge_cmd import MergeSpec, load_merge_config, run_merge
from saft_jax.workflow.finetune_cmd import FinetuneSpec, run_finetune
from saft_jax.workflow.eval_cmd import EvalSpec, run_eval
