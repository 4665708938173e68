"""Load model folders in vLLM and generate: run by the interpreter of the vLLM venv.

vLLM pins its own torch/transformers, so `toolkit.export.vllm_proof` runs this file as a
script (`PYTHON vllm_job.py JOB.json`); it imports only vLLM and the standard library. For
each model of the job it builds an offline `vllm.LLM` (all of them stay loaded), then runs
`rounds` timed greedy decodes per model in the order A B B A ... (so a machine that gets
busier or quieter during the run weighs on every model alike), and optionally scores
perplexity with prompt logprobs (what vLLM's own kernels compute, not a reference model's).

A model that fails to load is reported with its error line and the others go on. One JSON
line per model is printed, prefixed `VLLM_JOB `, as soon as it is known.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, this folder would be sys.path[0] and its modules would shadow the packages
# of the same name in the other venv
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

import json
import math
import time
import traceback
from typing import Any


def _emit(record: dict[str, Any]) -> None:
    print("VLLM_JOB " + json.dumps(record), flush=True)


def _error_line(exc: BaseException) -> str:
    """The most telling line of an exception: its own message, else the chained cause's."""
    for error in (exc, exc.__cause__, exc.__context__):
        if error is not None and str(error).strip():
            return f"{type(error).__name__}: {str(error).strip().splitlines()[-1]}"[:400]
    return type(exc).__name__


def _load(spec: dict[str, Any], job: dict[str, Any]) -> Any:
    from vllm import LLM

    kwargs: dict[str, Any] = {"model": spec["path"], "max_model_len": int(job["max_model_len"]),
                              "enforce_eager": True, "seed": 0}
    if spec.get("dtype"):
        kwargs["dtype"] = spec["dtype"]
    if spec.get("quantization"):
        kwargs["quantization"] = spec["quantization"]
    return LLM(**kwargs)


def _decode(llm: Any, prompt_ids: list[int], tokens: int) -> tuple[float, list[int]]:
    """Seconds to decode exactly `tokens` greedy tokens after the prompt, and the tokens."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": prompt_ids}], params, use_tqdm=False)
    return time.perf_counter() - started, list(out[0].outputs[0].token_ids)


def _perplexity(llm: Any, sequences: list[dict[str, Any]]) -> dict[str, Any]:
    """exp(mean NLL) over the scored tokens of each sequence, overall and per language."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": s["ids"]} for s in sequences], params,
                        use_tqdm=False)
    nll: dict[str, float] = {}
    count: dict[str, int] = {}
    for seq, out in zip(sequences, outs):
        ids = seq["ids"]
        for pos in range(int(seq["start"]), len(ids)):
            entry = out.prompt_logprobs[pos]
            value = -entry[ids[pos]].logprob
            for key in ("overall", seq["language"]):
                nll[key] = nll.get(key, 0.0) + value
                count[key] = count.get(key, 0) + 1
    return {key: math.exp(nll[key] / count[key]) for key in nll} | {"tokens": count.get("overall", 0)}


def run(job: dict[str, Any]) -> None:
    """Load every model, then time and score them; emits one record per model."""
    loaded: dict[str, Any] = {}
    records: dict[str, dict[str, Any]] = {}
    for spec in job["models"]:
        started = time.perf_counter()
        record: dict[str, Any] = {"name": spec["name"], "loaded": False}
        try:
            loaded[spec["name"]] = _load(spec, job)
            record.update(loaded=True, load_seconds=round(time.perf_counter() - started, 1))
        except Exception as exc:  # noqa: BLE001 - any failure is the finding, reported as a line
            traceback.print_exc()
            record["error"] = _error_line(exc)
            _emit(record)
        records[spec["name"]] = record
    names = list(loaded)
    if not names:
        return
    prompt, tokens, rounds = job["prompt_ids"], int(job["tokens"]), int(job["rounds"])
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # warm-up: first-call allocations and caches are not decoding speed
        try:
            _, sample = _decode(loaded[name], prompt, min(tokens, 8))
            records[name]["sample_ids"] = sample
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            records[name].update(generated=False, error=_error_line(exc))
    names = [n for n in names if records[n].get("generated", True)]
    for index in range(rounds):
        order = names if index % 2 == 0 else list(reversed(names))
        for name in order:
            elapsed, _ = _decode(loaded[name], prompt, tokens)
            seconds[name].append(elapsed)
    for name in names:
        record = records[name]
        record["generated"] = True
        if seconds[name]:
            best = min(seconds[name])
            record.update(tokens=tokens, rounds=rounds, seconds=[round(s, 4) for s in seconds[name]],
                          tokens_per_s=round(tokens / best, 2))
        if job.get("ppl_sequences"):
            record["perplexity"] = _perplexity(loaded[name], job["ppl_sequences"])
    for name in loaded:
        _emit(records[name])


if __name__ == "__main__":
    run(json.loads(Path(sys.argv[1]).read_text(encoding="utf-8")))
