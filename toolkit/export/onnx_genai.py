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

from toolkit.errors import MissingExtraError, ModelSourceError
from toolkit.export.onnx import (
    INT8_SETTINGS,
    OnnxExportError,
    _staged,
    copy_model_files,
)
from toolkit.processes import run_child
from toolkit.runtime.onnx_model import (
    GENAI_CONFIG,
    LOGIT_POSITIONS,
    ONNX_FILE,
    QUERY_LENGTHS,
)

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
        gather_logit_positions(stage / ONNX_FILE)
        feed_query_lengths(stage / ONNX_FILE)
        copy_model_files(model_dir, stage)
    return {
        "exporter": "onnxruntime-genai model builder",
        "precision": precision,
        "builder_options": options,
        "graph": "GroupQueryAttention (rotary fused), past_present_share_buffer, "
                 f"logits only at `{LOGIT_POSITIONS}`, new tokens per row at `{QUERY_LENGTHS}`",
        "files": {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())},
    }


def check_builder_graph(folder: Path) -> None:
    """Raise unless `folder` holds a builder graph (model.onnx and genai_config.json), the
    source the quantizers of `onnx-int4` and `onnx-w8a8` rewrite.

    Raises:
        ModelSourceError: a file is missing; the message says how to build the graph.
    """
    for name in (ONNX_FILE, GENAI_CONFIG):
        if not (Path(folder) / name).is_file():
            raise ModelSourceError(
                f"{folder}: no {name}; build the fp32 GroupQueryAttention graph first "
                "(toolkit.export.onnx_genai.export_genai_onnx(merged, out, \"fp32\"))")


def gather_logit_positions(path: Path) -> None:
    """Make the graph at `path` compute logits only at the positions its caller asks for.

    The builder's lm_head runs on every position, but serving samples from one per row: in a
    prefill of 8 prompts of 48 tokens the other 376 rows cost a fifth of the prefill's
    multiply-adds (576 x 49,152 each, on SmolLM2) and a 75 MB float array, which showed as
    time to first token (`benchmarks/serve_throughput.py`). A new input `LOGIT_POSITIONS`
    (batch, k) picks the hidden states the lm_head sees (`GatherElements` on the sequence
    axis), so `logits` is (batch, k, vocab): one position per row when serving (a right-padded
    prompt's last token; 0 in a decode step), all of them when scoring (`OnnxCausalLM`).
    The graph is edited in place; its weights (external data) are not touched.
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    if any(graph_input.name == LOGIT_POSITIONS for graph_input in graph.input):
        return
    head_at, head = next((i, n) for i, n in enumerate(graph.node) if "logits" in n.output)
    hidden, name = head.input[0], "/logits_positions"
    nodes = [
        helper.make_node("Constant", [], [f"{name}/axes"], name=f"{name}/axes",
                         value=helper.make_tensor("axes", TensorProto.INT64, [1], [2])),
        helper.make_node("Unsqueeze", [LOGIT_POSITIONS, f"{name}/axes"], [f"{name}/unsqueezed"],
                         name=f"{name}/Unsqueeze"),
        helper.make_node("Shape", [LOGIT_POSITIONS], [f"{name}/rows"], name=f"{name}/Shape"),
        helper.make_node("Shape", [hidden], [f"{name}/width"], name=f"{name}/HiddenSize",
                         start=2),
        helper.make_node("Concat", [f"{name}/rows", f"{name}/width"], [f"{name}/shape"],
                         name=f"{name}/Concat", axis=0),
        helper.make_node("Expand", [f"{name}/unsqueezed", f"{name}/shape"], [f"{name}/index"],
                         name=f"{name}/Expand"),
        helper.make_node("GatherElements", [hidden, f"{name}/index"], [f"{name}/hidden"],
                         name=f"{name}/GatherElements", axis=1),
    ]
    head.input[0] = f"{name}/hidden"
    for offset, node in enumerate(nodes):
        graph.node.insert(head_at + offset, node)
    graph.input.append(helper.make_tensor_value_info(
        LOGIT_POSITIONS, TensorProto.INT64, ["batch_size", "logit_positions"]))
    logits = next(output for output in graph.output if output.name == "logits")
    logits.type.tensor_type.shape.dim[1].dim_param = "logit_positions"
    onnx.save(model, str(path))


#: GroupQueryAttention's input index of the per-row new-token counts (onnxruntime >= 1.32)
_QUERY_LENGTHS_INPUT = 16


def feed_query_lengths(path: Path) -> None:
    """Give every GroupQueryAttention of the graph at `path` the rows' new-token counts.

    Without them the op takes several new tokens after a cache for a batch of one row only,
    so a server ran each prompt that starts with cached blocks alone (16 short prompts: 16
    runs through the weights) and could check drafts for one request at a time. With a new
    input `QUERY_LENGTHS` (batch,) int32, each row feeds its first `QUERY_LENGTHS[b]` tokens
    of a right-padded (batch, width) chunk after its own cache. A token's logits do not depend
    on the chunk's padding or on the other rows (tested, and measured bit for bit on
    onnx-w8a8). The graph is edited in place; its weights (external data) are not touched.
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    if any(graph_input.name == QUERY_LENGTHS for graph_input in graph.input):
        return
    for node in graph.node:
        if node.op_type == "GroupQueryAttention":
            inputs = list(node.input)[:_QUERY_LENGTHS_INPUT]
            inputs += [""] * (_QUERY_LENGTHS_INPUT - len(inputs)) + [QUERY_LENGTHS]
            del node.input[:]
            node.input.extend(inputs)
    graph.input.append(helper.make_tensor_value_info(QUERY_LENGTHS, TensorProto.INT32,
                                                     ["batch_size"]))
    onnx.save(model, str(path))
