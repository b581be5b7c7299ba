"""The offline text suite: T5 on four grammar text-to-text tasks, no downloads.

  saft reproduce --config experiments/configs/text.py --out runs/text
  (or: saft reproduce --suite text --out runs/text)

Produces runs/text/results.{json,md} and meta.json: a small T5 on the grammar's word
vocabulary (d_model 64, 2 encoder + 1 decoder layers, 4 heads, gated-GELU, untied LM
head) pre-trained on a Flan-style mixture of span corruption and labelled task examples
drawn apart from the splits (θ0, cached in runs/text/theta0.msgpack), fine-tuned
with SGD (plain AdamW) and SAFT-ASAM on sentiment, acceptability, paraphrase and
entailment (the offline analogues of SST-2, CoLA, MRPC and RTE, with the same label
words), merged by weight averaging, task arithmetic and TIES under the three search
protocols. Accuracy is the exact match of the generated label word (`text.score`); each
record also holds the rank-classification accuracy and the label-word analysis of the
merged model's outputs (a label word of this task, of another task, or neither).
Add `--all-methods` for FTTS and FTLO, `--seeds 3` for mean ± std.

Settings: the tasks' `lexical` level (`--set text.level=standard` for the harder
grammar); θ0 pre-trained 1000 steps (batch 64, lr 1e-3, half of each batch task
examples); fine-tuning 600 steps of batch 32, lr 1e-3, 10 warm-up steps, linear decay;
2000 / 100 / 200 examples per task; ASAM ρ = 0.5·√(236,352 / 247,577,856) = 0.0154 →
0.015 (per-coordinate radius of Flan-T5-base at the paper's ρ = 0.5). Change any of
them with --set, e.g. `--set text.pretrain_steps=2000 --set optim.lr=3e-4`.
"""
from saft_jax.experiment.defaults import text_config


def get_config():
  return text_config()
