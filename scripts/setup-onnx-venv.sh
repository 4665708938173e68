#!/usr/bin/env bash
# Create .venv-onnx, the ONNX exporter's venv, from locks/onnx-exporter.txt: optimum-onnx 0.1.0
# (its only release) requires transformers<4.58, which cannot share .venv with transformers 5, so
# `toolkit export` runs it as a subprocess (toolkit/export/onnx.py). Idempotent.
# Usage: scripts/setup-onnx-venv.sh [VENV_DIR]   (default .venv-onnx)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
sync_venv "${1:-.venv-onnx}" locks/onnx-exporter.txt
