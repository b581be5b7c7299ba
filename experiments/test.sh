#!/usr/bin/env bash
# Installs saft_jax with everything the tests need and runs the suite.
# (The README's test command; CI runs exactly this.)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install -q -e ".[test]"
# CPU build of PyTorch, only for the parity tests against transformers' PyTorch CLIP.
$PY -m pip install -q "torch==2.13.0" || echo "torch unavailable: PyTorch parity tests will be skipped"
# Two worker processes (SAFT_TEST_WORKERS), one test file per worker at a time (module
# fixtures are built once); XLA compilation is single-threaded, so two processes keep
# both cores busy. The 25 slowest tests are listed at the end.
$PY -m pytest -q -p no:cacheprovider -n "${SAFT_TEST_WORKERS:-2}" --dist loadfile \
  --durations=25 "$@"
