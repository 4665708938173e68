"""Continuous batching for the embedded engines: one decode loop, many requests per step.

A background thread owns the model. At every step boundary it prefills the requests that
arrived (left-padded, as one batch), merges them into the running batch, and then decodes one
token for every running row at once, so a batch of 16 costs little more than a batch of 1 on
the matrix multiplies and throughput rises with concurrency. Finished or cancelled rows leave
the batch at the next step. Each request gets its tokens back through its own asyncio queue.

A `runtime.steps.StepBackend` does the tensor work (torch for transformers, numpy for ONNX
Runtime) and `runtime.steps.sample_token` picks each token, as in export's measurements;
this module does the rest: scheduling, stop strings, detokenization, finish reasons.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from toolkit.runtime.speculation import (
    DraftPolicy,
    NgramSpeculation,
    accepted,
    draft_width,
    measure_extra_cost,
)
from toolkit.runtime.steps import DraftingBackend, StepBackend, is_greedy, sample_token
from toolkit.serve.engines.base import GenerationChunk, PreparedRequest

log = logging.getLogger("toolkit.serve")

#: batch sizes whose draft-token cost is timed at start (a batch drafts at the cost of the
#: next size up); larger batches never draft. On onnx-w8a8 one more token per row cost 0.13 /
#: 0.34 / 0.55 / 0.69 of a step at 1 / 2 / 4 / 8 rows on 16-token dummy prompts (0.27 / 0.45 at
#: 2 / 4 rows with the W8A8 lm_head, less at a 128-token context): served, 2 clients drafting
#: gained 11 %, 4 clients lost 6 % (`benchmarks/serve_throughput.py --clients 2 4 8`), and
#: drafting for up to 4 rows lost 6 % at 4 clients again with the W8A8 lm_head
DRAFT_ROWS = (1, 2)


class StopMatcher:
    """Find the first stop string in text that arrives piece by piece, in linear time.

    One Knuth-Morris-Pratt automaton per stop: its state is the longest prefix of the stop that
    ends the text seen so far, so each new character costs amortised O(1) per stop and a token
    costs only its own characters, however long the stops are. (Comparing every prefix of every
    stop with the text's end after each token costs O(len(stop)^2) per token on the decode
    thread all requests share: four 200k-character stops took 27 s for 16 tokens.)
    """

    def __init__(self, stops: list[str]) -> None:
        self._stops = stops
        self._fallback = [_kmp_fallback(stop) for stop in stops]
        self._states = [0] * len(stops)
        self._seen = 0

    @property
    def held(self) -> int:
        """Characters at the end of the text that may start a stop string."""
        return max(self._states, default=0)

    def feed(self, text: str, armed: bool = True) -> int | None:
        """Read more text; the offset (in all text fed) where a stop string starts, if one ended.

        Unarmed (before `min_tokens`), a completed stop string is passed over, as vLLM does.
        """
        for char in text:
            self._seen += 1
            for i, stop in enumerate(self._stops):
                state, fallback = self._states[i], self._fallback[i]
                while state and stop[state] != char:
                    state = fallback[state - 1]
                if stop[state] == char:
                    state += 1
                if state == len(stop):
                    if armed:
                        return self._seen - state
                    state = fallback[state - 1]
                self._states[i] = state
        return None


def _kmp_fallback(stop: str) -> list[int]:
    """For each prefix of `stop`, the length of its longest proper prefix that is also a suffix."""
    fallback = [0] * len(stop)
    k = 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = fallback[k - 1]
        if stop[i] == stop[k]:
            k += 1
        fallback[i] = k
    return fallback


class TextStream:
    """Detokenize a growing token list into deltas, cutting at the first stop string.

    Text that might be the start of a stop string, or an incomplete UTF-8 character, is held
    back until the next token decides it, so a client never receives text it must un-see.
    Only a window of the last tokens is decoded per step (as TGI and vLLM do): decoding
    every token so far, every step, costs O(answer length) per token on the decode thread
    all requests share. The window starts at the last settled token, so a tokenizer that
    drops a word's leading space at the start of a decode drops it from both texts compared.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str]) -> None:
        self._decode = decode
        self._stop = stop
        self._matcher = StopMatcher(stop)
        self._scanned = ""
        self._text = ""  # the text of tokens[:self._read], settled
        self._prefix = 0  # where the decoded window starts
        self._read = 0
        self.sent = ""

    def _detokenize(self, tokens: list[int], final: bool) -> str:
        """The text of all `tokens` (a trailing incomplete character dropped unless final)."""
        settled = self._decode(tokens[self._prefix:self._read])
        window = self._decode(tokens[self._prefix:])
        if not window.startswith(settled):  # the window rewrote settled text (rare): decode all
            text = self._decode(tokens)
            return text if final else text.rstrip("\ufffd")
        fresh = window[len(settled):]
        if final or not fresh.endswith("\ufffd"):
            self._text += fresh
            self._prefix, self._read = self._read, len(tokens)
            return self._text
        return self._text + fresh.rstrip("\ufffd")  # decided by the next token

    def push(self, tokens: list[int], final: bool, armed: bool = True) -> tuple[str, bool]:
        """The new text to send and whether a stop string was hit (only when `armed`)."""
        text = self._detokenize(tokens, final)
        if not text.startswith(self._scanned):  # the tokenizer rewrote earlier text (rare)
            self._matcher, self._scanned = StopMatcher(self._stop), ""
        at = self._matcher.feed(text[len(self._scanned):], armed)
        self._scanned = text
        if at is not None:
            return self._delta(text[:at]), True
        if not final:
            text = text[:len(text) - self._matcher.held]
        return self._delta(text), False

    def _delta(self, text: str) -> str:
        if not text.startswith(self.sent):
            return ""  # the tokenizer rewrote earlier text (rare); send nothing rather than repeat
        delta = text[len(self.sent):]
        self.sent = text
        return delta


