"""The `onnx-int4` format: ONNX Runtime's 4-bit MatMulNBits over the builder's fp32 graph.

It starts from onnxruntime-genai's fp32 GroupQueryAttention graph (`onnx_genai`), the graph
`onnx-int8` is built as: the same inputs and outputs and the same `genai_config.json`, so the
onnxruntime engine decodes it with the KV cache updated in place (`onnx_shared_kv`). Only
the MatMul weights and the token embedding change. What varies is how the weights become
4 bits, described by an `Int4Recipe`: the algorithm (round-to-nearest, k-quant, HQQ, GPTQ on
our FR/EN calibration texts), the block size, symmetric or not, the compute precision
(`accuracy_level` 4 = int8 activations, MLAS's fast CPU path), what happens to the token
embedding, and which MatMuls stay in 8 bits.
`benchmarks/onnx_int4_choice.py` measures every recipe; `CHOSEN` and `INT4_MEASUREMENTS`
below are its result, and the export report carries both.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from toolkit.errors import ConfigError
from toolkit.export.onnx import ONNX_DATA_FILE, _staged, copy_model_files
from toolkit.export.onnx_genai import check_builder_graph
from toolkit.runtime.onnx_model import (
    GENAI_CONFIG,
    LOGIT_POSITIONS,
    ONNX_FILE,
    QUERY_LENGTHS,
    default_query_lengths,
)

Algorithm = Literal["rtn", "k_quant", "hqq", "gptq", "offset"]
Embedding = Literal["fp32", "int4", "shared"]
ALGORITHMS: tuple[str, ...] = ("rtn", "k_quant", "hqq", "gptq", "offset")
EMBEDDINGS: tuple[str, ...] = ("fp32", "int4", "shared")
BLOCK_SIZES: tuple[int, ...] = (32, 64, 128)
#: GPTQ calibration: the first texts up to this many tokens, cut into windows of this length.
#: ORT's GPTQ runs the whole graph once per distinct MatMul input (121 on SmolLM2) over every
#: window, so its cost is linear in these tokens; 4k tokens keep it to minutes on 2 cores.
GPTQ_TOKENS = 4096
GPTQ_WINDOW = 512
#: the untied embedding's initializer (the builder names only the tied lm_head weight)
EMBEDDING_WEIGHT = "model.embed_tokens.weight"


@dataclass(frozen=True)
class Int4Recipe:
    """One way to write `onnx-int4`.

    Attributes:
        algorithm: "rtn" (round to nearest, ORT's DefaultWeightOnlyQuantConfig), "k_quant"
            (llama.cpp-style scale search), "hqq" (half-quadratic zero-point fitting, float
            zero points) or "gptq" (Hessian-aware rounding on calibration activations), all
            through ORT's quantizer; or "offset" (min/max blocks whose float offset is a
            separate fp32 correction, `toolkit.export.onnx_int4_offset`; `symmetric` unused).
        block_size: weights sharing one scale (and zero point) along the input dimension.
        symmetric: no zero points (int4 around 0) instead of uint4 with a zero point.
        accuracy_level: MatMulNBits compute type: 0 = fp32 (dequantize then SGEMM), 4 = int8
            activations (MLAS int8 dot products: the fast CPU path).
        embedding: the token embedding: "fp32" (left as the fp32 Gather), "int4" (its own
            4-bit GatherBlockQuantized) or "shared" (a GatherBlockQuantized reading the 4-bit
            lm_head weight, for tied embeddings: one 4-bit copy for both; with HQQ the lm_head
            is then rounded to nearest, as the Gather needs integer zero points).
        int8: substrings of MatMul node names kept at 8 bits (block `block_size`, asymmetric):
            the layers measured as the most sensitive to 4-bit rounding.
    """

    algorithm: Algorithm = "rtn"
    block_size: int = 32
    symmetric: bool = False
    accuracy_level: int = 4
    embedding: Embedding = "shared"
    int8: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        problems = []
        if self.algorithm not in ALGORITHMS:
            problems.append(f"algorithm {self.algorithm!r}: choose from {', '.join(ALGORITHMS)}")
        if self.block_size not in BLOCK_SIZES:
            problems.append(f"block_size {self.block_size}: choose from {BLOCK_SIZES}")
        if self.embedding not in EMBEDDINGS:
            problems.append(f"embedding {self.embedding!r}: choose from {', '.join(EMBEDDINGS)}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            problems.append(f"accuracy_level {self.accuracy_level}: choose from 0-4")
        if problems:
            raise ConfigError("onnx-int4 recipe: " + "; ".join(problems))

    @property
    def label(self) -> str:
        """A short name for tables: "rtn b32 asym acc4 emb=shared int8=down_proj"."""
        parts = [self.algorithm, f"b{self.block_size}", "sym" if self.symmetric else "asym",
                 f"acc{self.accuracy_level}", f"emb={self.embedding}"]
        if self.int8:
            parts.append("int8=" + "+".join(self.int8))
        return " ".join(parts)


#: what `toolkit export --quantize onnx-int4` writes (see INT4_REASON)
CHOSEN = Int4Recipe(algorithm="offset", block_size=32, embedding="shared")


def quantize_onnx_int4(src_dir: Path, out_dir: Path, calibration_texts: list[str] | None = None,
                       recipe: Int4Recipe = CHOSEN,
                       adapter_dir: Path | None = None) -> dict[str, Any]:
    """Write an `onnx-int4` folder from the builder's fp32 graph.

    Args:
        src_dir: an fp32 graph written by `onnx_genai.export_genai_onnx(merged, src_dir, "fp32")`.
        out_dir: the int4 folder, replaced if it exists; gets the same tokenizer/config files.
        calibration_texts: rendered FR/EN conversations; only GPTQ uses them (it fits the
            rounding to the activations they produce).
        recipe: how to quantize (default: the measured choice).
        adapter_dir: the LoRA adapter merged into `src_dir`'s weights: taken out of them
            before quantizing and kept beside them in fp32 (`onnx_lora`), so the fine-tune
            is not rounded away; None quantizes the merged weights as they are.

    Returns:
        The recipe, node counts, why it was chosen, the measured alternatives and the files.

    Raises:
        ModelSourceError: `src_dir` has no model.onnx or no genai_config.json (not a builder
            graph: the int4 folder would not be served by the in-place KV path).
        ConfigError: GPTQ without calibration texts.
        MissingExtraError: onnx, onnxruntime or onnx-ir is not installed.
    """
    from toolkit.extras import require

    for module in ("onnx", "onnxruntime", "onnx_ir"):
        require(module, "--quantize onnx-int4")
    import onnx

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    check_builder_graph(src_dir)
    if recipe.algorithm == "gptq" and not calibration_texts:
        raise ConfigError("onnx-int4 with GPTQ needs calibration texts: pass --calibration "
                          "data/train.jsonl")
    model = onnx.load(str(src_dir / ONNX_FILE))
    adapter = None
    if adapter_dir is not None:
        from toolkit.export.onnx_lora import split_adapter

        decoder = json.loads((src_dir / GENAI_CONFIG).read_text(encoding="utf-8"))["model"]["decoder"]
        adapter = split_adapter(model, Path(adapter_dir), decoder)
    side = adapter.pop("side_nodes") if adapter else []
    tied = untie_embedding(model)
    lm_head = _lm_head_weight(model)
    if recipe.embedding == "int4":
        model = quantize_nbits(model, Int4Recipe(block_size=recipe.block_size,
                                            symmetric=recipe.symmetric), op_types=("Gather",))
    sensitive = _matching_matmuls(model, recipe.int8)
    # HQQ's zero points are floats, which GatherBlockQuantized cannot read: a shared
    # embedding needs the lm_head rounded with integer zero points (RTN) instead
    head = [] if recipe.algorithm != "hqq" or recipe.embedding != "shared" else [
        n.name for n in model.graph.node if n.op_type == "MatMul" and n.output[0] == "logits"
        and n.name not in sensitive]
    feeds = (calibration_feeds(model, src_dir, calibration_texts)
             if recipe.algorithm == "gptq" else None)
    corrections: list[str] = []
    if recipe.algorithm == "offset":
        from toolkit.export import onnx_int4_offset

        onnx_int4_offset.rewrite_matmuls(model, recipe.block_size, recipe.accuracy_level,
                                         set(sensitive + side))
        corrections = [n.name for n in model.graph.node if n.name.endswith("_Offset")]
    else:
        model = quantize_nbits(model, recipe, op_types=("MatMul",), exclude=sensitive + head + side,
                          feeds=feeds)
    if head:
        model = quantize_nbits(model, replace(recipe, algorithm="rtn", symmetric=False),
                          op_types=("MatMul",), exclude=sensitive + side)
    if sensitive:
        model = quantize_nbits(model, replace(recipe, algorithm="rtn", symmetric=False),
                          op_types=("MatMul",), exclude=corrections + side, bits=8)
    set_accuracy_level(model, recipe.accuracy_level)
    shared = recipe.embedding == "shared" and tied and (
        (recipe.algorithm == "offset"
         and onnx_int4_offset.share_embedding(model, lm_head, recipe.block_size))
        or _share_embedding(model, lm_head))
    with _staged(out_dir) as stage:
        onnx.save_model(model, str(stage / ONNX_FILE), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=ONNX_DATA_FILE, size_threshold=1024)
        copy_model_files(src_dir, stage)
        shutil.copy2(src_dir / GENAI_CONFIG, stage / GENAI_CONFIG)
    counts = _node_counts(model)
    return {
        "method": "MatMulNBits int4 weight-only (onnxruntime MatMulNBitsQuantizer)",
        "bits": 4,
        "recipe": asdict(recipe),
        "label": recipe.label,
        "quantized_matmuls_4bit": counts.get(4, 0),
        "quantized_matmuls_8bit": counts.get(8, 0),
        "embedding": ("shared with the quantized lm_head (GatherBlockQuantized)" if shared
                      else {"fp32": "fp32 Gather", "int4": "own 4-bit GatherBlockQuantized",
                            "shared": "fp32 Gather (lm_head not tied)"}[recipe.embedding]),
        "embedding_tied": tied,
        "adapter": adapter or ("merged weights quantized (no adapter given, or one that cannot "
                               "be kept apart exactly)"),
        "calibration_tokens": sum(int(f["input_ids"].size) for f in feeds) if feeds else 0,
        "reason": INT4_REASON if recipe == CHOSEN else "recipe given by the caller",
        "measured": [dict(zip(MEASUREMENT_FIELDS, row)) for row in INT4_MEASUREMENTS],
        "files": {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())},
    }


def quantize_nbits(model: Any, recipe: Int4Recipe, op_types: tuple[str, ...],
              exclude: list[str] | None = None, feeds: list[dict[str, np.ndarray]] | None = None,
              bits: int = 4) -> Any:
    """One MatMulNBitsQuantizer pass over `op_types` nodes (their constant weights)."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    common = {"op_types_to_quantize": op_types}
    if recipe.algorithm == "rtn" or bits == 8 or op_types == ("Gather",):
        config = mnq.DefaultWeightOnlyQuantConfig(
            block_size=recipe.block_size, is_symmetric=recipe.symmetric, bits=bits,
            accuracy_level=recipe.accuracy_level, **common)
    elif recipe.algorithm == "hqq":
        config = mnq.HQQWeightOnlyQuantConfig(block_size=recipe.block_size, bits=bits, **common)
    elif recipe.algorithm == "k_quant":
        config = mnq.KQuantWeightOnlyQuantConfig(**common)
    else:
        config = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=_FeedReader(feeds or []),
                                               actorder=True, mse=True, **common)
    quantizer = mnq.MatMulNBitsQuantizer(
        model, bits=bits, block_size=recipe.block_size, is_symmetric=recipe.symmetric,
        accuracy_level=recipe.accuracy_level, nodes_to_exclude=exclude or [],
        op_types_to_quantize=op_types, algo_config=config)
    quantizer.process()
    return quantizer.model.model


