"""Two per-call costs of peft's LoRA layers that a CPU run removes: dropout masks, input casts.

Dropout: peft puts an `nn.Dropout` before every adapter's A matrix. On a CPU, torch draws its mask
with `bernoulli_`, one generator call per element: for SmolLM2's q/v adapters that was 8%
of a training step here (1.8 ms for a 458 x 576 activation, 60 calls per forward), more than
the adapters' own matmuls. `CpuDropout` draws 64 random bits per four elements (16 bits
each, compared against a threshold), which is 2.6x cheaper and keeps dropout's contract:
each element kept with probability 1 - p (to within 2**-16), kept elements scaled by
1 / (1 - p), identity in eval mode, the same seeded torch generator. On CUDA torch's fused
dropout is already cheap, so GPU runs keep peft's module.

Input casts: peft casts each adapter's input to the adapter's dtype (fp32) before dropout and
A. In a bf16 run under autocast that copy is pure waste: autocast casts A's input back to
bf16 for the matmul. Skipping it (peft's `cast_input_dtype_enabled`) gained 4% of a step
here; it requires every forward, evaluation included, to run under autocast.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_LANES = 4  # int16 lanes per int64 draw
_SPAN = 1 << 16


class CpuDropout(nn.Module):
    """Dropout with p to 2**-16 precision whose mask costs one 64-bit draw per 4 elements."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout p must be in [0, 1), got {p}")
        self.p = p
        self.scale = 1.0 / (1.0 - p)
        # an element is dropped when its uniform int16 falls below this
        self.threshold = -(_SPAN // 2) + round(p * _SPAN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        n = x.numel()
        bits = torch.empty((n + _LANES - 1) // _LANES, dtype=torch.int64, device=x.device)
        bits.random_(-(1 << 63), (1 << 63) - 1)
        lanes = bits.view(torch.int16)[:n].view(x.shape)
        keep = (lanes >= self.threshold).to(x.dtype)
        return x * (keep * self.scale)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def tune_lora_for_cpu(model: Any, under_autocast: bool) -> int:
    """Swap every LoRA `nn.Dropout` of a peft model for `CpuDropout`; returns how many.

    With `under_autocast` (a bf16 run: training and evaluation both autocast), the adapters
    also stop casting their input to fp32. Neither change touches a parameter or state-dict
    key, so the saved adapter is the same as with peft's modules.
    """
    swapped = 0
    for module in model.modules():
        if under_autocast and hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, dropout in list(dropouts.items()):
            if isinstance(dropout, nn.Dropout) and dropout.p > 0:
                dropouts[name] = CpuDropout(dropout.p).train(dropout.training)
                swapped += 1
    return swapped
