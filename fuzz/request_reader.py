"""Fuzz target: the request reader (`edge/protocol.py`) fed whatever a client may send.

A client's bytes go in through `data_received`, cut into reads of varied sizes, on a socket
whose transport behaves like asyncio's: it pauses the protocol's writing above the high-water
mark the reader sets, delivers nothing while reading is paused, and reports `connection_lost`
a turn after a close. Only the reader's public surface is used (the constructor,
`connection_made`, `data_received`, `pause_writing`/`resume_writing`, `connection_lost`, and
what a handler calls: `respond`, `begin_async`/`end_async`, `hand_over`), so the target
outlives changes to how the reader works inside.

Input: byte 0 picks how the client and the socket behave (`Knobs`), byte 1 seeds the read
sizes and the client's timing, bytes 2-3 (big-endian) split the rest into a head the client
sends once and a tail it sends `REPEATS` times over (a pipelined request, a header value that
never ends).

Invariants checked after every step; a violation raises `Finding` (so does any exception the
reader lets out, or one the event loop reports from a callback):
- every write is one complete HTTP/1.1 response: a status line, headers, a body whose length
  is its Content-Length (none after HEAD); the reader's own answers are JSON errors that close
  the connection;
- at most one answer per request, in the order the requests came; an answer the handler
  gives on an open socket is written exactly once; nothing is written after a close or after
  the socket became a stream; the handler is never given a request on a closed socket, nor
  while it is still answering the previous one;
- memory: what the connection holds (everything allocated since it opened, through
  tracemalloc: the reader, the parser's partial header, queued requests and bytes) stays under
  `RETAINED_BOUND` plus two reads, and the transport's unsent bytes under its high-water mark
  plus two answers, however much the client sends;
- a socket whose client has read every answer, and whose handler owes none, does not stay
  paused: it reads again (or is closed);
- every socket's admission slot is given back once the socket is gone, and what was allocated
  for it is freed (less than `LEFTOVER_BOUND` left after a garbage collection).

Memory is traced only for inputs whose tail is repeated `TRACED_REPEATS` times (knob bits 6-7
both set): tracing makes an input about five times slower, and the other inputs (at most
64 KiB sent) cannot come near the bounds.
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import re
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fakes import FakeClockLoop

from sse_gateway.edge.admission import Admission
from sse_gateway.edge.protocol import RequestReader
from sse_gateway.edge.request_parser import MAX_HEADER_BYTES
from sse_gateway.metrics import Metrics
from sse_gateway.wire.http import Request, Response

# What the fake handler does is chosen by the request's path prefix (seeds use them all).
BODY_LIMIT = 4096  # kept for POST /publish...; any other body is read and dropped
BIG_BODY = 16 * 1024  # the answer to /big...: a few make the transport pause writing
MAX_ANSWER = BIG_BODY + 1024  # the largest answer the handler or the reader writes
# uvloop reads at most 256 KiB at a time: no single data_received is larger.
READ_SIZES = (1, 2, 3, 5, 8, 17, 64, 333, 1024, 4096, 16384, 65536, 262144)
REPEATS = (1, 1, 16, 1024)  # knob bits 6-7: how often the client sends its tail
TRACED_REPEATS = 1024  # memory is traced for these inputs only
MAX_CLIENT_BYTES = 4 * 1024 * 1024  # the longest a repeated input gets
MAX_REQUESTS = 500  # the client stops after this many have been handled (time per input)
# Past the reads themselves, everything a connection may hold: about one request head (a
# head of MAX_HEADER_BYTES in 4-byte headers is ~290 KB of Python objects), the requests
# parsed from one slice of a read, a publish body, timers. Well under MAX_CLIENT_BYTES, so that
# a connection that keeps what it is sent is caught.
RETAINED_BOUND = 48 * MAX_HEADER_BYTES
# What may stay allocated once the socket is gone (loop and allocator bookkeeping).
LEFTOVER_BOUND = 64 * 1024
IDLE_STEPS = 6  # how long the client waits on a paused socket before it stops sending
_STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-5][0-9][0-9]) [\x20-\x7e]+")
_HEADER_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+): ?([\x20-\x7e]*)")


class Finding(AssertionError):
    """An invariant the reader broke."""


@dataclass(frozen=True, slots=True)
class Knobs:
    """Byte 0 of the input."""

    reads: int  # bits 0-1: 0 reads at once, 1 never, 2 now and then, 3 only at the end
    timeout: bool  # bit 2: the clock passes every timeout before the client leaves
    leaves_early: bool  # bit 3: the client may hang up between two reads
    draining: bool  # bit 4: the gateway is draining (no keep-alive)
    budget_spent: bool  # bit 5: other sockets spent this turn's request budget first
    repeats: int  # bits 6-7

    @classmethod
    def of(cls, byte: int) -> Knobs:
        return cls(
            reads=byte & 3,
            timeout=bool(byte & 4),
            leaves_early=bool(byte & 8),
            draining=bool(byte & 16),
            budget_spent=bool(byte & 32),
            repeats=REPEATS[byte >> 6],
        )


class Stream(asyncio.Protocol):
    """What takes the socket over after `hand_over`: gives the admission slot back on close,
    as the stream lifecycle does."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission

    def connection_lost(self, exc: Exception | None) -> None:
        self.admission.socket_closed()


