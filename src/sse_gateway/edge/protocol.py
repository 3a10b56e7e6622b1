"""RequestReader: the asyncio protocol of every client socket until a request becomes a stream.

Modelled on uvicorn's httptools_impl: `request_parser.RequestParser` turns bytes into
requests; the reader decides when to feed it, keeps the connection's state (requests and bytes
waiting, flow control, the header/idle timer) and hands each request to its handler, which may
take the socket for a stream with `hand_over()`. One request at a time, and one per unit of
the loop turn's budget: while an answer is pending or unread (writing paused), the reader stops
reading. What a connection holds is bounded (docs/operations.md, "Half-open sockets and
pipelining"): one read of unparsed bytes, the requests parsed from one `FEED_SLICE`, a request
head or kept body, the transport buffer up to `WRITE_HIGH_WATER` plus one answer.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Protocol, cast

from sse_gateway.edge.admission import Admission, unavailable
from sse_gateway.edge.request_parser import RequestParser, RequestRefused
from sse_gateway.streams.stream import bound_send_buffer
from sse_gateway.wire.http import Request, Response, encode_response, error_response

# The parser is fed at most this many bytes at a time, so that requests pipelined behind one
# whose answer is backed up stay unparsed bytes: at most FEED_SLICE / 18 parsed ones wait.
FEED_SLICE = 2048
# Requests one connection may have answered per loop turn: pipelining costs its own sender
# the wait, not everyone else (browsers and SSE clients never pipeline).
PIPELINED_PER_TURN = 8
# Above this many bytes in the transport's buffer, events wait in the stream's own queue.
WRITE_HIGH_WATER = 64 * 1024
WRITE_LOW_WATER = 16 * 1024


class RequestHandler(Protocol):
    """What the reader asks of the application (the router)."""

    def body_limit(self, url: bytes, headers: list[tuple[bytes, bytes]]) -> int:
        """Bytes of a POST's body to keep for this request head; 0: read it and drop it."""

    def handle(self, reader: RequestReader, request: Request) -> None:
        """Answers with `reader.respond`, or takes the socket with `reader.hand_over`."""


