#!/usr/bin/env bash
# Runs the same command on every worker of a Cloud TPU pod slice.
#   TPU_NAME=my-v4-32 ZONE=us-central2-b bash experiments/launch_tpu.sh \
#       saft reproduce --config experiments/configs/clip_vit_b32.py --out gs://bucket/run
# Each worker installs requirements-tpu.txt and the package, then runs the command;
# saft_jax calls jax.distributed.initialize() on TPU pods (auto-detected), builds one
# global mesh over all chips, and each process feeds its share of every global batch.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO_DIR=${REPO_DIR:-saft_jax}
CMD="cd $REPO_DIR && pip install -q -r requirements-tpu.txt && pip install -q -e . --no-deps \
 && SAFT_DISTRIBUTED_AUTO=1 $*"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$CMD"
