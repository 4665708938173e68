"""Admission control: `max_concurrency` requests generate, `max_queue` more wait, the rest get 429.

The queue is bounded on purpose: an unbounded one turns overload into ever-growing latency for
everyone; a 429 with Retry-After lets clients and load balancers back off or go elsewhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from toolkit.serve.protocol import OpenAIError


class Slot:
    """A held slot; `release()` is idempotent so every exit path may call it."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self.held = True

    def release(self) -> None:
        """Give the slot back once."""
        if self.held:
            self.held = False
            self._admission.release()


class Admission:
    """A semaphore for running requests plus a bounded count of waiting ones.

    Args:
        max_concurrency: requests allowed to generate at once.
        max_queue: requests allowed to wait for a slot.
        retry_after_s: the Retry-After value sent with 429.
        on_running / on_waiting: called with +1/-1 as the gauges move (metrics).
    """

    def __init__(self, max_concurrency: int, max_queue: int, retry_after_s: int = 1,
                 on_running: Callable[[int], None] | None = None,
                 on_waiting: Callable[[int], None] | None = None) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self.running = 0
        self.waiting = 0
        self._sem = asyncio.Semaphore(max_concurrency)
        self._on_running = on_running or (lambda delta: None)
        self._on_waiting = on_waiting or (lambda delta: None)

    async def acquire(self) -> Slot:
        """Take a slot, waiting in the queue if needed.

        Raises:
            OpenAIError: 429 when every slot is busy and the queue is full.
        """
        if self._sem.locked():
            if self.waiting >= self.max_queue:
                raise OpenAIError(
                    429, f"the server is busy: {self.running} requests running and "
                    f"{self.waiting} waiting (max_queue {self.max_queue}); retry later",
                    type="rate_limit_error", code="server_overloaded",
                    headers={"Retry-After": str(self.retry_after_s)},
                )
            self.waiting += 1
            self._on_waiting(1)
            try:
                await self._sem.acquire()
            finally:
                self.waiting -= 1
                self._on_waiting(-1)
        else:
            await self._sem.acquire()
        self.running += 1
        self._on_running(1)
        return Slot(self)

    def release(self) -> None:
        """Give a slot back; prefer `Slot.release`, which cannot release twice."""
        self.running -= 1
        self._on_running(-1)
        self._sem.release()
