"""The paper's NLP experiment: Flan-T5-base fine-tuned on GLUE CoLA, MRPC, RTE, SST-2.

  T5_CHECKPOINT=checkpoints/flan-t5-base TFDS_DATA_DIR=~/tensorflow_datasets \
    saft reproduce --config experiments/configs/flan_t5_glue.py --out runs/flan_t5_glue
  (or: saft reproduce --suite glue --out runs/flan_t5_glue)

Needs, all local: a Hugging Face T5 directory (`T5_CHECKPOINT`, e.g. a copy of
google/flan-t5-base with config.json, model.safetensors and the tokenizer files;
`T5_TOKENIZER_DIR` if the tokenizer lives elsewhere) and GLUE prepared for
tensorflow-datasets (`tfds build glue/cola glue/mrpc glue/rte glue/sst2`, in
`TFDS_DATA_DIR`).

Produces runs/flan_t5_glue/results.{json,md} and meta.json: SGD (plain full
fine-tuning with AdamW), FTTS (linearized, tangent space) and FTLO (attention q/k/v/o
kernels only), each plain and with SAFT-ASAM (ρ = 0.5), merged by weight averaging, task
arithmetic and TIES under the three search protocols; every record holds the exact-match
accuracy of the generated label word (the score of the search and the tables), the
rank-classification accuracy and the label-word analysis of the merged model's outputs.

The paper's settings: 8000 steps, batch 16, AdamW, linear decay to 0, no warm-up. The
paper leaves the learning rate blank: 1e-4 here (`--set optim.lr=...` to change it).
Validation is the held-out part of GLUE train, test the GLUE validation split (GLUE's
test labels are not public). Inputs are T5's GLUE format ("cola sentence: ..."),
truncated to 128 tokens.
"""
from saft_jax.experiment.defaults import glue_config


def get_config():
  return glue_config()
