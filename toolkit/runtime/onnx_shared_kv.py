"""`StepBackend` over a GroupQueryAttention graph whose KV cache is updated in place.

onnxruntime-genai's model builder emits one fused `GroupQueryAttention` per layer (rotary
inside) with `past_present_share_buffer`: when `past_key_values.i.*` and `present.i.*` are the
same buffer of shape (batch, kv heads, capacity, head dim), each row's new keys are written at
its own length and attention reads only that row's prefix. So one decode step copies no cache
at all (the optimum graph's `Concat` writes a new cache per step: the whole cache, every
step), and rows of different lengths share a batch without padding: the attention mask only
carries each row's length (`ReduceSum(mask) - 1` feeds the op's `seqlens_k`).

This backend keeps those buffers in a `KvArena` bound to the session with IO binding. ONNX
Runtime commits the whole buffer (measured: 4 rows x 8192 positions = 1.3 GB resident after
one prefill), so an arena holds what the batch needs and grows by doubling, rows and positions
alike, up to the serving context (`capacity`): one copy of the cache per doubling. A row that
leaves is replaced by the last physical row (one row copied) and the batch keeps a logical ->
physical slot map, so the scheduler's row order never costs a cache copy. Arrivals are
prefilled straight into the batch's free rows (`prefill_into`), and an empty batch's arena
serves the next one unless it grew past twice the positions that one needs. States are
consumed: after `decode`, `select`, `merge` or `prefill_into` use only the state returned (they
share and mutate the arena, which is the point).

With a `PrefixCache` (serving), `prefill` copies the cached blocks a prompt starts with into its
row and runs only the rest, and `retain` caches a finished row's prompt and answer for the
chat's next turn (`runtime/prefix_cache.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from toolkit.runtime.onnx_model import (
    LOGIT_POSITIONS,
    QUERY_LENGTHS,
    default_query_lengths,
)
from toolkit.runtime.onnx_steps import OrtKvLayout
from toolkit.runtime.prefix_cache import CachedBlock, PrefixCache

#: rows and positions the first arena of a batch holds before it grows (doubling)
MIN_ROWS = 4
MIN_LENGTH = 256
#: what one more session run costs, in padded positions: on onnx-w8a8 (SmolLM2, 2 AVX2
#: cores) a one-row run of one token takes ~8.6 ms (reading every weight) and each further
#: position ~1.1 ms, so splitting a batch pays once it saves about 8 padded positions
RUN_COST_POSITIONS = 8


def padded_runs(widths: list[int], cached: list[int] | None = None,
                room: int | None = None) -> list[range]:
    """Consecutive rows (sorted by `widths`, their new tokens) that run as right-padded
    batches, at the least cost in padded positions.

    A run costs `RUN_COST_POSITIONS` plus its rows times its widest row: one long prompt in a
    batch of short ones would otherwise pad every row to its width (15 rests of 30 tokens and
    one of 400: 6,400 positions in one run, 866 in two). A row with one new token never shares
    a run with longer ones: a one-token run is a decode step, which rounds differently from a
    chunk (`runtime.speculation`), and a prompt's first answer token must not depend on the
    prompts it arrived with. With `cached` (each row's cached positions) every row of a run
    needs its cache plus the run's width within `room` positions of the arena. Ties go to
    fewer runs. O(rows^2): rows are at most a batch.
    """
    count = len(widths)
    best: list[tuple[int, int, int]] = [(0, 0, 0)]  # (cost, runs, first row of the last run)
    for stop in range(1, count + 1):
        width, longest = widths[stop - 1], 0
        options = []
        for start in range(stop - 1, -1, -1):
            longest = max(longest, cached[start] if cached else 0)
            if start < stop - 1 and ((widths[start] == 1) != (width == 1) or
                                     (room is not None and longest + width > room)):
                break  # sorted widths: an earlier start mixes or overflows too
            cost, runs, _ = best[start]
            options.append((cost + RUN_COST_POSITIONS + (stop - start) * width, runs + 1,
                            start))
        best.append(min(options))
    runs: list[range] = []
    stop = count
    while stop:
        start = best[stop][2]
        runs.insert(0, range(start, stop))
        stop = start
    return runs


class KvArena:
    """Per-layer key/value buffers (rows, kv heads, capacity, head dim) and their IO bindings."""

    def __init__(self, backend: SharedKvStepBackend, rows: int, length: int) -> None:
        self.backend = backend
        shape = (rows, backend.kv_heads, length, backend.head_dim)
        self.buffers = [np.zeros(shape, dtype=backend.kv_dtype) for _ in backend.past_names]
        self._bindings: dict[int, Any] = {}

    @property
    def rows(self) -> int:
        """Rows this arena can hold."""
        return self.buffers[0].shape[0]

    @property
    def length(self) -> int:
        """Positions per row this arena can hold."""
        return self.buffers[0].shape[2]

    def binding(self, rows: int, first: int = 0) -> Any:
        """An IO binding with rows [first, first + rows) bound as both past and present (cached)."""
        if (first, rows) not in self._bindings:
            import onnxruntime as ort

            binding = self.backend.session.io_binding()
            for past, present, buffer in zip(self.backend.past_names, self.backend.present_names,
                                             self.buffers):
                # consecutive rows of a C-ordered array: one contiguous block
                value = ort.OrtValue.ortvalue_from_numpy(buffer[first:first + rows])
                binding.bind_ortvalue_input(past, value)
                binding.bind_ortvalue_output(present, value)
            self._bindings[first, rows] = binding
        return self._bindings[first, rows]

    def copy_row(self, source: KvArena, src: int, dst: int, length: int) -> None:
        """Copy the first `length` cached positions of row `src` of `source` into row `dst`."""
        for mine, theirs in zip(self.buffers, source.buffers):
            mine[dst, :, :length] = theirs[src, :, :length]

    def read(self, row: int, start: int, stop: int) -> list[np.ndarray]:
        """A copy of positions [start, stop) of `row`, one array per cache tensor."""
        return [buffer[row, :, start:stop].copy() for buffer in self.buffers]

    def write(self, row: int, blocks: list[CachedBlock]) -> int:
        """Put cached blocks at the start of `row`, one after another; the positions filled."""
        start = 0
        for block in blocks:
            stop = start + block.kv[0].shape[1]
            for buffer, values in zip(self.buffers, block.kv):
                buffer[row, :, start:stop] = values
            start = stop
        return start


@dataclass
class SharedKvState:
    """A batch in an arena: logical row -> physical row (a permutation of range(n)), lengths.

    Attributes:
        arena: the buffers holding the rows.
        slots: physical row of each logical row (the scheduler's order).
        lengths: tokens cached per logical row.
    """

    arena: KvArena
    slots: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.slots)


class SharedKvStepBackend(OrtKvLayout):
    """`StepBackend` over a builder graph (`GroupQueryAttention`, shared past/present buffers).

    Args:
        lm: an `OnnxCausalLM` whose graph `is_shared_kv`.
        capacity: cached positions per row (prompt + answer); the serving context length.
        prefix_cache: where prompts' KV blocks are kept and looked up (serving); None prefills
            every prompt whole (export's measurements, which must time the whole prompt).
    """

    can_merge = True

    def __init__(self, lm: Any, capacity: int, prefix_cache: PrefixCache | None = None) -> None:
        super().__init__(lm)
        self.logit_positions = lm.has_logit_positions
        #: rows of one run may feed different numbers of tokens after their caches (graphs
        #: exported before `QUERY_LENGTHS` run each such row alone)
        self.query_lengths = lm.has_query_lengths
        self.vocab = lm.vocab_size
        self.capacity = int(capacity)
        self.prefix_cache = prefix_cache
        self._spare: KvArena | None = None  # the last batch's arena (`prefill_into`)

    def _length_for(self, needed: int) -> int:
        """Arena positions for `needed` tokens: a power of two from MIN_LENGTH, <= capacity."""
        if needed > self.capacity:
            raise ValueError(f"a sequence reached {needed} tokens, over the KV capacity "
                             f"{self.capacity}; lower max_tokens or raise --max-model-len")
        return min(self.capacity, max(MIN_LENGTH, 1 << (needed - 1).bit_length()))

    def _fit(self, state: SharedKvState, rows: int, length: int) -> KvArena:
        """`state`'s arena if it holds `rows` x `length`, else a doubled one with its rows."""
        arena = state.arena
        if rows <= arena.rows and length <= arena.length:
            return arena
        grown = KvArena(self, arena.rows if rows <= arena.rows else max(rows, 2 * arena.rows),
                        arena.length if length <= arena.length else self._length_for(length))
        for row, slot in enumerate(state.slots):
            grown.copy_row(arena, int(slot), int(slot), int(state.lengths[row]))
        if self._spare is arena:  # the batch `prefill_into` fills keeps the grown one
            self._spare = grown
        return grown

    def _run(self, arena: KvArena, ids: np.ndarray, lengths: np.ndarray,
             positions: np.ndarray, first: int = 0, counts: np.ndarray | None = None) -> np.ndarray:
        """One session run over rows [first, first + len(ids)) of `arena` (physical order).

        `lengths` are the rows' lengths after the run; a row's cache holds the positions before
        its `ids`, of which the first `counts` are its new tokens (None: all of them, or the
        row's whole length if shorter, as in a right-padded prompt without cache; a graph
        without `QUERY_LENGTHS` takes only that). Returns the logits at each row's input
        `positions` (rows, k, vocab).
        A graph with `LOGIT_POSITIONS` computes only those: a prompt's other positions would
        cost the lm_head (a fifth of a 135M model's prefill) and a (rows, prompt, vocab) array.
        """
        binding = arena.binding(len(ids), first)
        width = int(lengths.max())
        mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
        if self.logit_positions:
            binding.bind_cpu_input(LOGIT_POSITIONS, positions.astype(np.int64))
            logits = np.empty((*positions.shape, self.vocab), dtype=np.float32)
        else:
            logits = np.empty((*ids.shape, self.vocab), dtype=np.float32)
        if self.query_lengths:
            binding.bind_cpu_input(QUERY_LENGTHS, default_query_lengths(ids.shape[1], lengths)
                                   if counts is None else counts.astype(np.int32))
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask)
        binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape),
                            logits.ctypes.data)
        self.session.run_with_iobinding(binding)
        if self.logit_positions:
            return logits
        return logits[np.arange(len(ids))[:, None], positions]

    def prefill(self, prompts: list[list[int]],
                cache_salts: list[str | None] | None = None) -> tuple[SharedKvState, np.ndarray]:
        """Prefill the prompts into a new arena; rows attend to their own length only.

        Prompts without a cached prefix run as right-padded batches of similar lengths
        (`padded_runs`); each prompt with one gets its cached blocks copied in and runs only
        the rest, the rests batched the same way (`_warm_runs`). A prompt whose first block
        an earlier prompt of the same call starts with waits until that one is cached, so
        the first chats after a start share their system prompt too.
        """
        longest = max(len(p) for p in prompts)
        arena = KvArena(self, max(len(prompts), MIN_ROWS), self._length_for(longest))
        return self._fill(self._empty(arena), prompts, cache_salts)

    def prefill_into(self, state: SharedKvState | None, prompts: list[list[int]],
                     cache_salts: list[str | None] | None = None
                     ) -> tuple[SharedKvState, np.ndarray]:
        """`merge(state, prefill(prompts))` without a second arena: the prompts are prefilled
        straight into the free rows after `state`'s (the arena grown first if they do not fit).

        The caller promises that `state` is the only state of this backend in use (None: none
        is), as the continuous-batching scheduler's one batch is; so an empty batch reuses the
        arena of the last one, unless that one grew past twice the positions these prompts
        need (a burst of long answers does not keep its memory once short chats follow). At
        16 clients a new arena per arrival (4 rows x 256 positions, 47 MB zeroed for SmolLM2),
        its IO bindings built anew and the copy of its rows into the batch's took ~15 % of the
        decode thread.
        """
        longest = max(len(p) for p in prompts)
        if state is None:
            length = self._length_for(longest)
            spare = self._spare
            if spare is None or spare.length > 2 * length:
                spare = KvArena(self, max(len(prompts), MIN_ROWS), length)
            state = self._empty(spare)
        self._spare = state.arena
        needed = max(longest, int(state.lengths.max(initial=0)))
        state = SharedKvState(self._fit(state, len(state) + len(prompts), needed),
                              state.slots, state.lengths)
        return self._fill(state, prompts, cache_salts)

    @staticmethod
    def _empty(arena: KvArena) -> SharedKvState:
        return SharedKvState(arena, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))

    def _fill(self, state: SharedKvState, prompts: list[list[int]],
              cache_salts: list[str | None] | None) -> tuple[SharedKvState, np.ndarray]:
        """Prefill the prompts into the rows after `state`'s, whose arena holds them all;
        the state with their rows appended, and their last-position logits."""
        base = len(state)
        salts = cache_salts or [None] * len(prompts)
        logits = np.empty((len(prompts), self.vocab), dtype=np.float32)
        order: list[int] = []  # physical row - base -> prompt
        for wave in self._waves(prompts, salts):
            order += self._prefill_wave(state.arena, prompts, salts, wave, base + len(order),
                                        logits)
        slots = np.empty(len(prompts), dtype=np.int64)
        slots[order] = base + np.arange(len(prompts))
        lengths = np.array([len(p) for p in prompts], dtype=np.int64)
        return SharedKvState(state.arena, np.concatenate([state.slots, slots]),
                             np.concatenate([state.lengths, lengths])), logits

    def _waves(self, prompts: list[list[int]], salts: list[str | None]) -> list[list[int]]:
        """The prompts to prefill first, then those starting with a first block that is not
        cached yet but that one of the first will cache."""
        cache = self.prefix_cache
        if cache is None:
            return [list(range(len(prompts)))]
        heads: set[tuple[str | None, tuple[int, ...]]] = set()
        first, later = [], []
        for i, prompt in enumerate(prompts):
            head = (salts[i], tuple(prompt[:cache.block])) \
                if len(prompt) > cache.block and not cache.holds(prompt, salts[i]) else None
            (later if head in heads else first).append(i)
            if head is not None:
                heads.add(head)
        return [first, later] if later else [first]

    def _prefill_wave(self, arena: KvArena, prompts: list[list[int]], salts: list[str | None],
                      wave: list[int], row: int, logits: np.ndarray) -> list[int]:
        """Prefill prompts `wave` into arena rows from `row` on, filling their `logits` and
        caching their blocks; the prompt of each row used, in order."""
        cache = self.prefix_cache
        matches = {i: cache.match(prompts[i], salts[i]) if cache is not None else []
                   for i in wave}
        cold = [i for i in wave if not matches[i]]
        warm = [i for i in wave if matches[i]]
        cold.sort(key=lambda i: len(prompts[i]))
        for run in padded_runs([len(prompts[i]) for i in cold]):
            group = cold[run.start:run.stop]
            lengths = np.array([len(prompts[i]) for i in group], dtype=np.int64)
            ids = np.zeros((len(group), int(lengths.max())), dtype=np.int64)
            for r, i in enumerate(group):
                ids[r, :len(prompts[i])] = prompts[i]
            logits[group] = self._run(arena, ids, lengths, (lengths - 1)[:, None],
                                      first=row + run.start)[:, 0]
        rest = {i: len(prompts[i]) - sum(b.kv[0].shape[1] for b in matches[i]) for i in warm}
        warm.sort(key=rest.__getitem__)
        first = row + len(cold)
        for r, i in enumerate(warm, start=first):
            arena.write(r, matches[i])
        for run in self._warm_runs([rest[i] for i in warm], [len(prompts[i]) for i in warm],
                                   arena.length):
            group = warm[run.start:run.stop]
            counts = np.array([rest[i] for i in group], dtype=np.int64)
            ids = np.zeros((len(group), int(counts.max())), dtype=np.int64)
            for r, i in enumerate(group):
                ids[r, :rest[i]] = prompts[i][len(prompts[i]) - rest[i]:]
            logits[group] = self._run(arena, ids, np.array([len(prompts[i]) for i in group]),
                                      (counts - 1)[:, None], first + run.start, counts)[:, 0]
        if cache is not None:
            for r, i in enumerate(cold + warm, start=row):
                cache.store(prompts[i], lambda start, stop, r=r: arena.read(r, start, stop),
                            salts[i])
        return cold + warm

    def _warm_runs(self, rests: list[int], lengths: list[int], room: int) -> list[range]:
        """Consecutive warm rows (sorted by `rests`, their new tokens) that run together
        (`padded_runs`): where the graph takes `QUERY_LENGTHS`; each alone where it does not.
        `lengths` are whole prompts: every row needs its cache plus the run's padded width
        within the arena's `room` positions.
        """
        if not self.query_lengths:
            return [range(i, i + 1) for i in range(len(rests))]
        return padded_runs(rests, [length - rest for length, rest in zip(lengths, rests)], room)

    def retain(self, state: SharedKvState, rows: list[int], tokens: list[list[int]],
               cache_salts: list[str | None]) -> None:
        """Keep the cached KV of finished `rows` (their prompt and answer) in the prefix cache.

        A chat's next turn repeats the conversation so far, answer included: its prompt then
        starts with these blocks. `tokens[i]` are row `rows[i]`'s tokens; only the first
        `lengths` of them have keys and values (the last token chosen was never fed).
        """
        if self.prefix_cache is None:
            return
        for row, row_tokens, salt in zip(rows, tokens, cache_salts):
            slot, length = int(state.slots[row]), int(state.lengths[row])
            self.prefix_cache.store(
                row_tokens[:length],
                lambda start, stop, slot=slot: state.arena.read(slot, start, stop), salt)

    def decode(self, state: SharedKvState, tokens: np.ndarray) -> tuple[SharedKvState, np.ndarray]:
        """One token per logical row; the arena is updated in place."""
        lengths = state.lengths + 1
        arena = self._fit(state, len(state), int(lengths.max()))
        ids = np.empty((len(state), 1), dtype=np.int64)
        ids[state.slots, 0] = tokens
        physical = np.empty_like(lengths)
        physical[state.slots] = lengths
        logits = self._run(arena, ids, physical, np.zeros((len(ids), 1), dtype=np.int64))[:, 0]
        in_order = bool((state.slots == np.arange(len(state))).all())
        return SharedKvState(arena, state.slots, lengths), \
            logits if in_order else logits[state.slots]

    @property
    def batch_extend(self) -> bool:
        """Whether `extend` takes several rows: graphs with `QUERY_LENGTHS` only."""
        return self.query_lengths

    def extend(self, state: SharedKvState, tokens: np.ndarray,
               counts: np.ndarray) -> tuple[SharedKvState, np.ndarray]:
        """Feed logical row i its first `counts[i]` tokens of `tokens[i]` in one run.

        Speculation's check (`runtime.speculation`): each row's next token and its draft go
        through the weights once, as prompts' rests after cached blocks do. A graph without
        `QUERY_LENGTHS` takes one row (GroupQueryAttention then takes several new tokens after
        a cache for a batch of one only).

        Returns:
            The state, each row `counts[i]` positions longer, and logits
            (rows, width, vocab) after each position (a row's padding positions: no meaning).
        """
        tokens = np.asarray(tokens, dtype=np.int64)
        counts = np.asarray(counts, dtype=np.int64)
        if len(state) != 1 and not self.query_lengths:
            raise ValueError(f"extend feeds one row at a time on a graph without "
                             f"{QUERY_LENGTHS}, not {len(state)}")
        width = tokens.shape[1]
        # every row's cache plus the whole padded width must fit (GroupQueryAttention's rule)
        arena = self._fit(state, len(state), int(state.lengths.max()) + width)
        ids = np.empty_like(tokens)
        ids[state.slots] = tokens
        lengths = state.lengths + counts
        physical, fed = np.empty_like(lengths), np.empty_like(counts)
        physical[state.slots], fed[state.slots] = lengths, counts
        positions = np.broadcast_to(np.arange(width), tokens.shape)
        logits = self._run(arena, ids, physical, positions, counts=fed)
        return SharedKvState(arena, state.slots, lengths), logits[state.slots]

    def rewind(self, state: SharedKvState, positions: np.ndarray) -> SharedKvState:
        """Forget row i's last `positions[i]` cached tokens (a draft's rejected tail).

        Nothing is copied: attention reads a row's first `lengths` positions only, and the
        next step writes over the rest.
        """
        return SharedKvState(state.arena, state.slots,
                             state.lengths - np.asarray(positions, dtype=np.int64))

    def select(self, state: SharedKvState, rows: list[int]) -> SharedKvState:
        """Keep `rows`; each physical hole left below the new size gets one row from above it."""
        slots = state.slots[np.asarray(rows, dtype=np.int64)].copy()
        lengths = state.lengths[np.asarray(rows, dtype=np.int64)]
        size = len(rows)
        holes = iter(sorted(set(range(size)) - set(slots.tolist())))
        for row in np.flatnonzero(slots >= size):
            hole = next(holes)
            state.arena.copy_row(state.arena, int(slots[row]), hole, int(lengths[row]))
            slots[row] = hole
        return SharedKvState(state.arena, slots, lengths)

    def merge(self, first: SharedKvState, second: SharedKvState) -> SharedKvState:
        """Append `second`'s rows after `first`'s, in `first`'s arena (grown by doubling)."""
        arena = self._fit(first, len(first) + len(second),
                          int(max(first.lengths.max(), second.lengths.max())))
        for row, slot in enumerate(second.slots):
            arena.copy_row(second.arena, int(slot), len(first) + row, int(second.lengths[row]))
        slots = np.concatenate([first.slots, len(first) + np.arange(len(second))])
        return SharedKvState(arena, slots, np.concatenate([first.lengths, second.lengths]))
