"""A conforming Server-Sent Events parser and a raw-socket HTTP/1.1 client.

The parser follows the WHATWG "interpreting an event stream" algorithm: UTF-8 decoding (a leading
BOM is dropped), lines end at CRLF, CR or LF, `data` lines are joined with LF, `:` starts a comment,
an empty line dispatches. Unlike a browser it reports every block that set a field (so a
`retry:`-only block is visible as a frame), with `has_data` telling whether a browser would have
dispatched it as an event.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import re
import select
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

_LINE_BREAK = re.compile(r"[\r\n]")


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One block of fields ended by a blank line."""

    event: str = "message"
    data: str = ""
    id: str | None = None
    retry: int | None = None
    has_data: bool = False
    event_field: bool = False

    def json(self) -> Any:
        return json.loads(self.data)

    @property
    def is_retry_only(self) -> bool:
        return self.retry is not None and not self.has_data and not self.event_field


class SSEParser:
    """Pure, incremental: feed bytes, get the completed blocks."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""
        self._started = False
        self._reset_block()
        self.last_event_id = ""
        self.retries: list[int] = []
        self.comments: list[str] = []

    def _reset_block(self) -> None:
        self._event: str | None = None
        self._data: list[str] = []
        self._id: str | None = None
        self._retry: int | None = None
        self._any_field = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        self._text += self._decoder.decode(chunk)
        return self._drain(final=False)

    def feed_eof(self) -> list[SSEEvent]:
        """End of stream: an incomplete block is discarded, as the spec says."""
        self._text += self._decoder.decode(b"", final=True)
        out = self._drain(final=True)
        self._reset_block()
        return out

    def _drain(self, *, final: bool) -> list[SSEEvent]:
        if not self._started:
            if not self._text:
                return []
            self._started = True
            if self._text.startswith("\ufeff"):
                self._text = self._text[1:]
        out: list[SSEEvent] = []
        while True:
            match = _LINE_BREAK.search(self._text)
            if match is None:
                break
            i = match.start()
            if self._text[i] == "\r":
                if i + 1 == len(self._text):
                    if not final:
                        break  # a CR at the end may be the first half of a CRLF
                    end = i + 1
                elif self._text[i + 1] == "\n":
                    end = i + 2
                else:
                    end = i + 1
            else:
                end = i + 1
            line = self._text[:i]
            self._text = self._text[end:]
            event = self._line(line)
            if event is not None:
                out.append(event)
        return out

    def _line(self, line: str) -> SSEEvent | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            self.comments.append(line[1:])
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            if "\0" not in value:
                self._id = value
                self.last_event_id = value
        elif name == "retry":
            if value and value.isascii() and value.isdigit():
                self._retry = int(value)
                self.retries.append(self._retry)
        else:
            return None  # unknown fields are ignored
        self._any_field = True
        return None

    def _dispatch(self) -> SSEEvent | None:
        if not self._any_field:
            self._reset_block()
            return None
        event = SSEEvent(
            event=self._event if self._event else "message",
            data="\n".join(self._data),
            id=self._id,
            retry=self._retry,
            has_data=bool(self._data),
            event_field=self._event is not None,
        )
        self._reset_block()
        return event


def parse_stream(data: bytes) -> list[SSEEvent]:
    parser = SSEParser()
    return parser.feed(data) + parser.feed_eof()


# --------------------------------------------------------------------------- raw HTTP


@dataclass(slots=True)
class Response:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes = b""

    def header(self, name: str) -> str | None:
        """The last value of a header (case-insensitive), or None."""
        found = None
        for key, value in self.headers:
            if key.lower() == name.lower():
                found = value
        return found

    def header_values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)


class ChunkError(ValueError):
    """A `Transfer-Encoding: chunked` body that breaks RFC 9112 §7.1."""


class _ChunkedDecoder:
    """Decodes a `Transfer-Encoding: chunked` body incrementally, strictly (RFC 9112 §7.1).

    A size line that is not hex, a chunk not followed by CRLF, or anything after the last
    chunk's end raises ChunkError: a stream that garbles its framing fails the test at once.
    `done`: the last chunk (`0`) and the blank line after it were read; `sizes` lists every
    chunk's size in order (the last one, 0, included).
    """

    def __init__(self) -> None:
        self._buf = b""
        self._state = "size"
        self._remaining = 0
        self.done = False
        self.sizes: list[int] = []

    def feed(self, data: bytes) -> bytes:
        if self.done:
            if data:
                raise ChunkError(f"bytes after the last chunk: {data[:100]!r}")
            return b""
        self._buf += data
        out = bytearray()
        while not self.done:
            if self._state == "size":
                nl = self._buf.find(b"\r\n")
                if nl < 0:
                    if len(self._buf) > 1024:
                        raise ChunkError(f"no chunk size line: {self._buf[:100]!r}")
                    break
                size_text = self._buf[:nl].split(b";", 1)[0].strip()
                if not size_text or any(c not in b"0123456789abcdefABCDEF" for c in size_text):
                    raise ChunkError(f"bad chunk size line: {self._buf[:nl][:100]!r}")
                self._buf = self._buf[nl + 2 :]
                self._remaining = int(size_text, 16)
                self.sizes.append(self._remaining)
                self._state = "data" if self._remaining else "trailer"
            elif self._state == "data":
                if not self._buf:
                    break
                take = min(len(self._buf), self._remaining)
                out += self._buf[:take]
                self._buf = self._buf[take:]
                self._remaining -= take
                if self._remaining == 0:
                    self._state = "crlf"
            elif self._state == "crlf":
                if len(self._buf) < 2:
                    break
                if self._buf[:2] != b"\r\n":
                    raise ChunkError(f"chunk data not followed by CRLF: {self._buf[:100]!r}")
                self._buf = self._buf[2:]
                self._state = "size"
            else:  # "trailer": the blank line that ends the body (no trailer fields expected)
                if len(self._buf) < 2:
                    break
                if self._buf[:2] != b"\r\n":
                    raise ChunkError(f"unexpected trailer after the last chunk: {self._buf!r}")
                rest, self._buf = self._buf[2:], b""
                self.done = True
                if rest:
                    raise ChunkError(f"bytes after the last chunk: {rest[:100]!r}")
        return bytes(out)


def dechunk(data: bytes) -> tuple[bytes, bool]:
    """A chunked body decoded at once: (the bytes, whether its last chunk was there)."""
    decoder = _ChunkedDecoder()
    return decoder.feed(data), decoder.done


def build_request(
    method: str,
    target: str,
    headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    host: str = "127.0.0.1",
) -> bytes:
    """The bytes of one request; `host` is the Host header value (give the port too)."""
    items = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
    names = {k.lower() for k, _ in items}
    lines = [f"{method} {target} HTTP/1.1"]
    if "host" not in names:
        lines.append(f"Host: {host}")
    lines += [f"{k}: {v}" for k, v in items]
    if body and "content-length" not in names:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class SSEClient:
    """A synchronous HTTP/1.1 client on a raw socket that reads an SSE response incrementally.

    A `Transfer-Encoding: chunked` body is decoded strictly (ChunkError on broken framing);
    `wire` keeps the body's bytes as they came, `raw` the decoded ones the SSE parser read.
    The body is over (`eof`) at its last chunk, or when the socket closes; `ended` tells a
    chunked body that ended properly from one cut off (a reset, a crash).
    """

    def __init__(self, sock: socket.socket, response: Response, leftover: bytes) -> None:
        self.sock = sock
        self.response = response
        self.parser = SSEParser()
        self.frames: list[SSEEvent] = []  # every block read so far, in order
        self.raw = bytearray()  # the decoded body bytes read so far
        self.wire = bytearray()  # the body bytes as they came off the socket (chunk framing)
        self.eof = False  # the body is over: its last chunk was read, or the socket closed
        self.socket_closed = False  # the peer closed (or reset) the connection
        self.connected: SSEEvent | None = None  # the `connected` frame, once wait_connected saw it
        self._pending: list[SSEEvent] = []
        te = (response.header("Transfer-Encoding") or "").lower()
        self._chunked: _ChunkedDecoder | None = _ChunkedDecoder() if "chunked" in te else None
        if leftover:
            self._absorb(leftover)

    @property
    def chunked(self) -> bool:
        """The response announced `Transfer-Encoding: chunked`."""
        return self._chunked is not None

    @property
    def ended(self) -> bool:
        """A chunked body whose last chunk (`0`, blank line) was read: a graceful end. False for
        a chunked body cut off, and for a close-delimited one (nothing tells its end apart)."""
        return self._chunked is not None and self._chunked.done

    def chunks(self) -> list[bytes]:
        """The contents of every whole chunk read so far (a chunked body), in order."""
        assert self._chunked is not None, "not a chunked body"
        out: list[bytes] = []
        start = 0
        for size in self._chunked.sizes:
            if size == 0 or start + size > len(self.raw):
                break
            out.append(bytes(self.raw[start : start + size]))
            start += size
        return out

    @property
    def retries(self) -> list[int]:
        """Every `retry:` value read so far, in order (whatever block it came in)."""
        return self.parser.retries

    @property
    def status(self) -> int:
        return self.response.status

    @classmethod
    def connect(
        cls,
        port: int,
        target: str = "/v1/sse",
        headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
        *,
        method: str = "GET",
        body: bytes = b"",
        timeout: float = 15.0,
        host: str = "127.0.0.1",
        rcvbuf: int | None = None,
    ) -> SSEClient:
        """Sends the request and reads the status line and headers (not the body)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.settimeout(timeout)
            sock.connect((host, port))
            sock.sendall(build_request(method, target, headers, body, f"{host}:{port}"))
            deadline = time.monotonic() + timeout
            buf = b""
            while b"\r\n\r\n" not in buf:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no response headers within {timeout}s: {buf!r}")
                sock.settimeout(remaining)
                chunk = sock.recv(65536)
                if not chunk:
                    raise EOFError(f"connection closed before response headers: {buf!r}")
                buf += chunk
            head, _, rest = buf.partition(b"\r\n\r\n")
            response = parse_head(head)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return cls(sock, response, rest)

    def _absorb(self, data: bytes) -> None:
        self.wire += data
        if self._chunked is not None:
            data = self._chunked.feed(data)
        self.raw += data
        events = self.parser.feed(data)
        self.frames += events
        self._pending += events
        if self._chunked is not None and self._chunked.done:
            self._end_body()

    def _end_body(self) -> None:
        """The body is over: an incomplete last block is dropped, as the spec says."""
        if self.eof:
            return
        self.eof = True
        events = self.parser.feed_eof()
        self.frames += events
        self._pending += events

    def _read_some(self, deadline: float) -> bool:
        """Reads what is available before the deadline; False on timeout. EOFError once the
        socket is closed."""
        if self.socket_closed:
            raise EOFError("stream closed")
        remaining = max(0.0, deadline - time.monotonic())
        poller = select.poll()  # not select(): the tests hold more than 1024 sockets
        poller.register(self.sock, select.POLLIN | select.POLLHUP | select.POLLERR)
        if not poller.poll(remaining * 1000):
            return False
        try:
            data = self.sock.recv(262144)
        except BlockingIOError:
            return True
        except ConnectionResetError:
            data = b""
        if not data:
            self.socket_closed = True
            self._end_body()
            return True
        self._absorb(data)
        return True

    def next_frame(self, timeout: float = 10.0) -> SSEEvent:
        """The next block, including `retry:`-only blocks. TimeoutError; EOFError when the
        body is over and every block was taken."""
        deadline = time.monotonic() + timeout
        while not self._pending:
            if self.eof:
                raise EOFError("stream closed")
            if not self._read_some(deadline) and time.monotonic() >= deadline:
                raise TimeoutError(f"no SSE frame within {timeout}s")
        return self._pending.pop(0)

    def next_event(self, timeout: float = 10.0) -> SSEEvent:
        """The next block a browser would dispatch (it has `data`)."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self.next_frame(max(0.0, deadline - time.monotonic()))
            if frame.has_data:
                return frame

    def read_until(self, pred: Callable[[SSEEvent], bool], timeout: float = 10.0) -> list[SSEEvent]:
        """Frames read up to and including the first one matching `pred`."""
        deadline = time.monotonic() + timeout
        seen: list[SSEEvent] = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no matching frame within {timeout}s; saw {seen!r}")
            frame = self.next_frame(remaining)
            seen.append(frame)
            if pred(frame):
                return seen

    def wait_event(self, event_type: str, timeout: float = 10.0) -> SSEEvent:
        return self.read_until(lambda f: f.event == event_type and f.has_data, timeout)[-1]

    def wait_connected(self, timeout: float = 15.0) -> dict[str, Any]:
        """The `connected` payload; the frame itself (its `id:`, `retry:`) is kept as
        `connected`."""
        self.connected = self.wait_event("connected", timeout)
        data: dict[str, Any] = self.connected.json()
        return data

    def drain_available(self, quiet: float = 0.2) -> list[SSEEvent]:
        """Everything that arrives until the stream has been quiet for `quiet` seconds."""
        out: list[SSEEvent] = []
        while True:
            try:
                out.append(self.next_frame(quiet))
            except TimeoutError:
                return out

    def wait_closed(self, timeout: float = 10.0) -> bool:
        """Reads (and keeps) frames until the socket closes; False if it is still open at the
        deadline."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._read_some(deadline)
        except EOFError:
            return True

    def read_body(self, timeout: float = 5.0) -> bytes:
        """The rest of a bounded (error) response body, decoded: to the last chunk of a chunked
        one, by Content-Length, else until EOF."""
        length = self.response.header("Content-Length")
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self._chunked is not None:
                    if self._chunked.done:
                        break
                elif length is not None and len(self.raw) >= int(length):
                    break
                if not self._read_some(deadline) and time.monotonic() >= deadline:
                    break
        except EOFError:
            pass
        return bytes(self.raw)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> SSEClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: The sequence number of a position id (`wire.ids.position_id`): the resume id of a stream
