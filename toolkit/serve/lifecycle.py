"""How a request ends early: the client leaves, its upload stalls, or the server shuts down.

Each of these must stop the engine's work for that request and be counted honestly in
`toolkit_requests_total`, so that a hostile or unlucky client neither holds a slot nor fires
the 5xx alert:

- the client closes its connection: nobody will read the answer, so decoding stops at once
  (streamed or not) and the request counts as 499, nginx's "client closed request";
- the client uploads its body too slowly: after `body_timeout_s` it gets an OpenAI-shaped 408
  and the connection closes (nginx's `client_body_timeout` answers the same), so a stalled
  upload cannot hold a connection for ever;
- the server's shutdown timeout passes: the generation is cut with an OpenAI error (503, or an
  error event then `[DONE]` in a stream) instead of uvicorn's plain-text 500.

A stream that fails after its `200` header went out cannot change its status line;
`report_status` tells the metrics middleware what to count instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any, TypeVar

from starlette.requests import ClientDisconnect

from toolkit.serve.protocol import SSE_DONE, OpenAIError, error_body, sse

log = logging.getLogger("toolkit.serve")
T = TypeVar("T")
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
#: the scope key through which a handler tells the metrics middleware the status to count
STATUS_KEY = "toolkit.status"


def report_status(scope: MutableMapping[str, Any], status: int) -> None:
    """Count this request as `status` whatever its response started with (a failed stream)."""
    scope[STATUS_KEY] = status


def reported_status(scope: MutableMapping[str, Any]) -> int | None:
    """The status a handler reported with `report_status`, if any."""
    return scope.get(STATUS_KEY)


def stream_failure(scope: MutableMapping[str, Any], exc: Exception, what: str) -> list[bytes]:
    """The last events of a stream that failed after its `200`: an error event, then `[DONE]`.

    The client learns why its answer stopped, and the metrics count the request as the error's
    status (500 unless it is an `OpenAIError`): counted as a disconnect (499) it would hide
    engine failures from the 5xx alert.

    Args:
        scope: the request's ASGI scope (for `report_status`).
        exc: what ended the stream.
        what: names the request in the log line.
    """
    if isinstance(exc, OpenAIError):
        report_status(scope, exc.status)
        return [sse(exc.body()), SSE_DONE]
    # the decode loop fails its requests with a RuntimeError after logging the traceback;
    # anything else is a bug whose details stay in the log (as in the app's 500 handler)
    decode_failure = isinstance(exc, RuntimeError)
    message = str(exc) if decode_failure else f"internal error: {type(exc).__name__}"
    log.error("%s failed: %s", what, message, exc_info=None if decode_failure else exc)
    report_status(scope, 500)
    return [sse(error_body(message, type="server_error")), SSE_DONE]


def shutdown_error() -> OpenAIError:
    """The answer of a request still generating when the shutdown timeout ends."""
    return OpenAIError(503, "the server is shutting down and this request ran past its shutdown "
                       "timeout; retry it", type="server_error", code="server_shutting_down")


def body_deadline(receive: Receive, timeout_s: float) -> Receive:
    """`receive` that gives the whole request body `timeout_s` to arrive, then answers 408.

    The 408 carries `Connection: close`: the rest of the body may still be on its way, and a
    connection whose request was never read to its end cannot serve another one.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    complete = False

    async def receive_within_deadline() -> MutableMapping[str, Any]:
        nonlocal complete
        if complete:
            return await receive()
        try:
            message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
        except TimeoutError:
            raise OpenAIError(
                408, f"the request body did not arrive within {timeout_s:g} s (body_timeout_s); "
                "send it at once", code="request_timeout", headers={"Connection": "close"},
            ) from None
        complete = message["type"] != "http.request" or not message.get("more_body", False)
        return message

    return receive_within_deadline


async def _client_gone(receive: Receive) -> None:
    """Return when the ASGI server reports `http.disconnect` (the body was read before)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class Stops:
    """What may end a request's wait early: the shutdown cut and, optionally, the client leaving.

    Each condition is one watcher task for the whole request, so racing every engine step
    against them creates no watcher per token. `close()` them when the request ends.

    Args:
        cut: set when the shutdown timeout ends.
        receive: the request's ASGI receive, read after the body to notice a disconnect; None
            for streams, whose disconnect Starlette already turns into a cancellation.
    """

    def __init__(self, cut: asyncio.Event, receive: Receive | None = None) -> None:
        self._watchers: dict[asyncio.Future[Any], Callable[[], Exception]] = {
            asyncio.ensure_future(cut.wait()): shutdown_error}
        if receive is not None:
            self._watchers[asyncio.ensure_future(_client_gone(receive))] = ClientDisconnect
        self._stopped: Callable[[], Exception] | None = None
        self._waiter: asyncio.Task[Any] | None = None
        for watcher, stop in self._watchers.items():
            watcher.add_done_callback(self._on_stop(stop))

    def _on_stop(self, stop: Callable[[], Exception]) -> Callable[[asyncio.Future[Any]], None]:
        def fired(watcher: asyncio.Future[Any]) -> None:
            if watcher.cancelled() or self._stopped is not None:
                return
            self._stopped = stop
            if self._waiter is not None:
                self._waiter.cancel()
        return fired

    async def next(self, chunks: AsyncIterator[T]) -> T:
        """The next item of `chunks`, unless a stop comes first (then it is raised).

        Unlike `wait`, this awaits in the calling task and creates nothing per item: a stop
        cancels the wait through the watchers' callbacks. Racing a new task against the
        watchers for every token cost ~0.1 ms of event-loop time per token (measured), which
        the decode threads lose on a 2-core machine.

        Raises:
            StopAsyncIteration: `chunks` ended.
            ClientDisconnect, OpenAIError: as `wait`.
        """
        if self._stopped is not None:
            raise self._stopped()
        task = asyncio.current_task()
        self._waiter = task
        try:
            return await chunks.__anext__()
        except asyncio.CancelledError:
            # our own cancel (a stop) becomes the stop; any other cancel goes on
            if self._stopped is None or task is None or task.uncancel() > 0:
                raise
            raise self._stopped() from None
        finally:
            self._waiter = None

    async def wait(self, work: Awaitable[T]) -> T:
        """`await work`, unless a stop comes first: then `work` is cancelled and the stop raised.

        Raises:
            ClientDisconnect: the client closed the connection (counted 499).
            OpenAIError: 503 once the shutdown cut came.
        """
        task = asyncio.ensure_future(work)
        try:
            done, _ = await asyncio.wait([task, *self._watchers],
                                         return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled from outside: the work must still end
            task.cancel()
            raise
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.wait([task])
        raise next(stop for watcher, stop in self._watchers.items() if watcher in done)()

    def close(self) -> None:
        """Stop watching."""
        for watcher in self._watchers:
            watcher.cancel()


async def until_stopped(chunks: AsyncIterator[T], cut: asyncio.Event,
                        receive: Receive | None = None) -> AsyncIterator[T]:
    """Yield `chunks` until they end or a `Stops` condition comes (see `Stops.wait`).

    Stopping early cancels the step waiting on `chunks`, which closes the engine's generator:
    the same path as a stream whose client left, so the engine drops the request from its
    batch at the next step.
    """
    stops = Stops(cut, receive)
    try:
        while True:
            try:
                item = await stops.next(chunks)
            except StopAsyncIteration:
                return
            yield item
    finally:
        stops.close()