class Connection:
    """One socket: the reader, its transport and its handler, and the checks on them.

    Violations found inside a call from the reader are recorded and raised after the step:
    an exception raised inside a parser callback would come back as an `HttpParserError`,
    which the reader answers with a 400.
    """

    def __init__(self, knobs: Knobs) -> None:
        self.knobs = knobs
        self.admission = Admission(100, Metrics())
        self.admission.draining = knobs.draining
        self.reader = RequestReader(self, self.admission)
        self.protocol: asyncio.BaseProtocol = self.reader
        self.violations: list[str] = []
        # the transport
        self.high_water = self.low_water = 0
        self.unsent = 0
        self.writing_paused = False
        self.reading = True
        self.closed = False  # close() or abort() called
        self.eof_written = False  # write_eof(): a lingering close
        self.lost = False  # connection_lost delivered
        self.handed_over = False
        self.answers = 0  # writes
        self.last_seq = 0
        self.final_answer = ""  # why the last write must be the last one, if it must
        # the handler
        self.handled = 0
        self.heads: set[int] = set()  # seqs of HEAD requests
        self.awaiting: list[tuple[Request, int]] = []  # async answers still owed
        self.largest_read = 0

    # --- asyncio.Transport, as the reader sees it ------------------------------------------

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high_water = 64 * 1024 if high is None else high
        self.low_water = self.high_water // 4 if low is None else low

    def get_write_buffer_size(self) -> int:
        return self.unsent

    def write(self, data: bytes) -> None:
        if data == b"HTTP/1.1 100 Continue\r\n\r\n":
            if self.closed or self.eof_written or self.final_answer or self.handed_over:
                self.violation("100 Continue after the end of the answers")
            return  # an interim answer, not one of the answers counted per request
        if self.eof_written:
            self.violation(f"written after write_eof: {bytes(data[:80])!r}")
            return
        if self.closed:
            self.violation(f"written after close: {bytes(data[:80])!r}")
            return
        if self.handed_over:
            self.violation("the reader wrote on a socket it handed over")
        if self.final_answer:
            self.violation(f"written after {self.final_answer}: {bytes(data[:80])!r}")
        self.answers += 1
        self.check_answer(bytes(data))
        self.unsent += len(data)
        if self.unsent > self.high_water and not self.writing_paused:
            self.writing_paused = True
            self.protocol.pause_writing()  # type: ignore[attr-defined]

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self.closed:
            self.violation("write_eof after close")
        self.eof_written = True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self.lose)

    def abort(self) -> None:
        self.close()

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    # --- the client and the kernel -----------------------------------------------------------

    def client_reads(self) -> None:
        """The client reads everything sent so far."""
        self.unsent = 0
        if self.writing_paused and not self.lost:
            self.writing_paused = False
            self.protocol.resume_writing()  # type: ignore[attr-defined]

    def lose(self) -> None:
        """The socket is gone (closed by either side): `connection_lost`, once."""
        if not self.lost:
            self.lost = True
            self.closed = True
            self.protocol.connection_lost(None)

    def send(self, data: bytes) -> None:
        self.largest_read = max(self.largest_read, len(data))
        self.protocol.data_received(data)  # type: ignore[attr-defined]

    # --- RequestHandler ----------------------------------------------------------------------

    def body_limit(self, url: bytes, headers: list[tuple[bytes, bytes]]) -> int:
        return BODY_LIMIT if url.startswith(b"/publish") else 0

    def handle(self, reader: RequestReader, request: Request) -> None:
        if reader is not self.reader:
            self.violation("the handler was given another reader")
        if self.closed or self.handed_over:
            self.violation(f"{request.method} {request.path} handled on a closed socket")
            return
        if self.awaiting:
            self.violation("a request handled while the previous one is still being answered")
        if len(request.body) > BODY_LIMIT:
            self.violation(f"a body of {len(request.body)} bytes kept (limit {BODY_LIMIT})")
        self.handled += 1
        seq = self.handled
        if request.method == "HEAD":
            self.heads.add(seq)
        if request.path.startswith("/stream"):
            transport = reader.hand_over()
            if transport is not self:
                self.violation("hand_over returned another transport")
            self.handed_over = True
            self.set_protocol(Stream(self.admission))
            return
        if request.path.startswith("/async"):
            reader.begin_async()
            self.awaiting.append((request, seq))
            return
        self.answer(request, seq)

    def answer(self, request: Request, seq: int) -> None:
        body = b"x" * BIG_BODY if request.path.startswith("/big") else b'{"ok":true}'
        response = Response(200, body, headers=[("X-Fuzz-Seq", str(seq))])
        keep_alive = request.keep_alive and not request.path.startswith("/close")
        writes = 0 if self.closed or self.handed_over else 1
        before = self.answers
        self.reader.respond(response, keep_alive=keep_alive, head_only=request.method == "HEAD")
        if self.answers - before != writes:
            self.violation(f"respond() wrote {self.answers - before} answers, not {writes}")

    def finish_async(self) -> None:
        """The async handler answers what it owes, then tells the reader."""
        while self.awaiting:
            request, seq = self.awaiting.pop(0)
            self.answer(request, seq)
            self.reader.end_async()

    # --- the checks --------------------------------------------------------------------------

    def violation(self, message: str) -> None:
        self.violations.append(message)

    def check_answer(self, data: bytes) -> None:
        head, sep, body = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status_line = _STATUS_LINE.fullmatch(lines[0])
        if not sep or status_line is None:
            self.violation(f"not an HTTP/1.1 response: {data[:80]!r}")
            return
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            match = _HEADER_LINE.fullmatch(line)
            if match is None:
                self.violation(f"bad header line {line[:80]!r}")
                return
            name = match.group(1).lower()
            if name in headers:
                self.violation(f"header {name!r} twice")
            headers[name] = match.group(2)
        status = int(status_line.group(1))
        length = headers.get(b"content-length", b"")
        connection = headers.get(b"connection")
        if not length.isdigit() or connection not in (b"keep-alive", b"close"):
            self.violation(f"no Content-Length or Connection in {head[:200]!r}")
            return
        seq_text = headers.get(b"x-fuzz-seq")
        if seq_text is None:
            # The reader's own answer: an error that ends the connection.
            self.final_answer = f"the reader's own {status}"
            if status < 400 or connection != b"close":
                self.violation(f"the reader answered {status} {connection!r} by itself")
            if body and (len(body) != int(length) or set(json.loads(body)) != {"error", "message"}):
                self.violation(f"error body {body[:80]!r}")
            return
        seq = int(seq_text)
        if not self.last_seq < seq <= self.handled:
            self.violation(f"answer {seq} after answer {self.last_seq} ({self.handled} handled)")
        self.last_seq = seq
        wanted = 0 if seq in self.heads else int(length)
        if len(body) != wanted:
            self.violation(f"answer {seq}: {len(body)} body bytes, Content-Length {length!r}")
        if connection == b"close":
            self.final_answer = f"answer {seq} with Connection: close"

    def check(self, baseline: int) -> None:
        if self.final_answer and not (self.closed or self.eof_written):
            self.violation(f"the socket stays open after {self.final_answer}")
        bound = self.high_water + 2 * MAX_ANSWER
        if self.unsent > bound:
            self.violation(f"{self.unsent} bytes wait in the transport (bound {bound})")
        retained = tracemalloc.get_traced_memory()[0] - baseline
        bound = RETAINED_BOUND + 2 * self.largest_read
        if retained > bound:
            self.violation(f"the connection holds {retained} bytes (bound {bound})")
        if self.violations:
            raise Finding("; ".join(self.violations))


