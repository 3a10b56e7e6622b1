"""HttpConnection: one asyncio.Protocol per client socket, modelled on uvicorn's httptools_impl.

It parses requests with httptools until one of them becomes an SSE stream; from then on it
drops the parser and request state and is only a stream: a channel, a write path with
backpressure, and a heartbeat slot. No task, no timer and no queue while a stream is idle.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, cast

import httptools

from sse_gateway.wire.http import Request, Response, encode_response, error_response

if TYPE_CHECKING:
    from sse_gateway.app import Gateway

log = logging.getLogger("sse_gateway.connection")

MAX_HEADER_BYTES = 16 * 1024
HEADER_TIMEOUT = 10.0
MAX_PIPELINED = 16
# Above this many bytes in the transport's buffer, events wait in the stream's own queue.
WRITE_HIGH_WATER = 64 * 1024
WRITE_LOW_WATER = 16 * 1024


class _StreamStarted(Exception):
    """Raised from a parser callback to stop parsing once the connection is a stream."""


class HttpConnection(asyncio.Protocol):
    __slots__ = (
        "active",
        "app",
        "body",
        "body_limit",
        "busy",
        "channel",
        "closed",
        "conn_no",
        "floor",
        "hb_slot",
        "head",
        "header_bytes",
        "headers",
        "held",
        "opened_at",
        "parser",
        "paused",
        "queue",
        "requests",
        "timer",
        "transport",
        "url",
    )

    def __init__(self, app: Gateway) -> None:
        self.app = app
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.header_bytes = 0
        self.body: list[bytes] | None = None
        self.body_limit = 0
        self.requests: deque[Request] | None = None
        self.busy = False
        self.timer: asyncio.TimerHandle | None = None
        # Stream state; meaningful once the request became an SSE stream.
        self.channel = b""
        self.active = False
        self.paused = False
        self.closed = False
        self.queue: deque[bytes] | None = None
        # Live events that arrive while this stream replays history wait here.
        self.held: list[tuple[str | None, bytes]] | None = None
        self.floor: tuple[int, int] | None = None
        self.hb_slot = -1
        # A stream's response head, until it goes out with `connected` (one write, not two).
        self.head: bytes | None = None
        self.conn_no = 0
        self.opened_at = 0.0

    # --- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        app = self.app
        app.open_sockets += 1
        if app.open_sockets > app.socket_budget:
            # Beyond the fd budget even a 503 must not cost more: answer and drop at once.
            app.metrics.rejected["connection_limit"] += 1
            self.respond(
                error_response(
                    503,
                    "connection_limit",
                    "the gateway is at its connection limit",
                    [("Retry-After", "5")],
                ),
                keep_alive=False,
            )
            return
        self.timer = asyncio.get_running_loop().call_later(HEADER_TIMEOUT, self._header_timeout)

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None:
            return  # a stream does not read requests; anything the client sends is ignored
        app = self.app
        if app.request_budget <= 0:
            # A connect storm must not hold up everyone else's events: past this loop turn's
            # budget, the request waits (its socket paused) for a later turn.
            app.defer_request(self, data)
            return
        app.spend_request_budget()
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # an Upgrade header on an ordinary request: answered as plain HTTP
        except httptools.HttpParserError:
            if self.parser is not None and not self.closed:
                self.respond(
                    error_response(400, "bad_request", "malformed HTTP request"), keep_alive=False
                )

    def connection_lost(self, exc: Exception | None) -> None:
        self.app.open_sockets -= 1
        self._cancel_timer()
        self.parser = None
        if self.conn_no:
            self.app.stream_sockets -= 1
            if not self.closed:
                self.app.stream_closed(self, "client" if exc is None else "error")
        self.closed = True
        self.transport = None

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        queue = self.queue
        transport = self.transport
        if queue and transport is not None:
            while queue and not self.paused:
                transport.write(queue.popleft())
        if not queue:
            self.queue = None

    # --- httptools callbacks -----------------------------------------------------------------

    # Bytes after a request that became a stream (a pipelined request, say) are still in the
    # parser's buffer: every callback refuses them once the parser is gone.

    def on_message_begin(self) -> None:
        if self.parser is None:
            raise _StreamStarted
        self.url = b""
        self.headers = []
        self.header_bytes = 0
        self.body = None

    def on_url(self, url: bytes) -> None:
        if self.parser is None:
            raise _StreamStarted
        self.url += url
        self._count_header_bytes(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.parser is None:
            raise _StreamStarted
        self.headers.append((name.lower(), value))
        self.header_bytes += len(name) + len(value) + 4
        if self.header_bytes > MAX_HEADER_BYTES:
            self._headers_too_large()

    def on_headers_complete(self) -> None:
        parser = self.parser
        if parser is None:
            raise _StreamStarted
        # Only an authorized publish has a body worth keeping; any other is read and dropped.
        # The header timer keeps running until the whole message is in: a body that never
        # ends cannot hold the socket.
        if parser.get_method() == b"POST" and self.app.accepts_body(self.url, self.headers):
            self.body = []
            self.body_limit = self.app.max_body_bytes

    def on_body(self, chunk: bytes) -> None:
        if self.parser is None:
            raise _StreamStarted
        body = self.body
        if body is None:
            return
        body.append(chunk)
        self.body_limit -= len(chunk)
        if self.body_limit < 0:
            self.body = None
            self.respond(
                error_response(413, "payload_too_large", "request body is too large"),
                keep_alive=False,
            )
            raise httptools.HttpParserError("body too large")

    def on_message_complete(self) -> None:
        parser = self.parser
        if parser is None or self.closed:
            raise _StreamStarted
        self._cancel_timer()
        url = httptools.parse_url(self.url)
        request = Request(
            method=parser.get_method().decode("ascii", "replace"),
            path=url.path.decode("latin-1") if url.path else "/",
            query_string=url.query.decode("latin-1") if url.query else "",
            headers=dict(self.headers),
            keep_alive=parser.should_keep_alive(),
            body=b"".join(self.body) if self.body else b"",
        )
        self.headers = []
        self.body = None
        if self.busy:
            if self.requests is None:
                self.requests = deque()
            self.requests.append(request)
            if len(self.requests) >= MAX_PIPELINED and self.transport is not None:
                self.transport.pause_reading()
            return
        self.app.handle(self, request)

    # --- responses ---------------------------------------------------------------------------

    def respond(self, response: Response, *, keep_alive: bool, head_only: bool = False) -> None:
        """Writes a complete response; closes unless the connection may serve another request."""
        transport = self.transport
        if transport is None or self.closed or self.conn_no:
            return  # a stream's body is SSE frames only
        keep_alive = keep_alive and not self.app.draining
        transport.write(encode_response(response, keep_alive=keep_alive, head_only=head_only))
        if not keep_alive:
            self.parser = None
            self.closed = True
            transport.close()
            return
        self.timer = asyncio.get_running_loop().call_later(HEADER_TIMEOUT, self._idle_timeout)

    def begin_async(self) -> None:
        self.busy = True

    def end_async(self) -> None:
        """After an async handler has responded: serve requests that arrived meanwhile."""
        self.busy = False
        requests = self.requests
        while requests and not self.busy and not self.closed and not self.conn_no:
            request = requests.popleft()
            self._cancel_timer()
            self.app.handle(self, request)
        if requests is not None and not requests:
            self.requests = None
            if self.transport is not None and not self.closed:
                self.transport.resume_reading()

    # --- stream ------------------------------------------------------------------------------

    def become_stream(self, channel: bytes, conn_no: int, head: bytes) -> None:
        """Turns this connection into an SSE stream: no more request parsing.

        The head is written with the first frames (`connected`, or a closing `retry:`), so a
        client that sees 200 knows its channel is subscribed.
        """
        self._cancel_timer()
        self.parser = None
        self.requests = None
        self.url = b""  # may hold the token
        self.body = None
        self.app.stream_sockets += 1
        self.channel = channel
        self.conn_no = conn_no
        self.opened_at = time.monotonic()
        self.head = head

    def take_head(self) -> bytes:
        """The response head if it was not written yet; it leads the stream's first write."""
        head = self.head
        if head is None:
            return b""
        self.head = None
        return head

    def send(self, frame: bytes) -> None:
        if self.paused:
            queue = self.queue
            if queue is None:
                self.queue = queue = deque()
            queue.append(frame)
            if len(queue) > self.app.settings.event_buffer_size:
                self.close_stream("slow_consumer", abort=True)
            return
        transport = self.transport
        if transport is not None:
            transport.write(frame)

    def heartbeat(self, frame: bytes) -> None:
        # A stream whose socket is not draining has no use for another heartbeat.
        if not self.paused and self.transport is not None:
            self.transport.write(frame)

    def close_stream(self, reason: str, *, abort: bool = False, final: bytes = b"") -> None:
        if self.closed:
            return
        self.app.stream_closed(self, reason)
        self.closed = True
        self.queue = None
        self.held = None
        transport = self.transport
        if transport is None:
            return
        if abort:
            transport.abort()
        else:
            first = self.take_head() + final
            if first:
                transport.write(first)
            transport.close()

    # --- timers ------------------------------------------------------------------------------

    def _count_header_bytes(self, n: int) -> None:
        self.header_bytes += n
        if self.header_bytes > MAX_HEADER_BYTES:
            self._headers_too_large()

    def _headers_too_large(self) -> None:
        """Answers 431 and stops the parser."""
        self.respond(
            error_response(
                431,
                "request_header_fields_too_large",
                f"request line and headers exceed {MAX_HEADER_BYTES} bytes",
            ),
            keep_alive=False,
        )
        raise httptools.HttpParserError("headers too large")

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _header_timeout(self) -> None:
        self.timer = None
        self.respond(
            error_response(408, "request_timeout", "request headers not received in time"),
            keep_alive=False,
        )

    def _idle_timeout(self) -> None:
        self.timer = None
        if self.transport is not None and not self.busy:
            self.closed = True
            self.parser = None
            self.transport.close()
