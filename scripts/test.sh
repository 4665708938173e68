#!/usr/bin/env bash
# The test command (README, .ci/run): set up, then run the whole suite, integration included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --tests
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pytest -q "$@"
