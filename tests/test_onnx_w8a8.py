"""The `onnx-w8a8` format on the tiny model: the SmoothQuant W8A8 rewrite of the builder's fp32
graph loads as an in-place KV graph, scores close to fp32, decodes through `SharedKvStepBackend`,
quantizes each token on its own (a row's logits do not depend on its batch), and its smoothing
is what keeps an outlier channel from flattening every other one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from toolkit.errors import ConfigError, ModelSourceError

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install 'toolkit[onnx]'")

from toolkit.export.onnx_w8a8 import (
    ALPHA,
    INTEGER_GEMM,
    LM_HEAD_ALPHA,
    LM_HEAD_FP32_CHANNELS,
    LM_HEAD_OUTPUT,
    quantize_onnx_w8a8,
    rewrite_matmuls,
)

IDS = np.random.default_rng(0).integers(1, 200, (2, 24))


@pytest.fixture(scope="module")
def texts(tiny_model_dir: Path) -> list[str]:
    from toolkit.export.calibration import calibration_texts
    from toolkit.runtime.loading import load_tokenizer

    data = Path(__file__).resolve().parents[1] / "data" / "train.jsonl"
    return calibration_texts(data, load_tokenizer(tiny_model_dir), None)[0][:6]


@pytest.fixture(scope="module")
def w8a8(tiny_gqa_fp32: Path, texts: list[str],
         tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("w8a8") / "w8a8"
    return out, quantize_onnx_w8a8(tiny_gqa_fp32, out, texts)


def test_graph_scores_close_to_fp32_and_decodes(tiny_gqa_fp32: Path, w8a8) -> None:
    import onnx

    from toolkit.runtime.onnx_model import OnnxCausalLM
    from toolkit.runtime.onnx_shared_kv import SharedKvStepBackend
    from toolkit.runtime.onnx_steps import step_backend
    from toolkit.runtime.steps import greedy_generate

    folder, facts = w8a8
    ref = OnnxCausalLM.from_dir(tiny_gqa_fp32, threads=1).logits(IDS)
    model = OnnxCausalLM.from_dir(folder, threads=1)
    got = model.logits(IDS)
    assert model.is_shared_kv
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9
    backend = step_backend(model, 32)
    assert isinstance(backend, SharedKvStepBackend)
    assert len(greedy_generate(backend, [5, 17, 42], 4, stop_at_eos=False)) == 4

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    # 2 layers x qkv, gate+up (one GEMM over both weights), down, and the lm_head; the
    # attention output projections weight-only
    assert facts["matmuls_rewritten"] == 9
    assert ops.count(INTEGER_GEMM) == facts["integer_gemms"] == 7
    source = [n.op_type for n in onnx.load(str(tiny_gqa_fp32 / "model.onnx")).graph.node]
    assert "MatMulInteger" not in ops and ops.count("Cast") == source.count("Cast")
    # every decoder smoothing is folded into a norm or up's columns, the lm_head's stays a Mul
    # (its input is the logit positions' gather): the other Muls are the activation's two and
    # each GEMM's row scales (its column scales are inside the GEMM)
    assert facts["smoothing_muls"] == 1
    assert ops.count("Mul") == ops.count(INTEGER_GEMM) + 2 * 2 + 1
    assert ops.count("MatMulNBits") == facts["weight_only_int8"] == 2
    assert facts["lm_head_alpha"] == LM_HEAD_ALPHA
    # the one float MatMul left: the lm_head's fp32 channels beside its integer GEMM
    weights = {init.name for init in graph.initializer}
    assert [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights] == \
        [f"{LM_HEAD_OUTPUT}/fp32_channels/MatMul"]
    assert facts["lm_head_fp32_channels"] == LM_HEAD_FP32_CHANNELS
    assert facts["alpha"] == ALPHA and facts["calibration_tokens"] > 0 and facts["reason"]
    assert (folder / "tokenizer.json").is_file()
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float32"
    assert (folder / "genai_config.json").read_bytes() == \
        (tiny_gqa_fp32 / "genai_config.json").read_bytes()


def test_a_token_is_quantized_on_its_own(w8a8) -> None:
    """Per-token scales: a row scores the same alone as next to another row (a per-tensor
    activation scale would let a louder neighbour coarsen it)."""
    from toolkit.runtime.onnx_model import OnnxCausalLM

    model = OnnxCausalLM.from_dir(w8a8[0], threads=1)
    together = model.logits(IDS)
    other = IDS.copy()
    other[1] = IDS[1][::-1]  # another neighbour
    for row in range(len(IDS)):
        alone = model.logits(IDS[row:row + 1])[0]
        np.testing.assert_allclose(together[row], alone, rtol=0, atol=1e-5 * np.abs(alone).max())
    np.testing.assert_allclose(model.logits(other)[0], together[0], rtol=0,
                               atol=1e-5 * np.abs(together[0]).max())


def _one_matmul(weight: np.ndarray, output: str = "y") -> object:
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], [output], name="/proj/MatMul")], "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", weight.shape[0]])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["rows", weight.shape[1]])],
        [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_smoothing_keeps_an_outlier_channel_from_flattening_the_others() -> None:
    import onnxruntime as ort

    rng = np.random.default_rng(3)
    weight = rng.normal(0, 0.05, (64, 32)).astype(np.float32)
    x = rng.normal(0, 1, (16, 64)).astype(np.float32)
    x[:, 7] *= 80  # one activation channel far louder than the rest, as in LLM layers
    exact = x @ weight
    errors = {}
    for alpha in (0.0, 0.9):
        model = _one_matmul(weight)
        assert rewrite_matmuls(model, {"x": np.abs(x).max(axis=0)}, alpha) == 1
        session = ort.InferenceSession(model.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        assert [n.op_type for n in model.graph.node].count(INTEGER_GEMM) == 1
        errors[alpha] = np.abs(session.run(["y"], {"x": x})[0] - exact).max()
    assert errors[0.9] < errors[0.0] / 3, errors


def test_the_lm_heads_widest_channels_run_in_fp32_beside_its_gemm() -> None:
    """LLM.int8's split on the lm_head: its widest calibration channels are multiplied in fp32
    and zeroed for the GEMM, so they no longer set each row's scale."""
    import onnxruntime as ort

    rng = np.random.default_rng(4)
    weight = rng.normal(0, 0.05, (64, 32)).astype(np.float32)
    x = rng.normal(0, 1, (16, 64)).astype(np.float32)
    x[:, [3, 20, 41]] *= 80
    exact = x @ weight
    errors = {}
    for output in ("y", LM_HEAD_OUTPUT):  # the same MatMul as a decoder one, then as the head
        model = _one_matmul(weight, output)
        alpha = LM_HEAD_ALPHA  # the head's strength for both: only the split differs
        assert rewrite_matmuls(model, {"x": np.abs(x).max(axis=0)}, alpha) == 1
        session = ort.InferenceSession(model.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        errors[output] = np.abs(session.run([output], {"x": x})[0] - exact).max()
    ops = [n.op_type for n in model.graph.node]
    assert ops.count(INTEGER_GEMM) == 1 and ops.count("MatMul") == 1 and "Gather" in ops
    fp32 = next(i for i in model.graph.initializer if i.name.endswith("fp32_channels/weight"))
    assert list(fp32.dims) == [LM_HEAD_FP32_CHANNELS, 32]
    assert errors[LM_HEAD_OUTPUT] < errors["y"] / 3, errors


def _int8_weights(model: object) -> object:
    """The graph as onnx-w8a8 exports were written before uint8 weights: the same integer
    levels stored as int8 (zero point 0), so MLAS runs its uint8 x int8 kernel."""
    from onnx import numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    graph.initializer.append(numpy_helper.from_array(np.array(0, dtype=np.int8), "int8_zero"))
    for node in graph.node:
        if node.op_type == INTEGER_GEMM:
            weight = initializers[node.input[1]]
            levels = numpy_helper.to_array(weight).astype(np.int16) - 128
            weight.CopyFrom(numpy_helper.from_array(levels.astype(np.int8), weight.name))
            node.input[5] = "int8_zero"
    return model


def test_integer_products_are_exact_where_int16_pairs_would_saturate(tmp_path: Path) -> None:
    """Full-scale weights of one sign meeting loud activations: every pair of products is
    beyond int16 (255 x 127 x 2), where MLAS's uint8 x int8 kernel saturates on CPUs without
    AVX512-VNNI. The rewrite's output is the exact dequantized product on any CPU, and a row
    of zeros comes out as zeros (its scale is 0, with no guard node). The same levels stored
    as int8 (exports before uint8 weights) are found in the graph, which is what the load-time
    warning rests on, and come out exact only on a VNNI CPU."""
    import onnx
    import onnxruntime as ort

    from toolkit.cpu import cpu_has_vnni
    from toolkit.runtime.onnx_model import int8_weight_gemms

    rng = np.random.default_rng(7)
    weight = np.where(rng.random((64, 24)) < 0.8, 1.0, -1.0).astype(np.float32)
    x = np.abs(rng.normal(0, 1, (5, 64))).astype(np.float32) + 2.0
    x[1] *= -1
    x[3] = 0.0
    row_scale = np.maximum(np.abs(x).max(axis=1, keepdims=True), 1e-30) / 127
    levels = np.clip(np.round(x / row_scale), -127, 127).astype(np.int64)
    exact = (levels @ np.round(weight * 127).astype(np.int64)) * row_scale / 127
    got = {}
    for layout in ("uint8", "int8"):
        model = _one_matmul(weight)
        rewrite_matmuls(model, {"x": np.ones(64, dtype=np.float32)}, 0.0)
        if layout == "int8":
            model = _int8_weights(model)
        onnx.save(model, tmp_path / f"{layout}.onnx")
        assert len(int8_weight_gemms(tmp_path / f"{layout}.onnx")) == (layout == "int8")
        session = ort.InferenceSession(model.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        got[layout] = session.run(["y"], {"x": x})[0]
    assert np.isfinite(got["uint8"]).all() and not got["uint8"][3].any()
    np.testing.assert_allclose(got["uint8"], exact, rtol=1e-5, atol=1e-5)
    assert np.allclose(got["int8"], exact, rtol=1e-5, atol=1e-5) == cpu_has_vnni()


def test_loading_an_int8_weight_export_warns_where_the_cpu_has_no_vnni(
        w8a8, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    import onnx

    import toolkit.cpu
    from toolkit.runtime.onnx_model import ONNX_FILE, OnnxCausalLM

    new, _ = w8a8
    old = tmp_path / "old-w8a8"
    shutil.copytree(new, old, ignore=shutil.ignore_patterns("model.onnx*"))
    onnx.save(_int8_weights(onnx.load(new / ONNX_FILE)), old / ONNX_FILE,
              save_as_external_data=True, location="model.onnx_data")

    def warnings_on_load(flags: set[str], folder: Path) -> list[str]:
        monkeypatch.setattr(toolkit.cpu, "cpu_flags", lambda: frozenset(flags))
        caplog.clear()
        with caplog.at_level("WARNING", logger="toolkit.runtime"):
            OnnxCausalLM.from_dir(folder, threads=1)
        return [r.getMessage() for r in caplog.records]

    (warning,) = warnings_on_load({"avx2"}, old)
    assert str(old) in warning and "int8 weights" in warning
    assert "toolkit export --quantize onnx-w8a8" in warning
    assert warnings_on_load({"avx2", "avx512_vnni"}, old) == []
    assert warnings_on_load({"avx2"}, new) == []


def _mlp(gamma: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> object:
    """RMSNorm -> gate, up -> silu(gate) * up -> down: the builder's MLP."""
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node
    graph = helper.make_graph(
        [node("SimplifiedLayerNormalization", ["x", "gamma"], ["normed"], epsilon=1e-5, axis=-1),
         node("MatMul", ["normed", "gate"], ["g"], name="/gate/MatMul"),
         node("MatMul", ["normed", "up"], ["u"], name="/up/MatMul"),
         node("Sigmoid", ["g"], ["sig"]), node("Mul", ["g", "sig"], ["act"]),
         node("Mul", ["act", "u"], ["h"]),
         node("MatMul", ["h", "down"], ["y"], name="/down/MatMul")], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", gate.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", down.shape[1]])],
        [numpy_helper.from_array(value, name) for name, value in
         (("gamma", gamma), ("gate", gate), ("up", up), ("down", down))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _behind_identities(model: object) -> object:
    """The same MLP with an Identity before each MatMul input: nothing to fold into."""
    from onnx import helper

    nodes = list(model.graph.node)
    for node in nodes:
        if node.op_type == "MatMul":
            node.input[0] += "/copy"
    nodes.insert(1, helper.make_node("Identity", ["normed"], ["normed/copy"]))
    nodes.insert(len(nodes) - 1, helper.make_node("Identity", ["h"], ["h/copy"]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def test_smoothing_folds_into_the_norm_and_up_and_gate_up_share_one_gemm() -> None:
    """Where a constant made the input (the norm's gamma, up's columns) it carries the
    smoothing division, no Mul is left, and the result is the one with the Muls."""
    import onnxruntime as ort

    rng = np.random.default_rng(5)
    gamma = rng.uniform(0.5, 2.0, 64).astype(np.float32)
    gamma[3] = 40.0  # an outlier channel after the norm, as LLM norms have
    gate, up = (rng.normal(0, 0.1, (64, 96)).astype(np.float32) for _ in range(2))
    down = rng.normal(0, 0.1, (96, 64)).astype(np.float32)
    up[:, 11] *= 30  # and one in the down projection's input
    x = rng.normal(0, 1, (16, 64)).astype(np.float32)
    normed = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5) * gamma
    g, u = normed @ gate, normed @ up
    ranges = {"normed": np.abs(normed).max(0), "h": np.abs(g / (1 + np.exp(-g)) * u).max(0)}

    def run(model: object) -> np.ndarray:
        session = ort.InferenceSession(model.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        return session.run(["y"], {"x": x})[0]

    exact = run(_mlp(gamma, gate, up, down))
    folded = _mlp(gamma, gate, up, down)
    assert rewrite_matmuls(folded, ranges, 0.9) == 3
    ops = [n.op_type for n in folded.graph.node]
    assert ops.count(INTEGER_GEMM) == 2 and ops.count("Split") == 1
    assert not [n.name for n in folded.graph.node if n.name.endswith("/Mul_smoothed")]
    with_muls = _behind_identities(_mlp(gamma, gate, up, down))
    rewrite_matmuls(with_muls, {f"{k}/copy": v for k, v in ranges.items()}, 0.9)
    assert len([n for n in with_muls.graph.node if n.name.endswith("/Mul_smoothed")]) == 2
    got, reference = run(folded), run(with_muls)
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-4 * np.abs(exact).max())
    assert np.abs(got - exact).max() < 0.05 * np.abs(exact).max()


def test_errors_name_the_fix(tiny_gqa_fp32: Path, texts: list[str], tmp_path: Path) -> None:
    fix = r"build the fp32 GroupQueryAttention graph first \(.*export_genai_onnx"
    with pytest.raises(ModelSourceError, match="no model.onnx; " + fix):
        quantize_onnx_w8a8(tmp_path, tmp_path / "out", texts)
    not_builder = tmp_path / "optimum-like"
    not_builder.mkdir()
    shutil.copy2(tiny_gqa_fp32 / "model.onnx", not_builder / "model.onnx")
    with pytest.raises(ModelSourceError, match="no genai_config.json; " + fix):
        quantize_onnx_w8a8(not_builder, tmp_path / "out", texts)
    with pytest.raises(ConfigError, match="--calibration"):
        quantize_onnx_w8a8(tiny_gqa_fp32, tmp_path / "out", [])
    with pytest.raises(ConfigError, match="alpha 1.5: choose a value from 0 to 1"):
        quantize_onnx_w8a8(tiny_gqa_fp32, tmp_path / "out", texts, alpha=1.5)
    assert not (tmp_path / "out").exists()
