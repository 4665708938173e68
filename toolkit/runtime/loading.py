"""Open any model folder behind one interface: tokenizer, report, logits and greedy decoding.

Export verifies every format through this module, compare scores with it and serve's
embedded engines load their weights with `load_transformers_model` / `OnnxCausalLM` and
`load_tokenizer` from here, so what a report measured is what they run. transformers opens
merged, bitsandbytes and GPTQ folders, plain HF folders and base + LoRA adapter (merged in
memory); ONNX Runtime (`OnnxCausalLM`) opens ONNX ones. On a CPU the PyTorch formats
compute in fp32 (CPUs have no fast fp16 matmul; fp16-saved weights are upcast exactly), on
CUDA in the dtype they were saved in.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.artifacts import (
    ExportReport,
    export_format,
    has_export_report,
    read_export,
)
from toolkit.errors import ModelSourceError
from toolkit.evaluation import LogitsFn
from toolkit.formats import REGISTRY, ExportFormat
from toolkit.runtime.facts import eos_token_ids, pad_token_id

log = logging.getLogger("toolkit.runtime")


@dataclass
class LoadedExport:
    """An export ready to score and generate with.

    Attributes:
        path: the folder.
        format: what it holds.
        engine: "transformers" or "onnxruntime".
        tokenizer: with the chat template used in training.
        report: the folder's `ExportReport` (None while export is still verifying it, or for
            a plain model folder).
        logits_fn: token ids (1, T) -> logits (1, T, vocab), an `evaluation.LogitsFn`.
        eos_token_ids: tokens that end a reply (`facts.eos_token_ids`).
        model: the transformers model or the `OnnxCausalLM`.
    """

    path: Path
    format: ExportFormat
    engine: str
    tokenizer: Any
    report: ExportReport | None
    logits_fn: LogitsFn
    eos_token_ids: list[int]
    model: Any
    _generate: Callable[[list[int], int, bool], list[int]] = field(repr=False, default=None)  # type: ignore[assignment]

    def generate(self, prompt_ids: list[int], max_new_tokens: int,
                 stop_at_eos: bool = True) -> list[int]:
        """Greedy batch-1 decoding through the serving step backend: the new token ids (an
        EOS that ends the reply included).

        Args:
            stop_at_eos: False decodes exactly `max_new_tokens` (what speed measurements use).
        """
        if not prompt_ids:
            raise ValueError("generate needs a non-empty prompt")
        return self._generate(list(prompt_ids), int(max_new_tokens), stop_at_eos)

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Alias of `logits_fn`."""
        return self.logits_fn(input_ids)


def load_tokenizer(path: Path) -> Any:
    """The folder's tokenizer, given toolkit's ChatML template when it has none (logged)."""
    from transformers import AutoTokenizer

    from toolkit.data.prompts import ensure_chat_template

    tokenizer = AutoTokenizer.from_pretrained(path)
    if ensure_chat_template(tokenizer):
        log.info("%s has no chat template: using the toolkit's ChatML default", path)
    return tokenizer


def generation_config(path: Path) -> Any:
    """The folder's `GenerationConfig`, or None when it has none."""
    if not (Path(path) / "generation_config.json").is_file():
        return None
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:
        return None


