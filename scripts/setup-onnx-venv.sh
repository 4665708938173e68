#!/usr/bin/env bash
# Create .venv-onnx, the ONNX exporter's venv: optimum-onnx 0.1.0 (its only release) requires
# transformers<4.58, which cannot share .venv with transformers 5, so `toolkit export` runs it
# as a subprocess (toolkit/export/onnx.py). Idempotent: does nothing when the venv already
# imports the exporter. Usage: scripts/setup-onnx-venv.sh [VENV_DIR]   (default .venv-onnx)
set -euo pipefail
cd "$(dirname "$0")/.."

setup_onnx_venv() {
  local venv=${1:-.venv-onnx}
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import optimum.exporters.onnx, accelerate" 2>/dev/null; then
    return 0
  fi
  "${PYTHON:-python3}" -m venv "$venv"
  # torch first, pinned: this machine has the 2.13.0 CPU wheel locally, and optimum's
  # unpinned torch requirement would otherwise pull a multi-GB CUDA build.
  "$venv/bin/pip" install -q torch==2.13.0
  # accelerate: optimum needs it to store tied embedding/lm_head weights once (-113 MB on SmolLM2).
  "$venv/bin/pip" install -q 'optimum-onnx[onnxruntime]==0.1.0' 'transformers<4.58' accelerate
}

setup_onnx_venv "$@"
