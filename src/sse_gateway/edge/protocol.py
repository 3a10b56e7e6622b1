"""RequestReader: the asyncio protocol of every client socket until a request becomes a stream.

Modelled on uvicorn's httptools_impl: httptools parses, the reader keeps only request state
(the URL, headers and body being read, pipelined requests waiting, the header/idle timer) and
hands each complete request to its handler. A stream request ends the reader's part: the
handler takes the transport with `hand_over()` and installs a stream as its protocol.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol, cast

import httptools

from sse_gateway.edge.admission import Admission, unavailable
from sse_gateway.wire.http import (
    Request,
    Response,
    ambiguous_head,
    encode_response,
    error_response,
)

MAX_HEADER_BYTES = 16 * 1024
# The raw head may exceed what the callbacks count (line ends, "HTTP/1.1", spaces) by this much.
HEAD_SLACK_BYTES = 1024
HEADER_TIMEOUT = 10.0
MAX_PIPELINED = 16
# Above this many bytes in the transport's buffer, events wait in the stream's own queue.
WRITE_HIGH_WATER = 64 * 1024
WRITE_LOW_WATER = 16 * 1024


class RequestHandler(Protocol):
    """What the reader asks of the application (the router)."""

    def body_limit(self, url: bytes, headers: list[tuple[bytes, bytes]]) -> int:
        """Bytes of a POST's body to keep for this request head; 0: read it and drop it."""

    def handle(self, reader: RequestReader, request: Request) -> None:
        """Answers with `reader.respond`, or takes the socket with `reader.hand_over`."""


class _HandedOver(Exception):
    """Raised from a parser callback: bytes after a request that became a stream."""


