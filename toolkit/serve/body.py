"""Reading a request body safely: bounded size, bounded nesting, no value that fails later.

A body is attacker-controlled input that every later layer (pydantic, the tokenizer, SQLite,
`json.dumps` for vLLM and SSE) trusts. Anything that could make one of them raise is refused
here with a 400 naming the field, so no body can turn into a 500 or a cut stream:
- more than `max_body_bytes` (413, before the rest of the body is read);
- nesting deeper than `MAX_JSON_DEPTH` (`json` raises RecursionError near 1,000 levels, and
  `json.dumps` of a body nested 900 deep fails again when forwarded);
- integer literals longer than `MAX_INT_DIGITS` (Python refuses to convert them: ValueError);
- strings holding lone UTF-16 surrogates such as "\\ud800" (valid JSON escapes, but not
  encodable as UTF-8: tokenizers raise TypeError, SSE encoding raises UnicodeEncodeError).
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import Request

from toolkit.serve.protocol import OpenAIError

#: OpenAI bodies nest a handful of levels (messages[0].content[0].text); tool schemas a few more
MAX_JSON_DEPTH = 64
#: Python's own limit on int <-> str conversion (`sys.get_int_max_str_digits`, 4300 by default)
MAX_INT_DIGITS = sys.get_int_max_str_digits() or 4300


@dataclass(frozen=True)
class _HugeInt:
    """Stands in for an integer literal too long to convert, so the walk can name its field."""

    digits: int


def _parse_int(text: str) -> int | _HugeInt:
    digits = len(text.lstrip("-"))
    return int(text) if digits <= MAX_INT_DIGITS else _HugeInt(digits)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw body, refused with 413 as soon as it is known to exceed `max_bytes`.

    A declared `Content-Length` over the limit is refused before reading anything; a chunked
    body is refused once the bytes received pass it, so a client never makes the gateway buffer
    more than the limit. The 413 closes the connection: the rest of the body is never read.

    Raises:
        OpenAIError: 413 `request_too_large`.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(int(declared), max_bytes)
    received = bytearray()
    async for chunk in request.stream():
        received += chunk
        if len(received) > max_bytes:
            raise _too_large(len(received), max_bytes)
    return bytes(received)


def _too_large(size: int, max_bytes: int) -> OpenAIError:
    return OpenAIError(
        413, f"the request body has at least {size} bytes, over the server's limit of "
        f"{max_bytes} (max_body_bytes); shorten the prompt or raise --max-body-bytes",
        code="request_too_large", headers={"Connection": "close"},
    )


def load_json(body: bytes) -> Any:
    """The decoded JSON, checked so every later layer can take it.

    Depth is measured on the bytes; the walk that names a field holding a huge integer or a
    lone surrogate runs only when the parse failed or a byte pattern says it will find one
    (walking 300k list items costs ~0.25 s of GIL time, which would slow every thread).

    Raises:
        OpenAIError: 400 for malformed JSON, deep nesting, huge integers or lone surrogates,
            naming the field.
    """
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OpenAIError(400, f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise OpenAIError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels; "
                          "flatten it", code="nesting_too_deep") from None
    except ValueError:  # an integer literal over Python's conversion limit: find where
        with contextlib.suppress(RecursionError):
            _check_values(json.loads(body, parse_int=_parse_int), strings=False)
        raise OpenAIError(400, f"an integer has more than {MAX_INT_DIGITS} digits; send a "
                          "smaller number") from None
    if json.detect_encoding(body) != "utf-8":  # the byte tests below read UTF-8 (or ASCII)
        body = json.dumps(value).encode()
    if _LONE_SURROGATE.search(body):  # first: the messages below may quote keys
        _check_values(value, strings=True)
    if _nesting(body) > MAX_JSON_DEPTH:
        deep = [key for key, item in value.items() if _nesting(json.dumps(item).encode()) >=
                MAX_JSON_DEPTH] if isinstance(value, dict) else []
        raise OpenAIError(400, f"{deep[0] if deep else 'the body'}: nested deeper than "
                          f"{MAX_JSON_DEPTH} levels; flatten it", param=deep[0] if deep else None,
                          code="nesting_too_deep")
    return value


#: a lone UTF-16 surrogate escape (a pair such as "\\ud83d\\ude00" is an emoji, and fine), or a
#: raw encoded surrogate (json decodes bytes with `surrogatepass`); an escaped backslash before
#: "ud800" can match too, so a match only sends the body to the exact walk
_LONE_SURROGATE = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])"
    rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}"
    rb"|\xed[\xa0-\xbf]"
)


def _nesting(body: bytes) -> int:
    """The deepest bracket nesting of valid JSON, at C speed (brackets in strings ignored).

    Walking the decoded value in Python costs ~1 us per item, 0.25 s for a 1 MB list, held
    under the GIL in slices that slow every other thread; this costs milliseconds.
    """
    # once escaped backslashes and quotes are gone, every '"' delimits a string
    plain = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside = b"".join(plain.split(b'"')[::2])
    brackets = np.frombuffer(outside.translate(None, _NOT_BRACKETS), dtype=np.uint8)
    if not brackets.size:
        return 0
    steps = np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def _check_values(value: Any, strings: bool) -> None:
    """Walk the decoded body without recursion and refuse the first value no layer can take."""
    kinds: tuple[type, ...] = (dict, list, _HugeInt, str) if strings else (dict, list, _HugeInt)
    stack: list[tuple[Any, tuple[str, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if len(path) > MAX_JSON_DEPTH:
            raise OpenAIError(400, f"{_name(path[:3])}: nested deeper than {MAX_JSON_DEPTH} "
                              "levels; flatten it", param=_name(path[:1]), code="nesting_too_deep")
        if isinstance(item, _HugeInt):
            raise OpenAIError(400, f"{_name(path)}: an integer with {item.digits} digits is "
                              f"too large (at most {MAX_INT_DIGITS}); send a smaller number",
                              param=_name(path))
        if isinstance(item, str):
            _check_text(item, path)
        elif isinstance(item, dict):
            for key, child in item.items():
                if strings:
                    _check_text(key, path)
                if isinstance(child, kinds):
                    stack.append((child, (*path, key)))
        elif isinstance(item, list):
            stack.extend((child, (*path, str(i))) for i, child in enumerate(item)
                         if isinstance(child, kinds))


def _check_text(text: str, path: tuple[str, ...]) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise OpenAIError(400, f"{_name(path) or 'body'}: the text holds a lone UTF-16 surrogate "
                          "(such as \\ud800), which is not a character; send valid Unicode",
                          param=_name(path)) from None


def _name(path: tuple[str, ...]) -> str | None:
    """`messages.0.content`, the dotted form `validation_error` uses for pydantic errors."""
    return ".".join(path) or None