def reads(head: bytes, tail: bytes, repeats: int, rng: random.Random) -> Iterator[bytes]:
    """What the client sends, `head` then `tail` `repeats` times over, cut into reads."""
    total = min(len(head) + len(tail) * repeats, MAX_CLIENT_BYTES)
    offset = 0
    while offset < total:
        size = min(rng.choice(READ_SIZES), total - offset)
        yield _slice(head, tail, offset, size)
        offset += size


def _slice(head: bytes, tail: bytes, offset: int, size: int) -> bytes:
    """Bytes `offset` to `offset + size` of `head + tail * n`, without building it."""
    if offset < len(head):
        piece = head[offset : offset + size]
        if len(piece) == size:
            return piece
        return piece + _slice(head, tail, len(head), size - len(piece))
    start = (offset - len(head)) % len(tail)
    pieces = [tail[start : start + size]]
    missing = size - len(pieces[0])
    if missing:
        whole, rest = divmod(missing, len(tail))
        pieces += [tail] * whole + [tail[:rest]]
    return b"".join(pieces)


async def turns(n: int = 1) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def advance(seconds: float) -> None:
    """Moves the fake clock: due timers run."""
    loop = asyncio.get_running_loop()
    assert isinstance(loop, FakeClockLoop)
    loop.now += seconds
    await turns(3)


