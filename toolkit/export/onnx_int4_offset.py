"""4-bit blocks with a float offset, on ONNX Runtime's fast integer kernels.

MatMulNBits dequantizes a block as `scale * (q - zero_point)` with an integer zero point;
only integer zero points reach MLAS's int8 kernels (float ones, as HQQ writes, fall back to
dequantize-then-SGEMM: ~14x slower here). A block's best grid often starts between two
integer steps, and rounding the zero point costs up to half a step on every weight of the
block. GGUF's Q4_1 stores exactly that float offset (`d * q + m`), so a model that went
through Q4_1 (the embedded SmolLM2 did) loses quality under every integer-zero-point method.

Here each block is stored symmetric, `w = s * (q - 8) + c`, and the float offsets `c` become
a small fp32 correction: `A @ W = MatMulNBits(A) + ReduceSum_block(A) @ C`, with C of shape
[K / block, N] (the size of the scales). Scales and offsets are stored in fp16 (GGUF's own
precision for them) and cast to fp32 at load. The tied embedding gets the same offsets through a
Gather of C's transpose. For a weight on a Q4_1 grid of the same block size this is exact.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def quantize_blocks(weight: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Min/max 4-bit blocks along K of a [K, N] weight, as MatMulNBits stores them.

    Returns:
        (packed uint8 [N, K/block, block/2], scales float32 [N, K/block],
        offsets float32 [N, K/block]) such that w = scale * (q - 8) + offset.
    """
    k, n = weight.shape
    blocks = weight.T.reshape(n, k // block, block).astype(np.float32)
    low, high = blocks.min(-1), blocks.max(-1)
    flat = high == low
    scale = np.where(flat, 1.0, (high - low) / 15)
    q = np.clip(np.round((blocks - low[..., None]) / scale[..., None]), 0, 15).astype(np.uint8)
    # a constant block (a zero padding row) is all q = 8 with its value as offset: any other
    # q would cancel a large int8 product against the offset (accuracy_level 4 rounds the
    # activations to int8, and that rounding error would come back multiplied)
    q[flat] = 8
    offset = np.where(flat, low, low + 8 * scale)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    return packed, scale.astype(np.float32), offset.astype(np.float32)


def rewrite_matmuls(model: Any, block: int, accuracy_level: int, exclude: set[str]) -> list[str]:
    """Replace each MatMul with a constant 2-D weight (not in `exclude`) by MatMulNBits plus
    the offset correction; the block sums of an input are computed once for all its MatMuls.

    Returns:
        The names of the rewritten MatMuls.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    nodes: list[Any] = []
    block_sums: dict[str, str] = {}
    done: list[str] = []
    for node in graph.node:
        weight_init = initializers.get(node.input[1]) if node.op_type == "MatMul" else None
        if (weight_init is None or node.name in exclude or len(weight_init.dims) != 2
                or weight_init.dims[0] % block):
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(weight_init)
        k, n = weight.shape
        packed, scale, offset = quantize_blocks(weight, block)
        base = node.input[1]
        graph.initializer.append(numpy_helper.from_array(packed, f"{base}_Q4"))
        nodes += [_fp16_constant(graph, scale.reshape(-1), f"{base}_scales"),
                  _fp16_constant(graph, np.ascontiguousarray(offset.T), f"{base}_offsets")]
        source = node.input[0]
        if source not in block_sums:
            block_sums[source] = f"{source}_blocksum{block}"
            graph.initializer.append(numpy_helper.from_array(
                np.asarray([0, 0, k // block, block], dtype=np.int64), f"{source}_blockshape"))
            graph.initializer.append(numpy_helper.from_array(
                np.asarray([-1], dtype=np.int64), f"{source}_blockaxis"))
            nodes += [
                helper.make_node("Reshape", [source, f"{source}_blockshape"],
                                 [f"{source}_blocks"], name=f"{source}_BlockReshape"),
                helper.make_node("ReduceSum", [f"{source}_blocks", f"{source}_blockaxis"],
                                 [block_sums[source]], keepdims=0, name=f"{source}_BlockSum"),
            ]
        attrs = {"K": k, "N": n, "bits": 4, "block_size": block}
        if accuracy_level:
            attrs["accuracy_level"] = accuracy_level
        out = node.output[0]
        nodes += [
            helper.make_node("MatMulNBits", [source, f"{base}_Q4", f"{base}_scales"],
                             [f"{out}_q4"], name=f"{node.name}_Q4", domain="com.microsoft",
                             **attrs),
            helper.make_node("MatMul", [block_sums[source], f"{base}_offsets"],
                             [f"{out}_offset"], name=f"{node.name}_Offset"),
            helper.make_node("Add", [f"{out}_q4", f"{out}_offset"], [out],
                             name=f"{node.name}_AddOffset"),
        ]
        if sum(base in other.input for other in graph.node) == 1:
            graph.initializer.remove(weight_init)
        done.append(node.name)
    del graph.node[:]
    graph.node.extend(nodes)
    return done


def _fp16_constant(graph: Any, array: np.ndarray, name: str) -> Any:
    """Store `array` in fp16 and return the Cast node that gives it back as fp32 `name`.

    Scales and offsets are a quarter of the file in fp32; in fp16 they are exact for weights
    that came from GGUF (which stores them in fp16) and within 1e-3 relative otherwise. ORT
    folds the Cast at load, so MatMulNBits still sees a constant fp32 input to prepack.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph.initializer.append(numpy_helper.from_array(array.astype(np.float16), f"{name}_fp16"))
    return helper.make_node("Cast", [f"{name}_fp16"], [name], to=TensorProto.FLOAT,
                            name=f"{name}_Cast")


def share_embedding(model: Any, lm_head_weight: str | None, block: int) -> bool:
    """Feed the embedding Gather from the rewritten lm_head: its 4-bit blocks through a
    GatherBlockQuantized (no zero points: default 8, as MatMulNBits) plus its offsets.

    Returns:
        Whether the embedding was rewired (False: the lm_head was not rewritten).
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    gather = next((n for n in graph.node if n.op_type == "Gather"
                   and n.input[0] in initializers and n.input[1] == "input_ids"), None)
    if gather is None or lm_head_weight is None or f"{lm_head_weight}_Q4" not in initializers:
        return False
    vocab, hidden = (int(d) for d in initializers[gather.input[0]].dims)
    blocks = hidden // block
    name = f"{lm_head_weight}_embedding"
    graph.initializer.extend([
        numpy_helper.from_array(np.asarray([vocab, hidden // 2], np.int64), f"{name}_datashape"),
        numpy_helper.from_array(np.asarray([vocab, blocks], np.int64), f"{name}_scaleshape"),
        numpy_helper.from_array(np.asarray([0, 0, blocks, block], np.int64), f"{name}_split"),
        numpy_helper.from_array(np.asarray([0, 0, hidden], np.int64), f"{name}_merge"),
        numpy_helper.from_array(np.asarray([-1], np.int64), f"{name}_lastaxis"),
    ])
    ids, out = gather.input[1], gather.output[0]
    nodes = [
        helper.make_node("Reshape", [f"{lm_head_weight}_Q4", f"{name}_datashape"],
                         [f"{name}_data"], name=f"{name}_DataReshape"),
        helper.make_node("Reshape", [f"{lm_head_weight}_scales", f"{name}_scaleshape"],
                         [f"{name}_scales"], name=f"{name}_ScaleReshape"),
        helper.make_node("GatherBlockQuantized", [f"{name}_data", ids, f"{name}_scales"],
                         [f"{name}_q4"], name=f"{name}_Gather", domain="com.microsoft",
                         gather_axis=0, quantize_axis=1, block_size=block, bits=4),
        helper.make_node("Transpose", [f"{lm_head_weight}_offsets"], [f"{name}_offsets"],
                         perm=[1, 0], name=f"{name}_OffsetTranspose"),
        helper.make_node("Gather", [f"{name}_offsets", ids], [f"{name}_rowoffsets"],
                         name=f"{name}_OffsetGather"),
        helper.make_node("Unsqueeze", [f"{name}_rowoffsets", f"{name}_lastaxis"],
                         [f"{name}_rowoffsets4d"], name=f"{name}_OffsetUnsqueeze"),
        helper.make_node("Reshape", [f"{name}_q4", f"{name}_split"], [f"{name}_q4blocks"],
                         name=f"{name}_Split"),
        helper.make_node("Add", [f"{name}_q4blocks", f"{name}_rowoffsets4d"], [f"{name}_sum"],
                         name=f"{name}_AddOffset"),
        helper.make_node("Reshape", [f"{name}_sum", f"{name}_merge"], [out],
                         name=f"{name}_Merge"),
    ]
    position = list(graph.node).index(gather)
    graph.node.remove(gather)
    for offset, node in enumerate(nodes):
        graph.node.insert(position + offset, node)
    if not any(gather.input[0] in n.input for n in graph.node):
        graph.initializer.remove(initializers[gather.input[0]])
    return True
