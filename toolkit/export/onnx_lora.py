"""Keep a LoRA fine-tune intact in a 4-bit graph: base weights in 4 bits, the adapter beside them.

A LoRA fine-tune moves each target weight by `scale * B @ A`, a change far smaller than one
step of a 4-bit grid (lr 2e-5, a few hundred steps). Quantizing the merged weights rounds most
of that change away: the demo's onnx-int4 export of a fine-tune scored the base model's
perplexity, not the fine-tune's (+14 % against the merged model, where the same recipe on the
base model costs +6 %). So the graph's merged weights get the adapter's delta subtracted (the
base weights, which the quantizer then rounds) and the delta comes back as two small fp32
MatMuls beside each adapted projection, `y = x W_base + (x A^T)(scale B^T)`, as QLoRA computes it
in training. For r=8 on q_proj and v_proj of SmolLM2-135M that is 0.8 M fp32 parameters (3 MB)
and ~1 % more multiply-adds per token.

The builder fuses q/k/v into one `qkv_proj` MatMul; an adapted q, k or v lands in its columns
(q, then k, then v, from `genai_config.json`'s head counts).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

#: suffix of the side-path nodes; the quantizers leave them in fp32
SIDE = "/LoraSide"
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def adapter_deltas(adapter_dir: Path) -> tuple[dict[tuple[int, str], tuple[np.ndarray, np.ndarray]],
                                                dict[str, Any]] | None:
    """Per (layer, module): (A^T [in, r], scale * B^T [r, out]) of a plain LoRA adapter.

    Returns None for what this module cannot place exactly (DoRA, biases, modules_to_save,
    trained embeddings or a module outside a decoder layer's projections): the caller then
    quantizes the merged weights as before.
    """
    from safetensors.numpy import load_file

    config_path = adapter_dir / "adapter_config.json"
    weights_path = adapter_dir / "adapter_model.safetensors"
    if not (config_path.is_file() and weights_path.is_file()):
        return None
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if (config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("lora_bias")
            or config.get("bias", "none") != "none" or config.get("modules_to_save")
            or config.get("fan_in_fan_out") or config.get("rank_pattern")
            or config.get("alpha_pattern")):
        return None
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    scale = alpha / (rank ** 0.5 if config.get("use_rslora") else rank)
    tensors = load_file(str(weights_path))
    pairs: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}
    for key, lora_a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        parts = key.split(".")
        if "layers" not in parts or parts[-3] not in _ATTENTION + _MLP:
            return None
        layer = int(parts[parts.index("layers") + 1])
        lora_b = tensors.get(key.replace(".lora_A.", ".lora_B."))
        if lora_b is None:
            return None
        pairs[(layer, parts[-3])] = (lora_a.astype(np.float32).T.copy(),
                                     (scale * lora_b.astype(np.float32)).T.copy())
    if len(pairs) * 2 != len(tensors):  # anything else in the file was trained too
        return None
    return pairs, {"rank": rank, "alpha": alpha, "scale": scale,
                   "modules": sorted({module for _, module in pairs})}


def split_adapter(model: Any, adapter_dir: Path, decoder: dict[str, Any]) -> dict[str, Any] | None:
    """Take the adapter out of `model`'s merged fp32 weights and add it back as fp32 side paths.

    Args:
        model: the builder's fp32 `onnx.ModelProto` of the merged model (edited in place).
        adapter_dir: the run's adapter folder (adapter_config.json, adapter_model.safetensors).
        decoder: `genai_config.json`'s `model.decoder` (head counts and size).

    Returns:
        The report's facts (rank, modules, side-path node names and parameter count), or None
        when the adapter cannot be placed exactly (then nothing was changed).
    """
    from onnx import helper, numpy_helper

    found = adapter_deltas(adapter_dir)
    if found is None:
        return None
    pairs, facts = found
    graph = model.graph
    nodes = {node.name: node for node in graph.node}
    initializers = {init.name: init for init in graph.initializer}
    q_cols = decoder["num_attention_heads"] * decoder["head_size"]
    kv_cols = decoder["num_key_value_heads"] * decoder["head_size"]
    columns = {"q_proj": 0, "k_proj": q_cols, "v_proj": q_cols + kv_cols}
    # (matmul node name) -> [(column offset, A^T, scale B^T)]
    placed: dict[str, list[tuple[int, np.ndarray, np.ndarray]]] = {}
    for (layer, module), (a_t, b_t) in sorted(pairs.items()):
        group = "attn" if module in _ATTENTION else "mlp"
        own = f"/model/layers.{layer}/{group}/{module}/MatMul"
        fused = f"/model/layers.{layer}/attn/qkv_proj/MatMul"
        if own in nodes:
            placed.setdefault(own, []).append((0, a_t, b_t))
        elif module in columns and fused in nodes:
            placed.setdefault(fused, []).append((columns[module], a_t, b_t))
        else:
            return None
    for name in placed:
        weight = nodes[name].input[1]
        if weight not in initializers or sum(weight in n.input for n in graph.node) != 1:
            return None  # a shared or computed weight: subtracting would change another node
    side_nodes: list[str] = []
    new_nodes = []
    for node in graph.node:
        new_nodes.append(node)
        if node.name not in placed:
            continue
        init = initializers[node.input[1]]
        weight = numpy_helper.to_array(init).astype(np.float64)
        parts = placed[node.name]
        rank_total = sum(a_t.shape[1] for _, a_t, _ in parts)
        a_cat = np.zeros((weight.shape[0], rank_total), dtype=np.float32)
        b_cat = np.zeros((rank_total, weight.shape[1]), dtype=np.float32)
        at = 0
        for offset, a_t, b_t in parts:
            rank = a_t.shape[1]
            a_cat[:, at:at + rank] = a_t
            b_cat[at:at + rank, offset:offset + b_t.shape[1]] = b_t
            weight[:, offset:offset + b_t.shape[1]] -= a_t.astype(np.float64) @ b_t
            at += rank
        init.CopyFrom(numpy_helper.from_array(weight.astype(np.float32), init.name))
        prefix, out = f"{node.name}{SIDE}", node.output[0]
        graph.initializer.extend([numpy_helper.from_array(a_cat, f"{prefix}/A"),
                                  numpy_helper.from_array(b_cat, f"{prefix}/B")])
        node.output[0] = f"{out}{SIDE}/base"
        new_nodes += [
            helper.make_node("MatMul", [node.input[0], f"{prefix}/A"], [f"{prefix}/down"],
                             name=f"{prefix}/MatMulA"),
            helper.make_node("MatMul", [f"{prefix}/down", f"{prefix}/B"], [f"{prefix}/delta"],
                             name=f"{prefix}/MatMulB"),
            helper.make_node("Add", [node.output[0], f"{prefix}/delta"], [out],
                             name=f"{prefix}/Add"),
        ]
        side_nodes += [f"{prefix}/MatMulA", f"{prefix}/MatMulB"]
    del graph.node[:]
    graph.node.extend(new_nodes)
    params = sum(a.size + b.size for a, b in pairs.values())
    return {**facts, "kept": "fp32 low-rank side path beside the 4-bit base weights",
            "matmuls": len(placed), "parameters": int(params), "side_nodes": side_nodes}
