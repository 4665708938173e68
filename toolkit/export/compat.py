"""Files every export folder shares, and the keys transformers 4.x readers need.

transformers 5 writes `rope_parameters: {rope_theta: ...}` and `tokenizer_class:
TokenizersBackend`. A 4.x reader (an older vLLM, optimum-onnx) silently ignores the first
and falls back to rope_theta 10000 (a wrong model that still "works") and fails on the
second. Adding a top-level `rope_theta` and `PreTrainedTokenizerFast` fixes both; transformers
5 reads the patched files unchanged (checked: same rope_parameters, same tokenizer).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

#: tokenizer, chat template and generation defaults: copied into a format's folder when its
#: exporter did not write them, so every export is self-contained
SUPPORT_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
    "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


def copy_support_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer/template/generation files `dst` lacks; returns their names."""
    copied = []
    for name in SUPPORT_FILES:
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def add_v4_compat(folder: Path) -> dict[str, Any]:
    """Patch config.json and tokenizer_config.json for transformers 4.x readers, in place.

    Returns:
        What was added, for the report.
    """
    added: dict[str, Any] = {}
    config_path = folder / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        rope = config.get("rope_parameters")
        if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in config:
            config["rope_theta"] = rope["rope_theta"]
            added["rope_theta"] = rope["rope_theta"]
            extra = {k: v for k, v in rope.items() if k != "rope_theta"}
            if extra.get("rope_type", "default") != "default" and "rope_scaling" not in config:
                config["rope_scaling"] = extra
                added["rope_scaling"] = extra
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n",
                                   encoding="utf-8")
    tok_path = folder / "tokenizer_config.json"
    if tok_path.is_file() and (folder / "tokenizer.json").is_file():
        tok = json.loads(tok_path.read_text(encoding="utf-8"))
        if tok.get("tokenizer_class") == "TokenizersBackend":
            tok["tokenizer_class"] = "PreTrainedTokenizerFast"
            added["tokenizer_class"] = "PreTrainedTokenizerFast"
            tok_path.write_text(json.dumps(tok, indent=2, ensure_ascii=False) + "\n",
                                encoding="utf-8")
    return added
