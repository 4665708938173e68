"""The typed config of `toolkit serve`: one pydantic model, every problem reported at once."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from toolkit.errors import ConfigError
from toolkit.feedback.postgres import is_postgres_url

DEFAULT_VLLM_MODULE = "vllm.entrypoints.openai.api_server"


class EngineChoice(str, Enum):
    """The engine behind the gateway; `auto` prefers vLLM when it can load the model."""

    auto = "auto"
    vllm = "vllm"
    transformers = "transformers"
    onnxruntime = "onnxruntime"


class ServeSettings(BaseModel):
    """Everything `toolkit serve` needs; the CLI builds it, tests build it directly."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(description="Export folder, HF model folder, training run or model source.")
    engine: EngineChoice = Field(default=EngineChoice.auto, description="Engine behind the gateway.")
    host: str = Field(default="127.0.0.1", description="Bind address of the gateway.")
    port: int = Field(default=8000, ge=0, le=65535, description="Bind port (0: any free port).")
    api_key: str | None = Field(
        default=None, description="Bearer key required on /v1/*; /health and /metrics stay open."
    )
    api_key_file: Path | None = Field(
        default=None,
        description="File holding the bearer key (stripped), so it shows neither in `ps` nor in "
        "the shell history; read into api_key.",
    )
    max_concurrency: int = Field(default=8, ge=1, description="Requests generating at once.")
    max_queue: int = Field(
        default=64, ge=0, description="Requests waiting for a slot; beyond that they get 429."
    )
    model_name: str | None = Field(
        default=None, description="Model id clients send and /v1/models lists (default: folder name)."
    )
    record_completions: bool = Field(
        default=False,
        description="Store prompts and answers with each completion id (off: medical content).",
    )
    feedback_db: Path | str | None = Field(
        default=None,
        description="Feedback store: a SQLite file (default $TOOLKIT_HOME/feedback.db) or a "
        "postgresql:// URL that gateway replicas share.",
    )
    vllm_python: Path | None = Field(
        default=None, description="Interpreter of the venv holding vLLM (default: this Python)."
    )
    vllm_module: str = Field(
        default=DEFAULT_VLLM_MODULE,
        description="Module run as `python -m` to start vLLM's OpenAI server (tests use a fake).",
    )
    tensor_parallel_size: int | None = Field(default=None, ge=1, description="vLLM tensor parallelism.")
    pipeline_parallel_size: int | None = Field(
        default=None, ge=1, description="vLLM pipeline parallelism."
    )
    gpu_memory_utilization: float | None = Field(
        default=None, gt=0, le=1, description="vLLM share of GPU memory."
    )
    max_model_len: int | None = Field(
        default=None, ge=16, description="Context limit (default: the export report's or config's)."
    )
    threads: int | None = Field(
        default=None, ge=1,
        description="CPU threads of embedded engines (default: all cores but one, at least 1).",
    )
    ray_address: str | None = Field(
        default=None,
        description="vLLM over a Ray cluster (multi-node pipeline parallelism): the child gets "
        "RAY_ADDRESS and --distributed-executor-backend ray.",
    )
    engine_args: list[str] = Field(
        default_factory=list, description="Extra arguments passed verbatim to vLLM (after `--`)."
    )
    startup_timeout_s: float = Field(
        default=900.0, gt=0,
        description="How long to wait for the engine to become ready (vLLM compiles on CPU: minutes).",
    )
    shutdown_timeout_s: float = Field(
        default=30.0, ge=0,
        description="On SIGTERM, how long in-flight requests may finish; then they end with an "
        "OpenAI error (503, or an error event in a stream).",
    )
    body_timeout_s: float = Field(
        default=30.0, gt=0,
        description="How long a client may take to upload its request body; then 408 and the "
        "connection closes (a stalled upload must not hold a connection).",
    )
    max_tokens_default: int = Field(
        default=1024, ge=1,
        description="Completion tokens when a request sets no max_tokens (it may ask for more, "
        "up to the context).",
    )
    max_restarts: int = Field(
        default=3, ge=0, description="vLLM child restarts after a crash before the gateway gives up."
    )
    retry_after_s: int = Field(default=1, ge=1, description="Retry-After header on 429 answers.")
    max_body_bytes: int = Field(
        default=1024 * 1024, ge=1024,
        description="Largest request body; beyond it 413. 1 MiB holds ~250k tokens of English "
        "text, far beyond SmolLM2's 8k context, while bounding what one request can make the "
        "gateway buffer and parse (raise it for long-context models).",
    )
    max_batch: int | None = Field(
        default=None, ge=1, description="Embedded engines: rows decoded together (default: max_concurrency)."
    )
    prefix_cache_mb: int = Field(
        default=64, ge=0,
        description="onnxruntime engine: MiB of prompt-prefix keys and values kept, so a prompt "
        "that starts like an earlier one (chat template, system prompt) prefills only the rest; "
        "0 turns the cache off. SmolLM2-135M keeps 46 KiB per token (64 MiB: ~1,400 tokens).",
    )
    speculative_tokens: int = Field(
        default=0, ge=0, le=16,
        description="onnxruntime engine: while one or two greedy requests run, draft up to "
        "this many tokens each (4 is a good start) from its own prompt and answer (n-gram lookup, "
        "vLLM's `ngram` method) and check them in one step, keeping each while it is the "
        "argmax: 1.2-1.4x faster for one client here, ~1.1x for two. Off (0) by "
        "default: on quantized graphs the check rounds as a prefill does, not as one-token "
        "steps, so greedy answers can differ from those without drafts (a request alone gets "
        "the same answer from one server; in a batch it can depend on the others).",
    )

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError("serve: " + _format_errors(exc)) from None

    @field_validator("feedback_db", mode="before")
    @classmethod
    def _store_location(cls, value: Any) -> Any:
        """A URL stays a string (a Path would fold its `//`); anything else is a file path."""
        if isinstance(value, str) and not is_postgres_url(value):
            return Path(value)
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> ServeSettings:
        problems = self._resolve_api_key()
        if not self.model.strip():
            problems.append("model: pass an export folder, model folder, run or model source")
        if self.engine_args and self.engine == EngineChoice.transformers:
            problems.append("engine_args: extra `-- ARGS` only pass through to vLLM")
        if self.engine_args and self.engine == EngineChoice.onnxruntime:
            problems.append("engine_args: extra `-- ARGS` only pass through to vLLM")
        if self.ray_address and self.engine in (EngineChoice.transformers, EngineChoice.onnxruntime):
            problems.append("ray_address: a Ray cluster only serves the vllm engine; pass "
                            "--engine vllm")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _resolve_api_key(self) -> list[str]:
        """Read `api_key_file` into `api_key`; an empty key is an error, never "auth off"."""
        if self.api_key_file is None:
            if self.api_key is not None and not self.api_key.strip():
                return [("api_key: an empty --api-key would turn authentication off; pass a "
                         "non-empty key, or leave the option out to serve without one")]
            return []
        if self.api_key is not None:
            return [("api_key_file: give the key once, either --api-key/$TOOLKIT_API_KEY or "
                     "--api-key-file")]
        try:
            key = self.api_key_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            return [(f"api_key_file: cannot read {self.api_key_file} ({exc}); pass a readable "
                     "text file holding the key")]
        if not key:
            return [f"api_key_file: {self.api_key_file} is empty; write the key into it"]
        self.api_key = key
        return []

    @property
    def engine_threads(self) -> int:
        """Threads for embedded engines: the setting, else every core but one.

        One core stays free for the event loop, tokenization and HTTP: on the 2-core reference
        machine, 2 torch threads competing with the gateway decoded 3-4x slower than 1.
        """
        return self.threads or max(1, (os.cpu_count() or 2) - 1)

    @property
    def batch_rows(self) -> int:
        """Rows an embedded engine decodes together."""
        return self.max_batch or self.max_concurrency


def _format_errors(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "settings"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "enum":
            choices = ", ".join(e.value for e in EngineChoice)
            message = f"{message} (choose one of {choices})"
        parts.append(f"{where}: {message}" if where != "settings" else message)
    return "; ".join(parts)
