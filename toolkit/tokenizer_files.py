"""Tidy the tokenizer files a save leaves behind, for every folder toolkit hands out.

transformers 5 writes the load-time arguments back into `tokenizer_config.json`
(`local_files_only`, `is_local`): a copy on another machine would then refuse to download
anything. A tokenizer converted from GGUF has no length and gets `model_max_length`
1e30 (transformers' "very large integer"), so truncation and engines that read it
(vLLM, TGI) see no context limit; the model's real context length goes there instead.
"""

from __future__ import annotations

import json
from pathlib import Path

TOKENIZER_CONFIG = "tokenizer_config.json"
#: arguments of the load that produced the tokenizer, not properties of the tokenizer
LOAD_TIME_KEYS = ("local_files_only", "is_local", "cache_dir", "force_download", "token")
#: anything above this is transformers' placeholder for "no limit" (int(1e30))
NO_LIMIT = 10**12


def tidy_tokenizer_config(folder: Path, max_length: int | None) -> list[str]:
    """Drop load-time keys and set a placeholder `model_max_length` to `max_length`.

    Returns:
        The keys changed (empty when the file is absent or already clean).
    """
    path = Path(folder) / TOKENIZER_CONFIG
    if not path.is_file():
        return []
    config = json.loads(path.read_text(encoding="utf-8"))
    changed = [key for key in LOAD_TIME_KEYS if config.pop(key, None) is not None]
    current = config.get("model_max_length")
    if max_length is not None and (not isinstance(current, (int, float)) or current > NO_LIMIT):
        config["model_max_length"] = int(max_length)
        changed.append("model_max_length")
    if changed:
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return changed
