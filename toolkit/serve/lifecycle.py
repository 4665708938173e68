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
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any, TypeVar

from starlette.requests import ClientDisconnect

from toolkit.serve.protocol import OpenAIError

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


async def until_stopped(chunks: AsyncIterator[T], cut: asyncio.Event,
                        receive: Receive | None = None) -> AsyncIterator[T]:
    """Yield `chunks` until they end, the client disconnects or `cut` is set.

    Stopping early cancels the step that waits on `chunks`, which closes the engine's
    generator: the same path as a stream whose client left, so the engine drops the request
    from its batch at the next step.

    Args:
        chunks: the engine's output.
        cut: set when the shutdown timeout ends.
        receive: the request's ASGI receive, to watch for a disconnect; None for streams,
            whose disconnect Starlette already turns into a cancellation.

    Raises:
        ClientDisconnect: the client closed the connection (counted 499).
        OpenAIError: 503 once `cut` is set.
    """
    stops: dict[asyncio.Future[Any], Callable[[], Exception]] = {
        asyncio.ensure_future(cut.wait()): shutdown_error}
    if receive is not None:
        stops[asyncio.ensure_future(_client_gone(receive))] = ClientDisconnect
    step: asyncio.Future[T] | None = None
    try:
        while not cut.is_set():
            step = asyncio.ensure_future(chunks.__anext__())
            done, _ = await asyncio.wait([step, *stops], return_when=asyncio.FIRST_COMPLETED)
            if step not in done:
                step.cancel()
                await asyncio.wait([step])
                raise next(stops[stop] for stop in stops if stop in done)()
            try:
                item = step.result()
            except StopAsyncIteration:
                return
            step = None
            yield item
        raise shutdown_error()
    finally:
        for stop in stops:
            stop.cancel()
        if step is not None:  # cancelled from outside: the step still closes the engine request
            step.cancel()
