"""Admission: who gets in, and when. The narrow shared state of every request reader.

- Two socket budgets, so the process never runs out of file descriptors and sockets that
  send nothing cannot lock out anyone else: streams (SSE_CONNECTION_LIMIT, lowered to what the
  open-file limit allows) and request readers (sockets that are not streams: a request being
  read, answered, or awaited on a keep-alive connection; `connection_budget`). When readers are
  at their budget, a new socket evicts the reader that has waited longest on its client (a
  slowloris socket, an idle keep-alive one, one that does not read its answers or pipelines);
  only when every reader has one request waiting on the gateway is the new socket answered 503
  and closed at once.
- The header timeout (SSE_HEADER_TIMEOUT): how long a reader waits for a complete request.
- The request budget: at most `REQUESTS_PER_TICK` requests are handled per event-loop turn
  (and at most 8 of one connection: `protocol.PIPELINED_PER_TURN`); the rest wait a turn with
  their socket paused, so Pub/Sub delivery, heartbeats and health checks keep running through
  a storm of 10,000 (re)connects or of pipelined requests.
- Draining: after SIGTERM no keep-alive and no new stream.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable
from typing import NamedTuple, Protocol

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
# Request readers (sockets not yet, or never, a stream) per process: an eighth of the stream
# limit, within these bounds, and at most a quarter of the descriptors.
MIN_READERS = 64
MAX_READERS = 1024
HEADER_TIMEOUT = 10.0

_UNAVAILABLE_MESSAGES = {
    "draining": "the gateway is shutting down",
    "connection_limit": "the gateway is at its connection limit",
    "broker_unavailable": "the message broker is not connected",
}


def default_readers(stream_limit: int) -> int:
    """The reader budget for a stream limit, before the open-file limit is taken into account:
    an eighth of it, within `MIN_READERS`..`MAX_READERS`."""
    return min(MAX_READERS, max(MIN_READERS, stream_limit // 8))


class ConnectionBudget(NamedTuple):
    """What one process holds at most: `streams` and request `readers` (sockets)."""

    streams: int
    readers: int


def connection_budget(configured: int, fd_limit: int) -> ConnectionBudget:
    """The budgets of a process with stream limit `configured` and `fd_limit` open files:
    streams + readers + FD_RESERVE never exceed `fd_limit`."""
    available = max(2, fd_limit - FD_RESERVE)
    readers = default_readers(configured)
    readers = max(1, min(readers, available // 4))
    return ConnectionBudget(max(1, min(configured, available - readers)), readers)


def effective_connection_limit(configured: int, fd_limit: int) -> int:
    """Streams one process can hold without running out of file descriptors."""
    return connection_budget(configured, fd_limit).streams


class Reader(Protocol):
    """What the admission asks of a request reader it evicts."""

    def evict(self) -> None:
        """Closes the socket at once; the admission has already stopped counting it."""


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
        headers=[
            ("Cache-Control", "no-cache, no-transform"),
            ("Retry-After", str(retry_after)),
            *headers,
        ],
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
        "_idle",
        "_waiting",
        "connection_limit",
        "draining",
        "header_timeout",
        "metrics",
        "open_readers",
        "open_sockets",
        "reader_budget",
        "request_budget",
        "socket_budget",
    )

    def __init__(
        self,
        connection_limit: int,
        metrics: Metrics,
        *,
        reader_budget: int | None = None,
        header_timeout: float = HEADER_TIMEOUT,
    ) -> None:
        """`connection_limit` is the effective stream limit of this process; `reader_budget`
        defaults to `connection_budget`'s; `header_timeout` (seconds) is SSE_HEADER_TIMEOUT."""
        self.connection_limit = connection_limit
        if reader_budget is None:
            reader_budget = default_readers(connection_limit)
        self.reader_budget = reader_budget
        self.socket_budget = connection_limit + reader_budget
        self.header_timeout = header_timeout
        self.metrics = metrics
        self.open_sockets = 0  # readers and streams: what the descriptors hold
        self.open_readers = 0
        # Readers waiting for a request, the longest-waiting first (dicts keep insertion
        # order): the ones a new socket may evict.
        self._idle: dict[Reader, None] = {}
        self.draining = False
        self.request_budget = REQUESTS_PER_TICK
        self._budget_refill_scheduled = False
        self._waiting: deque[Callable[[], None]] = deque()

    # --- sockets -----------------------------------------------------------------------------

    def reader_opened(self, reader: Reader) -> bool:
        """Counts a new socket, evicting the longest-idle reader if readers are at their
        budget; False (and a `connection_limit` rejection) when no room can be made."""
        self.open_sockets += 1
        self.open_readers += 1
        if self.open_readers > self.reader_budget and self._idle:
            victim = next(iter(self._idle))
            self.reader_closed(victim)
            victim.evict()
            self.metrics.rejected["request_timeout"] += 1
        if self.open_readers > self.reader_budget or self.open_sockets > self.socket_budget:
            self.metrics.rejected["connection_limit"] += 1
            return False
        self._idle[reader] = None
        return True

    def reader_waiting(self, reader: Reader) -> None:
        """`reader` waits on its client (for a request, or to read an answer): evictable,
        after those waiting longer. Marking it again keeps its place."""
        if reader not in self._idle:
            self._idle[reader] = None

    def reader_working(self, reader: Reader) -> None:
        """`reader` has a complete request (or bytes waiting for their turn): not evictable."""
        self._idle.pop(reader, None)

    def reader_closed(self, reader: Reader) -> None:
        """`reader`'s socket is gone (or evicted): both budgets stop counting it."""
        self._idle.pop(reader, None)
        self.open_readers -= 1
        self.open_sockets -= 1

    def reader_handed_over(self, reader: Reader) -> None:
        """`reader`'s socket became a stream: the socket stays counted until `socket_closed`."""
        self._idle.pop(reader, None)
        self.open_readers -= 1

    def socket_closed(self) -> None:
        """A stream's socket is gone."""
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
