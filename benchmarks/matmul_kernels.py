"""Why batching stops paying on this CPU: ONNX Runtime's weight-only kernels against fp32 GEMM.

One decoder layer's matrix multiplies (the shapes of SmolLM2-135M, or of `--config`: fused
q/k/v, o_proj, gate, up, down) built as a plain fp32 `MatMul` graph (MLAS SGEMM: the baseline)
as `MatMulNBits` graphs the way the `onnx-int8` and `onnx-int4` exports are quantized
(blocks, asymmetric, accuracy level 4 = int8 activation blocks) and as `onnx-w8a8`'s rewrite
(`toolkit.export.onnx_w8a8`: each token quantized to 8 bits in the graph, `MatMulIntegerToFloat`
over uint8 weights, the result rescaled per row; and over the int8 weights the engine gives it
on VNNI CPUs, `toolkit.runtime.integer_weights`), timed in one process at the
row counts serving produces: 1 (one client decoding), 16 (16 clients decoding), 720 (a
16-prompt prefill). Rounds interleave the kernels (A B .. B A); the median is reported.

    .venv/bin/python benchmarks/matmul_kernels.py [--threads 2] [--rounds 5] [--save]
        [--result matmul_kernels_vnni]

Columns: ms per layer; `vs fp32` = fp32 time / this kernel's time at the same rows (> 1 is
faster); `batch gain` = rows per second at M rows / rows per second at 1 row, the most that
batching M requests can give the decode loop (the matmuls are ~85-95 % of a step,
`benchmarks/onnx_decode.py`).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
#: SmolLM2-135M: hidden 576, intermediate 1536, 9 query heads and 3 KV heads of 64
SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
           "num_key_value_heads": 3}
ROWS = (1, 16, 720)


@dataclass(frozen=True)
class Kernel:
    """How one graph's weights are stored and multiplied."""

    name: str
    bits: int  # 0: fp32 MatMul
    block: int = 0
    accuracy_level: int = 0
    w8a8: bool = False  # toolkit.export.onnx_w8a8's rewrite (MatMulIntegerToFloat)
    signed: bool = False  # its weights retyped to int8, as the engine does on VNNI CPUs


KERNELS = (
    Kernel("fp32 MatMul (SGEMM)", 0),
    Kernel("MatMulNBits 8-bit b64, int8 compute (onnx-int8)", 8, 64, 4),
    Kernel("MatMulNBits 4-bit b32, int8 compute (onnx-int4)", 4, 32, 4),
    Kernel("MatMulNBits 8-bit b64, fp32 compute", 8, 64, 1),
    Kernel("MatMulIntegerToFloat u8 x u8, per-token activations (onnx-w8a8)", 8, w8a8=True),
    Kernel("MatMulIntegerToFloat u8 x s8 (onnx-w8a8 served on VNNI CPUs; saturates without)", 8,
           w8a8=True, signed=True),
)


