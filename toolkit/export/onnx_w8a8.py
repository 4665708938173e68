"""The `onnx-w8a8` format: 8-bit weights and activations, so that batches run as integer GEMMs.

`onnx-int8` stores int8 weights for MatMulNBits, whose int8-compute kernel on CPUs without
AVX512-VNNI multiplies one activation row at a time: 16 rows cost 9.6x one row where fp32
SGEMM costs 4x, and a 720-token prefill runs at 0.59x SGEMM (`benchmarks/matmul_kernels.py`).
Serving 16 clients is mostly such batches. ONNX Runtime's integer GEMM (MLAS's blocked 8-bit
QGEMM) batches rows instead, and needs the activations in 8 bits too. This module rewrites the
builder's fp32 graph (`onnx_genai`) so that every decoder MatMul does that:

- SmoothQuant (Xiao et al., 2023): activation outliers sit in a few input channels, which a
  per-token int8 scale cannot hold. Each channel j of a MatMul input is divided by
  s_j = max|x_j|^alpha / max|W_j|^(1 - alpha), measured on the calibration texts, and row j of
  the weights is multiplied by it (exact in real numbers; it moves the range into the weights,
  which are quantized per output channel).
- At run time each row (token) is quantized with its own scale, max|x| / 127, in standard ONNX
  ops (a blocked QuantizeLinear, a block per row, to uint8 around 128), so a token's result
  does not depend on what it is batched with.
- `MatMulIntegerToFloat` (onnxruntime's contrib op) multiplies and applies the column scales
  in the GEMM's output stage; one Mul applies the row scales. MatMuls sharing an input (gate
  and up) are one GEMM over both weights.
- The weights are stored as uint8 around 128, not int8: MLAS multiplies uint8 x int8 with
  `vpmaddubsw` on CPUs without AVX512-VNNI, which adds two products in a saturating int16,
  and a pair such as 255 x 127 + 200 x 127 overflows it. With int8 weights ~1 % of a layer's
  outputs came out wrong on an AVX2 machine (the same graph is exact on a VNNI one), and the
  demo export scored +1.8 % there; uint8 x uint8 widens to int16 before multiplying, is exact
  everywhere, and scored +1.2 % at the same speed within this VM's noise (`W8A8_REASON`).
  Where a CPU's uint8 x int8 kernel is exact (VNNI, AMX) it is also the fast one, so the engine
  gives the weights that sign when it loads the graph (`toolkit.runtime.integer_weights`).
- Nodes are the single-row cost (a decode step of one request runs ~800 of them), so the
  smoothing division is folded into the constant that made its input (the RMSNorm gammas,
  the up projection's columns for the down projection's input): it costs no node.

The lm_head runs W8A8 too: as a weight-only MatMulNBits it was a fifth of a 16-row decode step
(MatMulNBits' int8 kernel has no batched path without VNNI). It has its own migration strength
(`LM_HEAD_ALPHA`), and its `LM_HEAD_FP32_CHANNELS` input channels of the widest ranges are
multiplied in fp32 beside the integer GEMM (LLM.int8's split, Dettmers et al., 2022), so they
set no row's scale. Its smoothing division stays a Mul, which also zeroes those channels for
the GEMM. One MatMul stays weight-only MatMulNBits int8, as in `onnx-int8`: the attention
output projection (`ATTENTION_OPS`' outputs: their channels are grouped-query heads, so no
constant can carry their smoothing, and its quantizing nodes cost the single-row step more
than its ~9 % of a layer's multiply-adds save; see `W8A8_REASON`). The graph keeps the builder's inputs, outputs and
`genai_config.json`: the engine serves it with the KV cache updated in place, like
`onnx-int8`. Measured on the demo fine-tune: see `W8A8_REASON`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.errors import ConfigError
from toolkit.export.onnx import INT8_SETTINGS, ONNX_DATA_FILE, _staged, copy_model_files
from toolkit.export.onnx_genai import check_builder_graph
from toolkit.runtime.onnx_model import GENAI_CONFIG, ONNX_FILE

#: SmoothQuant's migration strength, chosen on the demo fine-tune (W8A8_REASON)
ALPHA = 0.9
#: the lm_head's output (the graph output `logits`)
LM_HEAD_OUTPUT = "logits"
#: SmoothQuant's migration strength for the lm_head, and its input channels of the widest
#: calibration ranges, multiplied in fp32 beside its integer GEMM (W8A8_REASON)
LM_HEAD_ALPHA = 0.5
LM_HEAD_FP32_CHANNELS = 16
#: the node-name prefix of those channels' fp32 MatMul (left out of the int8 pass)
FP32_CHANNELS = f"{LM_HEAD_OUTPUT}/fp32_channels"
#: ops whose output feeds a projection left weight-only (the attention output projection)
ATTENTION_OPS = ("GroupQueryAttention", "MultiHeadAttention", "Attention")
#: the zero point (128) of the decoder activations' QuantizeLinear, in the scales' shape, and
#: the lm_head's (its rows are the logit positions, not every position)
ZERO_POINT = "/w8a8/zero_point"
LM_HEAD_ZERO_POINT = "/w8a8/lm_head_zero_point"
MIDDLE = "/w8a8/128"
#: the op multiplying quantized rows by quantized weights (onnxruntime's contrib domain)
INTEGER_GEMM = "MatMulIntegerToFloat"
#: the calibration probe graph, written beside the source graph while ranges are measured
PROBE_FILE = "w8a8_probe.onnx"
W8A8_REASON = (
    "Measured on the demo fine-tune of SmolLM2-135M (2 AVX2 cores, 2 threads). 8-bit weights "
    "stored as uint8 around 128, so every product is exact (uint8 x int8 saturates in int16 on "
    "CPUs without AVX512-VNNI): +1.2 % perplexity (fr +0.9, en +1.9) against +1.8 % with int8 "
    "weights on this AVX2 machine; decode steps level at 1 and 16 rows (MatMulIntegerToFloat "
    "cut the node count from 1,070 to 800), a 16-prompt prefill level to 14 % slower (two "
    "interleaved runs). With exact products, the attention output projection W8A8 too "
    "measured +1.3 % (its smoothing cannot be folded: 180 more nodes on every single-row "
    "step); later, beside the W8A8 lm_head and without smoothing, +0.9 % (34.15), a 16-row "
    "step 2-5 % faster but a one-row step 9-10 % slower (9.1 -> 10.1 ms, 150 more nodes), "
    "so it stays weight-only int8. SmoothQuant alpha 0.75 / 0.8 / 0.85 / 0.9 / 0.95 with exact "
    "products: +1.2 / +1.0 / +1.2 / +1.2 / +2.0 % (flat within this eval set's noise up to "
    "0.9, so 0.9 stays); earlier, with int8 weights: without smoothing +17.3 %, 0.8 / 0.85 / "
    "0.9 / 0.95 +3.4 / +2.7 / +2.6 / +3.2 % in standalone runs. "
    "The lm_head W8A8 (exact products; ranges measured on the w8a8 graph) with alpha 0 / 0.3 "
    "/ 0.5 / 0.7 / 0.9: perplexity 34.48 / 34.55 / 34.29 / 34.30 / 34.97 against 34.24 "
    "weight-only (reference 33.83); with its 4 / 16 / 32 widest input channels in fp32 beside "
    "the GEMM (alpha 0): 34.39 / 34.21 / 34.23, and 34.22 with 16 and alpha 0.5. In the "
    "export itself (ranges from the fp32 graph), alpha 0.5 alone scored 34.38 (+1.6 %, en "
    "+2.9 %) and with the 16 fp32 channels 34.28 (+1.3 %, en +2.1 %), against 34.24 (+1.2 %, "
    "en +1.9 %) with the weight-only lm_head. "
    "Against the weight-only lm_head it takes a 16-row decode step from 39.4 to 35.8 ms and "
    "leaves a one-row step level (8.6 ms; three interleaved rounds). "
    "Against onnx-int8 (MatMulNBits, weight-only, +1.7 %) the GEMMs make a 16-row decode step "
    "1.3x and a 16-prompt prefill 1.65x faster in one interleaved run (int8 weights, same run: "
    "1.4x, 1.6x; 1.5x, 2.1x on a quieter day; benchmarks/matmul_kernels.py, "
    "benchmarks/serve_throughput.py)."
)


def quantize_onnx_w8a8(src_dir: Path, out_dir: Path, calibration_texts: list[str],
                       alpha: float = ALPHA) -> dict[str, Any]:
    """Write an `onnx-w8a8` folder from the builder's fp32 graph.

    Args:
        src_dir: an fp32 graph written by `onnx_genai.export_genai_onnx(merged, src_dir, "fp32")`.
        out_dir: the w8a8 folder, replaced if it exists; gets the same tokenizer/config files.
        calibration_texts: rendered FR/EN conversations: the activation ranges SmoothQuant
            balances against the weights are measured on them.
        alpha: SmoothQuant's migration strength (0: none, 1: all of the range to the weights).

    Returns:
        Facts for the export report: method, alpha, node counts, calibration tokens, files.

    Raises:
        ModelSourceError: `src_dir` has no model.onnx or no genai_config.json.
        ConfigError: no calibration texts, or alpha outside [0, 1].
        MissingExtraError: onnx or onnxruntime is not installed.
    """
    from toolkit.extras import require

    for module in ("onnx", "onnxruntime"):
        require(module, "--quantize onnx-w8a8")
    import onnx

    from toolkit.export.onnx_int4 import (
        Int4Recipe,
        calibration_feeds,
        quantize_nbits,
        set_accuracy_level,
        untie_embedding,
    )

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    check_builder_graph(src_dir)
    if not calibration_texts:
        raise ConfigError("onnx-w8a8 needs calibration texts (its activation ranges are "
                          "measured on them): pass --calibration data/train.jsonl")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"onnx-w8a8 alpha {alpha}: choose a value from 0 to 1")
    model = onnx.load(str(src_dir / ONNX_FILE))
    tied = untie_embedding(model)
    feeds = calibration_feeds(model, src_dir, calibration_texts)
    ranges = input_ranges(src_dir, feeds)
    rewritten = rewrite_matmuls(model, ranges, alpha)
    # what is left as a float MatMul with a constant weight (the attention output): int8
    # weight-only
    model = quantize_nbits(model, Int4Recipe(block_size=INT8_SETTINGS["block_size"],
                                             symmetric=INT8_SETTINGS["symmetric"]),
                           op_types=("MatMul",), exclude=[f"{FP32_CHANNELS}/MatMul"], bits=8)
    set_accuracy_level(model, INT8_SETTINGS["accuracy_level"])
    ops = [n.op_type for n in model.graph.node]
    with _staged(out_dir) as stage:
        onnx.save_model(model, str(stage / ONNX_FILE), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=ONNX_DATA_FILE, size_threshold=1024)
        copy_model_files(src_dir, stage)
        shutil.copy2(src_dir / GENAI_CONFIG, stage / GENAI_CONFIG)
    return {
        "method": "SmoothQuant W8A8: per-channel 8-bit weights, per-token dynamic 8-bit "
                  "activations (MatMulIntegerToFloat, uint8 x uint8: exact on every CPU); "
                  "lm_head W8A8 beside its widest input channels in fp32; attention output "
                  "projections weight-only int8 (MatMulNBits)",
        "bits": 8,
        "alpha": alpha,
        "lm_head_alpha": LM_HEAD_ALPHA,
        "lm_head_fp32_channels": LM_HEAD_FP32_CHANNELS,
        "matmuls_rewritten": rewritten,
        "integer_gemms": ops.count(INTEGER_GEMM),
        # smoothing divisions left as a Mul (where no norm or up projection can carry them)
        "smoothing_muls": sum(n.name.endswith("/Mul_smoothed") for n in model.graph.node),
        "weight_only_int8": ops.count("MatMulNBits"),
        "embedding": "fp32 Gather" + (" (untied from the lm_head)" if tied else ""),
        "calibration_tokens": sum(int(f["input_ids"].size) for f in feeds),
        "reason": W8A8_REASON,
        "files": {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())},
    }


def _weighted_matmuls(model: Any) -> list[Any]:
    """MatMul nodes with a constant 2-D weight to rewrite: not one reading an attention op's
    output (reads no weight data)."""
    weights = {init.name for init in model.graph.initializer if len(init.dims) == 2}
    attention = {out for n in model.graph.node if n.op_type in ATTENTION_OPS for out in n.output}
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights
            and n.input[0] not in attention]


def input_ranges(src_dir: Path, feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """max |x_j| per input channel of every weighted MatMul input, over the calibration feeds.

    The probe graph (the source graph with those inputs as extra outputs) is written beside
    the source and reads its external weights from there: no copy of the weights in memory,
    and no 2 GB protobuf limit for a 7B model.
    """
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    probe = onnx.load(str(Path(src_dir) / ONNX_FILE), load_external_data=False)
    names = sorted({n.input[0] for n in _weighted_matmuls(probe)})
    probe.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
                              for name in names)
    path = Path(src_dir) / PROBE_FILE
    onnx.save_model(probe, str(path))
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        ranges: dict[str, np.ndarray] = {}
        for feed in feeds:
            for name, value in zip(names, session.run(names, feed)):
                peak = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
                ranges[name] = np.maximum(ranges.get(name, peak), peak)
    finally:
        path.unlink(missing_ok=True)
    return ranges


def smoothing(activation_max: np.ndarray, weight_max: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's per-channel factors, kept within [1e-2, 1e2] (dead channels stay put)."""
    factors = (np.maximum(activation_max, 1e-5) ** alpha
               / np.maximum(weight_max, 1e-5) ** (1.0 - alpha))
    return np.clip(factors, 1e-2, 1e2).astype(np.float32)


