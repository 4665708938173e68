"""Pick the `onnx-int8` settings: perplexity and speed of each ONNX int8 method on a real model.

Not a test: it exports the embedded SmolLM2-135M (or --model), quantizes it with every
candidate below, and prints method, perplexity, delta vs fp32, greedy tok/s with 1 thread
(batch 1, KV cache) and size. Its output with the default arguments is the table
`INT8_MEASUREMENTS` in `toolkit/export/onnx.py`, which also says what was chosen and why; the
last row runs `quantize_onnx_int8` itself, so it must reproduce the chosen row.

    .venv/bin/python benchmarks/onnx_int8_choice.py [--model DIR] [--text FILE] [--only NAME...]

Perplexity text: the `output` fields of data/test.jsonl then data/train.jsonl (French and
English hospital protocols) up to --tokens tokens, or --text FILE.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from toolkit.export.onnx import quantize_onnx_int8, untie_lm_head

REPO = Path(__file__).resolve().parents[1]
WINDOW = 512
SPEED_PROMPT = "<|im_start|>user\nQuelles sont les cinq règles avant d'administrer un médicament ?<|im_end|>\n<|im_start|>assistant\n"


def _save(model, out_dir: Path) -> None:
    import onnx

    out_dir.mkdir(parents=True)
    onnx.save_model(model, str(out_dir / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx_data", size_threshold=1024)


def _matmul_names(src: Path, pattern: str) -> list[str]:
    import onnx

    model = onnx.load(str(src / "model.onnx"), load_external_data=False)
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and pattern in n.name]


def qdq_weight_only(symmetric: bool = True, untie: bool = False) -> Callable[[Path, Path], None]:
    """int8 weights per output channel + DequantizeLinear before each MatMul; fp32 activations.

    ORT's quantizers cannot write this for 8 bits (MatMulNBitsQuantizer: QOperator only;
    quantize_static also quantizes activations), so the rewrite is done here. ORT fuses each
    DequantizeLinear + MatMul into an int8 MatMulNBits when it loads the model.
    """
    def run(src: Path, dst: Path) -> None:
        import onnx
        from onnx import helper, numpy_helper

        model = onnx.load(str(src / "model.onnx"))
        if untie:
            untie_lm_head(model)
        inits = {i.name: i for i in model.graph.initializer}
        nodes = []
        for node in model.graph.node:
            name = node.input[1] if node.op_type == "MatMul" else ""
            if name in inits and len(inits[name].dims) == 2:
                weight = numpy_helper.to_array(inits[name])
                low, high = np.minimum(weight.min(0), 0), np.maximum(weight.max(0), 0)
                if symmetric:
                    high = np.maximum(-low, high)
                    low = -high
                scale = ((high - low) / 254 if symmetric else (high - low) / 255).astype(np.float32)
                zero = np.zeros_like(scale) if symmetric else np.round(-128 - low / scale)
                quant = np.clip(np.round(weight / scale) + zero, -128, 127).astype(np.int8)
                model.graph.initializer.remove(inits[name])
                model.graph.initializer.extend([
                    numpy_helper.from_array(quant, name + "_q"),
                    numpy_helper.from_array(scale, name + "_scale"),
                    numpy_helper.from_array(zero.astype(np.int8), name + "_zero")])
                nodes.append(helper.make_node("DequantizeLinear",
                                              [name + "_q", name + "_scale", name + "_zero"],
                                              [name], axis=1))
            nodes.append(node)
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        _save(model, dst)
    return run


def nbits(bits: int, block: int, accuracy: int | None, symmetric: bool = True,
          untie: bool = False) -> Callable[[Path, Path], None]:
    """ORT MatMulNBits weight-only; accuracy None = 0 (fp32 compute), 4 = int8 compute."""
    def run(src: Path, dst: Path) -> None:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        model = onnx.load(str(src / "model.onnx"))
        if untie:
            untie_lm_head(model)
        quant = MatMulNBitsQuantizer(model, bits=bits, block_size=block,
                                     is_symmetric=symmetric, accuracy_level=accuracy,
                                     op_types_to_quantize=("MatMul",))
        quant.process()
        _save(quant.model.model, dst)
    return run


def dynamic(per_channel: bool, reduce_range: bool,
            exclude: tuple[str, ...] = ()) -> Callable[[Path, Path], None]:
    """ORT dynamic int8 (int8 weights, activations quantized per tensor at run time)."""
    def run(src: Path, dst: Path) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        skip = [n for pattern in exclude for n in _matmul_names(src, pattern)]
        dst.mkdir(parents=True, exist_ok=True)
        quantize_dynamic(src / "model.onnx", dst / "model.onnx", op_types_to_quantize=["MatMul"],
                         per_channel=per_channel, reduce_range=reduce_range,
                         weight_type=QuantType.QInt8, nodes_to_exclude=skip,
                         use_external_data_format=True)
    return run


CANDIDATES: dict[str, Callable[[Path, Path], None] | None] = {
    "fp32": None,
    "dynamic per-tensor (ORT default)": dynamic(False, False),
    "dynamic per-channel reduce-range": dynamic(True, True),
    "dynamic per-channel rr, fp32 down_proj": dynamic(True, True, ("down_proj",)),
    "QDQ weight-only per-channel sym": qdq_weight_only(),
    "QDQ weight-only per-channel asym": qdq_weight_only(symmetric=False),
    "QDQ weight-only per-channel sym +lm_head": qdq_weight_only(untie=True),
    "QDQ weight-only per-channel asym +lm_head": qdq_weight_only(symmetric=False, untie=True),
    "MatMulNBits int8 b32 acc0": nbits(8, 32, None),
    "MatMulNBits int8 b32 acc4": nbits(8, 32, 4),
    "MatMulNBits int8 b32 acc4 asym": nbits(8, 32, 4, symmetric=False),
    "MatMulNBits int8 b64 acc4": nbits(8, 64, 4),
    "MatMulNBits int8 b64 acc4 asym": nbits(8, 64, 4, symmetric=False),
    "MatMulNBits int8 b128 acc4": nbits(8, 128, 4),
    "MatMulNBits int8 b128 acc4 asym": nbits(8, 128, 4, symmetric=False),
    "MatMulNBits int8 b32 acc4 asym +lm_head": nbits(8, 32, 4, symmetric=False, untie=True),
    "MatMulNBits int8 b64 acc4 asym +lm_head": nbits(8, 64, 4, symmetric=False, untie=True),
    "MatMulNBits int8 b128 acc4 asym +lm_head": nbits(8, 128, 4, symmetric=False, untie=True),
    "MatMulNBits int4 b32 acc4": nbits(4, 32, 4),
    "onnx-int8 as shipped (quantize_onnx_int8)": quantize_onnx_int8,
}


def load_text(args: argparse.Namespace, tokenizer) -> list[int]:
    if args.text:
        return tokenizer(Path(args.text).read_text(encoding="utf-8"))["input_ids"][: args.tokens]
    ids: list[int] = []
    for name in ("test.jsonl", "train.jsonl"):
        path = REPO / "data" / name
        for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
            ids += tokenizer(json.loads(line)["output"] + "\n")["input_ids"]
            if len(ids) >= args.tokens:
                return ids[: args.tokens]
    if len(ids) < 500:
        raise SystemExit("not enough text: pass --text FILE (French/English prose)")
    return ids


def perplexity(model, ids: list[int]) -> float:
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, WINDOW):
        chunk = np.asarray([ids[start: start + WINDOW + 1]], dtype=np.int64)
        logits = model.logits(chunk[:, :-1]).astype(np.float64)[0]
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= logp[np.arange(len(logp)), chunk[0, 1:]].sum()
        count += len(logp)
    return math.exp(nll / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m")
    parser.add_argument("--text", help="UTF-8 text file for perplexity")
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--work", type=Path, help="keep exports here (default: a temp dir)")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds (best kept)")
    parser.add_argument("--only", nargs="*", help="candidate names (substring match)")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from toolkit.export.onnx import export_onnx
    from toolkit.model_source import resolve_model
    from toolkit.runtime.onnx_model import OnnxCausalLM

    model_dir = resolve_model(args.model).path
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = load_text(args, tokenizer)
    prompt = tokenizer(SPEED_PROMPT)["input_ids"]
    work = args.work or Path(tempfile.mkdtemp(prefix="onnx-int8-choice-"))
    fp32_dir = work / "fp32"
    if not (fp32_dir / "model.onnx").is_file():
        export_onnx(model_dir, fp32_dir)
    rows: dict[str, dict[str, float]] = {}
    models = {}
    for name, quantize in CANDIDATES.items():
        if args.only and name != "fp32" and not any(s in name for s in args.only):
            continue
        folder, seconds = fp32_dir, 0.0
        if quantize is not None:
            folder = work / name.replace(" ", "_").replace(",", "")
            shutil.rmtree(folder, ignore_errors=True)
            start = time.perf_counter()
            quantize(fp32_dir, folder)
            seconds = time.perf_counter() - start
        models[name] = OnnxCausalLM.from_dir(folder, threads=1)
        size = sum(p.stat().st_size for p in folder.glob("model.onnx*")) / 1e6
        rows[name] = {"ppl": perplexity(models[name], ids), "mb": size, "s": seconds, "tps": 0.0}
        print(f"{name}: ppl {rows[name]['ppl']:.2f}", flush=True)
    # Round-robin timing, best of --rounds: other processes share the cores, and interleaving
    # spreads their load over every candidate instead of penalising whichever ran at that time.
    for model in models.values():
        model.generate_all([prompt], 2)
    for _ in range(args.rounds):
        for name, model in models.items():
            start = time.perf_counter()
            model.generate_all([prompt], args.new_tokens)
            rows[name]["tps"] = max(rows[name]["tps"], args.new_tokens / (time.perf_counter() - start))
    base = rows["fp32"]["ppl"]
    print(f"model {args.model}, {len(ids)} ppl tokens, {args.new_tokens} new tokens, 1 thread, "
          f"best of {args.rounds}")
    print("| method | ppl | delta % | tok/s | MB | quantize s |\n|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['ppl']:.2f} | {100 * (row['ppl'] / base - 1):+.1f} | "
              f"{row['tps']:.1f} | {row['mb']:.0f} | {row['s']:.0f} |")

if __name__ == "__main__":
    main()
