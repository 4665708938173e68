#!/usr/bin/env bash
# The test command (README, .ci/run): set up, then run the whole suite, integration included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --tests
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -x .venv-vllm/bin/python ]; then export TOOLKIT_VLLM_PYTHON=${TOOLKIT_VLLM_PYTHON:-$PWD/.venv-vllm/bin/python}; fi
.venv/bin/python -m pytest -q "$@"
