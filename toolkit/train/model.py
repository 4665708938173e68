"""The trainable model: precision and device choice, base loading (optionally QLoRA), LoRA.

Everything a config can get wrong about the model is checked before the weights load:
precision against the hardware, QLoRA against CUDA and bitsandbytes, target modules and
sequence length against the architecture (built on the meta device, so a 7B check costs
no memory).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.config import BaseQuantization, LoraSection, Precision, TrainConfig
from toolkit.cpu import cpu_model
from toolkit.errors import ConfigError, UnsupportedHardwareError
from toolkit.extras import cuda_available, require


@dataclass(frozen=True)
class Hardware:
    """What training actually runs on, after falling back from the requested precision."""

    device: str  # "cpu" or "cuda"
    device_name: str
    precision: Precision
    requested: Precision
    warning: str | None = None

    @property
    def cuda(self) -> bool:
        """True on a CUDA GPU."""
        return self.device == "cuda"

    def autocast(self) -> Any:
        """The autocast region training runs in (disabled for fp32), for forwards outside it."""
        import torch

        return torch.autocast(self.device, dtype=torch_dtype(self.precision),
                              enabled=self.precision is not Precision.fp32)


def resolve_hardware(cfg: TrainConfig) -> Hardware:
    """Choose device and precision; on a CPU, half precision becomes what the CPU computes fast.

    A CPU with native bf16 (AVX512-BF16 or AMX) trains `bf16` and `fp16` requests in bf16:
    the frozen base stored in bf16, LoRA weights in fp32, autocast around the forward; it is
    the CPU's half precision (fp16 has no fast CPU matmul) and measured 1.45x fp32 tokens/s
    here (`benchmarks/train_throughput.py`). Without it both fall back to fp32. Any change
    from the request is said in one warning line.

    Raises:
        UnsupportedHardwareError: QLoRA without CUDA, or bf16 on a GPU without bf16.
        MissingExtraError: QLoRA without bitsandbytes installed.
    """
    import platform

    requested = cfg.training.precision
    cuda = cuda_available()
    if cfg.training.quantization is BaseQuantization.nf4:
        if not cuda:
            raise UnsupportedHardwareError(
                "training.quantization: nf4 (QLoRA) needs a CUDA GPU: bitsandbytes has no 4-bit "
                "training kernels for CPUs; set training.quantization: none to train in "
                f"{Precision.fp32.value} on this machine"
            )
        require("bitsandbytes", "training.quantization: nf4 (QLoRA)")
    if not cuda:
        name = cpu_model() or platform.processor() or platform.machine() or "cpu"
        return cpu_hardware(name, requested, cpu_has_native_bf16())
    import torch

    name = torch.cuda.get_device_name(0)
    if requested is Precision.bf16 and not torch.cuda.is_bf16_supported():
        raise UnsupportedHardwareError(
            f"training.precision: bf16 is not supported by {name}; set training.precision: fp16"
        )
    return Hardware("cuda", name, requested, requested)


def cpu_hardware(name: str, requested: Precision, native_bf16: bool) -> Hardware:
    """The CPU branch of `resolve_hardware`, given whether the CPU computes bf16 natively."""
    if requested is Precision.fp32 or (requested is Precision.bf16 and native_bf16):
        return Hardware("cpu", name, requested, requested)
    if native_bf16:
        return Hardware("cpu", name, Precision.bf16, requested, warning=(
            "training.precision: fp16 has no fast CPU kernels; this CPU computes bf16 natively "
            "(AVX512-BF16/AMX), so training runs in bf16"))
    return Hardware("cpu", name, Precision.fp32, requested, warning=(
        f"training.precision: {requested.value} needs a CUDA GPU or a CPU with AVX512-BF16/AMX; "
        "this machine has neither, so training runs in fp32"))


def cpu_has_native_bf16() -> bool:
    """True where the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX tiles).

    Without them PyTorch emulates bf16 matmuls, slower than fp32. The checks are torch's own
    (what its inductor uses); an older torch without them counts as no.
    """
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, probe, lambda: False)()) for probe in probes)


def torch_dtype(precision: Precision) -> Any:
    """The dtype the frozen base is loaded in."""
    import torch

    return {Precision.fp32: torch.float32, Precision.fp16: torch.float16,
            Precision.bf16: torch.bfloat16}[precision]


def linear_module_names(model: Any) -> dict[str, list[str]]:
    """Leaf name -> full names of every linear layer (what LoRA can target)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    names: dict[str, list[str]] = {}
    for full_name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)):
            names.setdefault(full_name.rsplit(".", 1)[-1], []).append(full_name)
    return names