#: whose player's history was empty, the end of one millisecond of Redis' clock; no entry has it.
POSITION_SEQ = 2**64 - 1


def position_ms(value: str | None) -> int | None:
    """The millisecond of a position id `<ms>-18446744073709551615`; None for any other id."""
    if value is None:
        return None
    ms, sep, seq = value.partition("-")
    if not sep or not ms.isdigit() or seq != str(POSITION_SEQ):
        return None
    return int(ms)


def assert_position_id(value: str | None, slack_ms: int = 60_000) -> int:
    """`value` is a position id of about now (Redis' clock a millisecond before the read of
    where the history ends): the resume id of a stream that began on an empty history.
    Returns its millisecond."""
    ms = position_ms(value)
    assert ms is not None, f"not a position id (<ms>-{POSITION_SEQ}): {value!r}"
    now_ms = int(time.time() * 1000)
    assert now_ms - slack_ms <= ms <= now_ms, f"position {value} is not of about now ({now_ms})"
    return ms


#: Event types of the gateway's own frames; a published event cannot have them.
GATEWAY_EVENTS = ("connected", "heartbeat", "close", "error", "session_expired")


def is_event(frame: SSEEvent) -> bool:
    """A published event (not `connected`, a heartbeat or `close`; not a retry-only block)."""
    return frame.has_data and frame.event not in GATEWAY_EVENTS