def rewrite_matmuls(model: Any, ranges: dict[str, np.ndarray], alpha: float) -> int:
    """Replace every weighted MatMul by its smoothed W8A8 form; their count.

    `alpha` is the decoder's migration strength; the lm_head's is `LM_HEAD_ALPHA`.
    MatMuls reading the same input (gate and up) share its smoothing and its quantized copy,
    and run as one integer GEMM over their concatenated weights, split after. A smoothing
    division is folded into the constant that produced its input where one does (a norm's
    gamma, the up projection's columns; `_fold_smoothing`), so it costs no node.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    # by output (unique): each weight converted to an array once
    weights = {n.output[0]: numpy_helper.to_array(initializers[n.input[1]]).astype(np.float32)
               for n in _weighted_matmuls(model)}
    groups: dict[str, list[Any]] = {}
    for node in graph.node:
        if node.output[0] in weights:
            groups.setdefault(node.input[0], []).append(node)
    head = next((source for source, group in groups.items()
                 if any(n.output[0] == LM_HEAD_OUTPUT for n in group)), None)
    factors = {source: smoothing(ranges[source], np.max(
        [np.abs(weights[n.output[0]]).max(axis=1) for n in group], axis=0),
        LM_HEAD_ALPHA if source == head else alpha) for source, group in groups.items()}
    # the lm_head's smoothing Mul also zeroes its fp32 channels: never folded
    folded = _fold_smoothing(graph, {s: g for s, g in groups.items() if s != head}, factors,
                             weights)
    constants = _Constants(graph)
    nodes: list[Any] = []
    for node in graph.node:
        group = groups.get(node.input[0]) if node.output[0] in weights else None
        if group is None:
            nodes.append(node)
        elif node is group[0]:  # the whole group at its first MatMul: its input exists here
            source = node.input[0]
            smoothed = [weights[n.output[0]] * factors[source][:, None] for n in group]
            if source != head:
                ints, row_scale = _quantize_rows(source, factors[source], constants, nodes,
                                                 smooth=source not in folded,
                                                 zero_point=ZERO_POINT)
                nodes += _integer_matmul(group, smoothed, ints, row_scale, constants)
                continue
            channels = np.sort(np.argsort(-ranges[source])[:LM_HEAD_FP32_CHANNELS])
            ints, row_scale = _quantize_rows(source, factors[source], constants, nodes,
                                             smooth=True, zero_point=LM_HEAD_ZERO_POINT,
                                             dropped=channels)
            smoothed[0][channels] = 0.0  # those input channels run in fp32 beside the GEMM
            nodes += _integer_matmul(group, smoothed, ints, row_scale, constants,
                                     out=f"{LM_HEAD_OUTPUT}/integer")
            nodes += _fp32_channels(source, channels, weights[LM_HEAD_OUTPUT][channels],
                                    f"{LM_HEAD_OUTPUT}/integer", constants)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if weights and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(weights)


#: norms whose output is `x * gamma` (per channel): gamma's input index
NORM_GAMMA = {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2}


def _fold_smoothing(graph: Any, groups: dict[str, list[Any]], factors: dict[str, np.ndarray],
                    weights: dict[str, np.ndarray]) -> set[str]:
    """Divide by the smoothing factors where the input is made; the inputs so folded.

    - the output of an RMSNorm (`NORM_GAMMA`) read only by the group: gamma / s;
    - `act(gate) * up` read only by the group (the down projection's input), with `up` a
      rewritten MatMul read only there: up's weight columns / s.
    Anything else (the attention output: its channels are grouped-query heads) keeps a Mul.
    """
    from onnx import numpy_helper

    readers: dict[str, int] = {}
    for name in [n for node in graph.node for n in node.input] + [o.name for o in graph.output]:
        readers[name] = readers.get(name, 0) + 1  # a graph output is read too: never changed
    producers = {out: node for node in graph.node for out in node.output}
    initializers = {init.name: init for init in graph.initializer}
    folded = set()
    for source, group in groups.items():
        producer = producers.get(source)
        if producer is None or readers[source] != len(group):
            continue
        if producer.op_type in NORM_GAMMA and producer.output[0] == source:
            gamma = initializers.get(producer.input[NORM_GAMMA[producer.op_type]])
            if gamma is None or readers[gamma.name] != 1:
                continue
            value = numpy_helper.to_array(gamma)
            gamma.CopyFrom(numpy_helper.from_array((value / factors[source]).astype(value.dtype),
                                                   gamma.name))
            folded.add(source)
        elif producer.op_type == "Mul":
            up = next((name for name in producer.input
                       if name in weights and readers[name] == 1), None)
            if up is not None:
                weights[up] = weights[up] / factors[source][None, :]
                folded.add(source)
    return folded


class _Constants:
    """Initializers added to a graph, and tensors made once for the whole graph, each once."""

    def __init__(self, graph: Any) -> None:
        self.graph = graph
        self.names: set[str] = set()

    def add(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        if name not in self.names:
            self.graph.initializer.append(numpy_helper.from_array(value, name))
            self.names.add(name)
        return name

    def first(self, name: str) -> bool:
        """True the first time `name` is asked for: its nodes are to be made now."""
        if name in self.names:
            return False
        self.names.add(name)
        return True


def _quantize_rows(source: str, factors: np.ndarray, constants: _Constants,
                   nodes: list[Any], smooth: bool, zero_point: str,
                   dropped: np.ndarray | None = None) -> tuple[str, str]:
    """Nodes turning `source` (rows x channels) into uint8 rows and their scales (rows x 1).

    One blocked QuantizeLinear (a block per row) rounds and shifts; its zero point, 128 in the
    scales' shape, is made once per `zero_point` name (every decoder MatMul input has the same
    rows; the lm_head's are the logit positions).
    A row of zeros gets scale 0 and no guard node: whatever bytes QuantizeLinear makes of
    0 / 0, the product is an int32, and its row scale 0 makes the output row exactly 0.
    `dropped` channels (computed elsewhere) are zeroed by the smoothing Mul, so that they do
    not set the rows' scales.
    """
    from onnx import helper

    q = f"{source}/w8a8"
    axes = constants.add("/w8a8/last_axis", np.array([-1], dtype=np.int64))
    levels = constants.add("/w8a8/127", np.array(127.0, dtype=np.float32))
    step = []
    smoothed = source
    if smooth:
        inverse = (1.0 / factors).astype(np.float32)
        if dropped is not None:
            inverse[dropped] = 0.0
        inverse = constants.add(f"{q}/inverse_smoothing", inverse)
        step.append(("Mul", [source, inverse], "smoothed", {}))
        smoothed = f"{q}/smoothed"
    step += [("Abs", [smoothed], "abs", {}),
             ("ReduceMax", [f"{q}/abs", axes], "max", {"keepdims": 1}),
             ("Div", [f"{q}/max", levels], "scale", {})]
    for op, inputs, output, attributes in step:
        nodes.append(helper.make_node(op, inputs, [f"{q}/{output}"], name=f"{q}/{op}_{output}",
                                      **attributes))
    if constants.first(zero_point):
        middle = constants.add(MIDDLE, np.array(128, dtype=np.uint8))
        nodes += [helper.make_node("Shape", [f"{q}/scale"], [f"{zero_point}/rows_shape"],
                                   name=f"{zero_point}/Shape_rows"),
                  helper.make_node("Expand", [middle, f"{zero_point}/rows_shape"], [zero_point],
                                   name=f"{zero_point}/Expand")]
    nodes.append(helper.make_node("QuantizeLinear", [smoothed, f"{q}/scale", zero_point],
                                  [f"{q}/uint8"], name=f"{q}/QuantizeLinear", axis=-1,
                                  block_size=len(factors)))
    return f"{q}/uint8", f"{q}/scale"


def _integer_matmul(group: list[Any], smoothed: list[np.ndarray], ints: str, row_scale: str,
                    constants: _Constants, out: str | None = None) -> list[Any]:
    """One integer GEMM over the group's 8-bit weights, rescaled, split back to its outputs.

    Each weight column gets its own scale (max |w| / 127), stored as uint8 around 128 (exact
    products on CPUs without VNNI, see the module docstring). `MatMulIntegerToFloat` turns the
    int32 sums into floats times the column scales inside the GEMM (its activation scale, a
    per-tensor one, is 1); a Mul applies the row (token) scales: a per-axis DequantizeLinear
    after a MatMulInteger ran 3.7x slower at 720 rows, and a Cast and two Muls cost 180 nodes
    on every single-row step. `out` names the (unsplit) result instead of the group's output.
    """
    from onnx import helper

    name = group[0].name or group[0].output[0]
    weight = np.concatenate(smoothed, axis=1)
    column_scale = (np.maximum(np.abs(weight).max(axis=0), 1e-12) / 127.0).astype(np.float32)
    levels = np.clip(np.round(weight / column_scale), -127, 127)
    uint8 = constants.add(f"{name}/uint8", (levels + 128).astype(np.uint8))
    scale = constants.add(f"{name}/column_scale", column_scale)
    zero = constants.add(MIDDLE, np.array(128, dtype=np.uint8))
    one = constants.add("/w8a8/one", np.array(1.0, dtype=np.float32))
    fused = len(group) > 1
    out = out or (f"{name}/rescaled" if fused else group[0].output[0])
    nodes = [
        helper.make_node(INTEGER_GEMM, [ints, uint8, one, scale, zero, zero], [f"{name}/columns"],
                         name=f"{name}/{INTEGER_GEMM}", domain="com.microsoft"),
        helper.make_node("Mul", [f"{name}/columns", row_scale], [out], name=f"{name}/RowScale"),
    ]
    if fused:
        sizes = constants.add(f"{name}/split", np.array([w.shape[1] for w in smoothed], np.int64))
        nodes.append(helper.make_node("Split", [out, sizes], [n.output[0] for n in group],
                                      name=f"{name}/Split", axis=-1))
    return nodes


def _fp32_channels(source: str, channels: np.ndarray, rows: np.ndarray, integer: str,
                   constants: _Constants) -> list[Any]:
    """The lm_head's `logits`: its integer GEMM's output plus `source`'s `channels` times their
    weight `rows` in fp32 (LLM.int8's split: the outlier channels keep their precision, and
    the others' row scales no longer stretch to fit them)."""
    from onnx import helper

    q = FP32_CHANNELS
    index = constants.add(f"{q}/index", channels.astype(np.int64))
    weight = constants.add(f"{q}/weight", rows.astype(np.float32))
    return [helper.make_node("Gather", [source, index], [f"{q}/inputs"], name=f"{q}/Gather",
                             axis=-1),
            helper.make_node("MatMul", [f"{q}/inputs", weight], [f"{q}/products"],
                             name=f"{q}/MatMul"),
            helper.make_node("Add", [integer, f"{q}/products"], [LM_HEAD_OUTPUT],
                             name=f"{q}/Add")]
