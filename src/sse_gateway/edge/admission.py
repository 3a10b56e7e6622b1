"""Admission: who gets in, and when. The narrow shared state of every request reader.

- The socket budget: sockets beyond the stream limit plus `FD_SOCKET_SLACK` are answered 503
  and closed at once, so the process never runs out of file descriptors.
- The stream limit: SSE_CONNECTION_LIMIT, lowered to what the open-file limit allows.
- The request budget: at most `REQUESTS_PER_TICK` reads of requests are parsed per event-loop
  turn (several requests pipelined in one read count once); the rest wait a turn with their
  socket paused, so Pub/Sub delivery, heartbeats and health checks
  keep running through a storm of 10,000 (re)connects.
- Draining: after SIGTERM no keep-alive and no new stream.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable

from sse_gateway.metrics import Metrics
from sse_gateway.streams.stream import spread_retry
from sse_gateway.wire.frames import encode_close
from sse_gateway.wire.http import Request, Response, error_response

RETRY_AFTER_SECONDS = 5
# What a stream refused for SSE_MAX_CONNECTIONS_PER_PLAYER is told to wait (plus the spread):
# long enough that a surplus tab costs a request a minute, not a reconnect loop; short enough
# that it gets a stream soon after one of the player's others ends.
TOO_MANY_RETRY_MS = 60_000
REQUESTS_PER_TICK = 100
# Descriptors kept back from the open-file limit for Redis, the listener, logs and the loop.
FD_RESERVE = 100
# Extra sockets (health checks, refused clients) allowed beyond the stream limit.
FD_SOCKET_SLACK = 50

_UNAVAILABLE_MESSAGES = {
    "draining": "the gateway is shutting down",
    "connection_limit": "the gateway is at its connection limit",
    "broker_unavailable": "the message broker is not connected",
}


def effective_connection_limit(configured: int, fd_limit: int) -> int:
    """Streams one process can hold without running out of file descriptors."""
    return max(1, min(configured, fd_limit - FD_RESERVE - FD_SOCKET_SLACK))


def unavailable(
    code: str, message: str | None = None, headers: Iterable[tuple[str, str]] = ()
) -> Response:
    """The one 503 answer: `{"error": code, "message": …}` with `Retry-After`.

    `code` is `draining`, `connection_limit` or `broker_unavailable` (their messages are
    fixed here) or another code with its own `message`; `headers` are added (e.g. CORS).
    """
    text = message if message is not None else _UNAVAILABLE_MESSAGES[code]
    return error_response(503, code, text, [("Retry-After", str(RETRY_AFTER_SECONDS)), *headers])


def accepts_event_stream(request: Request) -> bool:
    """Whether the client asked for `text/event-stream` (every EventSource and SSE library
    does; curl and health probes do not)."""
    accept = request.headers.get(b"accept")
    return accept is not None and b"text/event-stream" in accept.lower()


def unavailable_stream(
    code: str, retry_ms: int, headers: Iterable[tuple[str, str]] = ()
) -> Response:
    """A transient stream refusal that an EventSource survives: `200 text/event-stream` whose
    body is one `event: close` with the reason and a `retry:` (SSE_RETRY_MS plus spread).

    WHATWG HTML fails an EventSource for good on any answer that is not `200
    text/event-stream` (and ignores `Retry-After`); this one ends normally, so it reconnects
    by itself after `retry`. `Retry-After` is kept for other clients.
    """
    message = _UNAVAILABLE_MESSAGES[code]
    return _closing_stream(code, message, spread_retry(retry_ms), RETRY_AFTER_SECONDS, headers)


def _closing_stream(
    code: str, message: str, retry_ms: int, retry_after: int, headers: Iterable[tuple[str, str]]
) -> Response:
    """`200 text/event-stream` whose body is one `event: close` (`code`, `message`) with
    `retry:` `retry_ms`; `Retry-After` for other clients."""
    return Response(
        200,
        encode_close(code, message, retry_ms),
        content_type="text/event-stream; charset=utf-8",
        headers=[("Cache-Control", "no-cache"), ("Retry-After", str(retry_after)), *headers],
    )


def too_many_connections(
    limit: int, event_stream: bool, headers: Iterable[tuple[str, str]] = ()
) -> Response:
    """The refusal of a stream beyond SSE_MAX_CONNECTIONS_PER_PLAYER (`limit`) in this process.

    The new stream gives way, never an open one: two tabs over the cap cannot take turns
    evicting each other. To `Accept: text/event-stream` it is a `200` with one `event: close`
    (`too_many_connections`) and a `retry:` of a minute or so (`TOO_MANY_RETRY_MS` plus the
    spread): an EventSource asks again then, rather than every SSE_RETRY_MS or never (a 429
    would fail it for good, also when the streams it was counted against were dead sockets of
    its own that the gateway has not noticed yet). Other clients get `429` with `Retry-After`.
    """
    code = "too_many_connections"
    message = (
        f"this player has {limit} streams open on this gateway process"
        " (SSE_MAX_CONNECTIONS_PER_PLAYER); close one or try again later"
    )
    retry_ms = spread_retry(TOO_MANY_RETRY_MS)
    retry_after = TOO_MANY_RETRY_MS // 1000
    if event_stream:
        return _closing_stream(code, message, retry_ms, retry_after, headers)
    return error_response(429, code, message, [("Retry-After", str(retry_after)), *headers])


class Admission:
    """Counts sockets and hands out the per-turn request budget."""

    __slots__ = (
        "_budget_refill_scheduled",
        "_waiting",
        "connection_limit",
        "draining",
        "metrics",
        "open_sockets",
        "request_budget",
        "socket_budget",
    )

    def __init__(self, connection_limit: int, metrics: Metrics) -> None:
        """`connection_limit` is the effective stream limit of this process."""
        self.connection_limit = connection_limit
        self.socket_budget = connection_limit + FD_SOCKET_SLACK
        self.metrics = metrics
        self.open_sockets = 0
        self.draining = False
        self.request_budget = REQUESTS_PER_TICK
        self._budget_refill_scheduled = False
        self._waiting: deque[Callable[[], None]] = deque()

    # --- sockets -----------------------------------------------------------------------------

    def socket_opened(self) -> bool:
        """Counts a new socket; False (and a `connection_limit` rejection) when over budget."""
        self.open_sockets += 1
        if self.open_sockets > self.socket_budget:
            self.metrics.rejected["connection_limit"] += 1
            return False
        return True

    def socket_closed(self) -> None:
        self.open_sockets -= 1

    # --- streams -----------------------------------------------------------------------------

    def stream_refusal(self, open_streams: int, broker_connected: bool) -> str | None:
        """Why a new stream cannot be served now (a 503 code), or None."""
        if self.draining:
            return "draining"
        if open_streams >= self.connection_limit:
            return "connection_limit"
        if not broker_connected:
            return "broker_unavailable"
        return None

    # --- the request budget ------------------------------------------------------------------

    def spend_request(self) -> bool:
        """Takes one request from this turn's budget; False when it is spent (then wait)."""
        if self.request_budget <= 0:
            return False
        self.request_budget -= 1
        if not self._budget_refill_scheduled:  # _schedule_refill, inlined: once per request
            self._budget_refill_scheduled = True
            asyncio.get_running_loop().call_soon(self._refill)
        return True

    def wait_turn(self, resume: Callable[[], None]) -> None:
        """`resume()` runs on a later turn with budget left; it spends the budget itself (a
        socket that went away meanwhile spends none)."""
        self._waiting.append(resume)
        self._schedule_refill()

    def _schedule_refill(self) -> None:
        if not self._budget_refill_scheduled:
            self._budget_refill_scheduled = True
            asyncio.get_running_loop().call_soon(self._refill)

    def _refill(self) -> None:
        self._budget_refill_scheduled = False
        self.request_budget = REQUESTS_PER_TICK
        waiting = self._waiting
        while waiting and self.request_budget > 0:
            waiting.popleft()()
        if waiting:
            self._schedule_refill()
