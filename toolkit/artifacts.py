"""The contract between the stages: what train and export write, and how the next stage reads it.

Train writes `RunManifest` (`runs/NAME/manifest.json`); export writes `ExportReport`
(`EXPORT/export_report.json`). Every later stage reads them through `read_run` /
`read_export` and asks `identify(path)` what a folder is, so the file names, the schema
versions and the "is this a run, an export, an adapter or a model?" rules live here only.
Only pydantic and the standard library are imported: reading an artifact is instant.

Versions: `manifest_version` / `report_version` is the schema version of a file. A file
from a newer toolkit, or one that does not match the schema, is refused with one line that
says which stage to re-run (or to upgrade).
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
from datetime import datetime, timezone
from enum import Enum
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from toolkit.errors import ModelSourceError, ToolkitError
from toolkit.formats import ExportFormat

RUN_MANIFEST = "manifest.json"
EXPORT_REPORT = "export_report.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
MANIFEST_VERSION = 1
REPORT_VERSION = 1
#: used when a run records no max_seq_len (a bare adapter: the TrainConfig default)
DEFAULT_MAX_SEQ_LEN = 1024


class ArtifactError(ToolkitError):
    """A manifest or report is missing, unreadable, from a newer toolkit, or off-schema."""


class Kind(str, Enum):
    """What a folder holds."""

    run = "run"  # a `toolkit train` run: manifest.json + adapter/
    export = "export"  # a `toolkit export` folder (or an ONNX graph folder without its report)
    adapter = "adapter"  # a bare peft adapter folder
    model = "model"  # anything else: an HF model folder


def identify(path: Path | str) -> Kind | None:
    """What the folder at `path` is; None when it is not a folder (a hub id, `embedded:...`)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return None
    if (path / EXPORT_REPORT).is_file() or (path / "model.onnx").is_file():
        return Kind.export
    if (path / RUN_MANIFEST).is_file():
        return Kind.run
    if (path / ADAPTER_CONFIG).is_file():
        return Kind.adapter
    return Kind.model


# --- the run manifest -----------------------------------------------------------------------


class BaseModelRef(BaseModel):
    """The base a run was trained on (`model_source.ResolvedModel`)."""

    source: str = Field(min_length=1, description="What the config named (resolve_model input).")
    path: str | None = Field(default=None, description="The local folder it resolved to.")
    revision: str | None = Field(default=None, description="Hub revision, when pinned.")
    kind: str | None = Field(default=None, description="local, hub, embedded...")


class DataEntry(BaseModel):
    """One data split as the run saw it."""

    model_config = ConfigDict(extra="allow")

    path: str
    sha256: str
    examples: int
    tokens: int
    truncated: int
    dropped: list[str] = Field(default_factory=list)


class RunData(BaseModel):
    """The run's splits (eval is None when data.eval was null)."""

    train: DataEntry
    eval: DataEntry | None = None


class RunManifest(BaseModel):
    """`runs/NAME/manifest.json`: what a training run was, and what export needs to rebuild it.

    Every field is always written (`null` where it does not apply). `--resume` of a finished
    run with nothing left to train leaves it unchanged.
    """

    model_config = ConfigDict(extra="allow")

    manifest_version: int = Field(default=MANIFEST_VERSION, description="Schema version.")
    toolkit_version: str = Field(description="The toolkit that trained.")
    created: str = Field(description="UTC ISO 8601 of the run's end.")
    config: dict[str, Any] = Field(description="The resolved TrainConfig (config_to_dict).")
    base_model: BaseModelRef
    adapter_dir: str = Field(default=ADAPTER_DIR, description="peft adapter + tokenizer.")
    checkpoint_dir: str = Field(default=CHECKPOINT_DIR, description="What --resume continues.")
    chat_template_added: bool = Field(description="The base had no template; ChatML was saved.")
    data: RunData
    versions: dict[str, str | None] = Field(description="toolkit, torch, transformers, ...")
    device: dict[str, Any] = Field(
        description="{type, name, precision, requested_precision, quantization, threads, "
                    "world_size, micro_batch_rows, accumulation_steps}")
    world_size: int = Field(description="Processes that trained.")
    packing: bool
    metrics: dict[str, Any] = Field(
        description="{before, epochs: [{epoch, step, train_loss, eval, train_tokens, "
                    "train_time_s}], after}; perplexities as Perplexity.to_dict().")
    truncated_examples: int = Field(description="train + eval examples cut at max_seq_len.")
    steps: int = Field(description="Optimizer steps done (cumulative over resumes).")
    resumed_from_step: int | None = None
    train_tokens: int = Field(description="Non-pad tokens trained by the whole run.")
    wall_time_s: float = Field(description="This invocation, start to end.")
    train_time_s: float = Field(description="The training loop only, whole run.")
    tokens_per_s: float = Field(description="train_tokens / train_time_s.")
    peak_memory_bytes: int = Field(description="ru_maxrss (CPU) or max_memory_allocated (CUDA).")
    trainable_params: int
    total_params: int

    def _section(self, name: str) -> dict[str, Any]:
        value = self.config.get(name)
        return value if isinstance(value, dict) else {}

    @property
    def system_prompt(self) -> str | None:
        """The system message rendered before every training example (None: no system turn)."""
        return self._section("data").get("system_prompt") or None

    @property
    def max_seq_len(self) -> int:
        """Examples were truncated to this many tokens."""
        return int(self._section("training").get("max_seq_len") or DEFAULT_MAX_SEQ_LEN)

    @property
    def qlora(self) -> bool:
        """The adapter was trained on a 4-bit NF4 base."""
        return str(self._section("training").get("quantization") or "none") == "nf4"

    @property
    def compute_dtype(self) -> str:
        """The precision the base was loaded in for training (fp32, fp16, bf16)."""
        return str(self._section("training").get("precision") or "fp32")

    @property
    def trust_remote_code(self) -> bool:
        """As the training config allowed."""
        return bool(self._section("model").get("trust_remote_code", False))

    def data_path(self, split: str) -> Path | None:
        """The file a split was read from (recorded, else configured; None when neither)."""
        entry = getattr(self.data, split, None)
        if entry is not None and entry.path:
            return Path(entry.path)
        configured = self._section("data").get(split)
        return Path(configured) if configured else None

    def adapter_path(self, run_dir: Path) -> Path:
        """The run's peft adapter folder."""
        return Path(run_dir) / self.adapter_dir