class RequestReader(asyncio.Protocol):
    __slots__ = (
        "admission",
        "body",
        "body_limit",
        "busy",
        "closed",
        "deferred",
        "handler",
        "head_raw",
        "header_bytes",
        "headers",
        "parser",
        "reading_paused",
        "requests",
        "timer",
        "transport",
        "url",
        "writing_paused",
    )

    def __init__(self, handler: RequestHandler, admission: Admission) -> None:
        self.handler = handler
        self.admission = admission
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.header_bytes = 0
        # Raw bytes of the request head received so far, or -1 once its headers are complete:
        # httptools keeps a header value until its line ends, so `on_header` alone would let an
        # unterminated one grow without bound.
        self.head_raw = 0
        self.body: list[bytes] | None = None
        self.body_limit = 0
        self.requests: deque[Request] | None = None
        self.busy = False
        self.closed = False
        self.timer: asyncio.TimerHandle | None = None
        self.deferred = b""  # read while over this turn's request budget
        # Flow control, which a stream taking over the socket inherits.
        self.writing_paused = False
        self.reading_paused = False

    # --- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        if not self.admission.socket_opened():
            # Beyond the fd budget even a 503 must not cost more: answer and drop at once.
            self.respond(unavailable("connection_limit"), keep_alive=False)
            return
        self.timer = asyncio.get_running_loop().call_later(HEADER_TIMEOUT, self._header_timeout)

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None:
            return
        if not self.admission.spend_request():
            # A connect storm must not hold up everyone else's events: past this loop turn's
            # budget, the request waits (its socket paused) for a later turn.
            if self.transport is not None:
                self.transport.pause_reading()
                self.reading_paused = True
            self.deferred += data
            self.admission.wait_turn(self._resume)
            return
        if self.head_raw >= 0:
            end = data.find(b"\r\n\r\n")
            self.head_raw += len(data) if end < 0 else end + 4
            if self.head_raw > MAX_HEADER_BYTES + HEAD_SLACK_BYTES:
                try:
                    self._headers_too_large()
                except httptools.HttpParserError:
                    return
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # an Upgrade header on an ordinary request: answered as plain HTTP
        except httptools.HttpParserError:
            if self.parser is not None and not self.closed:
                self.respond(
                    error_response(400, "bad_request", "malformed HTTP request"), keep_alive=False
                )

    def _resume(self) -> None:
        transport = self.transport
        if self.closed or transport is None:
            return
        transport.resume_reading()
        self.reading_paused = False
        data, self.deferred = self.deferred, b""
        self.data_received(data)

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.admission.socket_closed()
        self._cancel_timer()
        self.parser = None
        self.closed = True
        self.transport = None

    # --- httptools callbacks -----------------------------------------------------------------

    # Bytes after a request that became a stream (a pipelined request, say) are still in the
    # parser's buffer: every callback refuses them once the parser is gone.

    def on_message_begin(self) -> None:
        if self.parser is None:
            raise _HandedOver
        self.url = b""
        self.headers = []
        self.header_bytes = 0
        self.body = None

    def on_url(self, url: bytes) -> None:
        if self.parser is None:
            raise _HandedOver
        self.url += url
        self._count_header_bytes(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.parser is None:
            raise _HandedOver
        self.headers.append((name.lower(), value))
        # Counted here rather than through _count_header_bytes: once per header per request.
        self.header_bytes += len(name) + len(value) + 4
        if self.header_bytes > MAX_HEADER_BYTES:
            self._headers_too_large()

    def on_headers_complete(self) -> None:
        parser = self.parser
        if parser is None:
            raise _HandedOver
        self.head_raw = -1
        refusal = ambiguous_head(self.headers, parser.get_http_version())
        if refusal is not None:
            self.respond(error_response(400, "bad_request", refusal), keep_alive=False)
            raise httptools.HttpParserError(refusal)
        # Only a body the handler asks for is kept; any other is read and dropped. The header
        # timer keeps running until the whole message is in: a body that never ends cannot
        # hold the socket.
        if parser.get_method() == b"POST":
            limit = self.handler.body_limit(self.url, self.headers)
            if limit > 0:
                self.body = []
                self.body_limit = limit

    def on_body(self, chunk: bytes) -> None:
        if self.parser is None:
            raise _HandedOver
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
            raise _HandedOver
        self.head_raw = 0  # the next request's head, on a keep-alive connection
        self._cancel_timer()
        url = httptools.parse_url(self.url)
        request = Request(
            method=parser.get_method().decode("ascii", "replace"),
            path=url.path.decode("latin-1") if url.path else "/",
            query_string=url.query.decode("latin-1") if url.query else "",
            headers=dict(self.headers),
            keep_alive=parser.should_keep_alive(),
            body=b"".join(self.body) if self.body else b"",
            http_version=parser.get_http_version(),
        )
        self.headers = []
        self.body = None
        if self.busy:
            if self.requests is None:
                self.requests = deque()
            self.requests.append(request)
            if len(self.requests) >= MAX_PIPELINED and self.transport is not None:
                self.transport.pause_reading()
                self.reading_paused = True
            return
        self.handler.handle(self, request)

    # --- what a handler calls ----------------------------------------------------------------

    def respond(self, response: Response, *, keep_alive: bool, head_only: bool = False) -> None:
        """Writes a complete response; closes unless the connection may serve another request.

        Does nothing once the socket is closed or handed over to a stream.
        """
        transport = self.transport
        if transport is None or self.closed:
            return
        keep_alive = keep_alive and not self.admission.draining
        transport.write(encode_response(response, keep_alive=keep_alive, head_only=head_only))
        if not keep_alive:
            self.parser = None
            self.closed = True
            transport.close()
            return
        self.timer = asyncio.get_running_loop().call_later(HEADER_TIMEOUT, self._idle_timeout)

    def begin_async(self) -> None:
        """The handler answers later (e.g. after a publish): requests that arrive meanwhile
        wait, at most `MAX_PIPELINED` before reading pauses."""
        self.busy = True

    def end_async(self) -> None:
        """After an async handler has responded: serve requests that arrived meanwhile."""
        self.busy = False
        requests = self.requests
        while requests and not self.busy and not self.closed and self.transport is not None:
            request = requests.popleft()
            self._cancel_timer()
            self.handler.handle(self, request)
        if requests is not None and not requests:
            self.requests = None
            if self.transport is not None and not self.closed:
                self.transport.resume_reading()
                self.reading_paused = False

    def hand_over(self) -> asyncio.Transport:
        """Gives the socket up for a stream: no more request parsing, no timers, no responses.

        The caller installs the stream with `transport.set_protocol`, after reading
        `writing_paused` (a stream must know its socket is already backed up); from then on
        the stream hears `connection_lost` and flow control, and the socket's budget slot
        goes with it. Reading is resumed if the reader had paused it: a stream must see the
        client leave.
        """
        transport = self.transport
        assert transport is not None and not self.closed, "only an open socket is handed over"
        if self.reading_paused:
            self.reading_paused = False
            transport.resume_reading()
        self._cancel_timer()
        self.parser = None
        self.requests = None
        self.url = b""  # may hold the token
        self.body = None
        self.transport = None
        return transport

    # --- limits and timers -------------------------------------------------------------------

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
