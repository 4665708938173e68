#!/usr/bin/env bash
# The main job on the embedded default, end to end on a CPU machine:
#   train (LoRA, seed recipe) -> export (merged + int8/4-bit formats) -> serve -> one real request.
# Usage: scripts/demo.sh [RUN_NAME]   (re-running replaces runs/RUN_NAME)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
name=${1:-demo}
run=runs/$name
port=${TOOLKIT_DEMO_PORT:-8000}
tk=.venv/bin/toolkit

$tk data stats data/train.jsonl
$tk train configs/model/smollm2-135m.yaml --output "$run" --overwrite
$tk export "$run" --quantize merged --quantize onnx --quantize onnx-int8 --quantize onnx-w8a8 --quantize onnx-int4 \
  --quantize bnb-int8 --quantize bnb-nf4 --quantize gptq-int4 --quantize ct-w8a8 --quantize ct-w4a16 --overwrite || \
  echo "demo: some formats were skipped on this machine (see the table above)"

$tk serve "$run/exports/onnx-int8" --port "$port" &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null' EXIT
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break
  sleep 1
done
.venv/bin/python - "$port" <<'PY'
import sys
from openai import OpenAI

client = OpenAI(base_url=f"http://127.0.0.1:{sys.argv[1]}/v1", api_key="unused")
model = client.models.list().data[0].id
reply = client.chat.completions.create(
    model=model, max_tokens=64, temperature=0,
    messages=[{"role": "user", "content": "Quelles sont les étapes de l'hygiène des mains ?"}],
)
print(f"[{model}] {reply.choices[0].message.content}")
print(f"usage: {reply.usage}")
PY
curl -s "http://127.0.0.1:$port/metrics" | grep -E '^toolkit_(requests_total|generation_tokens_total)'
