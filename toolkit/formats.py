"""The export formats and what each one is: the one table every stage reads.

Export produces a format, serve picks an engine for it, compare labels it: all of them ask
`REGISTRY[fmt]` (family, bits, quantization method, the engines that load it, vLLM's
`--quantization` name) instead of reading meaning into the format's name. Only the standard
library is imported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class ExportFormat(str, Enum):
    """What `toolkit export --quantize` produces."""

    merged = "merged"
    bnb_int8 = "bnb-int8"
    bnb_nf4 = "bnb-nf4"
    gptq_int4 = "gptq-int4"
    onnx = "onnx"
    onnx_int8 = "onnx-int8"
    ct_w8a8 = "ct-w8a8"
    ct_w4a16 = "ct-w4a16"
    onnx_int4 = "onnx-int4"
    onnx_w8a8 = "onnx-w8a8"

    def __str__(self) -> str:
        return self.value


class MergeDtype(str, Enum):
    """The dtype merged weights are saved in (quantized formats keep it for what they do
    not quantize: embeddings, norms)."""

    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"

    @property
    def torch_name(self) -> str:
        """The name transformers writes in config.json and vLLM takes as `--dtype`."""
        return {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[self.value]


@dataclass(frozen=True)
class FormatSpec:
    """One format: where its exporter lives and what it needs to run here.

    Attributes:
        format: the name users type.
        exporter: "module:function" with the signature `(ctx: ExportContext, work: Path)
            -> VariantResult`, imported only when the format is produced.
        modules: packages (extras) the format needs in this venv.
        family: "transformers" (loaded with from_pretrained) or "onnx" (ONNX Runtime).
        method: the quantization method recorded in reports ("none" for merged/onnx).
        bits: weight bits of the quantized layers (None: not quantized).
        target_delta_pct: the perplexity delta the format should stay within (the
            benchmark targets); None for the reference formats, which are checked by logits.
        summary: one line for the model card.
        card_tags: the model card's format tags (what Hub search filters on).
        engines: the serving engines that can load it, best first ("vllm" only where the
            installed vLLM also supports `vllm_quantization`).
        vllm_quantization: vLLM's `--quantization` method (None: unquantized, or no vLLM).
    """

    format: ExportFormat
    exporter: str
    modules: tuple[str, ...]
    family: str
    method: str
    bits: int | None
    target_delta_pct: float | None
    summary: str
    card_tags: tuple[str, ...]
    engines: tuple[str, ...] = ("vllm", "transformers")
    vllm_quantization: str | None = None

    @property
    def quantized(self) -> bool:
        """Weights stored in fewer bits than the merged reference."""
        return self.bits is not None


REGISTRY: dict[ExportFormat, FormatSpec] = {
    spec.format: spec
    for spec in (
        FormatSpec(ExportFormat.merged, "toolkit.export.merge:export_merged", (),
                   "transformers", "none", None, None,
                   "LoRA adapters merged into the base weights (safetensors)",
                   ("safetensors", "merged")),
        FormatSpec(ExportFormat.bnb_int8, "toolkit.export.bnb:export_bnb_int8",
                   ("bitsandbytes",), "transformers", "bitsandbytes", 8, 2.0,
                   "bitsandbytes LLM.int8 pre-quantized checkpoint",
                   ("bitsandbytes", "8-bit", "int8"), vllm_quantization="bitsandbytes"),
        FormatSpec(ExportFormat.bnb_nf4, "toolkit.export.bnb:export_bnb_nf4",
                   ("bitsandbytes",), "transformers", "bitsandbytes", 4, 10.0,
                   "bitsandbytes NF4 pre-quantized checkpoint",
                   ("bitsandbytes", "4-bit", "nf4"), vllm_quantization="bitsandbytes"),
        FormatSpec(ExportFormat.gptq_int4, "toolkit.export.gptq:export_gptq",
                   ("gptqmodel", "optimum"), "transformers", "gptq", 4, 10.0,
                   "GPTQ 4-bit (gptqmodel), calibrated on the project's FR/EN examples",
                   ("gptq", "4-bit", "int4"), vllm_quantization="gptq"),
        FormatSpec(ExportFormat.onnx, "toolkit.export.onnx_formats:export_onnx_fp32",
                   ("onnx", "onnxruntime"), "onnx", "none", None, None,
                   "ONNX graph with past key values (optimum-onnx), external data",
                   ("onnx",), engines=("onnxruntime",)),
        FormatSpec(ExportFormat.onnx_int8, "toolkit.export.onnx_formats:export_onnx_int8",
                   ("onnx", "onnxruntime", "onnxruntime_genai"), "onnx", "onnxruntime", 8, 2.0,
                   "ONNX Runtime int8 (MatMulNBits) on onnxruntime-genai's GroupQueryAttention "
                   "graph",
                   ("onnx", "8-bit", "int8"), engines=("onnxruntime",)),
        FormatSpec(ExportFormat.ct_w8a8, "toolkit.export.ct_formats:export_ct_w8a8",
                   ("compressed_tensors",), "transformers", "compressed-tensors", 8, 2.0,
                   "compressed-tensors W8A8 int8 (SmoothQuant + GPTQ, llmcompressor), "
                   "int8 weights and activations, for vLLM",
                   ("compressed-tensors", "8-bit", "int8", "w8a8"),
                   vllm_quantization="compressed-tensors"),
        FormatSpec(ExportFormat.ct_w4a16, "toolkit.export.ct_formats:export_ct_w4a16",
                   ("compressed_tensors",), "transformers", "compressed-tensors", 4, 10.0,
                   "compressed-tensors W4A16 (GPTQ, llmcompressor), int4 weights in groups, "
                   "for vLLM", ("compressed-tensors", "4-bit", "int4", "w4a16"),
                   vllm_quantization="compressed-tensors"),
        FormatSpec(ExportFormat.onnx_int4, "toolkit.export.onnx_formats:export_onnx_int4",
                   ("onnx", "onnxruntime", "onnx_ir", "onnxruntime_genai"), "onnx",
                   "onnxruntime", 4, 10.0,
                   "ONNX Runtime 4-bit MatMulNBits on onnxruntime-genai's GroupQueryAttention "
                   "graph, embedding included",
                   ("onnx", "4-bit", "int4"), engines=("onnxruntime",)),
        FormatSpec(ExportFormat.onnx_w8a8, "toolkit.export.onnx_formats:export_onnx_w8a8",
                   ("onnx", "onnxruntime", "onnxruntime_genai"), "onnx", "onnxruntime", 8, 2.0,
                   "ONNX Runtime W8A8 (SmoothQuant, 8-bit weights and per-token 8-bit "
                   "activations, MatMulIntegerToFloat) on onnxruntime-genai's GroupQueryAttention graph",
                   ("onnx", "8-bit", "int8", "w8a8"), engines=("onnxruntime",)),
    )
}

#: formats whose exporter starts from the merged folder (all but merged itself)
QUANTIZED = tuple(f for f in ExportFormat if f is not ExportFormat.merged)


#: dtype names as configs, reports and users spell them -> the torch/vLLM name
_DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
                "bf16": "bfloat16", "bfloat16": "bfloat16", "auto": "auto"}


def dtype_name(name: str | None) -> str | None:
    """"fp16"/"float16" -> "float16" (what config.json and vLLM's `--dtype` say); None if unknown."""
    return _DTYPE_NAMES.get(str(name or "").strip().lower())


def spec_of(name: str | ExportFormat | None) -> FormatSpec | None:
    """The spec of a format name, or None for what is not an export format ("lora", "hf")."""
    try:
        return REGISTRY[ExportFormat(name)]
    except ValueError:
        return None