@dataclass
class _Sequence:
    prepared: PreparedRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    text: TextStream
    rng: np.random.Generator
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    done: bool = False
    policy: DraftPolicy | None = None  # how often its drafts are kept, once it drafts
    _ids: np.ndarray | None = None  # prompt + generated, filled as drafts need it
    _filled: int = 0

    def ids(self) -> np.ndarray:
        """The prompt and the answer so far as one array, extended in place (a draft lookup
        per step must not rebuild an 8k-token array from lists)."""
        prompt = self.prepared.prompt_ids
        if self._ids is None:
            self._ids = np.empty(len(prompt) + self.prepared.max_tokens, dtype=np.int64)
            self._ids[:len(prompt)] = prompt
            self._filled = len(prompt)
        new = self.generated[self._filled - len(prompt):]
        self._ids[self._filled:self._filled + len(new)] = new
        self._filled += len(new)
        return self._ids[:self._filled]

    def emit(self, item: GenerationChunk | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop closed (server shutting down)
            self.cancelled = True


def _deliver(items: list[tuple[asyncio.Queue, GenerationChunk]]) -> None:
    """Runs on the event loop: hand one step's chunks to their requests."""
    for queue, item in items:
        queue.put_nowait(item)


class SequenceHandle:
    """The request's side: read chunks from `queue`, `cancel()` when the client leaves."""

    def __init__(self, seq: _Sequence, wake: Callable[[], None]) -> None:
        self._seq = seq
        self._wake = wake
        self.queue = seq.queue

    def cancel(self) -> None:
        """Drop the request from the batch at the next step."""
        if not self._seq.done:
            self._seq.cancelled = True
            self._wake()


@dataclass
class SchedulerStats:
    """Counters a benchmark or test can read."""

    steps: int = 0
    prefills: int = 0
    max_rows: int = 0
    rows_decoded: int = 0
    prefill_s: float = 0.0  # time inside the backend's prefill and decode calls
    decode_s: float = 0.0
    draft_tokens: int = 0  # speculation: tokens checked, and those kept and sent (no step of
    accepted_tokens: int = 0  # their own; tokens kept after an answer's end are not counted)
    draft_token_cost: float = 0.0  # one more token in a one-row run, in one-token runs
    draft_rows: int = 0  # the most rows a run checks drafts for (both timed at start)


class BatchScheduler:
    """The decode loop of an embedded engine, on one background thread."""

    def __init__(self, backend: StepBackend, decode: Callable[[list[int]], str],
                 eos_ids: frozenset[int], max_batch: int, name: str = "engine",
                 on_thread_start: Callable[[], None] | None = None,
                 speculation: NgramSpeculation | None = None) -> None:
        self.backend = backend
        # drafts need a backend that feeds rows several tokens in a run (and forgets some)
        self._drafting = (backend, speculation) if speculation is not None and \
            speculation.tokens and isinstance(backend, DraftingBackend) else None
        self._draft_costs: dict[int, float] = {}  # rows -> r (`measure_extra_cost`)
        self.decode = decode
        self.eos_ids = eos_ids
        self.max_batch = max_batch
        self.stats = SchedulerStats()
        self._name = name
        self._on_thread_start = on_thread_start
        self._pending: list[_Sequence] = []
        self._active: list[_Sequence] = []
        self._outbox: list[_Sequence] = []  # sequences with a chunk to send after this step
        self._chunks: list[GenerationChunk] = []
        self._state: Any = None
        self._next: np.ndarray = np.zeros(0, dtype=np.int64)
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the decode thread."""
        self._thread = threading.Thread(target=self._run, name=f"{self._name}-decode", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """End the loop; unfinished requests get an error."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def alive(self) -> bool:
        """True while the decode thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, prepared: PreparedRequest) -> SequenceHandle:
        """Queue a request for the next step boundary (call from the event loop)."""
        params = prepared.request.sampling
        seq = _Sequence(prepared, asyncio.get_running_loop(), asyncio.Queue(),
                        TextStream(self.decode, params.stop), np.random.default_rng(params.seed))
        with self._cond:
            if self._stopping:
                raise RuntimeError("the engine is stopping")
            self._pending.append(seq)
            self._cond.notify_all()
        return SequenceHandle(seq, self._wake)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _run(self) -> None:
        if self._on_thread_start is not None:
            self._on_thread_start()
        if self._drafting is not None:
            self._measure_draft_cost(*self._drafting)
        while True:
            with self._cond:
                while not self._stopping and not self._pending and not self._active:
                    self._cond.wait()
                if self._stopping:
                    break
                room = self.max_batch - len(self._active)
                if self._active and not self.backend.can_merge:
                    room = 0
                arrived = [s for s in self._pending[:max(room, 0)] if not s.cancelled]
                self._pending = [s for s in self._pending[max(room, 0):] if not s.cancelled]
            try:
                self._drop_finished()
                if arrived:
                    self._admit(arrived)
                if self._active:
                    self._step()
                self._flush()
            except Exception as exc:  # a model error must fail these requests, not the server
                log.exception("%s: decode step failed", self._name)
                self._flush()
                for seq in self._active + arrived:
                    if not seq.done:
                        seq.done = True
                        seq.emit(RuntimeError(f"generation failed: {type(exc).__name__}: {exc}"))
                self._keep([])
        for seq in self._active + self._pending:
            seq.emit(RuntimeError("the engine stopped"))
        self._active, self._pending, self._state = [], [], None

    def _flush(self) -> None:
        """Send the step's chunks: one event-loop wake-up per loop, not one per request.

        `call_soon_threadsafe` writes to the loop's self-pipe each time; at 16 rows per step
        that was 16 wake-ups of the thread that also serves HTTP.
        """
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, GenerationChunk]]] = {}
        for seq, chunk in zip(self._outbox, self._chunks):
            by_loop.setdefault(seq.loop, []).append((seq.queue, chunk))
        self._outbox, self._chunks = [], []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the event loop closed (server shutting down)
                for seq in self._active:
                    if seq.loop is loop:
                        seq.cancelled = True

    def _send(self, seq: _Sequence, chunk: GenerationChunk) -> None:
        self._outbox.append(seq)
        self._chunks.append(chunk)

    def _admit(self, arrived: list[_Sequence]) -> None:
        """Prefill the arrivals into the batch, then drop those their first token ended."""
        base = len(self._active)
        started = time.perf_counter()
        self._state, logits = self._prefill_into([s.prepared.prompt_ids for s in arrived],
                                                 [s.prepared.request.cache_salt for s in arrived])
        self.stats.prefill_s += time.perf_counter() - started
        self.stats.prefills += 1
        tokens = self._sample_all(arrived, logits)
        keep = [i for i, seq in enumerate(arrived) if not self._accept(seq, int(tokens[i]))]
        self._active = self._active + arrived
        self._next = np.concatenate([self._next, tokens])
        if len(keep) < len(arrived):
            self._keep(list(range(base)) + [base + i for i in keep])

    def _prefill_into(self, prompts: list[list[int]],
                      salts: list[str | None]) -> tuple[Any, np.ndarray]:
        """The batch with the prompts' rows after its own, and their logits: straight into its
        free rows where the backend can (`prefill_into`), else prefilled apart and merged."""
        batch = self._state if self._active else None
        into = getattr(self.backend, "prefill_into", None)
        if into is not None:
            return into(batch, prompts, salts)
        state, logits = self.backend.prefill(prompts, salts)
        return (state if batch is None else self.backend.merge(batch, state)), logits

    def _step(self) -> None:
        drafts: list[np.ndarray] = []
        if self._drafting is not None:
            drafter, speculation = self._drafting
            drafts = self._drafts(speculation)
            width = self._draft_width(drafts)
            if width:
                self._speculative_step([draft[:width] for draft in drafts], drafter)
                return
        started = time.perf_counter()
        self._state, logits = self.backend.decode(self._state, self._next)
        self._count_step(len(self._active), time.perf_counter() - started)
        tokens = self._sample_all(self._active, logits)
        for seq, draft, token in zip(self._active, drafts, tokens):
            if draft.size:  # the draft not run: would its first token have been kept?
                seq.policy.record_draft(1, int(draft[0] == token))
        finished = [self._accept(seq, int(tokens[i])) for i, seq in enumerate(self._active)]
        self._next = tokens
        if any(finished):
            self._retain([i for i, done in enumerate(finished) if done])
            self._keep([i for i, done in enumerate(finished) if not done])

    def _count_step(self, rows: int, seconds: float) -> None:
        """One decode run over `rows` rows took `seconds` (however many tokens each fed)."""
        self.stats.decode_s += seconds
        self.stats.steps += 1
        self.stats.rows_decoded += rows
        self.stats.max_rows = max(self.stats.max_rows, rows)

    def _measure_draft_cost(self, drafter: DraftingBackend, speculation: NgramSpeculation) -> None:
        """Time what a draft token costs once, before serving, at each of `DRAFT_ROWS` the
        backend can extend; drafts stay off if it fails."""
        sizes = DRAFT_ROWS if drafter.batch_extend else DRAFT_ROWS[:1]
        try:
            self._draft_costs = {rows: measure_extra_cost(drafter, speculation.tokens, rows)
                                 for rows in sizes if rows <= self.max_batch}
        except Exception:  # a model that cannot run the dummy prompt still serves, undrafted
            log.exception("%s: measuring the cost of draft tokens failed; drafts are off",
                          self._name)
            self._drafting = None
            return
        self.stats.draft_token_cost = self._draft_costs[1]
        self.stats.draft_rows = max(self._draft_costs)
        log.info("%s: one more token per row in a run costs %s of a one-token step (by rows; "
                 "drafts of up to %d tokens)", self._name,
                 ", ".join(f"{r}: {c:.2f}" for r, c in self._draft_costs.items()),
                 speculation.tokens)

    def _drafts(self, speculation: NgramSpeculation) -> list[np.ndarray]:
        """Each active row's draft, when the batch may draft (else none): every row greedy
        (sampled rows would need rejection sampling) and no more rows than were timed."""
        if len(self._active) > self.stats.draft_rows:
            return []
        drafts = []
        for seq in self._active:
            params = seq.prepared.request.sampling
            if not is_greedy(params.temperature, params.top_p):
                return []
            seq.policy = seq.policy or DraftPolicy()
            drafts.append(speculation.propose(seq.ids()))
        return drafts

    def _draft_width(self, drafts: list[np.ndarray]) -> int:
        """Draft tokens per row for this step: what pays (`draft_width`) within every row's
        room (a run as wide as its widest row must fit each row's answer limit)."""
        if not drafts:
            return 0
        room = min(seq.prepared.max_tokens - len(seq.generated) - 1 for seq in self._active)
        rows = len(drafts)
        cost = self._draft_costs[min(r for r in self._draft_costs if r >= rows)]
        return draft_width([seq.policy for seq in self._active],
                           [min(len(draft), room) for draft in drafts], cost) if room > 0 else 0

    def _speculative_step(self, drafts: list[np.ndarray], drafter: DraftingBackend) -> None:
        """Feed every row's next token and draft in one run; keep what greedy decoding
        confirms.

        A row yields its confirmed draft tokens and the argmax after the last of them, so one
        to `len(draft) + 1` tokens, each the argmax after the tokens before it (see
        `runtime.speculation` on quantized graphs' rounding); a row without a draft yields one.
        """
        counts = np.array([1 + len(draft) for draft in drafts], dtype=np.int64)
        fed = np.zeros((len(drafts), int(counts.max())), dtype=np.int64)
        fed[:, 0] = self._next
        for row, draft in enumerate(drafts):
            fed[row, 1:1 + len(draft)] = draft
        started = time.perf_counter()
        state, logits = drafter.extend(self._state, fed, counts)
        self._count_step(len(drafts), time.perf_counter() - started)
        choices = np.asarray(logits.argmax(axis=-1), dtype=np.int64)
        kept = np.array([accepted(draft, choices[row]) for row, draft in enumerate(drafts)],
                        dtype=np.int64)
        self._state = drafter.rewind(state, counts - 1 - kept)
        finished = []
        for row, (seq, draft) in enumerate(zip(self._active, drafts)):
            if draft.size:
                seq.policy.record_draft(len(draft), int(kept[row]))
            self.stats.draft_tokens += len(draft)
            for used, token in enumerate(choices[row, :kept[row] + 1]):
                if self._accept(seq, int(token)):  # kept tokens after an end are dropped
                    self.stats.accepted_tokens += used
                    finished.append(row)
                    break
            else:
                self.stats.accepted_tokens += int(kept[row])
        self._next = choices[np.arange(len(drafts)), kept]
        if finished:
            self._retain(finished)
            self._keep([row for row in range(len(drafts)) if row not in finished])

    def _retain(self, rows: list[int]) -> None:
        """Hand finished rows' conversations to a backend that caches prompt prefixes, before
        they leave the batch (a chat's next turn starts with them)."""
        retain = getattr(self.backend, "retain", None)
        if retain is None:
            return
        seqs = [self._active[i] for i in rows]
        retain(self._state, rows, [s.prepared.prompt_ids + s.generated for s in seqs],
               [s.prepared.request.cache_salt for s in seqs])

    def _drop_finished(self) -> None:
        if any(seq.cancelled for seq in self._active):
            for seq in self._active:
                if seq.cancelled:
                    seq.done = True
            self._keep([i for i, seq in enumerate(self._active) if not seq.cancelled])

    def _keep(self, rows: list[int]) -> None:
        if not rows:
            self._active, self._state, self._next = [], None, np.zeros(0, dtype=np.int64)
            return
        self._state = self.backend.select(self._state, rows)
        self._active = [self._active[i] for i in rows]
        self._next = self._next[rows]

    def _sample_all(self, rows: list[_Sequence], logits: np.ndarray) -> np.ndarray:
        """Next token of every row: one vectorized argmax for the greedy rows."""
        tokens = np.asarray(logits.argmax(axis=-1), dtype=np.int64)
        for i, seq in enumerate(rows):
            params = seq.prepared.request.sampling
            if not is_greedy(params.temperature, params.top_p):
                tokens[i] = sample_token(logits[i], params.temperature, params.top_p, seq.rng)
        return tokens

    def _accept(self, seq: _Sequence, token: int) -> bool:
        """Record one new token; emit its text; return True when the sequence is finished."""
        if seq.cancelled:
            seq.done = True
            return True
        params = seq.prepared.request.sampling
        # vLLM's ignore_eos / min_tokens: an EOS that may not end the answer is kept as a token
        # (decoded to no text) and decoding goes on
        if token in self.eos_ids and not params.ignore_eos and \
                len(seq.generated) >= params.min_tokens:
            delta, _ = seq.text.push(seq.generated, final=True)
            seq.done = True
            self._send(seq, GenerationChunk(delta, 1, "stop"))
            return True
        seq.generated.append(token)
        at_limit = len(seq.generated) >= seq.prepared.max_tokens
        delta, stopped = seq.text.push(seq.generated, final=at_limit,
                                       armed=len(seq.generated) >= params.min_tokens)
        if stopped or at_limit:
            seq.done = True
            self._send(seq, GenerationChunk(delta, 1, "stop" if stopped else "length"))
            return True
        self._send(seq, GenerationChunk(delta, 1))
        return False
