#!/usr/bin/env bash
# Create .venv-llmcompressor from locks/llmcompressor.txt: llmcompressor 0.14 (vLLM's compression
# library) for --quantize ct-w4a16 / ct-w8a8. Its pins (transformers<=5.17, compressed-tensors==0.19,
# datasets<=5.0.1) cannot share .venv, so `toolkit export` runs it as a subprocess
# (toolkit/export/ct_formats.py). The lock leaves out nvidia-ml-py (NVML bindings auto-round asks
# for; nothing imports them on a CPU). Idempotent.
# Usage: scripts/setup-llmcompressor-venv.sh [VENV_DIR]   (default .venv-llmcompressor)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
sync_venv "${1:-.venv-llmcompressor}" locks/llmcompressor.txt
