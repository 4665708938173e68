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


def test_integer_products_are_exact_where_int16_pairs_would_saturate() -> None:
    """Full-scale weights of one sign meeting loud activations: every pair of products is
    beyond int16 (255 x 127 x 2), where MLAS's uint8 x int8 kernel saturates on CPUs without
    VNNI. Whichever sign the weights are given (`retype_weights`: int8 where the probe found
    uint8 x int8 exact here), the output is the exact dequantized product, and a row of zeros
    comes out as zeros (its scale is 0, with no guard node). Stored as int8 and left so (the
    exports before uint8 weights), the same levels are exact only where the probe says so,
    which is what the probe measures and the CPU's flags predict."""
    import onnxruntime as ort

    from toolkit.cpu import cpu_has_vnni
    from toolkit.runtime.integer_weights import retype_weights, signed_weights_exact

    rng = np.random.default_rng(7)
    weight = np.where(rng.random((64, 24)) < 0.8, 1.0, -1.0).astype(np.float32)
    x = np.abs(rng.normal(0, 1, (5, 64))).astype(np.float32) + 2.0
    x[1] *= -1
    x[3] = 0.0
    row_scale = np.maximum(np.abs(x).max(axis=1, keepdims=True), 1e-30) / 127
    levels = np.clip(np.round(x / row_scale), -127, 127).astype(np.int64)
    exact = (levels @ np.round(weight * 127).astype(np.int64)) * row_scale / 127
    assert signed_weights_exact() == cpu_has_vnni()

    def run(stored_as_int8: bool, retype_to: bool | None) -> tuple[int, np.ndarray]:
        model = _one_matmul(weight)
        rewrite_matmuls(model, {"x": np.ones(64, dtype=np.float32)}, 0.0)
        if stored_as_int8:
            model = _int8_weights(model)
        changed = 0 if retype_to is None else retype_weights(model, signed=retype_to)
        session = ort.InferenceSession(model.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        return changed, session.run(["y"], {"x": x})[0]

    for stored_as_int8 in (False, True):
        for retype_to in (False, True):
            changed, got = run(stored_as_int8, retype_to)
            assert changed == (stored_as_int8 != retype_to)
            if retype_to and not signed_weights_exact():
                continue  # int8 weights on a CPU that saturates them: shown below
            assert np.isfinite(got).all() and not got[3].any()
            np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-5)
    _, as_stored = run(True, None)
    assert np.allclose(as_stored, exact, rtol=1e-5, atol=1e-5) == signed_weights_exact()


def test_retyping_leaves_gemms_whose_weights_cannot_fold_or_whose_activations_are_signed(
) -> None:
    """Only constant weights and zero points fold into constants at load, and MLAS has no
    int8 x uint8 kernel: such GEMMs keep their weights. An absent weight zero point is 0 of
    the old sign, so retyped weights get -128 (int8) and compute the same sums."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from toolkit.runtime.integer_weights import retype_weights

    rng = np.random.default_rng(8)
    b = rng.integers(0, 256, (32, 8)).astype(np.uint8)
    a = rng.integers(0, 256, (3, 32)).astype(np.uint8)

    def gemm(activation_zero: np.ndarray, weight_as_input: bool = False) -> object:
        inputs = [helper.make_tensor_value_info("a", TensorProto.UINT8, ["rows", 32])]
        initializers = [numpy_helper.from_array(activation_zero, "a_zero")]
        if weight_as_input:
            inputs.append(helper.make_tensor_value_info("b", TensorProto.UINT8, [32, 8]))
        initializers.append(numpy_helper.from_array(b, "b"))
        graph = helper.make_graph(
            [helper.make_node("MatMulInteger", ["a", "b", "a_zero"], ["y"])], "gemm", inputs,
            [helper.make_tensor_value_info("y", TensorProto.INT32, ["rows", 8])], initializers)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])

    assert retype_weights(gemm(np.array(0, np.uint8), weight_as_input=True), signed=True) == 0
    assert retype_weights(gemm(np.array(0, np.int8)), signed=True) == 0
    model = gemm(np.array(3, np.uint8))
    assert retype_weights(model, signed=True) == 1
    assert "b/int8" in model.graph.node[-1].input
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(["y"], {"a": a})[0],
                                  (a.astype(np.int64) - 3) @ b.astype(np.int64))


def test_the_engine_opens_integer_gemms_with_the_sign_this_cpu_multiplies_exactly(
        w8a8, tiny_gqa_fp32: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """An export with uint8 weights (today's onnx-w8a8) and one with int8 weights (before
    them) load with the sign the probe picks, from their own external data (nothing is
    written beside them), and score alike; a graph without integer GEMMs loads as stored."""
    import onnx

    from toolkit.runtime import integer_weights
    from toolkit.runtime.onnx_model import ONNX_FILE, OnnxCausalLM

    new, _ = w8a8
    old = tmp_path / "old-w8a8"
    shutil.copytree(new, old, ignore=shutil.ignore_patterns("model.onnx*"))
    onnx.save(_int8_weights(onnx.load(new / ONNX_FILE)), old / ONNX_FILE,
              save_as_external_data=True, location="model.onnx_data")
    gemms = [n.op_type for n in onnx.load(new / ONNX_FILE, load_external_data=False).graph.node
             ].count(INTEGER_GEMM)
    files = {folder: sorted(p.name for p in folder.iterdir()) for folder in (new, old)}
    reference = None

    def load(folder: Path, signed: bool) -> tuple[list[str], np.ndarray]:
        monkeypatch.setattr(integer_weights, "signed_weights_exact", lambda: signed)
        caplog.clear()
        with caplog.at_level("INFO", logger="toolkit.runtime"):
            logits = OnnxCausalLM.from_dir(folder, threads=1).logits(IDS)
        return [r.getMessage() for r in caplog.records if "integer GEMM" in r.getMessage()], logits

    exact_here = integer_weights.signed_weights_exact()
    for folder, stored_signed in ((new, False), (old, True)):
        for signed in (False, True):
            messages, logits = load(folder, signed)
            if signed == stored_signed:
                assert messages == []
            else:
                (message,) = messages
                assert str(folder) in message and f"{gemms} integer GEMM(s)" in message
                assert ("int8 weights" if signed else "uint8 weights") in message
            if signed and not exact_here:
                continue  # int8 weights on a CPU that saturates them
            if reference is None:
                reference = logits
            np.testing.assert_allclose(logits, reference, rtol=1e-5, atol=1e-5)
    assert {folder: sorted(p.name for p in folder.iterdir()) for folder in (new, old)} == files
    assert integer_weights.graph_for_this_cpu(tiny_gqa_fp32 / ONNX_FILE) is None
    # the sign is measured on the CPU's kernels: a GPU provider first keeps the graph as stored
    # (onnxruntime without CUDA falls back to the CPU, with a warning)
    monkeypatch.setattr(integer_weights, "signed_weights_exact", lambda: False)
    caplog.clear()
    with caplog.at_level("INFO", logger="toolkit.runtime"), pytest.warns(UserWarning):
        OnnxCausalLM.from_dir(old, threads=1,
                              providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
    assert not [r for r in caplog.records if "integer GEMM" in r.getMessage()]


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