class RequestReader(asyncio.Protocol):
    __slots__ = (
        "admission",
        "busy",
        "closed",
        "counted",
        "deferred",
        "handler",
        "parser",
        "reading_paused",
        "refusal",
        "requests",
        "served",
        "timer",
        "transport",
        "waiting_turn",
        "writing_paused",
    )

    def __init__(self, handler: RequestHandler, admission: Admission) -> None:
        self.handler = handler
        self.admission = admission
        self.transport: asyncio.Transport | None = None
        self.parser = RequestParser(handler.body_limit, self._request_complete, self._continue)
        self.requests: deque[Request] | None = None  # complete, waiting for their turn
        self.refusal: Response | None = None  # for a malformed request behind those
        self.served = 0  # requests handled this loop turn
        self.busy = False  # an async handler has not answered yet
        self.closed = False
        self.counted = False  # the admission counts this socket as a reader
        self.timer: asyncio.TimerHandle | None = None
        self.deferred = b""  # read, not parsed yet: waiting for a turn or for an answer
        self.waiting_turn = False
        # Flow control, which a stream taking over the socket inherits.
        self.writing_paused = False
        self.reading_paused = False

    # --- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = tcp = cast(asyncio.Transport, transport)
        tcp.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        # Answers a client does not read, and later a stream's frames, wait in at most 64 KiB
        # of kernel buffer (Linux would grow it to 4 MiB: docs/operations.md, "Slow clients").
        bound_send_buffer(tcp)
        self.counted = True
        if not self.admission.reader_opened(self):
            # Beyond the fd budget even a 503 must not cost more: answer and drop at once.
            tcp.write(encode_response(unavailable("connection_limit"), keep_alive=False))
            self._close_after_answer(tcp, linger=False)
            return
        self.timer = asyncio.get_running_loop().call_later(
            self.admission.header_timeout, self._header_timeout
        )

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return  # answered and closing (or lingering): what the client still sends is dropped
        self.served = 0  # a socket is read at most once per loop turn
        if self.deferred or self.requests or self.busy or self.writing_paused or self.waiting_turn:
            # Something waits already: these bytes wait behind it, unparsed, reading paused.
            self.deferred += data
            self._pause_reading()
            self._classify()
            return
        if self.admission.request_budget <= 0:
            # A connect storm must not hold up everyone's events: the bytes wait a turn.
            self.deferred = data
            self._wait_turn()
            return
        if len(data) > FEED_SLICE:
            self._feed(data)
            return
        try:  # _parse, inlined: once per request on the connect path
            self.parser.feed(data)
        except RequestRefused as refused:
            self._refuse(refused)

    def _wait_turn(self) -> None:
        """Waits (the socket paused) for a loop turn with request budget left."""
        self._pause_reading()
        if not self.waiting_turn:
            self.waiting_turn = True
            self.admission.wait_turn(self._resume)
        self._classify()

    def _feed(self, data: bytes) -> None:
        """Parses `data` a slice at a time; stops (keeping the rest) once a request waits."""
        size = len(data)
        offset = 0
        while offset < size:
            if self.requests or self.busy or self.writing_paused or self.waiting_turn:
                self.deferred = data[offset:] + self.deferred
                self._pause_reading()
                self._classify()
                return
            piece = data if size <= FEED_SLICE else data[offset : offset + FEED_SLICE]
            offset += len(piece)
            if not self._parse(piece):
                return

    def _parse(self, data: bytes) -> bool:
        """Feeds the parser; False once the reader is done with the socket."""
        try:
            self.parser.feed(data)
        except RequestRefused as refused:
            self._refuse(refused)
            return False
        return not self.closed

    def _refuse(self, refused: RequestRefused) -> None:
        """Counts and answers a malformed request; closes after the answers owed before it."""
        self.admission.metrics.rejected[refused.code] += 1
        if self.busy or self.requests:
            self.refusal, self.deferred = refused.response, b""
            self._pause_reading()
        else:
            self.respond(refused.response, keep_alive=False)

    def _resume(self) -> None:
        self.waiting_turn = False
        self.served = 0
        self._drain()

    def _drain(self) -> None:
        """Serves what waits (requests, a refusal, bytes), a request per unit of the turn's
        budget, until something blocks again; reading resumes once nothing is left."""
        while True:
            transport = self.transport
            if self.closed or transport is None:
                return
            if self.busy or self.writing_paused or self.waiting_turn:
                return
            if transport.is_closing():
                return  # the client is gone: nothing more is answered
            requests = self.requests
            if requests:
                if self.served >= PIPELINED_PER_TURN or not self.admission.spend_request():
                    self._wait_turn()
                    return
                self.served += 1
                request = requests.popleft()
                self._cancel_timer()
                self.admission.reader_working(self)
                self.handler.handle(self, request)
                continue
            self.requests = None
            if self.refusal is not None:
                self.respond(self.refusal, keep_alive=False)
                return
            if not self.deferred:
                break
            if self.admission.request_budget <= 0:
                self._wait_turn()
                return
            data, self.deferred = self.deferred, b""
            self._feed(data)
        # Nothing left on our side: the reader waits for the client again.
        self._classify()
        if self.reading_paused:
            self.reading_paused = False
            transport.resume_reading()

    def _classify(self) -> None:
        """Tells the admission whether this reader waits on the client (evictable: a request
        coming, an answer unread, requests pipelined) or on us (one request, waiting)."""
        if self.closed or not self.counted:
            return
        requests = self.requests
        waiting_on_us = (
            (self.busy or self.waiting_turn or bool(requests))
            and not self.writing_paused
            and not (requests and (len(requests) > 1 or self.deferred))
        )
        if waiting_on_us:
            self.admission.reader_working(self)
        else:
            self.admission.reader_waiting(self)

    def _pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def pause_writing(self) -> None:
        self.writing_paused = True
        self._classify()  # the client does not read its answers

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.requests or self.deferred or self.refusal:
            self._drain()
        else:
            self._classify()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.counted:
            self.counted = False
            self.admission.reader_closed(self)
        self._cancel_timer()
        self.parser.stop()
        self.closed = True
        self.transport = None
        self.requests = None
        self.deferred = b""

    def evict(self) -> None:
        """Closes the socket at once (the admission needs its slot; it no longer counts it)."""
        self.counted = False
        if self.transport is not None:
            self.transport.abort()
        self.connection_lost(None)

    def _continue(self) -> None:
        """`Expect: 100-continue` on a body the handler keeps: the client may send it now."""
        if self.transport is not None and not (self.closed or self.busy or self.requests):
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _request_complete(self, request: Request) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return  # the client is gone (a write failed): the answer would be thrown away
        if (
            self.busy
            or self.writing_paused
            or self.requests
            or self.waiting_turn
            or self.served >= PIPELINED_PER_TURN
            or not self.admission.spend_request()
        ):
            # One request in flight, and one per unit of the turn's budget: this one waits.
            if self.requests is None:
                self.requests = deque()
            self.requests.append(request)
            if self.busy or self.writing_paused or self.waiting_turn:
                self._classify()
            else:
                self._wait_turn()
            return  # the timer runs on: the answer before it must be read in time
        self.served += 1
        timer = self.timer
        if timer is not None:
            timer.cancel()
            self.timer = None
        self.admission.reader_working(self)
        self.handler.handle(self, request)

    # --- what a handler calls ----------------------------------------------------------------

    def respond(self, response: Response, *, keep_alive: bool, head_only: bool = False) -> None:
        """Writes a complete response; closes unless the connection may serve another request.
        Does nothing once the socket is closed or handed over to a stream."""
        transport = self.transport
        if transport is None or self.closed:
            return
        keep_alive = keep_alive and not self.admission.draining
        transport.write(encode_response(response, keep_alive=keep_alive, head_only=head_only))
        if not keep_alive:
            self._close_after_answer(transport, linger=True)
            return
        if not self.requests and not self.deferred and not self.busy:
            self.admission.reader_working(self)  # then waiting again, from now on
        self._classify()
        self._start_timer(self._idle_timeout)

    def _close_after_answer(self, transport: asyncio.Transport, *, linger: bool) -> None:
        """Closes once the answer is sent; lingering (RFC 9112 §9.6), it shuts the write side
        and drops what the client still sends for a while: closing with unread bytes resets
        the connection, which can destroy the answer before the client reads it."""
        self.parser.stop()
        self.closed = True
        self.requests = None
        self.deferred = b""
        if linger and transport.can_write_eof():
            transport.write_eof()
            if self.reading_paused:
                self.reading_paused = False
                transport.resume_reading()
            if self.counted:
                self.admission.reader_waiting(self)  # evictable while it lingers
            self._start_timer(partial(_end_linger, transport))
            return
        transport.close()
        if transport.get_write_buffer_size():  # close() would wait for a client that never reads
            self._start_timer(transport.abort)

    def begin_async(self) -> None:
        """The handler answers later (a publish): what arrives meanwhile waits, unread."""
        self.busy = True

    def end_async(self) -> None:
        """After an async handler has responded: serve requests that arrived meanwhile."""
        self.busy = False
        self._drain()

    def hand_over(self) -> asyncio.Transport:
        """Gives the socket up for a stream: no more parsing, timers or responses. The caller
        reads `writing_paused`, then installs the stream (`transport.set_protocol`), which
        takes the socket's budget slot. Reading resumes: a stream must see the client leave."""
        transport = self.transport
        assert transport is not None and not self.closed, "only an open socket is handed over"
        if self.reading_paused:
            self.reading_paused = False
            transport.resume_reading()
        self._cancel_timer()
        if self.counted:
            self.counted = False
            self.admission.reader_handed_over(self)
        self.parser.stop()  # also forgets the URL, which may hold the token
        self.requests = None
        self.deferred = b""
        self.transport = None
        return transport

    # --- limits and timers -------------------------------------------------------------------

    def _start_timer(self, callback: Callable[[], object]) -> None:
        self._cancel_timer()
        self.timer = asyncio.get_running_loop().call_later(self.admission.header_timeout, callback)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _header_timeout(self) -> None:
        self.timer = None
        self.admission.metrics.rejected["request_timeout"] += 1
        self.respond(
            error_response(408, "request_timeout", "request headers not received in time"),
            keep_alive=False,
        )

    def _idle_timeout(self) -> None:
        """SSE_HEADER_TIMEOUT after an answer: the client neither sent another request nor
        read the answer (then the socket is reset: its buffer would never drain)."""
        self.timer = None
        transport = self.transport
        if transport is None or self.busy:
            return
        if self.parser.in_head and not (self.requests or self.deferred or self.writing_paused):
            self._header_timeout()  # a next request began and did not finish in time
            return
        self.closed = True
        self.parser.stop()
        if self.requests or self.deferred or self.writing_paused:
            transport.abort()
        else:
            transport.close()


def _end_linger(transport: asyncio.Transport) -> None:
    """The end of a lingering close: the client had its time to read the answer."""
    transport.abort() if transport.get_write_buffer_size() else transport.close()