def check_target_modules(targets: list[str], linear: dict[str, list[str]]) -> None:
    """Every target must name a linear layer (by leaf name or a dotted suffix), as peft matches.

    Raises:
        ConfigError: naming the unknown targets and listing the model's linear modules.
    """
    full_names = [n for group in linear.values() for n in group]
    unknown = [t for t in targets
               if not any(n == t or n.endswith("." + t) for n in full_names)]
    if unknown:
        raise ConfigError(
            f"lora.target_modules: {', '.join(unknown)} not found in the model; its linear "
            f"modules are: {', '.join(sorted(linear))}"
        )


def check_model_config(cfg: TrainConfig, model_path: Path) -> None:
    """Check the config against the architecture without loading weights.

    Raises:
        ConfigError: unknown LoRA target, or max_seq_len beyond the model's positions.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    trust = cfg.model.trust_remote_code
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
    check_target_modules(cfg.lora.target_modules, linear_module_names(skeleton))
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and cfg.training.max_seq_len > limit:
        raise ConfigError(
            f"training.max_seq_len: {cfg.training.max_seq_len} exceeds the model's "
            f"{limit} positions (max_position_embeddings); set it to {limit} or less"
        )


def attention_implementation(hardware: Hardware) -> str | None:
    """"eager" for bf16 on a CPU, else the model's default (None: sdpa where it has it).

    PyTorch's CPU flash-attention kernel (what sdpa runs) is slow in bf16, its backward above
    all: on SmolLM2 it took a quarter of each step, and eager attention (bf16 matmuls, fp32
    softmax) trained 367 tok/s against 300 (2 threads, AVX512-BF16). In fp32 the two tie.
    Packed rows work with either: transformers builds the block-diagonal mask for both.
    """
    return "eager" if hardware.device == "cpu" and hardware.precision is Precision.bf16 else None


def load_base(cfg: TrainConfig, model_path: Path, hardware: Hardware, local_rank: int = 0) -> Any:
    """Load the frozen base in the training dtype (4-bit NF4 for QLoRA)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch_dtype(hardware.precision),
                              "trust_remote_code": cfg.model.trust_remote_code}
    attention = attention_implementation(hardware)
    if attention:
        kwargs["attn_implementation"] = attention
    if cfg.training.quantization is BaseQuantization.nf4:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype(hardware.precision),
        )
        kwargs["device_map"] = {"": local_rank}
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    # No KV cache in training: with a cache, transformers skips packed-sequence detection.
    model.config.use_cache = False
    if cfg.training.quantization is BaseQuantization.nf4:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.training.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    return model


#: peft modules that ask "is gptqmodel installed?" and then import it to type-check layers
_PEFT_GPTQ_CHECKS = ("peft.tuners.lora.gptq", "peft.tuners.lora.awq",
                     "peft.utils.quantization_utils", "peft.utils.other")


@contextmanager
def _without_gptqmodel_probe(model: Any) -> Iterator[None]:
    """Keep peft from importing gptqmodel while wrapping a base that has no GPTQ layers.

    With the `gptq` extra installed, peft imports gptqmodel for every LoRA wrap just to
    test layer types: a second of import, a banner, and gptqmodel's patches to
    safetensors, all for a base that was loaded in fp32/fp16/bf16/NF4. A GPTQ base keeps
    peft's own behaviour.
    """
    import importlib

    quant = getattr(getattr(model, "config", None), "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(
        quant, "quant_method", None)
    if str(getattr(method, "value", method)).lower() in ("gptq", "awq"):
        yield
        return
    patched = []
    for name in _PEFT_GPTQ_CHECKS:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "is_gptqmodel_available"):
            patched.append((module, module.is_gptqmodel_available))
            module.is_gptqmodel_available = lambda: False
    try:
        yield
    finally:
        for module, original in patched:
            module.is_gptqmodel_available = original


def attach_lora(model: Any, lora: LoraSection) -> Any:
    """Wrap the base with trainable LoRA adapters (kept in fp32 over an fp16/bf16 base).

    peft's `autocast_adapter_dtype=True` keeps the adapter weights in fp32, so the grad
    scaler never meets fp16 gradients ("Attempting to unscale FP16 gradients").
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM",
    )
    with _without_gptqmodel_probe(model), warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing` (not our call)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        return get_peft_model(model, config, autocast_adapter_dtype=True)


def trainable_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total
