""""Did you mean" hints for a mistyped name among known ones (config keys, data labels)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The choice `word` most likely meant, or None when nothing is close.

    Tried in order: the same name in another case (`FR` for `fr`), difflib's closest match,
    then a choice that is a prefix of the word (`rank` for LoRA's `r`: too short for
    difflib's ratio, yet the usual long spelling of it).
    """
    options = list(choices)
    folded = [c for c in options if c.casefold() == word.casefold()]
    if folded:
        return folded[0]
    matches = difflib.get_close_matches(word, options, n=1)
    if matches:
        return matches[0]
    prefixes = [c for c in options if word.casefold().startswith(c.casefold())]
    return max(prefixes, key=len) if prefixes else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """` (did you mean 'x'?)` to append to a message, or "" when nothing is close."""
    match = closest(word, choices)
    return f" (did you mean {match!r}?)" if match is not None else ""