class _FeedReader:
    """ORT's CalibrationDataReader protocol over prepared feeds (GPTQ deep-copies it)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = feeds
        self.index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index >= len(self.feeds):
            return None
        self.index += 1
        return self.feeds[self.index - 1]

    def __iter__(self) -> _FeedReader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        feed = self.get_next()
        if feed is None:
            raise StopIteration
        return feed


def calibration_feeds(model: Any, src_dir: Path,
                       texts: list[str] | None) -> list[dict[str, np.ndarray]]:
    """Graph feeds (no past) of the calibration texts, in `GPTQ_WINDOW`-token windows.

    The texts are concatenated in their order (the calibration file alternates languages) and
    cut at `GPTQ_TOKENS`, so both languages are in the sample.
    """
    from toolkit.runtime.loading import load_tokenizer

    tokenizer = load_tokenizer(src_dir)
    ids: list[int] = []
    for text in texts or []:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= GPTQ_TOKENS:
            break
    ids = ids[:GPTQ_TOKENS]
    # the graph leaves the head size symbolic; the builder's config states it
    decoder = json.loads((src_dir / GENAI_CONFIG).read_text(encoding="utf-8"))["model"]["decoder"]
    past = {graph_input.name: np.zeros((1, decoder["num_key_value_heads"], 0,
                                        decoder["head_size"]), dtype=np.float32)
            for graph_input in model.graph.input
            if graph_input.name.startswith("past_key_values.")}
    names = {graph_input.name for graph_input in model.graph.input}
    return [{"input_ids": window, "attention_mask": np.ones_like(window), **past,
             **({LOGIT_POSITIONS: np.arange(window.shape[1])[None, :]}
                if LOGIT_POSITIONS in names else {}),
             **({QUERY_LENGTHS: default_query_lengths(window.shape[1], np.array([window.shape[1]]))}
                if QUERY_LENGTHS in names else {})}
            for window in (np.asarray([ids[start:start + GPTQ_WINDOW]], dtype=np.int64)
                           for start in range(0, len(ids), GPTQ_WINDOW))]


def _matching_matmuls(model: Any, patterns: tuple[str, ...]) -> list[str]:
    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and any(p in n.name for p in patterns)]


def untie_embedding(model: Any) -> bool:
    """Give a tied embedding its own fp32 weight, so every recipe starts from separate matrices.

    The builder stores a tied matrix once, as the lm_head's [hidden, vocab] MatMul weight, and
    feeds the embedding Gather `Transpose(that weight)`. The lm_head is then quantized like any
    MatMul, and the embedding is kept (fp32), quantized on its own, or replaced by a
    GatherBlockQuantized over the lm_head's 4-bit bytes (`embedding` "shared").

    Returns:
        Whether a tied embedding was found and untied.
    """
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    gather = next((n for n in model.graph.node
                   if n.op_type == "Gather" and n.input[1] == "input_ids"), None)
    transpose = producers.get(gather.input[0]) if gather is not None else None
    if (transpose is None or transpose.op_type != "Transpose"
            or transpose.input[0] not in initializers):
        return False
    weight = numpy_helper.to_array(initializers[transpose.input[0]])
    model.graph.initializer.append(numpy_helper.from_array(weight.T.copy(), EMBEDDING_WEIGHT))
    gather.input[0] = EMBEDDING_WEIGHT
    if not any(transpose.output[0] in n.input for n in model.graph.node):
        model.graph.node.remove(transpose)
    return True


def _lm_head_weight(model: Any) -> str | None:
    """The weight name of the MatMul producing `logits`."""
    producers = {out: node for node in model.graph.node for out in node.output}
    node = producers.get("logits")
    return node.input[1] if node is not None and node.op_type == "MatMul" else None


def set_accuracy_level(model: Any, level: int) -> None:
    """Give every MatMulNBits the recipe's compute type (ORT's HQQ path does not set it)."""
    from onnx import helper

    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        kept = [a for a in node.attribute if a.name != "accuracy_level"]
        del node.attribute[:]
        node.attribute.extend(kept)
        if level:
            node.attribute.append(helper.make_attribute("accuracy_level", level))


def _share_embedding(model: Any, lm_head_weight: str | None) -> bool:
    """Replace the fp32 embedding Gather by a GatherBlockQuantized over the lm_head's bits.

    A tied model's embedding and lm_head are one [vocab, hidden] matrix. MatMulNBits stores
    it as uint8 [vocab, blocks, block * bits / 8] with scales [vocab * blocks] and packed
    zero points: the bytes GatherBlockQuantized reads for uint8 data (MatMulNBits conventions,
    4 or 8 bits) under 2-D shapes. Constant Reshapes give it those shapes, so the file holds
    the matrix once (ORT folds the Reshapes at load: a second quantized copy in memory, not on
    disk).

    Returns:
        Whether the embedding was rewired (False: no tied quantized lm_head found).
    """
    from onnx import helper, numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    matmul = next((n for n in model.graph.node if n.op_type == "MatMulNBits"
                   and n.output[0] == "logits"), None)
    gather = next((n for n in model.graph.node if n.op_type == "Gather"
                   and n.input[0] in initializers and n.input[1] == "input_ids"), None)
    if matmul is None or gather is None or lm_head_weight is None:
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in matmul.attribute}
    vocab, hidden = (int(d) for d in initializers[gather.input[0]].dims)
    bits = attrs.get("bits", 4)
    if bits not in (4, 8) or (attrs["N"], attrs["K"]) != (vocab, hidden):
        return False
    block = attrs["block_size"]
    blocks = -(-hidden // block)
    nodes, inputs = [], []
    for index, width in ((1, blocks * block * bits // 8), (2, blocks),
                         (3, -(-blocks * bits // 8))):
        if index >= len(matmul.input) or not matmul.input[index]:
            continue
        name = matmul.input[index]
        model.graph.initializer.append(numpy_helper.from_array(
            np.asarray([vocab, width], dtype=np.int64), f"{name}_shape2d"))
        nodes.append(helper.make_node("Reshape", [name, f"{name}_shape2d"], [f"{name}_2d"],
                                      name=f"{name}_Reshape2d"))
        inputs.append(f"{name}_2d")
    nodes.append(helper.make_node(
        "GatherBlockQuantized", [inputs[0], gather.input[1], *inputs[1:]], list(gather.output),
        name=gather.name + "_Qshared", domain="com.microsoft",
        gather_axis=0, quantize_axis=1, block_size=block, bits=bits))
    position = list(model.graph.node).index(gather)
    model.graph.node.remove(gather)
    for offset, node in enumerate(nodes):
        model.graph.node.insert(position + offset, node)
    if not any(gather.input[0] in n.input for n in model.graph.node):
        model.graph.initializer.remove(initializers[gather.input[0]])
    return True


def _node_counts(model: Any) -> dict[int, int]:
    """MatMulNBits nodes by bits."""
    from onnx import helper

    counts: dict[int, int] = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            bits = next((helper.get_attribute_value(a) for a in node.attribute
                         if a.name == "bits"), 4)
            counts[bits] = counts.get(bits, 0) + 1
    return counts


def parse_recipe(text: str) -> Int4Recipe:
    """`Int4Recipe` from its label ("gptq b32 asym acc4 emb=shared int8=down_proj")."""
    fields: dict[str, Any] = {}
    for part in text.split():
        if part in ALGORITHMS:
            fields["algorithm"] = part
        elif re.fullmatch(r"b\d+", part):
            fields["block_size"] = int(part[1:])
        elif part in ("sym", "asym"):
            fields["symmetric"] = part == "sym"
        elif re.fullmatch(r"acc\d", part):
            fields["accuracy_level"] = int(part[3:])
        elif part.startswith("emb="):
            fields["embedding"] = part[4:]
        elif part.startswith("int8="):
            fields["int8"] = tuple(p for p in part[5:].split("+") if p)
        else:
            raise ConfigError(f"onnx-int4 recipe {text!r}: unknown part {part!r}")
    return Int4Recipe(**fields)


# --- the measured choice ------------------------------------------------------------------
MEASUREMENT_FIELDS = ("recipe", "ppl_fr", "ppl_en", "delta_fr_pct", "delta_en_pct",
                      "size_vs_fp16_pct", "tokens_per_s", "vs_onnx_int8")
#: `benchmarks/onnx_int4_choice.py --save` (benchmarks/results/onnx_int4_choice.json) on the
#: embedded SmolLM2-135M (its fp32 builder graph; held-out data/test.jsonl answers), 1 thread,
#: decode speed through `SharedKvStepBackend` as the median A B B A ratio to the builder's
#: onnx-int8 in the same process, on 2 AVX2 cores shared with other jobs (load average ~4).
INT4_MEASUREMENTS: tuple[tuple[Any, ...], ...] = (
    ("rtn b32 asym acc4 emb=fp32", 51.77, 62.41, 54.5, 43.8, 75, 41.7, 1.55),
    ("rtn b32 asym acc0 emb=fp32", 51.48, 62.18, 53.6, 43.3, 75, 17.6, 0.65),
    ("k_quant b32 asym acc4 emb=fp32", 51.89, 65.66, 54.8, 51.3, 75, 38.9, 1.33),
    ("hqq b32 asym acc4 emb=fp32", 36.91, 47.40, 10.1, 9.2, 81, 2.1, 0.07),
    ("rtn b32 asym acc4 emb=shared", 52.32, 63.36, 56.1, 46.0, 33, 44.2, 1.26),
    ("rtn b32 asym acc4 emb=shared int8=down_proj", 48.98, 57.74, 46.1, 33.0, 38, 34.7, 1.21),
    ("offset b32 asym acc4 emb=fp32", 34.99, 46.31, 4.4, 6.7, 74, 36.8, 1.25),
    ("offset b32 asym acc4 emb=shared", 35.60, 45.95, 6.2, 5.9, 32, 38.0, 1.28),
    ("offset b64 asym acc4 emb=shared", 61.65, 68.61, 83.9, 58.1, 29, 38.9, 1.47),
)
INT4_REASON = (
    "The only recipe within every target on SmolLM2-135M: +6.2 % fr / +5.9 % en held-out "
    "perplexity at 32 % of the fp16 size, decoding 1.28x onnx-int8's speed (both builder "
    "graphs, in-place KV) on MLAS's integer kernels (accuracy_level 4). The "
    "embedded model comes from a Q4_1 GGUF: its layers lie on a 4-bit grid with a float offset "
    "per 32-block. ORT's integer-zero-point methods re-round that grid (RTN +55 %/+44 %, "
    "k-quant +55 %/+51 %, fp32 compute no better: +54 %/+43 %; 8-bit down_proj still "
    "+46 %/+33 %); HQQ's float zero points keep it (+10.1 %/+9.2 %) but MatMulNBits then "
    "dequantizes to fp32 on every call (0.07x onnx-int8's speed). `offset` stores each block "
    "symmetric and its float offset in a small fp32 correction MatMul, which is exact for the "
    "Q4_1 layers; what remains is the 4-bit lm_head/embedding (higher precision in the GGUF). "
    "Block 64 breaks the 32-block grid (+84 %/+58 %); sharing the tied embedding with the "
    "4-bit lm_head takes the file from 74 % to 32 % of fp16 for +1.8 % fr. GPTQ (ORT's, "
    "calibrated on our FR/EN texts) runs the whole graph once per MatMul input and was not "
    "measured on the real model; it is tested on the tiny model. On a LoRA run the adapter is "
    "kept beside the 4-bit base weights in fp32 (`onnx_lora`): quantizing the merged weights "
    "rounded the demo fine-tune away (+14.1 % against its merged model, the base model's "
    "perplexity); with the side path +5.2 % fr / +7.3 % en at 33 % of fp16."
)
