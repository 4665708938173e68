"""Optional backends behind cached availability checks (as peft's import_utils does).

A missing extra only matters when its backend is chosen, so nothing here imports the
backend itself: `importlib.util.find_spec` is enough to answer "is it installed".
"""

from __future__ import annotations

import importlib.util
from functools import cache

from toolkit.errors import MissingExtraError

#: module to check -> the extra of `pyproject.toml` that provides it
EXTRA_FOR_MODULE: dict[str, str] = {
    "onnxruntime": "onnx",
    "onnx": "onnx",
    "onnx_ir": "onnx",
    "onnxruntime_genai": "onnx",
    "bitsandbytes": "bnb",
    "gptqmodel": "gptq",
    "optimum": "gptq",
    "vllm": "vllm",
    "psycopg": "postgres",
    "compressed_tensors": "ct",
}


@cache
def is_available(module: str) -> bool:
    """Return whether `module` can be imported, without importing it."""
    return importlib.util.find_spec(module) is not None


def require(module: str, purpose: str) -> None:
    """Raise `MissingExtraError` naming the pip command when `module` is absent.

    Args:
        module: top-level module name, e.g. "bitsandbytes".
        purpose: what the user asked for, e.g. "--quantize bnb-nf4".
    """
    if is_available(module):
        return
    extra = EXTRA_FOR_MODULE.get(module, module)
    raise MissingExtraError(
        f"{purpose} needs the '{module}' package: pip install 'toolkit[{extra}]'"
    )


def cuda_available() -> bool:
    """True when torch sees a CUDA device (imports torch, so call it only when needed)."""
    import torch

    return torch.cuda.is_available()
