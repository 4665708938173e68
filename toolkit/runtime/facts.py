"""What every stage must agree on about a model folder before it generates from it.

Export measures, compare scores and serve answers with the same end-of-reply tokens and
the same context length, read here. Only the standard library is imported (serve resolves
its model before any engine loads).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: the context length assumed when a folder's config names none
DEFAULT_CONTEXT_LENGTH = 2048
#: config.json keys that hold a context length, in the order transformers' families use them
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
#: ChatML's end of turn: a reply ends there even when the tokenizer's EOS is another token
CHATML_END = "<|im_end|>"


def eos_token_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """Tokens that end a reply: the generation config's, the tokenizer's EOS, and ChatML's
    `<|im_end|>` when the vocabulary has it (toolkit's default template ends turns with it)."""
    ids: list[int] = []

    def add(value: Any) -> None:
        if isinstance(value, int) and not isinstance(value, bool) and value not in ids:
            ids.append(int(value))

    configured = getattr(generation_config, "eos_token_id", None) if generation_config else None
    for value in configured if isinstance(configured, list) else [configured]:
        add(value)
    add(tokenizer.eos_token_id)
    if CHATML_END in tokenizer.get_vocab():
        add(tokenizer.convert_tokens_to_ids(CHATML_END))
    return ids


def pad_token_id(tokenizer: Any) -> int:
    """The id batched rows are left-padded with (masked out): pad, else EOS, else 0."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad or 0)


def context_length(model_dir: Path | str) -> int | None:
    """The folder's context length from config.json (its text config for multimodal models),
    or None when it names none."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text(encoding="utf-8"))
    for section in (config, config.get("text_config") or {}):
        for key in CONTEXT_KEYS:
            value = section.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None
