"""Prompt-prefix KV cache: a prompt that starts like an earlier one skips prefilling that start.

Chat prompts share their beginning: the chat template and the system prompt are over half of
each prompt the demo's assistant sees (35 of ~50 tokens), and at 16 clients prefill took 20-25 %
of the engine's time (`benchmarks/serve_throughput.py`). vLLM (automatic prefix caching) and
llama-server (`cache_prompt`) keep such prefixes' keys and values; this does it at block
granularity. The keys and values of each full block of `BLOCK` tokens are stored under (the
parent block's id, the block's tokens), so a lookup walks a prompt block by block and prompts
share the blocks of their common start. Keys hold the tokens themselves, not a hash of them: no
collision can hand a prompt another prompt's cache. A block's keys and values depend only on the
tokens up to its end (causal attention), so reusing them is exact.

Blocks come from two places: every prefilled prompt, and every finished request (its prompt
and answer, `SharedKvStepBackend.retain`), since a chat's next turn repeats the conversation so
far.

A shared cache is a timing channel: a prompt whose start another user sent is answered sooner.
A salt (vLLM's `cache_salt`, e.g. one per tenant) is the parent of a prompt's first block, so
prompts share blocks only with prompts of the same salt.

The store is bounded in bytes and evicts the least recently used block; a lookup refreshes a
chain deepest block first, so a parent is always fresher than its children and is never evicted
before them (an evicted parent would strand its children, unreachable, until they aged out).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

#: tokens per cached block (vLLM's default block size)
BLOCK = 16

#: reads the keys and values of positions [start, stop) of a cached row: one array per cache
#: tensor (each layer's key and value), (kv heads, stop - start, head dim)
KvReader = Callable[[int, int], list[np.ndarray]]
#: a block's key: its parent block's id (or, for a prompt's first block, the root: the salt, 0
#: without one) and its tokens
BlockKey = tuple[int | str, tuple[int, ...]]


@dataclass
class PrefixCacheStats:
    """Counters for `/ready` and benchmarks: prompts and prompt tokens looked up, and reused."""

    prompts: int = 0
    prompts_hit: int = 0
    prompt_tokens: int = 0
    tokens_reused: int = 0
    blocks: int = 0
    bytes: int = 0
    evicted: int = 0


@dataclass(frozen=True)
class CachedBlock:
    """One block's keys and values, per cache tensor (kv heads, BLOCK, head dim)."""

    id: int
    kv: list[np.ndarray]

    @property
    def nbytes(self) -> int:
        """Bytes its arrays hold (what counts against the cache's budget)."""
        return sum(a.nbytes for a in self.kv)


class PrefixCache:
    """Blocks of prompt KV keyed by their prefix, least recently used evicted over `budget_bytes`.

    Used by one thread (the engine's decode loop), like the backend that owns it.
    """

    def __init__(self, budget_bytes: int, block: int = BLOCK) -> None:
        if budget_bytes <= 0 or block <= 0:
            raise ValueError("a prefix cache needs a positive byte budget and block size")
        self.budget_bytes = int(budget_bytes)
        self.block = int(block)
        self.stats = PrefixCacheStats()
        self._blocks: OrderedDict[BlockKey, CachedBlock] = OrderedDict()
        self._ids = itertools.count(1)

    def holds(self, tokens: Sequence[int], salt: str | None = None) -> bool:
        """Whether the first block of `tokens` is cached under `salt` (no counter or recency
        changes: a look before `match`)."""
        return (0 if salt is None else salt, tuple(tokens[:self.block])) in self._blocks

    def match(self, tokens: Sequence[int], salt: str | None = None) -> list[CachedBlock]:
        """The blocks cached under `salt` that `tokens` starts with, leaving at least one token
        to run (its logits pick the first answer token)."""
        found: list[CachedBlock] = []
        keys: list[BlockKey] = []
        parent: int | str = 0 if salt is None else salt
        for start in range(0, len(tokens) - self.block, self.block):  # full blocks before the last token
            key = (parent, tuple(tokens[start:start + self.block]))
            cached = self._blocks.get(key)
            if cached is None:
                break
            found.append(cached)
            keys.append(key)
            parent = cached.id
        for key in reversed(keys):
            self._blocks.move_to_end(key)
        self.stats.prompts += 1
        self.stats.prompts_hit += bool(found)
        self.stats.prompt_tokens += len(tokens)
        self.stats.tokens_reused += len(found) * self.block
        return found

    def store(self, tokens: Sequence[int], read: KvReader, salt: str | None = None) -> None:
        """Cache every full block of `tokens` not cached under `salt` yet, reading its KV with
        `read`."""
        keys: list[BlockKey] = []
        chain: set[BlockKey] = set()
        parent: int | str = 0 if salt is None else salt
        for start in range(0, len(tokens) - self.block + 1, self.block):
            key = (parent, tuple(tokens[start:start + self.block]))
            cached = self._blocks.get(key)
            if cached is None:
                cached = CachedBlock(next(self._ids), read(start, start + self.block))
                if not self._make_room(cached.nbytes, chain):
                    break  # the budget is this prompt's own start: the rest is not kept
                self._blocks[key] = cached
                self.stats.blocks += 1
                self.stats.bytes += cached.nbytes
            self._blocks.move_to_end(key)  # the chain stays the freshest while it grows
            keys.append(key)
            chain.add(key)
            parent = cached.id
        for key in reversed(keys):
            self._blocks.move_to_end(key)

    def _make_room(self, size: int, chain: set[BlockKey]) -> bool:
        """Evict least recently used blocks until `size` more bytes fit the budget; False when
        only `chain` (the blocks being stored, refreshed as they are walked) is left.

        The budget holds at every moment: a prompt longer than the cache keeps its first
        blocks (the ones other prompts share) and never lifts memory above the budget.
        """
        while self.stats.bytes + size > self.budget_bytes:
            oldest = next(iter(self._blocks), None)
            if oldest is None or oldest in chain:
                return False
            evicted = self._blocks.pop(oldest)
            self.stats.blocks -= 1
            self.stats.bytes -= evicted.nbytes
            self.stats.evicted += 1
        return True
