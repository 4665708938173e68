"""`StepBackend` over an `OnnxCausalLM` session.

Same graph contract as `onnx_model` (`input_ids`, `attention_mask`, `position_ids`,
`past_key_values.{i}.key/value` in, `logits` and `present.*` out). `OnnxCausalLM.generate`
decodes one fixed batch; serving needs requests to join a running batch at step boundaries,
so this backend drives the session step by step with the same feeds and keeps the KV arrays
itself (numpy: left-pad to merge, slice to drop rows).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from toolkit.runtime.facts import DEFAULT_CONTEXT_LENGTH
from toolkit.runtime.onnx_model import left_pad

_KV_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OrtState:
    """The running batch: KV arrays (batch, heads, seq, dim), attention mask, next positions."""

    def __init__(self, past: list[np.ndarray], mask: np.ndarray, next_pos: np.ndarray) -> None:
        self.past = past
        self.mask = mask
        self.next_pos = next_pos


class OrtKvLayout:
    """A session's KV cache tensors: their names, heads, head size and dtype, read from the graph.

    Both ONNX step backends (this module's and `onnx_shared_kv`'s) feed the same
    `past_key_values.{i}.key/value` inputs and read the same `present.*` outputs.
    """

    def __init__(self, lm: Any) -> None:
        self.session = lm.session
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [f"past_key_values.{i}.{kind}" for i in range(lm.num_layers)
                           for kind in ("key", "value")]
        self.present_names = [n.replace("past_key_values", "present") for n in self.past_names]
        self.kv_heads, self.head_dim = lm.num_kv_heads, lm.head_dim
        self.kv_dtype = _KV_TYPES.get(inputs[self.past_names[0]].type, np.float32)
        self.has_positions = "position_ids" in inputs


class OrtStepBackend(OrtKvLayout):
    """`StepBackend` over an `OnnxCausalLM` session."""

    can_merge = True

    def _run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray,
             past: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
        feed = {"input_ids": ids, "attention_mask": mask, **dict(zip(self.past_names, past))}
        if self.has_positions:
            feed["position_ids"] = positions
        outputs = self.session.run(["logits", *self.present_names], feed)
        return outputs[1:], np.asarray(outputs[0][:, -1], dtype=np.float32)

    def prefill(self, prompts: list[list[int]],
                cache_salts: list[str | None] | None = None) -> tuple[OrtState, np.ndarray]:
        ids, mask = left_pad(prompts)
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int64)
        empty = [np.zeros((len(prompts), self.kv_heads, 0, self.head_dim), dtype=self.kv_dtype)
                 for _ in self.past_names]
        past, logits = self._run(ids, mask, positions, empty)
        return OrtState(past, mask, positions[:, -1] + 1), logits

    def decode(self, state: OrtState, tokens: np.ndarray) -> tuple[OrtState, np.ndarray]:
        mask = np.concatenate([state.mask, np.ones((len(tokens), 1), dtype=np.int64)], axis=1)
        past, logits = self._run(np.asarray(tokens, dtype=np.int64)[:, None], mask,
                                 state.next_pos[:, None], state.past)
        return OrtState(past, mask, state.next_pos + 1), logits

    def select(self, state: OrtState, rows: list[int]) -> OrtState:
        index = np.asarray(rows)
        mask = state.mask[index]
        used = np.flatnonzero(mask.any(axis=0))
        first = int(used[0]) if used.size else 0
        return OrtState([p[index][:, :, first:] for p in state.past], mask[:, first:],
                        state.next_pos[index])

    def merge(self, first: OrtState, second: OrtState) -> OrtState:
        width = max(first.mask.shape[1], second.mask.shape[1])

        def pad(array: np.ndarray, axis: int) -> np.ndarray:
            missing = width - array.shape[axis]
            if missing == 0:
                return array
            widths = [(0, 0)] * array.ndim
            widths[axis] = (missing, 0)
            return np.pad(array, widths)

        past = [np.concatenate([pad(a, 2), pad(b, 2)]) for a, b in zip(first.past, second.past)]
        mask = np.concatenate([pad(first.mask, 1), pad(second.mask, 1)])
        return OrtState(past, mask, np.concatenate([first.next_pos, second.next_pos]))


def step_backend(lm: Any, capacity: int | None = None, prefix_cache_bytes: int = 0) -> Any:
    """The `StepBackend` for this graph: in-place KV for builder graphs, else `OrtStepBackend`.

    Args:
        lm: an `OnnxCausalLM`.
        capacity: tokens per sequence (prompt + answer) a builder graph's KV buffers hold;
            None takes the graph's own context length (memory is committed as it is used).
        prefix_cache_bytes: a builder graph's prompt-prefix KV cache budget (0: none). The
            optimum graph has none: its cache is rewritten by every step's Concat anyway.
    """
    if lm.is_shared_kv:
        from toolkit.runtime.onnx_shared_kv import SharedKvStepBackend
        from toolkit.runtime.prefix_cache import PrefixCache

        cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        return SharedKvStepBackend(lm, capacity or lm.context_length or DEFAULT_CONTEXT_LENGTH,
                                   prefix_cache=cache)
    return OrtStepBackend(lm)


def providers() -> tuple[str, ...]:
    """CUDA first when onnxruntime-gpu offers it, else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return ("CUDAExecutionProvider", "CPUExecutionProvider")
    return ("CPUExecutionProvider",)