async def session(knobs: Knobs, seed: int, head: bytes, tail: bytes) -> None:
    rng = random.Random(seed)
    baseline = tracemalloc.get_traced_memory()[0]
    conn = Connection(knobs)
    conn.reader.connection_made(conn)  # type: ignore[arg-type]
    conn.check(baseline)
    for data in reads(head, tail, knobs.repeats if tail else 0, rng):
        await turns()  # a socket is read at most once per loop turn
        idle = stuck = 0
        while not conn.reading and not conn.closed and idle < IDLE_STEPS:
            # The client waits: answers it is owed come, it reads them if it does, time passes.
            if rng.random() < 0.5:
                conn.finish_async()
            if knobs.reads == 0 or (knobs.reads == 2 and rng.random() < 0.5):
                conn.client_reads()
            owed = conn.awaiting or conn.unsent
            before = conn.handled
            await advance(rng.choice((0.0, 0.0, 0.5, 3.0)))
            # A backlog of pipelined requests is served a turn's budget at a time: only a
            # reader that makes no progress is stuck.
            progress = conn.handled != before
            if not owed and not progress and not conn.reading and not conn.closed:
                stuck += 0 if conn.handed_over else 1
                if stuck == 2:
                    conn.violation("reading stays paused, yet nothing is owed and all is read")
            conn.check(baseline)
            idle += 1
        if conn.closed or not conn.reading or conn.handed_over or conn.handled >= MAX_REQUESTS:
            break  # closed, still paused (the client gives up), a stream's now, or enough
        if knobs.budget_spent:
            while conn.admission.spend_request():
                pass
        conn.send(data)
        conn.check(baseline)
        if knobs.reads == 0 or (knobs.reads == 2 and rng.random() < 0.3):
            conn.client_reads()
        conn.check(baseline)
        if knobs.leaves_early and rng.random() < 0.02:
            break
    await turns(2)
    conn.check(baseline)
    if knobs.timeout:
        await advance(3600.0)  # past the header, idle and drain timers
        conn.check(baseline)
    while True:
        conn.finish_async()
        if knobs.reads != 1:
            conn.client_reads()
        owed = conn.awaiting or conn.unsent
        before = conn.handled
        await turns(3)
        if conn.handled == before or conn.reading or conn.closed or conn.handed_over:
            break
    if not owed and not conn.reading and not conn.closed and not conn.handed_over:
        conn.violation("reading stays paused, yet nothing is owed and all is read")
    conn.check(baseline)
    conn.lose()  # the client hangs up (a no-op if the gateway closed first)
    await turns(2)
    conn.check(baseline)
    if conn.admission.open_sockets != 0:
        raise Finding(f"{conn.admission.open_sockets} admission slots held after the close")


_loop: FakeClockLoop | None = None
_errors: list[str] = []


def _loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    _errors.append(f"{context.get('message')}: {context.get('exception')!r}")


def check(data: bytes) -> None:
    """One input: raises `Finding` (or what the reader let out) on a broken invariant."""
    global _loop
    if len(data) < 4:
        return
    if _loop is None:
        _loop = FakeClockLoop()
        _loop.set_exception_handler(_loop_error)
    _errors.clear()
    knobs = Knobs.of(data[0])
    client = data[4:]
    split = int.from_bytes(data[2:4], "big")
    # Memory is traced only for a client that sends a lot (see the module's docstring).
    if knobs.repeats >= TRACED_REPEATS:
        tracemalloc.start()
    try:
        _loop.run_until_complete(session(knobs, data[1], client[:split], client[split:]))
        _loop.run_until_complete(advance(3600.0))  # stray timers fire now, not in the next input
        if knobs.repeats >= TRACED_REPEATS:
            gc.collect()  # a 431 raised in a parser callback leaves a reference cycle
            left = tracemalloc.get_traced_memory()[0]
            if left > LEFTOVER_BOUND:
                raise Finding(f"{left} bytes still held after the socket is gone")
    finally:
        tracemalloc.stop()
    if _errors:
        raise Finding("the event loop reported: " + "; ".join(_errors))
