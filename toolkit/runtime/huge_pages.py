"""Transparent huge pages for the weights a decode step streams.

One decode step reads every weight once: SmolLM2-135M in int8 is 134 MB in ~120 matrices that
ONNX Runtime copies (prepacks) into its own heap allocations at load. With 4 KB pages that is
~33,000 page translations per token, most of them TLB misses; a 2 MB page covers 512 of them.
Linux gives anonymous memory huge pages only where a program asks when THP is in `madvise`
mode, the default of most distributions (`/sys/kernel/mm/transparent_hugepage/enabled`).

`back_with_huge_pages` asks, once the ONNX engine has loaded the model it serves, for every
large anonymous mapping of the process: `MADV_HUGEPAGE`, then `MADV_COLLAPSE` (Linux >= 6.1),
which moves the pages already there into huge pages now instead of whenever khugepaged gets to
them. No memory is added (the resident size was unchanged, measured). On this AVX2 VM the
one-row onnx-w8a8 step ran 1.09-1.23x faster in four runs of `benchmarks/huge_pages.py` (1.14x over
6 fresh-process pairs), while onnx-int4 and onnx-int8 were level (0.97-1.04x). Where THP is
`never`, off Linux, or with `TOOLKIT_HUGE_PAGES=0`, nothing is done and the result says why.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")
MAPS = Path("/proc/self/maps")
SMAPS_ROLLUP = Path("/proc/self/smaps_rollup")
#: set to 0 to leave page sizes to the kernel
ENV = "TOOLKIT_HUGE_PAGES"


@dataclass(frozen=True)
class HugePages:
    """What `back_with_huge_pages` did.

    Attributes:
        huge_mb: the process's anonymous memory in huge pages afterwards (MB).
        reason: what was done, or why nothing was.
    """

    huge_mb: int
    reason: str


def thp_mode() -> str | None:
    """The kernel's THP mode ("always", "madvise" or "never"); None where it cannot be read."""
    try:
        match = re.search(r"\[(\w+)\]", THP_ENABLED.read_text(encoding="utf-8"))
    except OSError:
        return None
    return match.group(1) if match else None


def anonymous_ranges(maps: str, min_bytes: int = HUGE_PAGE) -> list[tuple[int, int]]:
    """The huge-page-aligned parts of the writable anonymous mappings in `/proc/self/maps` text.

    Anonymous means unnamed or the `[heap]`: malloc serves large blocks from their own
    mappings until one is freed, then raises its threshold and serves them from the heap, so
    a second model loaded in one process (export measuring several formats) has its weights
    there. Files and `[stack]` are left out; a mapping smaller than one aligned huge page has
    no part that one could back.
    """
    ranges = []
    for line in maps.splitlines():
        fields = line.split()
        if fields[5:] not in ([], ["[heap]"]) or not fields[1].startswith("rw"):
            continue
        low, high = (int(value, 16) for value in fields[0].split("-"))
        start = (low + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1)
        end = high & ~(HUGE_PAGE - 1)
        if end - start >= min_bytes:
            ranges.append((start, end))
    return ranges


def anon_huge_mb() -> int:
    """The process's anonymous memory in huge pages (MB; 0 where it cannot be read)."""
    try:
        text = SMAPS_ROLLUP.read_text(encoding="utf-8")
    except OSError:
        return 0
    match = re.search(r"^AnonHugePages:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) // 1024 if match else 0


def back_with_huge_pages() -> HugePages:
    """Ask the kernel to back this process's large anonymous mappings with huge pages now.

    Call it after loading a model (its weights are then in place); it takes ~0.3 s for a
    300 MB process. Never raises: a kernel that refuses leaves the pages as they were.
    """
    if os.environ.get(ENV, "1") == "0":
        return HugePages(anon_huge_mb(), f"off ({ENV}=0)")
    mode = thp_mode()
    if not sys.platform.startswith("linux") or mode in (None, "never"):
        return HugePages(anon_huge_mb(), f"transparent huge pages unavailable (mode {mode})")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    ranges = anonymous_ranges(MAPS.read_text(encoding="utf-8"))
    collapsed = refused = 0
    for start, end in ranges:
        libc.madvise(start, end - start, MADV_HUGEPAGE)
        if libc.madvise(start, end - start, MADV_COLLAPSE) == 0:
            collapsed += 1
        else:  # EINVAL before Linux 6.1; EAGAIN/ENOMEM where the kernel found no free huge page
            refused += 1
    advised = sum(end - start for start, end in ranges) >> 20
    return HugePages(anon_huge_mb(), f"{advised} MB in {len(ranges)} mappings advised (THP "
                                     f"{mode}); {collapsed} collapsed now, {refused} left to "
                                     "khugepaged")
