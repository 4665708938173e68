"""`StepBackend` over a transformers causal LM.

Batched decoding keeps one `DynamicCache` for the running batch. Rows are left-padded: a newly
prefilled group is merged in by padding the shorter cache on the left (masked zeros), and
columns that every remaining row masks out are trimmed when rows leave. Position ids are passed
explicitly, so a row's positions ignore the padding in front of it.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np


class TorchState:
    """The running batch: its KV cache, attention mask and next position per row."""

    def __init__(self, cache: Any, mask: Any, next_pos: Any) -> None:
        self.cache = cache
        self.mask = mask
        self.next_pos = next_pos


class TorchStepBackend:
    """`StepBackend` over a transformers causal LM."""

    def __init__(self, model: Any, pad_id: int) -> None:
        import torch

        self.torch = torch
        self.model = model
        self.pad_id = pad_id
        self.device = next(model.parameters()).device
        layer_types = getattr(model.config.get_text_config(decoder=True), "layer_types", None) or []
        # sliding-window layers keep a rolling cache that cannot be left-padded and merged
        self.can_merge = not any("sliding" in str(t) for t in layer_types)
        # transformers 5.2x renamed `past_key_values` to `cache` (the old name warns)
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._keep_arg = "logits_to_keep" in params

    def _forward(self, ids: Any, mask: Any, positions: Any, cache: Any) -> tuple[Any, np.ndarray]:
        kwargs = {self._cache_arg: cache}
        if self._keep_arg:
            kwargs["logits_to_keep"] = 1
        with self.torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                             use_cache=True, **kwargs)
        logits = out.logits[:, -1, :].float().cpu().numpy()
        return getattr(out, self._cache_arg), logits

    def prefill(self, prompts: list[list[int]],
                cache_salts: list[str | None] | None = None) -> tuple[TorchState, np.ndarray]:
        torch = self.torch
        from transformers import DynamicCache

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        cache, logits = self._forward(ids, mask, positions, DynamicCache(config=self.model.config))
        return TorchState(cache, mask, positions[:, -1] + 1), logits

    def decode(self, state: TorchState, tokens: np.ndarray) -> tuple[TorchState, np.ndarray]:
        torch = self.torch
        ids = torch.as_tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        mask = torch.cat([state.mask, torch.ones((len(tokens), 1), dtype=torch.long,
                                                 device=self.device)], dim=1)
        cache, logits = self._forward(ids, mask, state.next_pos[:, None], state.cache)
        return TorchState(cache, mask, state.next_pos + 1), logits

    def select(self, state: TorchState, rows: list[int]) -> TorchState:
        index = self.torch.as_tensor(rows, dtype=self.torch.long, device=self.device)
        state.cache.batch_select_indices(index)
        mask, next_pos = state.mask[index], state.next_pos[index]
        first = int(mask.any(dim=0).nonzero()[0]) if mask.numel() else 0
        if first > 0:  # columns that only padding uses: drop them from the mask and the cache
            mask = mask[:, first:]
            for layer in state.cache.layers:
                layer.keys = layer.keys[:, :, first:]
                layer.values = layer.values[:, :, first:]
        return TorchState(state.cache, mask, next_pos)

    def merge(self, first: TorchState, second: TorchState) -> TorchState:
        torch = self.torch
        from transformers import DynamicCache

        width = max(first.mask.shape[1], second.mask.shape[1])

        def pad(tensor: Any, dim: int) -> Any:
            missing = width - tensor.shape[dim]
            if missing == 0:
                return tensor
            shape = list(tensor.shape)
            shape[dim] = missing
            return torch.cat([torch.zeros(shape, dtype=tensor.dtype, device=tensor.device),
                              tensor], dim=dim)

        layers = [(torch.cat([pad(a.keys, 2), pad(b.keys, 2)]),
                   torch.cat([pad(a.values, 2), pad(b.values, 2)]))
                  for a, b in zip(first.cache.layers, second.cache.layers)]
        mask = torch.cat([pad(first.mask, 1), pad(second.mask, 1)])
        return TorchState(DynamicCache(ddp_cache_data=layers), mask,
                          torch.cat([first.next_pos, second.next_pos]))