def read_events(client: SSEClient, count: int, timeout: float = 30.0) -> list[SSEEvent]:
    """The next `count` published events."""
    deadline = time.monotonic() + timeout
    out: list[SSEEvent] = []
    while len(out) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(
                f"only {len(out)} of {count} events within {timeout}s: {[f.event for f in out]}"
            )
        try:
            frame = client.next_frame(remaining)
        except TimeoutError:
            continue
        if is_event(frame):
            out.append(frame)
    return out


def read_through(client: SSEClient, last_id: str, timeout: float = 30.0) -> list[SSEEvent]:
    """Published events up to and including the one with id `last_id`."""
    frames = client.read_until(lambda f: is_event(f) and f.id == last_id, timeout)
    return [f for f in frames if is_event(f)]


def assert_quiet(client: SSEClient, quiet: float = 0.3) -> None:
    """No published event arrives within `quiet` seconds."""
    extra = [f for f in client.drain_available(quiet) if is_event(f)]
    assert not extra, f"unexpected events: {[(f.id, f.event) for f in extra]}"


def parse_head(head: bytes) -> Response:
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    if not version.startswith("HTTP/"):
        raise ValueError(f"not an HTTP response: {lines[0]!r}")
    code, _, reason = rest.partition(" ")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return Response(int(code), reason, headers)


