"""A fake vLLM OpenAI server for the gateway's vLLM engine tests (no vLLM needed).

Started exactly as the real one is: `PYTHON -m tests.fake_vllm --host H --port P --model M
--served-model-name NAME [--enable-lora --lora-modules NAME=DIR] ...` (the gateway's
`vllm_module` setting). It speaks the subset the gateway uses: `/health`, `/v1/models`, chat
and text completions (streamed or not, `stream_options.include_usage`), and `/metrics` with a
few `vllm:*` series. The answer is the words "fake answer to" followed by the last user message,
one word per token.

Environment knobs: FAKE_VLLM_ARGV_FILE (write argv and env as JSON there), FAKE_VLLM_FAIL_START
(exit 3 at once, printing an error), FAKE_VLLM_START_DELAY_S (sleep before listening),
FAKE_VLLM_TOKEN_DELAY_S (seconds per answer word, streamed or not; default 0.001 for streams).
"""

# no `from __future__ import annotations`: FastAPI must resolve `Request` at runtime

import argparse
import json
import os
import sys
import time
import uuid

REQUESTS = {"running": 0, "total": 0}


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", required=True)
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--lora-modules", nargs="*", default=[])
    args, _ = parser.parse_known_args(argv)
    return args


def build(args: argparse.Namespace):
    import asyncio

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    names = [args.served_model_name or args.model] + [m.split("=", 1)[0] for m in args.lora_modules]
    app = FastAPI()

    @app.get("/health")
    async def health() -> PlainTextResponse:
        return PlainTextResponse("")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": n, "object": "model"} for n in names]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        lines = [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f'vllm:num_requests_running{{model_name="{names[0]}"}} {REQUESTS["running"]}.0',
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
            f'vllm:num_requests_waiting{{model_name="{names[0]}"}} 0.0',
            "# HELP vllm:kv_cache_usage_perc KV-cache usage.",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f'vllm:kv_cache_usage_perc{{model_name="{names[0]}"}} 0.0',
        ]
        return PlainTextResponse("\n".join(lines) + "\n")

    async def complete(request: Request, chat: bool):
        body = await request.json()
        if body.get("model") not in names:
            return JSONResponse({"object": "error", "message": f"The model `{body.get('model')}` "
                                 "does not exist.", "type": "NotFoundError", "code": 404}, 404)
        if chat:
            user = [m for m in body["messages"] if m.get("role") == "user"]
            prompt = str(user[-1]["content"]) if user else ""
            prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body["messages"])
        else:
            prompt = str(body["prompt"])
            prompt_tokens = len(prompt.split())
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        if prompt_tokens + max_tokens > args.max_model_len:
            return JSONResponse({"object": "error", "message": "This model's maximum context "
                                 f"length is {args.max_model_len} tokens.",
                                 "type": "BadRequestError", "code": 400}, 400)
        words = ["fake", "answer", "to"] + prompt.split()
        # vLLM's extras: no end before min_tokens, none at all with ignore_eos
        floor = max_tokens if body.get("ignore_eos") else int(body.get("min_tokens") or 0)
        words += ["more"] * max(0, floor - len(words))
        finish = "length" if len(words) >= max_tokens else "stop"
        words = words[:max_tokens]
        cid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(words),
                 "total_tokens": prompt_tokens + len(words)}
        REQUESTS["total"] += 1
        delay_s = float(os.environ.get("FAKE_VLLM_TOKEN_DELAY_S", "0"))
        if not body.get("stream"):
            await asyncio.sleep(delay_s * len(words))
            text = " ".join(words)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                       "finish_reason": finish} if chat
                      else {"index": 0, "text": text, "finish_reason": finish})
            return {"id": cid, "object": "chat.completion" if chat else "text_completion",
                    "created": created, "model": body["model"], "choices": [choice], "usage": usage}
        kind = "chat.completion.chunk" if chat else "text_completion"

        def event(choices: list, **extra: object) -> bytes:
            payload = {"id": cid, "object": kind, "created": created, "model": body["model"],
                       "choices": choices, **extra}
            return f"data: {json.dumps(payload)}\n\n".encode()

        async def stream():
            REQUESTS["running"] += 1
            try:
                if chat:
                    yield event([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                  "finish_reason": None}])
                for i, word in enumerate(words):
                    piece = word if i == 0 else " " + word
                    yield event([{"index": 0, "delta": {"content": piece}, "finish_reason": None}]
                                if chat else [{"index": 0, "text": piece, "finish_reason": None}])
                    await asyncio.sleep(delay_s or 0.001)
                yield event([{"index": 0, "delta": {}, "finish_reason": finish}] if chat
                            else [{"index": 0, "text": "", "finish_reason": finish}])
                if (body.get("stream_options") or {}).get("include_usage"):
                    yield event([], usage=usage)
                yield b"data: [DONE]\n\n"
            finally:
                REQUESTS["running"] -= 1

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    return app


def main(argv: list[str]) -> None:
    if os.environ.get("FAKE_VLLM_ARGV_FILE"):
        with open(os.environ["FAKE_VLLM_ARGV_FILE"], "w", encoding="utf-8") as handle:
            json.dump({"argv": argv, "VLLM_CPU_KVCACHE_SPACE":
                       os.environ.get("VLLM_CPU_KVCACHE_SPACE")}, handle)
    if os.environ.get("FAKE_VLLM_FAIL_START"):
        print("ValueError: fake vLLM refuses to start (FAKE_VLLM_FAIL_START)", flush=True)
        sys.exit(3)
    time.sleep(float(os.environ.get("FAKE_VLLM_START_DELAY_S", "0")))
    args = _args(argv)
    import uvicorn

    print(f"fake vLLM serving {args.model} on {args.host}:{args.port}", flush=True)
    uvicorn.run(build(args), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main(sys.argv[1:])
