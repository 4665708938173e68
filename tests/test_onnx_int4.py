"""The `onnx-int4` format on the tiny model: every recipe option, applied to the builder's fp32
GroupQueryAttention graph, writes a graph that the ONNX Runtime wrapper loads as an in-place
KV graph, scores close to fp32 and decodes with through `SharedKvStepBackend`; the shared
4-bit embedding reads exactly the lm_head's quantized bytes; the error paths name their fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from toolkit.errors import ConfigError, MissingExtraError, ModelSourceError

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install 'toolkit[onnx]'")
pytest.importorskip("onnx_ir", reason="the onnx extra is not installed: pip install 'toolkit[onnx]'")

from toolkit.export.onnx_int4 import (
    CHOSEN,
    Int4Recipe,
    parse_recipe,
    quantize_onnx_int4,
)

IDS = np.random.default_rng(0).integers(1, 200, (2, 24))


@pytest.fixture(scope="module")
def fp32(tiny_gqa_fp32: Path) -> tuple[Path, np.ndarray]:
    from toolkit.runtime.onnx_model import OnnxCausalLM

    return tiny_gqa_fp32, OnnxCausalLM.from_dir(tiny_gqa_fp32, threads=1).logits(IDS)


def _greedy(folder: Path, prompt: list[int], tokens: int) -> list[int]:
    """Greedy tokens through the backend serving uses (in-place KV for a builder graph)."""
    from toolkit.runtime.onnx_model import OnnxCausalLM
    from toolkit.runtime.onnx_shared_kv import SharedKvStepBackend
    from toolkit.runtime.onnx_steps import step_backend
    from toolkit.runtime.steps import greedy_generate

    backend = step_backend(OnnxCausalLM.from_dir(folder, threads=1), 32)
    assert isinstance(backend, SharedKvStepBackend)
    return greedy_generate(backend, prompt, tokens, stop_at_eos=False)


@pytest.fixture(scope="module")
def texts(tiny_model_dir: Path) -> list[str]:
    from toolkit.export.calibration import calibration_texts
    from toolkit.runtime.loading import load_tokenizer

    data = Path(__file__).resolve().parents[1] / "data" / "train.jsonl"
    return calibration_texts(data, load_tokenizer(tiny_model_dir), None)[0][:6]


def _graph(folder: Path):
    import onnx

    return onnx.load(str(folder / "model.onnx"), load_external_data=False)


@pytest.mark.parametrize("label", [
    "rtn b32 asym acc4 emb=shared",
    "rtn b64 sym acc0 emb=fp32",
    "k_quant b32 asym acc4 emb=int4",
    "hqq b32 asym acc4 emb=fp32",
    "hqq b64 asym acc4 emb=shared int8=down_proj",
    "gptq b32 asym acc4 emb=shared",
    "rtn b32 asym acc4 emb=shared int8=down_proj+lm_head",
    "offset b32 asym acc4 emb=shared",
    "offset b64 asym acc0 emb=fp32 int8=down_proj",
    "offset b32 asym acc4 emb=shared int8=lm_head",
])
def test_recipe_loads_scores_close_to_fp32_and_decodes(fp32, texts, tmp_path: Path,
                                                       label: str) -> None:
    from toolkit.runtime.onnx_model import OnnxCausalLM

    recipe = parse_recipe(label)
    facts = quantize_onnx_int4(fp32[0], tmp_path / "int4", texts, recipe)
    model = OnnxCausalLM.from_dir(tmp_path / "int4", threads=1)
    got, ref = model.logits(IDS), fp32[1]
    assert np.abs(got - ref).max() < 0.3 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.8
    assert len(_greedy(tmp_path / "int4", [5, 17, 42], 4)) == 4
    matmuls = 2 * 5 + 1  # 2 layers x fused qkv/o/gate/up/down + lm_head
    eight = {"down_proj+lm_head": 3, "down_proj": 2, "lm_head": 1}.get(
        label.partition("int8=")[2], 0)
    assert (facts["quantized_matmuls_4bit"], facts["quantized_matmuls_8bit"]) == (
        matmuls - eight, eight)
    graph = _graph(tmp_path / "int4").graph
    weights = {init.name for init in graph.initializer}
    assert not [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    assert facts["recipe"]["algorithm"] == recipe.algorithm and facts["label"] == label
    assert facts["calibration_tokens"] > 0 if recipe.algorithm == "gptq" else True
    assert (tmp_path / "int4" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "int4" / "config.json").read_text())["dtype"] == "float32"
    assert (tmp_path / "int4" / "genai_config.json").read_bytes() == \
        (fp32[0] / "genai_config.json").read_bytes()
    levels = {a.i for n in graph.node if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "accuracy_level"}
    assert levels == ({recipe.accuracy_level} if recipe.accuracy_level else set())


def test_shared_embedding_reads_the_lm_head_bits(fp32, tmp_path: Path) -> None:
    """Sharing stores the tied matrix once, and decodes exactly as a separate 4-bit copy."""
    from toolkit.runtime.onnx_model import OnnxCausalLM

    shared = quantize_onnx_int4(fp32[0], tmp_path / "shared", None,
                                parse_recipe("rtn b32 asym acc4 emb=shared"))
    separate = quantize_onnx_int4(fp32[0], tmp_path / "own", None,
                                  parse_recipe("rtn b32 asym acc4 emb=int4"))
    kept = quantize_onnx_int4(fp32[0], tmp_path / "fp32emb", None,
                              parse_recipe("rtn b32 asym acc4 emb=fp32"))
    assert shared["embedding"].startswith("shared") and shared["embedding_tied"]
    graph = _graph(tmp_path / "shared").graph
    inits = {i.name for i in graph.initializer}
    assert [n.op_type for n in graph.node].count("GatherBlockQuantized") == 1
    assert not [n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits]
    # the builder's tied fp32 matrix (lm_head weight, embedding through a Transpose) is gone
    assert not inits & {"model.embed_tokens.weight", "lm_head.MatMul.weight"}
    assert "Transpose" not in {n.op_type for n in graph.node if n.name.startswith("/model/embed")}
    sizes = {name: facts["files"]["model.onnx_data"]
             for name, facts in (("shared", shared), ("own", separate), ("fp32", kept))}
    assert sizes["shared"] < sizes["own"] < sizes["fp32"]
    a = OnnxCausalLM.from_dir(tmp_path / "shared", threads=1).logits(IDS)
    b = OnnxCausalLM.from_dir(tmp_path / "own", threads=1).logits(IDS)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max())


def test_chosen_recipe_report_says_why(fp32, texts, tmp_path: Path) -> None:
    facts = quantize_onnx_int4(fp32[0], tmp_path / "int4", texts)
    assert facts["recipe"]["algorithm"] == CHOSEN.algorithm and facts["bits"] == 4
    assert facts["reason"] and facts["measured"]
    assert {"recipe", "delta_fr_pct", "delta_en_pct", "size_vs_fp16_pct",
            "vs_onnx_int8"} <= set(facts["measured"][0])


def test_labels_round_trip_and_bad_recipes_list_the_choices() -> None:
    recipe = Int4Recipe("gptq", 64, True, 0, "int4", ("down_proj", "lm_head"))
    assert parse_recipe(recipe.label) == recipe
    with pytest.raises(ConfigError, match=r"block_size 48: choose from \(32, 64, 128\)") as info:
        Int4Recipe(algorithm="awq", block_size=48)  # type: ignore[arg-type]
    assert "algorithm 'awq': choose from rtn, k_quant, hqq, gptq" in str(info.value)
    with pytest.raises(ConfigError, match="unknown part 'b32x'"):
        parse_recipe("rtn b32x")


def test_errors_name_the_fix(fp32, tmp_path: Path) -> None:
    fix = r"build the fp32 GroupQueryAttention graph first \(.*export_genai_onnx"
    with pytest.raises(ModelSourceError, match="no model.onnx; " + fix):
        quantize_onnx_int4(tmp_path, tmp_path / "out")
    not_builder = tmp_path / "optimum-like"  # a graph without the builder's genai_config.json
    not_builder.mkdir()
    shutil.copy2(fp32[0] / "model.onnx", not_builder / "model.onnx")
    with pytest.raises(ModelSourceError, match="no genai_config.json; " + fix):
        quantize_onnx_int4(not_builder, tmp_path / "out")
    with pytest.raises(ConfigError, match="--calibration"):
        quantize_onnx_int4(fp32[0], tmp_path / "out", [], parse_recipe("gptq b32 asym"))
    assert not (tmp_path / "out").exists()


def test_missing_onnx_ir_names_the_extra(monkeypatch: pytest.MonkeyPatch, fp32,
                                         tmp_path: Path) -> None:
    from toolkit import extras
    from toolkit.export.registry import ExportFormat, unavailable_reason

    real = extras.is_available
    monkeypatch.setattr(extras, "is_available", lambda module: module != "onnx_ir" and real(module))
    reason = unavailable_reason(ExportFormat.onnx_int4, cuda=False)
    assert reason is not None and "--quantize onnx-int4" in reason
    assert "pip install 'toolkit[onnx]'" in reason
    with pytest.raises(MissingExtraError, match=r"toolkit\[onnx\]"):
        quantize_onnx_int4(fp32[0], tmp_path / "out")


def test_offset_blocks_are_exact_on_a_gguf_q4_1_grid() -> None:
    """Weights that went through Q4_1 (`d * q + m` per 32-block) come back exactly: what
    integer zero points cannot do (the embedded SmolLM2's layers are such weights)."""
    from toolkit.export.onnx_int4_offset import quantize_blocks

    rng = np.random.default_rng(1)
    k, n, block = 64, 8, 32
    q = rng.integers(0, 16, (n, k // block, block))
    q[..., 0], q[..., 1] = 0, 15
    d = rng.uniform(0.01, 0.05, (n, k // block, 1))
    m = rng.uniform(-0.3, 0.0, (n, k // block, 1))
    weight = (d * q + m).reshape(n, k).T.astype(np.float32)
    weight[:, 0] = 0.25  # output 0: constant blocks (a padding row) stay exact too
    packed, scale, offset = quantize_blocks(weight, block)
    unpacked = np.stack([packed & 15, packed >> 4], -1).reshape(n, k // block, block)
    restored = (scale[..., None] * (unpacked - 8.0) + offset[..., None]).reshape(n, k).T
    np.testing.assert_allclose(restored, weight, rtol=0, atol=1e-6)
    assert (unpacked[0] == 8).all()  # no int8 product to cancel against the offset
