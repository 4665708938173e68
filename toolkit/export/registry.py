"""The export formats: one explicit table from a format name to its function and needs.

Nothing heavy is imported here: `toolkit --help` and the CLI's flag parsing use
`ExportFormat`, and `unavailable_reason` answers "can this machine produce it?" from
cached availability checks (and, for CUDA, one torch import) before any work starts.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Any

from toolkit.errors import ConfigError
from toolkit.formats import QUANTIZED, REGISTRY, ExportFormat, FormatSpec, MergeDtype

__all__ = ["QUANTIZED", "REGISTRY", "ExportFormat", "FormatSpec", "MergeDtype", "get_exporter",
           "parse_dtype", "parse_formats", "unavailable_reason", "valid_names"]


def valid_names() -> str:
    """The format names, for messages."""
    return ", ".join(f.value for f in ExportFormat)


def parse_formats(names: Iterable[str | ExportFormat]) -> list[ExportFormat]:
    """Turn `--quantize` values into formats, in the order given, without duplicates.

    Raises:
        ConfigError: an unknown name (the message lists the valid ones), or none at all.
    """
    formats: list[ExportFormat] = []
    unknown: list[str] = []
    for name in names:
        try:
            fmt = ExportFormat(name.value if isinstance(name, ExportFormat) else str(name).strip())
        except ValueError:
            unknown.append(str(name))
            continue
        if fmt not in formats:
            formats.append(fmt)
    if unknown:
        raise ConfigError(
            f"--quantize: unknown format(s) {', '.join(repr(u) for u in unknown)}; "
            f"choose from {valid_names()}"
        )
    if not formats:
        raise ConfigError(f"--quantize: give at least one format ({valid_names()})")
    return formats


def parse_dtype(name: str | MergeDtype) -> MergeDtype:
    """`--dtype` as a `MergeDtype` (ConfigError listing the valid ones otherwise)."""
    if isinstance(name, MergeDtype):
        return name
    try:
        return MergeDtype(str(name).strip().lower())
    except ValueError:
        raise ConfigError(
            f"--dtype: unknown dtype {name!r}; choose from {', '.join(d.value for d in MergeDtype)}"
        ) from None


def _bnb_cpu_backend() -> str | None:
    """bitsandbytes quantizes on CPUs from 0.46 on (measured: 0.50 int8 and NF4 both
    save and reload); older releases need CUDA."""
    from importlib import metadata

    try:
        version = metadata.version("bitsandbytes")
    except metadata.PackageNotFoundError:
        return None  # reported as a missing extra
    major, minor = (int(p) for p in (version.split(".") + ["0"])[:2])
    if (major, minor) >= (0, 46):
        return None
    return (f"needs a CUDA GPU: bitsandbytes {version} has no CPU backend (this machine has no "
            "GPU); pip install 'bitsandbytes>=0.46' for the CPU backend")


def _onnx_exporter(*functions: str) -> Callable[[], str | None]:
    def check() -> str | None:
        from toolkit.errors import MissingExtraError

        try:
            from toolkit.export import onnx as onnx_module
        except ImportError as exc:  # the ONNX exporter module is missing from this install
            return f"the ONNX exporter is not available ({exc})"
        missing = [name for name in functions if not hasattr(onnx_module, name)]
        if missing:
            return f"toolkit.export.onnx lacks {', '.join(missing)} in this install"
        try:
            onnx_module.resolve_onnx_python()
        except MissingExtraError as exc:
            return str(exc)
        return None

    return check


def _llmcompressor_venv() -> str | None:
    from toolkit.errors import MissingExtraError
    from toolkit.export.sidecar import LLMCOMPRESSOR

    try:
        LLMCOMPRESSOR.resolve()
    except MissingExtraError as exc:
        return str(exc)
    return None


#: format -> extra check run only where torch sees no CUDA device
CPU_CHECKS: dict[ExportFormat, Callable[[], str | None]] = {
    ExportFormat.bnb_int8: _bnb_cpu_backend,
    ExportFormat.bnb_nf4: _bnb_cpu_backend,
}
#: format -> check that does not depend on the hardware
OTHER_CHECKS: dict[ExportFormat, Callable[[], str | None]] = {
    ExportFormat.onnx: _onnx_exporter("export_onnx", "resolve_onnx_python"),
    ExportFormat.ct_w8a8: _llmcompressor_venv,
    ExportFormat.ct_w4a16: _llmcompressor_venv,
}


def unavailable_reason(fmt: ExportFormat, cuda: bool | None = None) -> str | None:
    """Why this machine cannot produce `fmt`, or None when it can.

    Checked in order: the extras it needs (message: which `pip install 'toolkit[...]'`),
    the hardware (message: what it needs and what this machine lacks), then the ONNX
    exporter venv.

    Args:
        cuda: whether a CUDA device is usable; None asks torch.
    """
    from toolkit.errors import MissingExtraError
    from toolkit.extras import require

    spec = REGISTRY[fmt]
    for module in spec.modules:
        try:
            require(module, f"--quantize {fmt.value}")
        except MissingExtraError as exc:
            return str(exc)
    if fmt in CPU_CHECKS:
        if cuda is None:
            from toolkit.extras import cuda_available

            cuda = cuda_available()
        if not cuda:
            problem = CPU_CHECKS[fmt]()
            if problem:
                return f"--quantize {fmt.value} {problem}"
    if fmt in OTHER_CHECKS:
        problem = OTHER_CHECKS[fmt]()
        if problem:
            return f"--quantize {fmt.value}: {problem}"
    return None


def get_exporter(fmt: ExportFormat) -> Callable[..., Any]:
    """Import and return the exporter of `fmt` (the heavy imports happen here)."""
    module_name, _, func = REGISTRY[fmt].exporter.partition(":")
    return getattr(importlib.import_module(module_name), func)
