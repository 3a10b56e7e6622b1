"""Shared fakes for in-process protocol tests (uvicorn `tests/protocols` style): no sockets."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

from sse_gateway.wire.http import Request


class FakeTransport:
    """Records what a protocol asks of its transport.

    `on_write` (if set) runs after each recorded write: a test can make the transport pause
    its protocol mid-flush, as a real one does when its buffer passes the high-water mark.
    """

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.late_writes: list[bytes] = []  # written after close()/abort(): always a bug
        self.closed = False
        self.aborted = False
        self.pause_reading_calls = 0
        self.resume_reading_calls = 0
        self.reading = True
        self.write_buffer_limits: tuple[int | None, int | None] | None = None
        self.protocol: asyncio.BaseProtocol | None = None
        self.on_write: Callable[[bytes], None] | None = None
        self.buffered = 0  # what get_write_buffer_size() reports: a test sets it
        self.eof_capable = False  # can_write_eof(): a test that checks lingering sets it
        self.eof_written = False

    # --- asyncio.Transport -------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.closed or self.aborted:
            self.late_writes.append(bytes(data))
            return
        self.writes.append(bytes(data))
        if self.on_write is not None:
            self.on_write(data)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def can_write_eof(self) -> bool:
        return self.eof_capable

    def write_eof(self) -> None:
        self.eof_written = True

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def pause_reading(self) -> None:
        self.pause_reading_calls += 1
        self.reading = False

    def resume_reading(self) -> None:
        self.resume_reading_calls += 1
        self.reading = True

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.write_buffer_limits = (high, low)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol | None:
        return self.protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default  # no real socket behind it

    # --- for assertions ----------------------------------------------------------------------

    @property
    def output(self) -> bytes:
        return b"".join(self.writes)


class FakeHandler:
    """A RequestHandler that records its calls; `action(reader, request)` answers if set."""

    def __init__(
        self,
        *,
        body_limit: int = 0,
        action: Callable[[Any, Request], None] | None = None,
    ) -> None:
        self.limit = body_limit
        self.action = action
        self.calls: list[tuple[Any, Request]] = []
        self.body_limit_calls: list[tuple[bytes, list[tuple[bytes, bytes]]]] = []

    def body_limit(self, url: bytes, headers: list[tuple[bytes, bytes]]) -> int:
        self.body_limit_calls.append((url, list(headers)))
        return self.limit

    def handle(self, reader: Any, request: Request) -> None:
        self.calls.append((reader, request))
        if self.action is not None:
            self.action(reader, request)

    @property
    def requests(self) -> list[Request]:
        return [request for _, request in self.calls]


class FakeOwner:
    """A StreamOwner that records `stream_closed` and `socket_closed`."""

    def __init__(self, event_buffer_size: int = 50) -> None:
        self.event_buffer_size = event_buffer_size
        self.closed: list[tuple[Any, str]] = []
        self.sockets_closed: list[Any] = []
        self.calls: list[str] = []

    def stream_closed(self, stream: Any, reason: str) -> None:
        self.closed.append((stream, reason))
        self.calls.append(f"stream_closed:{reason}")

    def socket_closed(self, stream: Any) -> None:
        self.sockets_closed.append(stream)
        self.calls.append("socket_closed")


class FakeClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock only moves when a test says so: `call_later` timers fire on
    `await advance(seconds)`, never by waiting in real time."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def time(self) -> float:
        return self.now


async def advance(seconds: float) -> None:
    """Moves the running FakeClockLoop's clock and lets due timers (and callbacks) run."""
    loop = asyncio.get_running_loop()
    assert isinstance(loop, FakeClockLoop)
    loop.now += seconds
    await turns(3)


async def settle(n: int = 1) -> None:
    """Lets `n` loop turns run after the head reads of new streams were sent: those wait
    `HEAD_BATCH_SECONDS` to be gathered into one pipeline (on a FakeClockLoop, the clock is
    moved that far first)."""
    from sse_gateway.streams.history import HEAD_BATCH_SECONDS

    loop = asyncio.get_running_loop()
    for _ in range(3):  # a subscription, a history read, then (not recovered) a head read
        await turns(n)
        if isinstance(loop, FakeClockLoop):
            await advance(HEAD_BATCH_SECONDS)
        else:
            await asyncio.sleep(HEAD_BATCH_SECONDS)
    await turns(n)


async def turns(n: int = 1) -> None:
    """Lets the loop run `n` more turns."""
    for _ in range(n):
        await asyncio.sleep(0)


def run_in_loop(
    test: Callable[..., Coroutine[Any, Any, None]],
) -> Callable[..., None]:
    """Runs an async test body on a fresh FakeClockLoop (fixtures are passed through)."""

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        with asyncio.Runner(loop_factory=FakeClockLoop) as runner:
            runner.run(test(*args, **kwargs))

    return wrapper


# --- HTTP/1.1 chunked bodies, written here independently of `wire.frames` -----------------

END_CHUNK = b"0\r\n\r\n"


def http_chunk(frame: bytes) -> bytes:
    """`frame` as one chunk (RFC 9112 §7.1): its size in hex, CRLF, the bytes, CRLF."""
    assert frame, "an empty chunk is the last chunk"
    return f"{len(frame):x}\r\n".encode("ascii") + frame + b"\r\n"


def split_chunks(data: bytes) -> tuple[list[bytes], bool]:
    """The chunks `data` is made of: (their contents, whether it ends with the last chunk).

    Strict: `data` must be whole chunks, in full, and nothing may follow the last chunk, so a
    write that is not "whole chunks" fails the test that decodes it.
    """
    chunks: list[bytes] = []
    rest = data
    while rest:
        line, sep, rest = rest.partition(b"\r\n")
        assert sep, f"no CRLF after a chunk size: {line[:50]!r}"
        hex_digits = b"0123456789abcdefABCDEF"
        assert line and all(c in hex_digits for c in line), f"bad chunk size {line!r}"
        size = int(line, 16)
        if size == 0:
            assert rest == b"\r\n", f"the last chunk must end the body: {rest[:50]!r}"
            return chunks, True
        assert len(rest) >= size + 2, f"chunk of {size} bytes cut short: {rest[:50]!r}"
        assert rest[size : size + 2] == b"\r\n", f"chunk not followed by CRLF: {rest[:50]!r}"
        chunks.append(rest[:size])
        rest = rest[size + 2 :]
    return chunks, False


def dechunk(data: bytes) -> bytes:
    """The body bytes carried by `data` (whole chunks, see `split_chunks`)."""
    return b"".join(split_chunks(data)[0])


def parse_response(data: bytes, *, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
    """(status, headers with lower-cased names, body) of one complete HTTP/1.1 response."""
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, f"no end of head in {data!r}"
    lines = head.decode("latin-1").split("\r\n")
    version, status, _ = lines[0].split(" ", 2)
    assert version == "HTTP/1.1"
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        assert name.lower() not in headers, f"repeated header {name}"
        headers[name.lower()] = value.strip()
    if head_only:
        assert body == b"", "a head-only response has a body"
    elif "content-length" in headers:
        assert len(body) == int(headers["content-length"]), "body does not match Content-Length"
    return int(status), headers, body
