"""Huge pages for loaded weights: which mappings are asked for, and that the kernel complies.

The speed it buys is measured by `benchmarks/huge_pages.py`, not asserted here.
"""

from __future__ import annotations

import ctypes
import mmap
import platform
import sys
from pathlib import Path

import pytest

from toolkit.runtime import huge_pages
from toolkit.runtime.huge_pages import (
    HUGE_PAGE,
    anonymous_ranges,
    back_with_huge_pages,
    thp_mode,
)

MB = 1 << 20
MAPS = """\
7f0000100000-7f0000700000 rw-p 00000000 00:00 0
7f0000800000-7f0000900000 rw-p 00000000 00:00 0
55d000000000-55d000600000 rw-p 00000000 00:00 0                          [heap]
7f0001000000-7f0001400000 rw-p 00000000 103:02 1234                      /srv/model.onnx_data
7f0002000000-7f0002400000 r--p 00000000 00:00 0
7ffc00000000-7ffc00400000 rw-p 00000000 00:00 0                          [stack]
"""


def test_only_aligned_parts_of_writable_anonymous_mappings_and_the_heap_are_asked() -> None:
    # 6 MB unaligned -> its aligned 4 MB; 1 MB -> nothing; the heap's 6 MB -> 6 MB (aligned);
    # a file, a read-only mapping and the stack are never touched
    assert anonymous_ranges(MAPS) == [(0x7F0000200000, 0x7F0000600000),
                                      (0x55D000000000, 0x55D000600000)]
    assert all(start % HUGE_PAGE == 0 and end % HUGE_PAGE == 0
               for start, end in anonymous_ranges(MAPS))


def _huge_kb_around(address: int) -> int:
    """AnonHugePages (kB) of the mapping of this process that holds `address`."""
    inside = False
    for line in Path("/proc/self/smaps").read_text(encoding="utf-8").splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            low, high = (int(value, 16) for value in head.split("-"))
            inside = low <= address < high
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    return 0


def _kernel_collapses() -> bool:
    """MADV_COLLAPSE exists from Linux 6.1."""
    major, minor = (int(part) for part in platform.release().split(".")[:2])
    return (major, minor) >= (6, 1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")
def test_a_large_buffer_is_moved_into_huge_pages_where_the_kernel_allows(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # a plain anonymous mapping, as malloc gives ONNX Runtime (numpy asks for huge pages itself)
    weights = mmap.mmap(-1, 64 * MB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    weights.write(b"\x01" * (64 * MB))  # touched: its small pages exist
    # madvise splits a mapping at the advised range: look in the middle, not at its start
    middle = ctypes.addressof(ctypes.c_char.from_buffer(weights)) + 32 * MB
    mode = thp_mode()
    if mode == "madvise":  # nothing asked yet: small pages (under `always` they may be huge)
        assert _huge_kb_around(middle) == 0
        monkeypatch.setenv(huge_pages.ENV, "0")
        assert back_with_huge_pages().reason.startswith("off")
        assert _huge_kb_around(middle) == 0
        monkeypatch.delenv(huge_pages.ENV)
    done = back_with_huge_pages()
    if mode in (None, "never"):
        assert "unavailable" in done.reason
    elif _kernel_collapses():
        assert _huge_kb_around(middle) >= 16 * 1024, done
        assert done.huge_mb >= 32
    else:
        assert "left to khugepaged" in done.reason
    assert weights[:] == b"\x01" * (64 * MB)  # the contents moved with the pages
