"""The adapter side path of `onnx-int4` (`export.onnx_lora`) on the tiny model: taking a LoRA
adapter out of the builder's merged fp32 graph and adding it back as fp32 MatMuls changes no
logit, leaves exactly the base weights for the quantizer (q and v inside the fused qkv_proj),
survives quantization in fp32, and anything it cannot place exactly is left merged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install 'toolkit[onnx]'")
pytest.importorskip("onnx_ir", reason="the onnx extra is not installed: pip install 'toolkit[onnx]'")

from tests.artifact_builders import save_lora_adapter

IDS = np.random.default_rng(1).integers(1, 200, (2, 20))


@pytest.fixture(scope="module")
def merged_graph(tiny_model_dir: Path, tmp_path_factory) -> tuple[Path, Path]:
    """(adapter folder, the builder's fp32 graph of base + adapter merged)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolkit.export.onnx_genai import export_genai_onnx

    root = tmp_path_factory.mktemp("lora-side")
    adapter = save_lora_adapter(tiny_model_dir, root / "adapter", scale=0.3)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    merged.save_pretrained(root / "merged")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(root / "merged")
    export_genai_onnx(root / "merged", root / "fp32", "fp32")
    return adapter, root / "fp32"


def _decoder(folder: Path) -> dict:
    return json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]


def _logits(folder: Path) -> np.ndarray:
    from toolkit.runtime.onnx_model import OnnxCausalLM

    return OnnxCausalLM.from_dir(folder, threads=1).logits(IDS)


def _weights(folder: Path, name: str) -> np.ndarray:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(folder / "model.onnx"))
    node = next(n for n in model.graph.node if n.name == name)
    init = next(i for i in model.graph.initializer if i.name == node.input[1])
    return numpy_helper.to_array(init)


def test_split_keeps_every_logit_and_leaves_the_base_weights(merged_graph, tiny_gqa_fp32,
                                                              tmp_path):
    import onnx

    from toolkit.export.onnx_lora import split_adapter

    adapter, fp32 = merged_graph
    split = tmp_path / "split"
    shutil.copytree(fp32, split)
    model = onnx.load(str(split / "model.onnx"))
    facts = split_adapter(model, adapter, _decoder(split))
    assert facts is not None and facts["modules"] == ["q_proj", "v_proj"] and facts["rank"] == 8
    assert facts["matmuls"] == 2  # one fused qkv_proj per layer of the 2-layer tiny model
    onnx.save_model(model, str(split / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data")
    np.testing.assert_allclose(_logits(split), _logits(fp32), atol=1e-4)
    qkv = "/model/layers.1/attn/qkv_proj/MatMul"
    # the merged weights moved (the adapter is not a no-op) and the split ones are the base's
    assert np.abs(_weights(fp32, qkv) - _weights(tiny_gqa_fp32, qkv)).max() > 1e-3
    np.testing.assert_allclose(_weights(split, qkv), _weights(tiny_gqa_fp32, qkv), atol=1e-5)


def test_int4_export_keeps_the_side_path_in_fp32(merged_graph, tmp_path):
    import onnx

    from toolkit.export.onnx_int4 import quantize_onnx_int4
    from toolkit.export.onnx_lora import SIDE

    adapter, fp32 = merged_graph
    facts = quantize_onnx_int4(fp32, tmp_path / "int4", adapter_dir=adapter)
    assert facts["adapter"]["modules"] == ["q_proj", "v_proj"]
    # 2 layers x r 8 x (q: in 64 + out 64, v: in 64 + out 32)
    assert facts["adapter"]["parameters"] == 2 * 8 * ((64 + 64) + (64 + 32))
    model = onnx.load(str(tmp_path / "int4" / "model.onnx"), load_external_data=False)
    side = [n for n in model.graph.node if SIDE in n.name and n.op_type.startswith("MatMul")]
    assert len(side) == 4 and {n.op_type for n in side} == {"MatMul"}
    assert sum(n.op_type == "MatMulNBits" for n in model.graph.node) >= 8
    error = np.abs(_logits(tmp_path / "int4") - _logits(fp32)).max()
    assert np.isfinite(error) and error < 5.0


def test_an_adapter_it_cannot_place_exactly_is_left_merged(merged_graph, tmp_path):
    import onnx

    from toolkit.export.onnx_lora import split_adapter

    adapter, fp32 = merged_graph
    dora = tmp_path / "dora"
    shutil.copytree(adapter, dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    model = onnx.load(str(fp32 / "model.onnx"))
    before = model.SerializeToString()
    assert split_adapter(model, dora, _decoder(fp32)) is None
    assert model.SerializeToString() == before