@dataclass(slots=True)
class _Reader:
    sock: socket.socket
    deadline: float
    buf: bytearray = field(default_factory=bytearray)
    closed: bool = False

    def more(self) -> bool:
        if self.closed:
            return False
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"response incomplete: {bytes(self.buf[:500])!r}")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.closed = True
            return False
        self.buf += chunk
        return True


def request(
    port: int,
    method: str,
    target: str,
    headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    *,
    raw: bytes | None = None,
    timeout: float = 15.0,
) -> Response:
    """One request on a fresh connection; the response must have a bounded body."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        # the server may answer (e.g. 431) and close before reading everything
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            data = build_request(method, target, headers, body, f"127.0.0.1:{port}")
            sock.sendall(raw if raw is not None else data)
        reader = _Reader(sock, time.monotonic() + timeout)
        while b"\r\n\r\n" not in reader.buf:
            if not reader.more():
                raise EOFError(f"connection closed before response headers: {bytes(reader.buf)!r}")
        head, _, rest = bytes(reader.buf).partition(b"\r\n\r\n")
        response = parse_head(head)
        reader.buf = bytearray(rest)
        if method == "HEAD" or response.status in (204, 304) or 100 <= response.status < 200:
            return response
        content_type = (response.header("Content-Type") or "").lower()
        te = (response.header("Transfer-Encoding") or "").lower()
        length = response.header("Content-Length")
        if content_type.startswith("text/event-stream") and length is None:
            # An endless stream: keep what came with the head (decoded, when chunked). A
            # bounded one (a refusal's single `event: close`) is read whole below.
            came = bytes(reader.buf)
            response.body = _ChunkedDecoder().feed(came) if "chunked" in te else came
            return response
        if "chunked" in te:
            decoder = _ChunkedDecoder()
            out = bytearray(decoder.feed(bytes(reader.buf)))
            while not decoder.done:
                before = len(reader.buf)
                if not reader.more():
                    raise EOFError("chunked body truncated")
                out += decoder.feed(bytes(reader.buf[before:]))
            response.body = bytes(out)
        elif length is not None:
            n = int(length)
            while len(reader.buf) < n:
                if not reader.more():
                    raise EOFError(f"body truncated: {len(reader.buf)} of {n} bytes")
            response.body = bytes(reader.buf[:n])
        else:
            while reader.more():
                pass
            response.body = bytes(reader.buf)
        return response
    finally:
        sock.close()
