"""CPU LoRA tuning: the cheap dropout keeps dropout's contract; skipping input casts keeps outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from toolkit.train.cpu_lora import CpuDropout, tune_lora_for_cpu


def test_cpu_dropout_keeps_one_minus_p_and_rescales() -> None:
    torch.manual_seed(0)
    x = torch.rand(1000, 1000) + 1.0  # no zeros: a zero in the output means dropped
    drop = CpuDropout(0.1).train()
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 3e-3  # 1e6 draws: std 3e-4
    assert torch.allclose(y[kept], x[kept] / 0.9)
    rows = kept.float().mean(dim=1)  # every lane of the 64-bit draws is uniform, not just some
    assert abs(rows.mean().item() - 0.9) < 3e-3 and rows.min().item() > 0.8
    for lane in range(4):
        assert abs(kept.flatten()[lane::4].float().mean().item() - 0.9) < 5e-3


def test_cpu_dropout_is_seeded_differentiable_and_off_in_eval() -> None:
    x = torch.randn(37, 29, requires_grad=True)
    drop = CpuDropout(0.25).train()
    torch.manual_seed(3)
    first = drop(x)
    torch.manual_seed(3)
    assert torch.equal(first, drop(x))
    assert not torch.equal(first, drop(x))  # a fresh mask on the next call
    first.sum().backward()
    assert torch.equal(x.grad, (first != 0).float() / 0.75)
    assert drop.eval()(x) is x
    assert CpuDropout(0.0).train()(x) is x
    with pytest.raises(ValueError, match="dropout p"):
        CpuDropout(1.0)


def _tiny_lora(tiny_model_dir: Path, dtype: torch.dtype, dropout: float) -> nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                        target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                        init_lora_weights=False)  # nonzero B: the adapters change the output
    return get_peft_model(base, config, autocast_adapter_dtype=True)


def test_tune_swaps_every_lora_dropout_and_keeps_the_adapter(tiny_model_dir: Path) -> None:
    model = _tiny_lora(tiny_model_dir, torch.float32, dropout=0.1)
    keys = set(model.state_dict())
    layers = model.get_base_model().config.num_hidden_layers
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    assert tune_lora_for_cpu(model, under_autocast=False) == 2 * layers
    dropouts = [d for m in model.modules() if isinstance(getattr(m, "lora_dropout", None),
                                                          nn.ModuleDict)
                for d in m.lora_dropout.values()]
    assert dropouts and all(isinstance(d, CpuDropout) for d in dropouts)
    assert set(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    model.train()
    torch.manual_seed(0)
    model(input_ids=ids).logits.sum().backward()  # trains through the new dropout
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_skipping_input_casts_under_autocast_keeps_bf16_outputs(tiny_model_dir: Path) -> None:
    from toolkit.config import Precision
    from toolkit.train.model import Hardware

    autocast = Hardware("cpu", "c", Precision.bf16, Precision.bf16).autocast
    model = _tiny_lora(tiny_model_dir, torch.bfloat16, dropout=0.0).eval()
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 2]])
    with torch.no_grad(), autocast():
        casting = model(input_ids=ids).logits.float()
    tune_lora_for_cpu(model, under_autocast=True)
    flags = [m.cast_input_dtype_enabled for m in model.modules()
             if hasattr(m, "cast_input_dtype_enabled")]
    assert flags and not any(flags)
    with torch.no_grad(), autocast():
        direct = model(input_ids=ids).logits.float()
    assert torch.allclose(direct, casting, atol=2e-2, rtol=2e-2)
    with torch.no_grad(), autocast(), model.disable_adapter():  # the check sees the adapters
        base = model(input_ids=ids).logits.float()
    assert not torch.allclose(direct, base, atol=2e-2, rtol=2e-2)