def layer_shapes(config: dict[str, Any]) -> list[tuple[int, int]]:
    """(in, out) of each matmul of one decoder layer, q/k/v fused as the builder's graph has it."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head = config.get("head_dim") or hidden // config["num_attention_heads"]
    kv = config.get("num_key_value_heads", config["num_attention_heads"]) * head
    return [(hidden, config["num_attention_heads"] * head + 2 * kv),
            (config["num_attention_heads"] * head, hidden), (hidden, inter), (hidden, inter),
            (inter, hidden)]


def session(kernel: Kernel, shapes: list[tuple[int, int]], threads: int) -> Any:
    """An ORT session computing every matmul of the layer from one input per width."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    widths = sorted({k for k, _ in shapes})
    nodes, weights = [], []
    for i, (k, n) in enumerate(shapes):
        weights.append(numpy_helper.from_array(
            (rng.standard_normal((k, n)) * 0.02).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [f"x{k}", f"w{i}"], [f"y{i}"]))
    graph = helper.make_graph(
        nodes, "layer",
        [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, ["m", k]) for k in widths],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["m", n])
         for i, (_, n) in enumerate(shapes)], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    if kernel.w8a8:
        from toolkit.export.onnx_w8a8 import ALPHA, rewrite_matmuls

        rewrite_matmuls(model, {f"x{k}": np.ones(k, dtype=np.float32) for k in widths}, ALPHA)
        if kernel.signed:
            from toolkit.runtime.integer_weights import retype_weights

            retype_weights(model, signed=True)
    elif kernel.bits:
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            MatMulNBitsQuantizer,
        )

        logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
        config = DefaultWeightOnlyQuantConfig(block_size=kernel.block, is_symmetric=False,
                                              accuracy_level=kernel.accuracy_level,
                                              bits=kernel.bits)
        quantizer = MatMulNBitsQuantizer(model, algo_config=config)
        quantizer.process()
        model = quantizer.model.model
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def time_once(sess: Any, feeds: dict[str, np.ndarray], budget_s: float = 0.3) -> float:
    """Median seconds of one run, over repeats filling about `budget_s`."""
    sess.run(None, feeds)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - started < budget_s and len(times) < 500):
        begin = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def measure(shapes: list[tuple[int, int]], threads: int, rounds: int) -> list[dict[str, Any]]:
    """Every kernel at every row count, kernels interleaved within each round.

    Sessions are made anew every round, in that round's order: on this VM, of identical
    sessions made one after another in one process the last ran up to 1.2x faster than the
    first, so sessions made once, in a fixed order, would favour the kernel made last.
    """
    rng = np.random.default_rng(1)
    widths = sorted({k for k, _ in shapes})
    found: dict[tuple[str, int], list[float]] = {}
    for r in range(rounds):
        order = KERNELS if r % 2 == 0 else tuple(reversed(KERNELS))
        sessions = {k.name: session(k, shapes, threads) for k in order}
        for rows in ROWS:
            feeds = {f"x{k}": rng.standard_normal((rows, k)).astype(np.float32) for k in widths}
            for kernel in order:
                print(f"matmul_kernels: round {r + 1}, {rows} rows, {kernel.name}",
                      file=sys.stderr, flush=True)
                found.setdefault((kernel.name, rows), []).append(
                    time_once(sessions[kernel.name], feeds))
    ms = {key: statistics.median(values) * 1e3 for key, values in found.items()}
    return [{"kernel": k.name, "bits": k.bits, "block": k.block,
             "accuracy_level": k.accuracy_level, "rows": rows,
             "ms_per_layer": round(ms[(k.name, rows)], 4),
             "vs_fp32": round(ms[(KERNELS[0].name, rows)] / ms[(k.name, rows)], 3),
             "batch_gain": round(rows * ms[(k.name, 1)] / ms[(k.name, rows)], 2)}
            for k in KERNELS for rows in ROWS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, help="a model's config.json (default: SmolLM2-135M)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--save", action="store_true")
    parser.add_argument("--result", default="matmul_kernels",
                        help="the saved result's name (matmul_kernels_vnni: a VNNI/AMX CPU's run)")
    args = parser.parse_args()
    config = json.loads(args.config.read_text(encoding="utf-8")) if args.config else SMOLLM2
    shapes = layer_shapes(config)
    rows = measure(shapes, args.threads, args.rounds)
    print("| kernel | rows | ms/layer | vs fp32 | batch gain |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['kernel']} | {row['rows']} | {row['ms_per_layer']:.3f} | "
              f"{row['vs_fp32']:.2f}x | {row['batch_gain']:.1f}x |")
    if args.save:
        from benchmarks.results import save

        save(args.result, {"threads": args.threads, "rounds": args.rounds,
                                "shapes": shapes, "config": str(args.config or "SmolLM2-135M")},
             rows)


if __name__ == "__main__":
    main()