#: every key a manifest has
MANIFEST_KEYS: tuple[str, ...] = tuple(RunManifest.model_fields)


def write_run(run_dir: Path, manifest: RunManifest) -> Path:
    """Write `manifest.json` atomically (temp file, then rename)."""
    return _write_json(Path(run_dir) / RUN_MANIFEST, manifest.model_dump(mode="json"))


def read_run(run_dir: Path | str) -> RunManifest:
    """Read a training run's manifest.

    Raises:
        ArtifactError: no manifest (not a finished run), not JSON, from a newer toolkit, or
            not matching the schema (one line naming the field and the fix).
    """
    data = _read_json(Path(run_dir) / RUN_MANIFEST, "manifest_version", MANIFEST_VERSION,
                      "pass the folder of a finished `toolkit train` run", "toolkit train")
    return _validate(RunManifest, data, Path(run_dir) / RUN_MANIFEST, "training manifest",
                     "re-run `toolkit train`")


# --- the export report ----------------------------------------------------------------------


class ExportReport(BaseModel):
    """`export_report.json`: everything known about one export folder.

    Serve reads `format`, `engine_hint`, `vllm`, `dtype`, `max_model_len` and
    `system_prompt` to start an engine; compare reads `format`, `size_bytes` and
    `max_model_len`. Every field is always written, `null` where it does not apply.
    """

    model_config = ConfigDict(extra="allow")

    format: ExportFormat = Field(description="The ExportFormat value.")
    path: str = Field(description="The export folder.")
    source: dict[str, Any] = Field(
        description="{path, run_dir, adapter_dir, adapter_sha256, base_model{source, path, "
                    "revision, kind}, qlora, compute_dtype}: what was exported.")
    dtype: str = Field(description="Activation dtype to serve with (vLLM's --dtype).")
    quantization: dict[str, Any] = Field(
        description="{method: none|bitsandbytes|gptq|onnxruntime, bits, ...}.")
    max_model_len: int | None = Field(description="The model's context length.")
    system_prompt: str | None = Field(description="The training system prompt.")
    size_bytes: int = Field(description="Every file except this report and the model card.")
    weights_bytes: int = Field(description="The weight files only.")
    fp16_reference_bytes: int = Field(description="Parameters of the merged model x 2 bytes.")
    size_ratio: float | None = Field(description="weights_bytes / fp16_reference_bytes.")
    perplexity: dict[str, Any] = Field(
        description="{overall, fr, en, loss, tokens, by_language, by_category} on the "
                    "held-out answers.")
    reference_perplexity: dict[str, Any] = Field(description="{overall, fr, en} of merged.")
    perplexity_delta_pct: dict[str, Any] = Field(description="100 * (ppl / reference - 1).")
    quality: dict[str, Any] = Field(description="{target_delta_pct, within_target, verdict}.")
    speed: dict[str, Any] = Field(description="{tokens_per_s, new_tokens, seconds, threads, "
                                              "engine}: greedy batch-1.")
    verification: dict[str, Any] = Field(
        description="{passed, reference, max_abs_logit_diff, tolerance, prompts, "
                    "generate_ok, sample, checks[], ...}.")
    vllm: dict[str, Any] = Field(description="{loadable, quantization, reason, checked, "
                                             "version, device}.")
    engine_hint: list[str] = Field(description="Engines that can serve it here, best first.")
    eval_data: dict[str, Any] = Field(description="{path, sha256, examples, by_language}.")
    calibration: dict[str, Any] | None = Field(description="Like eval_data, or null.")
    export_seconds: float = Field(description="Export + verification + measurement time.")
    versions: dict[str, str | None] = Field(description="Package versions that produced it.")
    warnings: list[str] = Field(default_factory=list)
    created: str = ""
    toolkit_version: str = ""
    report_version: int = REPORT_VERSION

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (NaN becomes null, floats keep 7 significant digits)."""
        return _clean(self.model_dump(mode="json"))


#: every key of export_report.json
REPORT_KEYS: tuple[str, ...] = tuple(ExportReport.model_fields)


def write_export(folder: Path, report: ExportReport) -> Path:
    """Write `export_report.json` into `folder`."""
    return _write_json(Path(folder) / EXPORT_REPORT, report.to_dict())


def read_export(folder: Path | str) -> ExportReport:
    """Read an export folder's report.

    Raises:
        ArtifactError: no report, not JSON, from a newer toolkit, or off-schema.
    """
    data = _read_json(Path(folder) / EXPORT_REPORT, "report_version", REPORT_VERSION,
                      "pass a folder written by `toolkit export`", "toolkit export")
    return _validate(ExportReport, data, Path(folder) / EXPORT_REPORT, "export report",
                     "re-run `toolkit export` with --overwrite")


def has_export_report(folder: Path | str) -> bool:
    """Whether the folder carries an export report (an ONNX graph folder may not)."""
    return (Path(folder) / EXPORT_REPORT).is_file()


def export_format(folder: Path | str) -> ExportFormat:
    """The format of an export folder: its report's, else what its files say.

    Raises:
        ModelSourceError: not a model folder (no report, config.json or model.onnx).
    """
    folder = Path(folder)
    if has_export_report(folder):
        return read_export(folder).format
    if (folder / "model.onnx").is_file():
        quantized = any("int8" in p.name or "quant" in p.name for p in folder.glob("*.json"))
        return ExportFormat.onnx_int8 if quantized else ExportFormat.onnx
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelSourceError(f"{folder}: no config.json or model.onnx; not an export folder")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    quant = config.get("quantization_config") or {}
    method = str(quant.get("quant_method") or "").lower()
    if method == "bitsandbytes":
        return ExportFormat.bnb_nf4 if quant.get("load_in_4bit") else ExportFormat.bnb_int8
    if method == "gptq":
        return ExportFormat.gptq_int4
    if method == "compressed-tensors":
        groups = (quant.get("config_groups") or {}).values()
        activations = [g.get("input_activations") for g in groups if isinstance(g, dict)]
        return ExportFormat.ct_w8a8 if any(activations) else ExportFormat.ct_w4a16
    return ExportFormat.merged


def trained_system_prompt(path: Path | str) -> str | None:
    """The system prompt the model in `path` was trained with ("" when it was trained without
    one), or None when the folder records none (a plain model, a bare adapter, an ONNX graph
    without its report)."""
    kind = identify(path)
    if kind is Kind.run:
        prompt = read_run(path).config.get("data", {}).get("system_prompt")
        return prompt if isinstance(prompt, str) else None
    if kind is Kind.export and has_export_report(path):
        return read_export(path).system_prompt or ""
    return None


# --- provenance: what a manifest or report records about how it was made --------------


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def package_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    """Versions of the packages that determine what a run (or an export) produced."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def utc_now() -> str:
    """Current UTC time, ISO 8601 with seconds."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- shared plumbing ------------------------------------------------------------------------


def _write_json(path: Path, data: dict[str, Any]) -> Path:
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def _read_json(path: Path, version_key: str, supported: int, what_to_pass: str,
               stage: str) -> dict[str, Any]:
    if not path.is_file():
        raise ArtifactError(f"{path.parent}: no {path.name}; {what_to_pass}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    except OSError as exc:
        raise ArtifactError(f"{path}: unreadable ({exc.strerror}); re-run `{stage}`") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: expected a JSON object; re-run `{stage}`")
    version = data.get(version_key)
    if isinstance(version, int) and version > supported:
        raise ArtifactError(
            f"{path}: {version_key} {version} is newer than this toolkit reads ({supported}); "
            "upgrade toolkit")
    return data


def _validate(model: type[Any], data: dict[str, Any], path: Path, what: str, fix: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ArtifactError(
            f"{path}: not a toolkit {what} from this version: {where}: {first['msg']}{more}; "
            f"{fix}") from None


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else float(f"{value:.7g}")
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value