def load_transformers_model(path: Path, fmt: ExportFormat = ExportFormat.merged,
                            device: str | None = None, adapter: Path | None = None) -> Any:
    """from_pretrained for the PyTorch formats, in the dtype that computes well here.

    Args:
        fmt: what the folder holds (a plain HF folder is `merged`).
        device: "cpu" or "cuda" (default: cuda when available).
        adapter: a peft LoRA adapter to merge into the weights in memory (a training run).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from toolkit.extras import cuda_available

    device = device or ("cuda" if cuda_available() else "cpu")
    kwargs: dict[str, Any] = {"device_map": device}
    spec = REGISTRY[fmt]
    if spec.family != "transformers":
        raise ValueError(f"{fmt.value} is not loaded with transformers")
    bnb = spec.method == "bitsandbytes"
    if spec.quantized:
        from toolkit.extras import require

        for module in spec.modules:
            require(module, f"loading a {fmt.value} export")
    if bnb:
        # "MatMul8bitLt: inputs will be cast to float16" is logged on every int8 matmul
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if device == "cpu":
        kwargs["dtype"] = torch.float32
    else:
        kwargs["dtype"] = "auto"
    if fmt == ExportFormat.ct_w4a16:
        kwargs["quantization_config"] = _dequantizing_config()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    if device == "cpu" and bnb:
        _bnb_compute_fp32(model)
    model.eval()
    return model


def _dequantizing_config() -> Any:
    """Load a weight-only compressed-tensors checkpoint as dense weights (its exact values).

    The default route builds the compressed modules on the meta device and loads the tensors
    into them; compressed-tensors 0.20.1 sizes an asymmetric checkpoint's zero points there
    unpacked ([out, groups]) while the file holds them packed ([out / 8, groups]), so it
    refuses every asymmetric W4A16 export (the ones vLLM loads). With `dequantize`, each
    tensor is unpacked and dequantized as it loads: the same weights the compressed modules
    would decompress on their first forward. (W8A8 keeps the default route: its int8
    activations are simulated there, and dense weights would score it as weight-only.)
    """
    from transformers import CompressedTensorsConfig

    return CompressedTensorsConfig(dequantize=True)


def _bnb_compute_fp32(model: Any) -> None:
    """bitsandbytes keeps a checkpoint's saved dtype on reload (fp16 embeddings and norms,
    fp16 compute); on a CPU fp16 is slow and less exact, so compute in fp32 instead."""
    import torch

    for module in model.modules():
        if hasattr(module, "compute_dtype") and getattr(module, "compute_dtype", None) is not None:
            module.compute_dtype = torch.float32
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.float()
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.dtype in (torch.float16, torch.bfloat16):
                setattr(module, name, buf.float())


def _stepwise(backend: Any, eos: list[int]) -> Callable[[list[int], int, bool], list[int]]:
    """Greedy decoding through the serving step backend (`steps.greedy_generate`)."""
    from toolkit.runtime.steps import greedy_generate

    def generate(prompt_ids: list[int], max_new_tokens: int, stop_at_eos: bool) -> list[int]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bitsandbytes warns on every int8 matmul
            return greedy_generate(backend, prompt_ids, max_new_tokens, eos, stop_at_eos)

    return generate


def _torch_logits(model: Any) -> LogitsFn:
    from toolkit.evaluation import torch_logits_fn

    inner = torch_logits_fn(model)

    def logits_fn(ids: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bitsandbytes warns on every int8 matmul
            return inner(ids)

    return logits_fn


def load_export(path: Path | str, *, fmt: ExportFormat | str | None = None,
                threads: int | None = None, device: str | None = None,
                adapter: Path | None = None, tokenizer_dir: Path | None = None) -> LoadedExport:
    """Open an export folder (any format), a plain HF folder, or a base + LoRA adapter, for
    scoring and greedy generation.

    Args:
        path: a folder written by `toolkit export`, a plain HF folder, or a run's base.
        fmt: the format when known (export passes it while the report is not written yet).
        threads: ONNX Runtime intra-op threads (PyTorch uses the process setting).
        device: "cpu" or "cuda" for the PyTorch formats (default: cuda when available).
        adapter: a peft adapter merged into `path`'s weights in memory.
        tokenizer_dir: where the tokenizer lives when not in `path` (a run's adapter).

    Raises:
        ModelSourceError: not an export folder. MissingExtraError: its backend is missing.
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelSourceError(f"{path}: no such export folder")
    fmt = ExportFormat(fmt) if fmt is not None else export_format(path)
    report = read_export(path) if has_export_report(path) else None
    tokenizer = load_tokenizer(tokenizer_dir or path)
    if REGISTRY[fmt].family == "onnx":
        from toolkit.runtime.onnx_model import OnnxCausalLM
        from toolkit.runtime.onnx_steps import step_backend

        onnx_model = OnnxCausalLM.from_dir(path, threads=threads)
        eos = eos_token_ids(tokenizer, generation_config(path))
        return LoadedExport(path, fmt, "onnxruntime", tokenizer, report,
                            lambda ids: onnx_model.logits(ids), eos, onnx_model,
                            _stepwise(step_backend(onnx_model), eos))
    from toolkit.runtime.torch_steps import TorchStepBackend

    model = load_transformers_model(path, fmt, device, adapter)
    eos = eos_token_ids(tokenizer, getattr(model, "generation_config", None))
    return LoadedExport(path, fmt, "transformers", tokenizer, report, _torch_logits(model), eos,
                        model, _stepwise(TorchStepBackend(model, pad_token_id(tokenizer)), eos))

