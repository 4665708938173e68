"""Integer GEMM weights given, at load, the sign this CPU multiplies exactly and fastest.

MLAS, ONNX Runtime's CPU kernel library, multiplies uint8 activations by 8-bit weights of either
sign, and which sign pays depends on the CPU, not on the export:
- uint8 x int8 runs on VNNI (`vpdpbusd`, AVX512-VNNI or AVX-VNNI) and on AMX tiles where the CPU
  has them: one instruction multiplies and adds into int32. On a 2-core Xeon with AVX512-VNNI
  and AMX, one SmolLM2 layer's GEMMs ran 2.5x faster at 16 rows and 4.2x at 720 rows than
  uint8 x uint8, with equal outputs (`benchmarks/matmul_kernels.py`).
- Without VNNI the same kernel uses `vpmaddubsw`, which adds each pair of products in a
  saturating int16: some outputs come out wrong. uint8 x uint8 widens before it multiplies and
  is exact on every CPU.

So exports store uint8 weights around 128 (`onnx-w8a8`: exact wherever they are served), and
the engine gives each integer GEMM the other sign where this CPU's uint8 x int8 kernel is
exact. Whether it is, is measured rather than read from CPU flags: `signed_weights_exact` runs
a probe GEMM whose every pair of products overflows int16. Graphs written with int8 weights
(onnxruntime's `quantize_dynamic`, older `onnx-w8a8` exports) get uint8 ones on CPUs where
int8 would saturate, so they compute exactly there too.

The conversion is three nodes per weight (Cast to int32, add or subtract 128, Cast) that ONNX
Runtime's constant folding evaluates once when the session is created: the weights stay in the
export's external data file, nothing is written, and the graph handed to the session is only
its structure.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

#: op -> input index of its constant weight, of that weight's zero point, and of its
#: activations' zero point (None: the op quantizes its float activations to uint8 itself)
GEMM_INPUTS: dict[str, tuple[int, int, int | None]] = {
    "MatMulInteger": (1, 3, 2),
    "MatMulIntegerToFloat": (1, 5, 4),
    "DynamicQuantizeMatMul": (1, 3, None),
    "QLinearMatMul": (3, 5, 2),
}
#: ONNX Runtime's session setting for where a graph loaded from bytes finds its external data
EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"
#: the probe's depth: every pair of its products, 255 x 127 twice, is beyond int16
_PROBE_K = 64
#: probe row counts: the one-row kernel (GEMV) and a blocked GEMM
_PROBE_ROWS = (1, 32)


@lru_cache(maxsize=1)
def signed_weights_exact() -> bool:
    """Whether ONNX Runtime multiplies uint8 activations by int8 weights exactly on this CPU.

    Measured once per process: a MatMulInteger of 255s by 127s, at one row and at 32, must give
    255 x 127 x 64 in every output; `vpmaddubsw` (no VNNI) saturates each pair at 32767.
    """
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.full((_PROBE_K, 16), 127, dtype=np.int8), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w"], ["y"])], "signed_weight_probe",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, ["rows", _PROBE_K])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, ["rows", 16])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    exact = 255 * 127 * _PROBE_K
    return all(
        bool((session.run(["y"], {"a": np.full((rows, _PROBE_K), 255, np.uint8)})[0] == exact)
             .all())
        for rows in _PROBE_ROWS)


def retype_weights(model: Any, signed: bool) -> int:
    """Give every integer GEMM of `model` (an onnx ModelProto, changed in place) constant
    weights of one sign: int8 where `signed`, else uint8. Returns how many GEMMs changed.

    A GEMM changes only where its weight and that weight's zero point are initializers (so the
    new nodes fold into constants) and its activations are known to be uint8 (a uint8
    activation zero point, or an op that quantizes its activations itself): int8 x uint8 is a
    kernel MLAS does not have. An absent weight zero point is 0 of the old sign.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    overridable = {i.name for i in graph.input}
    types = {t.name: t.data_type for t in graph.initializer if t.name not in overridable}
    old, new = (TensorProto.UINT8, TensorProto.INT8) if signed else (TensorProto.INT8,
                                                                      TensorProto.UINT8)
    shift = -128 if signed else 128
    suffix = "int8" if signed else "uint8"
    nodes: list[Any] = []
    constants: dict[str, np.ndarray] = {}
    converted: dict[str, str] = {}

    def convert(name: str) -> str:
        """The name of `name` shifted by 128 into the new type (its nodes made once)."""
        if name not in converted:
            out = f"{name}/{suffix}"
            nodes.extend([
                helper.make_node("Cast", [name], [f"{out}/int32"], name=f"{out}/Widen",
                                 to=TensorProto.INT32),
                helper.make_node("Add", [f"{out}/int32", f"/retype/{shift}"], [f"{out}/shifted"],
                                 name=f"{out}/Shift"),
                helper.make_node("Cast", [f"{out}/shifted"], [out], name=f"{out}/Narrow", to=new),
            ])
            converted[name] = out
        return converted[name]

    changed = 0
    for node in graph.node:
        if node.op_type not in GEMM_INPUTS:
            continue
        weight, weight_zero, activation_zero = GEMM_INPUTS[node.op_type]
        inputs = list(node.input) + [""] * (weight_zero + 1 - len(node.input))
        if types.get(inputs[weight]) != old:
            continue
        if activation_zero is not None and types.get(inputs[activation_zero]) != TensorProto.UINT8:
            continue
        if inputs[weight_zero] and types.get(inputs[weight_zero]) != old:
            continue
        if inputs[weight_zero]:
            inputs[weight_zero] = convert(inputs[weight_zero])
        else:
            inputs[weight_zero] = f"/retype/zero_{suffix}"
            constants[inputs[weight_zero]] = np.array(
                shift, dtype=helper.tensor_dtype_to_np_dtype(new))
        inputs[weight] = convert(inputs[weight])
        del node.input[:]
        node.input.extend(inputs)
        changed += 1
    if nodes:
        constants[f"/retype/{shift}"] = np.array(shift, dtype=np.int32)
    graph.initializer.extend(numpy_helper.from_array(value, name)
                             for name, value in constants.items())
    for i, made in enumerate(nodes):
        graph.node.insert(i, made)
    return changed


@dataclass(frozen=True)
class RetypedGraph:
    """A graph's structure (serialized) whose integer GEMMs got weights of another sign."""

    graph: bytes
    gemms: int
    sign: str  # "int8" or "uint8"


def graph_for_this_cpu(graph: Path) -> RetypedGraph | None:
    """`graph`'s structure with its integer GEMM weights retyped for this CPU, or None where
    none change and the file loads as it is.

    Only the structure is read: external weights stay where they are (load the bytes with
    `EXTERNAL_DATA_FOLDER` set to the graph's folder). Without the `onnx` package (serving
    needs only onnxruntime) graphs load as stored.
    """
    try:
        import onnx
    except ImportError:
        return None
    model = onnx.load(str(graph), load_external_data=False)
    if not any(node.op_type in GEMM_INPUTS for node in model.graph.node):
        return None
    signed = signed_weights_exact()
    changed = retype_weights(model, signed=signed)
    if not changed:
        return None
    return RetypedGraph(model.SerializeToString(), changed, "int8" if signed else "uint8")
