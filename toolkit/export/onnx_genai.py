"""An ONNX graph for fast CPU decoding, written by onnxruntime-genai's model builder.

optimum's graph (`export_onnx`) runs each attention as ~20 small ops and returns every layer's
KV cache as a new `Concat(past, new)`: a copy of the whole cache per decode step. The builder
(`python -m onnxruntime_genai.models.builder`) emits one `GroupQueryAttention` per layer with
rotary inside, fused QKV and `SkipSimplifiedLayerNormalization`, and declares
`past_present_share_buffer`: serving binds one KV buffer as both past and present and the op
writes the new position in place (`runtime.onnx_shared_kv`). Serving needs only onnxruntime;
onnxruntime-genai (extra `onnx`) is needed here, at export.

The builder reads the HF folder with the installed transformers (5.x here: it folds
`rope_parameters` into `rope_theta` itself, checked by the logits test against torch). Its
int8 uses the same MatMulNBits settings as `onnx-int8` (`INT8_SETTINGS`: block 64,
asymmetric, accuracy level 4, lm_head included), so the two graphs hold the same weights.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Literal

from toolkit.errors import MissingExtraError
from toolkit.export.onnx import (
    INT8_SETTINGS,
    OnnxExportError,
    _staged,
    copy_model_files,
)
from toolkit.processes import run_child
from toolkit.runtime.onnx_model import GENAI_CONFIG, ONNX_FILE

log = logging.getLogger(__name__)

BUILDER_MODULE = "onnxruntime_genai.models.builder"
#: builder precision -> its `--extra_options` (int8 as `onnx-int8` quantizes)
PRECISION_OPTIONS: dict[str, list[str]] = {
    "fp32": [],
    "int8": [f"accuracy_level={INT8_SETTINGS['accuracy_level']}",
             f"block_size={INT8_SETTINGS['block_size']}",
             f"is_symmetric={str(INT8_SETTINGS['symmetric']).lower()}"],
}


def export_genai_onnx(model_dir: Path, out_dir: Path,
                      precision: Literal["fp32", "int8"] = "int8") -> dict[str, Any]:
    """Build the GroupQueryAttention graph of a merged HF causal LM into `out_dir`.

    The folder is built beside `out_dir` and swapped in at the end (a failed run leaves
    nothing); the model's own config, generation config and tokenizer files are copied over
    the builder's, so serving reads the same EOS ids and chat template as the other formats.

    Args:
        model_dir: a merged (no adapter) HF model folder with its tokenizer.
        out_dir: export folder, replaced if it exists.
        precision: "int8" (MatMulNBits, `INT8_SETTINGS`) or "fp32".

    Returns:
        Facts for the export report: builder, precision, its options, files with sizes.

    Raises:
        MissingExtraError: onnxruntime-genai is not installed (extra `onnx`).
        OnnxExportError: the builder failed (its last error line is in the message).
    """
    from toolkit.extras import require

    require("onnxruntime_genai", "the GroupQueryAttention ONNX graph")
    if precision not in PRECISION_OPTIONS:
        raise ValueError(f"precision: {precision!r}; choose from {', '.join(PRECISION_OPTIONS)}")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    options = PRECISION_OPTIONS[precision]
    with _staged(out_dir) as stage:
        command = [sys.executable, "-m", BUILDER_MODULE, "-m", str(model_dir), "-o", str(stage),
                   "-p", precision, "-e", "cpu", "-c", str(stage / ".cache")]
        if options:
            command += ["--extra_options", *options]
        done = run_child(command, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                         capture_output=True, text=True)
        output = "\n".join(p.rstrip() for p in (done.stdout, done.stderr) if p.strip())
        if output:  # a progress line per tensor: the export log, not the console
            log.info("onnxruntime-genai builder (exit %s):\n%s", done.returncode, output)
        if done.returncode != 0 or not (stage / ONNX_FILE).is_file():
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            raise OnnxExportError(f"onnxruntime-genai builder failed (exit {done.returncode}): "
                                  f"{lines[-1] if lines else 'no error output'}")
        if not (stage / GENAI_CONFIG).is_file():
            raise MissingExtraError(f"the builder wrote no {GENAI_CONFIG}: onnxruntime-genai too "
                                    "old; install the locked version (extra onnx)")
        shutil.rmtree(stage / ".cache", ignore_errors=True)  # the builder's scratch folder
        copy_model_files(model_dir, stage)
    return {
        "exporter": "onnxruntime-genai model builder",
        "precision": precision,
        "builder_options": options,
        "graph": "GroupQueryAttention (rotary fused), past_present_share_buffer",
        "files": {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())},
    }
