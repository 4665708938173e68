"""What this CPU is and can do: its model name and ISA flags, read once from /proc/cpuinfo.

Kernels are chosen by these flags (MLAS's and oneDNN's int8 GEMMs, ggml's builds, PyTorch's
bf16 path), and some compute differently with them, not only faster: an 8-bit dot product
without VNNI (`vpmaddubsw`) adds each pair of uint8 x int8 products in a saturating int16,
so an int8 GEMM that is exact on a VNNI CPU can return wrong outputs on an AVX2 one. Reports
and benchmarks ask here (the ONNX engine measures its own kernel instead:
`toolkit.runtime.integer_weights`). Off Linux (no /proc/cpuinfo) the model is
unknown and the flags are empty, which every caller reads as "no such extension".
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
#: flags with an 8-bit dot product that accumulates in int32 (no int16 pair saturation)
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str | None, frozenset[str]]:
    """(model name, flags) of the first processor listed."""
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None, frozenset()
    model, flags = None, None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model is None:
            model = value.strip()
        elif key.strip() == "flags" and flags is None:
            flags = frozenset(value.split())
    return model, flags or frozenset()


def cpu_model() -> str | None:
    """The CPU's model name (None where it cannot be read)."""
    return _cpuinfo()[0]


def cpu_flags() -> frozenset[str]:
    """Every ISA flag the CPU reports (empty where they cannot be read)."""
    return _cpuinfo()[1]


def cpu_has_avx512() -> bool:
    """AVX512 foundation (vLLM-CPU's int4 kernels need it)."""
    return "avx512f" in cpu_flags()


def cpu_has_vnni() -> bool:
    """An 8-bit dot product into int32 (VNNI or AMX): int8 GEMMs are exact on this CPU."""
    return not cpu_flags().isdisjoint(VNNI_FLAGS)


def cpu_has_amx_int8() -> bool:
    """AMX int8 tiles (vLLM-CPU routes its int8 GEMMs to other kernels on such CPUs)."""
    return "amx_int8" in cpu_flags()
