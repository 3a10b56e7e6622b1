"""RequestReader, driven in-process: a fake transport, a fake handler, a real Admission.

In the style of uvicorn's tests/protocols: bytes go in through `data_received`, responses come
out of the transport's recorded writes. Timers run on a loop whose clock only the test moves.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable

import pytest
from fakes import FakeHandler, FakeTransport, advance, parse_response, run_in_loop, turns
from sse_spec_parser import parse_sse

from sse_gateway.edge.admission import (
    HEADER_TIMEOUT,
    MIN_READERS,
    REQUESTS_PER_TICK,
    RETRY_AFTER_SECONDS,
    Admission,
    accepts_event_stream,
    unavailable,
    unavailable_stream,
)
from sse_gateway.edge.protocol import (
    FEED_SLICE,
    PIPELINED_PER_TURN,
    WRITE_HIGH_WATER,
    WRITE_LOW_WATER,
    RequestReader,
)
from sse_gateway.edge.request_parser import MAX_HEADER_BYTES
from sse_gateway.metrics import Metrics
from sse_gateway.streams.stream import RETRY_SPREAD_MS
from sse_gateway.wire.http import Request, Response, encode_response, json_response

GET = b"GET /v1/sse?player=p1&x=%20y HTTP/1.1\r\nHost: gw\r\nX-Token: Abc\r\n\r\n"


def get(path: str = "/") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n".encode()


def post(path: str, body: bytes) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


OK = json_response(200, {"ok": True})


def answer(keep_alive: bool = True) -> Callable[[RequestReader, Request], None]:
    def action(reader: RequestReader, request: Request) -> None:
        reader.respond(OK, keep_alive=keep_alive)

    return action


class Conn:
    """One reader on one fake socket."""

    def __init__(
        self,
        handler: FakeHandler | None = None,
        admission: Admission | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics if metrics is not None else Metrics()
        self.admission = admission if admission is not None else Admission(1000, self.metrics)
        self.handler = handler if handler is not None else FakeHandler()
        self.transport = FakeTransport()
        self.reader = RequestReader(self.handler, self.admission)
        self.reader.connection_made(self.transport)  # type: ignore[arg-type]

    def feed(self, data: bytes) -> None:
        self.reader.data_received(data)

    def responses(self) -> list[tuple[int, dict[str, str], bytes]]:
        """Each write is one complete response."""
        return [parse_response(data) for data in self.transport.writes]


def error_code(body: bytes) -> str:
    payload = json.loads(body)
    assert set(payload) == {"error", "message"}
    return str(payload["error"])


# --- requests reach the handler -------------------------------------------------------------


@run_in_loop
async def test_simple_get_reaches_handler_with_its_fields() -> None:
    conn = Conn()
    conn.feed(GET)
    assert len(conn.handler.calls) == 1
    reader, request = conn.handler.calls[0]
    assert reader is conn.reader
    assert request.method == "GET"
    assert request.path == "/v1/sse"
    assert request.query_string == "player=p1&x=%20y"
    assert request.headers == {b"host": b"gw", b"x-token": b"Abc"}
    assert request.keep_alive is True
    assert request.body == b""
    assert conn.transport.writes == []  # the handler answered nothing: nothing written
    assert not conn.transport.closed


@run_in_loop
async def test_request_split_over_many_reads_is_assembled() -> None:
    conn = Conn()
    for i in range(len(GET)):
        conn.feed(GET[i : i + 1])
    await turns(2)  # the per-turn request budget is refilled between turns
    assert len(conn.handler.requests) == 1
    request = conn.handler.requests[0]
    assert request.path == "/v1/sse"
    assert request.query_string == "player=p1&x=%20y"
    assert request.headers == {b"host": b"gw", b"x-token": b"Abc"}


@pytest.mark.parametrize(
    ("raw", "keep_alive"),
    [
        (b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n", True),
        (b"GET / HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", True),
    ],
)
@run_in_loop
async def test_keep_alive_of_the_request(raw: bytes, keep_alive: bool) -> None:
    conn = Conn()
    conn.feed(raw)
    assert [r.keep_alive for r in conn.handler.requests] == [keep_alive]


@pytest.mark.parametrize(
    ("raw", "version"),
    [
        (b"GET /v1/sse HTTP/1.1\r\nHost: gw\r\n\r\n", "1.1"),
        (b"GET /v1/sse HTTP/1.0\r\n\r\n", "1.0"),
        (b"GET /v1/sse HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", "1.0"),
    ],
)
@run_in_loop
async def test_http_version_of_the_request(raw: bytes, version: str) -> None:
    # A stream to an HTTP/1.0 client cannot be chunked: its body runs until the close.
    conn = Conn()
    conn.feed(raw)
    assert [r.http_version for r in conn.handler.requests] == [version]


@run_in_loop
async def test_path_defaults_to_slash_for_an_absolute_url_without_path() -> None:
    conn = Conn()
    conn.feed(b"GET http://gw HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert [(r.path, r.query_string) for r in conn.handler.requests] == [("/", "")]


@run_in_loop
async def test_connection_made_sets_write_buffer_limits() -> None:
    conn = Conn()
    assert conn.transport.write_buffer_limits == (WRITE_HIGH_WATER, WRITE_LOW_WATER)
    assert conn.admission.open_sockets == 1


# --- respond and keep-alive -----------------------------------------------------------------


@run_in_loop
async def test_respond_keep_alive_keeps_the_socket_for_the_next_request() -> None:
    conn = Conn(FakeHandler(action=answer(keep_alive=True)))
    conn.feed(get("/one"))
    assert not conn.transport.closed
    conn.feed(get("/two"))
    assert [r.path for r in conn.handler.requests] == ["/one", "/two"]
    responses = conn.responses()
    assert len(responses) == 2
    for status, headers, body in responses:
        assert status == 200
        assert headers["connection"] == "keep-alive"
        assert json.loads(body) == {"ok": True}
    assert not conn.transport.closed


@run_in_loop
async def test_respond_close_closes_and_ignores_later_bytes() -> None:
    conn = Conn(FakeHandler(action=answer(keep_alive=False)))
    conn.feed(get("/one"))
    assert conn.transport.closed
    [(status, headers, _)] = conn.responses()
    assert status == 200
    assert headers["connection"] == "close"
    conn.feed(get("/two"))
    assert [r.path for r in conn.handler.requests] == ["/one"]
    assert len(conn.transport.writes) == 1
    assert conn.transport.late_writes == []


@run_in_loop
async def test_pipelined_request_in_the_same_read_after_a_close_is_ignored() -> None:
    conn = Conn(FakeHandler(action=answer(keep_alive=False)))
    conn.feed(get("/one") + get("/two"))
    assert [r.path for r in conn.handler.requests] == ["/one"]
    assert len(conn.transport.writes) == 1
    assert conn.transport.closed


@run_in_loop
async def test_draining_turns_keep_alive_off() -> None:
    conn = Conn(FakeHandler(action=answer(keep_alive=True)))
    conn.admission.draining = True
    conn.feed(get("/one"))
    [(status, headers, _)] = conn.responses()
    assert status == 200
    assert headers["connection"] == "close"
    assert conn.transport.closed


@run_in_loop
async def test_head_only_response_has_no_body() -> None:
    def action(reader: RequestReader, request: Request) -> None:
        reader.respond(OK, keep_alive=True, head_only=True)

    conn = Conn(FakeHandler(action=action))
    conn.feed(b"HEAD / HTTP/1.1\r\nHost: gw\r\n\r\n")
    [data] = conn.transport.writes
    status, headers, body = parse_response(data, head_only=True)
    assert status == 200
    assert body == b""
    assert headers["content-length"] == str(len(OK.body))


# --- async handlers and pipelining ----------------------------------------------------------


@run_in_loop
async def test_pipelined_requests_wait_for_an_async_handler_and_run_in_order() -> None:
    handler = FakeHandler(action=lambda reader, request: reader.begin_async())
    conn = Conn(handler)
    conn.feed(get("/1") + get("/2") + get("/3"))
    assert [r.path for r in handler.requests] == ["/1"]
    for expected in (["/1", "/2"], ["/1", "/2", "/3"]):
        conn.reader.respond(OK, keep_alive=True)
        conn.reader.end_async()
        assert [r.path for r in handler.requests] == expected
    conn.reader.respond(OK, keep_alive=True)
    conn.reader.end_async()
    assert len(handler.requests) == 3
    assert [status for status, _, _ in conn.responses()] == [200, 200, 200]
    assert conn.transport.pause_reading_calls == 0
    assert conn.transport.reading
    assert not conn.transport.closed


@run_in_loop
async def test_end_async_serves_queued_requests_answered_at_once() -> None:
    paths: list[str] = []

    def action(reader: RequestReader, request: Request) -> None:
        paths.append(request.path)
        if request.path == "/slow":
            reader.begin_async()
        else:
            reader.respond(OK, keep_alive=True)

    conn = Conn(FakeHandler(action=action))
    conn.feed(get("/slow") + get("/a") + get("/b"))
    assert paths == ["/slow"]
    conn.reader.respond(OK, keep_alive=True)
    conn.reader.end_async()
    assert paths == ["/slow", "/a", "/b"]
    assert len(conn.transport.writes) == 3
    assert conn.transport.reading


@run_in_loop
async def test_bytes_behind_an_async_request_wait_unparsed_with_reading_paused() -> None:
    handler = FakeHandler(action=lambda reader, request: reader.begin_async())
    conn = Conn(handler)
    conn.feed(get("/0"))
    for i in range(1, 40):
        conn.feed(get(f"/{i}"))
    assert conn.transport.pause_reading_calls == 1
    assert not conn.transport.reading
    assert len(handler.requests) == 1
    assert conn.reader.requests is None  # the rest are bytes, not parsed requests
    # One request at a time; reading resumes once none is waiting.
    for served in range(2, 41):
        conn.reader.respond(OK, keep_alive=True)
        conn.reader.end_async()
        await turns(1)  # at most PIPELINED_PER_TURN of them per loop turn
        assert len(handler.requests) == served
        assert not conn.transport.reading
    conn.reader.respond(OK, keep_alive=True)
    conn.reader.end_async()
    assert conn.transport.reading
    assert [r.path for r in handler.requests] == [f"/{i}" for i in range(40)]


def _backs_up_after(conn: Conn, n: int) -> None:
    """The transport pauses the reader once `n` answers are unread, as a real one does when
    its buffer passes the high-water mark because the client does not read."""

    def on_write(data: bytes) -> None:
        if len(conn.transport.writes) >= n:
            conn.reader.pause_writing()

    conn.transport.on_write = on_write


@run_in_loop
async def test_pipelined_requests_are_not_answered_while_answers_wait_unread() -> None:
    # Issue 10 (1): 12 MB of pipelined GETs from a client that never reads grew the RSS by
    # 700 MiB. Now answers stop once the transport is backed up, and so does reading.
    conn = Conn(FakeHandler(action=answer(keep_alive=True)))
    _backs_up_after(conn, 3)
    flood = get("/metrics") * 20_000  # 680 KB in one read
    conn.feed(flood)
    assert len(conn.transport.writes) == 3
    assert not conn.transport.reading
    waiting = len(conn.reader.requests or ())
    assert waiting <= FEED_SLICE // len(get("/metrics"))
    assert len(conn.reader.deferred) >= len(flood) - 3 * len(get("/metrics")) - FEED_SLICE
    conn.feed(get("/more") * 100)  # read before the pause took effect: kept, unparsed
    assert len(conn.transport.writes) == 3
    # The client reads: answers go on, in order, until the transport backs up again.
    conn.transport.on_write = None
    conn.reader.resume_writing()
    handled = [len(conn.handler.requests)]
    while handled[-1] < 20_100:
        await turns(1)
        handled.append(len(conn.handler.requests))
    # At most a turn's budget of requests per loop turn: probes and events get their turns.
    assert max(b - a for a, b in itertools.pairwise(handled)) <= REQUESTS_PER_TICK
    assert conn.transport.reading
    assert [r.path for r in conn.handler.requests[-101:]] == ["/metrics"] + ["/more"] * 100


@run_in_loop
async def test_a_client_that_never_reads_its_answers_is_reset_after_the_idle_timeout() -> None:
    conn = Conn(FakeHandler(action=answer(keep_alive=True)))
    _backs_up_after(conn, 1)
    conn.feed(get("/metrics") * 50)
    await advance(HEADER_TIMEOUT + 0.5)
    assert conn.transport.aborted  # close() would wait forever for the buffer to drain
    assert len(conn.transport.writes) == 1


@run_in_loop
async def test_a_closing_answer_the_client_never_reads_is_reset_after_the_timeout() -> None:
    conn = Conn(FakeHandler(action=answer(keep_alive=False)))
    conn.transport.buffered = 100_000
    conn.feed(get())
    assert conn.transport.closed and not conn.transport.aborted
    await advance(HEADER_TIMEOUT + 0.5)
    assert conn.transport.aborted


# --- limits ---------------------------------------------------------------------------------


def _with_header_bytes(total: int) -> bytes:
    """A request whose counted request line + header bytes are exactly `total`:
    the URL "/" (1), `Host: h` (4 + 1 + 4) and one header `X-Big` (5 + value + 4)."""
    value = b"a" * (total - 1 - 9 - 5 - 4)
    return b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + value + b"\r\n\r\n"


@run_in_loop
async def test_headers_at_the_limit_are_accepted() -> None:
    conn = Conn()
    conn.feed(_with_header_bytes(MAX_HEADER_BYTES))
    assert len(conn.handler.requests) == 1
    assert conn.transport.writes == []


@run_in_loop
async def test_headers_over_the_limit_answer_431_and_close() -> None:
    conn = Conn()
    conn.feed(_with_header_bytes(MAX_HEADER_BYTES + 1))
    assert conn.handler.requests == []
    [(status, headers, body)] = conn.responses()
    assert status == 431
    assert headers["connection"] == "close"
    assert error_code(body) == "request_header_fields_too_large"
    assert b'"error":"request_header_fields_too_large"' in body
    assert conn.transport.closed


@run_in_loop
async def test_many_small_headers_over_the_limit_answer_431() -> None:
    conn = Conn()
    headers = b"".join(b"X-H%05d: v\r\n" % i for i in range(MAX_HEADER_BYTES // 10))
    conn.feed(b"GET / HTTP/1.1\r\n" + headers + b"\r\n")
    assert conn.handler.requests == []
    [(status, _, body)] = conn.responses()
    assert status == 431
    assert error_code(body) == "request_header_fields_too_large"
    assert conn.transport.closed


@run_in_loop
async def test_request_line_over_the_limit_answers_431_before_it_ends() -> None:
    conn = Conn()
    conn.feed(b"GET /" + b"a" * MAX_HEADER_BYTES)  # no end of line yet
    [(status, _, body)] = conn.responses()
    assert status == 431
    assert error_code(body) == "request_header_fields_too_large"
    assert conn.transport.closed
    assert conn.handler.requests == []


@run_in_loop
async def test_unterminated_header_over_the_limit_answers_431() -> None:
    # httptools keeps a header value until its line ends: the raw head is counted as it comes
    # (issue 10 item 2: 122.8 MiB were buffered before the request timer's 408).
    conn = Conn()
    conn.feed(b"GET / HTTP/1.1\r\nX-Big: ")
    for _ in range(4):
        conn.feed(b"a" * (MAX_HEADER_BYTES // 2))  # 2x the limit, the line never ends
        await turns(2)
    assert [status for status, _, _ in conn.responses()] == [431]
    assert conn.transport.closed


@pytest.mark.parametrize(
    "raw",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header Name: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        b"\x00\x01\x02\r\n\r\n",
    ],
)
@run_in_loop
async def test_malformed_request_answers_400_and_closes(raw: bytes) -> None:
    conn = Conn()
    conn.feed(raw)
    assert conn.handler.requests == []
    [(status, headers, body)] = conn.responses()
    assert status == 400
    assert headers["connection"] == "close"
    assert error_code(body) == "bad_request"
    assert conn.transport.closed
    conn.feed(get())  # ignored
    assert conn.handler.requests == []
    assert len(conn.transport.writes) == 1


# --- bodies ---------------------------------------------------------------------------------


@run_in_loop
async def test_body_is_dropped_when_the_handler_keeps_none() -> None:
    handler = FakeHandler(body_limit=0, action=answer(keep_alive=True))
    conn = Conn(handler)
    conn.feed(post("/publish", b'{"a":1}') + get("/next"))
    assert [(r.path, r.body) for r in handler.requests] == [("/publish", b""), ("/next", b"")]
    assert [url for url, _ in handler.body_limit_calls] == [b"/publish"]  # POSTs only
    assert (b"content-length", b"7") in handler.body_limit_calls[0][1]


@run_in_loop
async def test_body_is_kept_up_to_the_limit_across_reads() -> None:
    handler = FakeHandler(body_limit=10)
    conn = Conn(handler)
    data = post("/publish", b"0123456789")
    conn.feed(data[:-7])
    await turns(2)
    conn.feed(data[-7:-3])
    await turns(2)
    conn.feed(data[-3:])
    assert [r.body for r in handler.requests] == [b"0123456789"]
    assert conn.transport.writes == []


@run_in_loop
async def test_chunked_body_is_kept() -> None:
    handler = FakeHandler(body_limit=100)
    conn = Conn(handler)
    conn.feed(
        b"POST /p HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"
    )
    assert [r.body for r in handler.requests] == [b"abcdefg"]


@run_in_loop
async def test_body_over_the_limit_answers_413_and_closes() -> None:
    handler = FakeHandler(body_limit=10)
    conn = Conn(handler)
    conn.feed(post("/publish", b"0123456789X") + get("/next"))
    assert handler.requests == []
    [(status, headers, body)] = conn.responses()
    assert status == 413
    assert headers["connection"] == "close"
    assert error_code(body) == "payload_too_large"
    assert conn.transport.closed
    assert conn.transport.late_writes == []


# --- timers ---------------------------------------------------------------------------------


@run_in_loop
async def test_header_timeout_answers_408_and_closes() -> None:
    conn = Conn()
    conn.feed(b"GET / HTTP/1.1\r\nHost: g")
    await advance(HEADER_TIMEOUT - 0.5)
    assert conn.transport.writes == []
    await advance(1.0)
    [(status, headers, body)] = conn.responses()
    assert status == 408
    assert headers["connection"] == "close"
    assert error_code(body) == "request_timeout"
    assert conn.transport.closed
    conn.feed(b"w\r\n\r\n")
    assert conn.handler.requests == []


@run_in_loop
async def test_header_timeout_also_applies_to_a_silent_socket() -> None:
    conn = Conn()
    await advance(HEADER_TIMEOUT + 0.1)
    assert [status for status, _, _ in conn.responses()] == [408]
    assert conn.transport.closed


@run_in_loop
async def test_header_timeout_covers_a_body_that_never_ends() -> None:
    conn = Conn(FakeHandler(body_limit=100))
    conn.feed(b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 50\r\n\r\n0123")
    await advance(HEADER_TIMEOUT + 0.1)
    assert [status for status, _, _ in conn.responses()] == [408]
    assert conn.handler.requests == []


@run_in_loop
async def test_the_configured_header_timeout_is_used() -> None:
    metrics = Metrics()
    conn = Conn(admission=Admission(1000, metrics, header_timeout=0.25), metrics=metrics)
    await advance(0.2)
    assert conn.transport.writes == []
    await advance(0.1)
    assert [status for status, _, _ in conn.responses()] == [408]
    assert metrics.rejected["request_timeout"] == 1


@run_in_loop
async def test_complete_request_stops_the_header_timer() -> None:
    conn = Conn()  # the handler answers nothing (e.g. a stream being opened)
    conn.feed(get())
    await advance(HEADER_TIMEOUT * 3)
    assert conn.transport.writes == []
    assert not conn.transport.closed


@run_in_loop
async def test_idle_keep_alive_timeout_closes_silently() -> None:
    conn = Conn(FakeHandler(action=answer(keep_alive=True)))
    conn.feed(get())
    assert len(conn.transport.writes) == 1
    await advance(HEADER_TIMEOUT - 0.5)
    assert not conn.transport.closed
    await advance(1.0)
    assert conn.transport.closed
    assert len(conn.transport.writes) == 1  # no 408 on an idle keep-alive socket
    conn.feed(get("/late"))
    assert len(conn.handler.requests) == 1


@run_in_loop
async def test_idle_timer_restarts_with_each_response() -> None:
    conn = Conn(FakeHandler(action=answer(keep_alive=True)))
    conn.feed(get("/1"))
    await advance(HEADER_TIMEOUT - 1)
    conn.feed(get("/2"))
    await advance(HEADER_TIMEOUT - 1)
    assert not conn.transport.closed
    await advance(1.5)
    assert conn.transport.closed
    assert len(conn.transport.writes) == 2


# --- hand over ------------------------------------------------------------------------------


@run_in_loop
async def test_hand_over_gives_up_the_socket() -> None:
    handed: list[object] = []
    stream = object()

    def action(reader: RequestReader, request: Request) -> None:
        transport = reader.hand_over()
        transport.set_protocol(stream)  # type: ignore[arg-type]
        handed.append(transport)
        reader.respond(OK, keep_alive=True)  # after the hand-over: nothing

    handler = FakeHandler(action=action)
    conn = Conn(handler)
    conn.feed(get("/v1/sse") + get("/pipelined"))
    assert handed == [conn.transport]
    assert conn.transport.protocol is stream
    assert [r.path for r in handler.requests] == ["/v1/sse"]  # the second never arrives
    assert conn.transport.writes == []
    assert not conn.transport.closed
    assert conn.reader.parser.stopped
    assert conn.reader.parser._url == b""  # the request line (a token, maybe) is gone
    conn.reader.respond(OK, keep_alive=False)
    await advance(HEADER_TIMEOUT * 3)  # no timer of the reader's is left
    assert conn.transport.writes == []
    assert not conn.transport.closed
    assert conn.admission.open_sockets == 1  # the slot goes with the socket, to the stream


@run_in_loop
async def test_hand_over_drops_requests_queued_behind_an_async_one() -> None:
    calls: list[str] = []

    def action(reader: RequestReader, request: Request) -> None:
        calls.append(request.path)
        if request.path == "/slow":
            reader.begin_async()

    conn = Conn(FakeHandler(action=action))
    conn.feed(get("/slow") + get("/queued"))
    transport = conn.reader.hand_over()
    assert transport is conn.transport  # type: ignore[comparison-overlap]
    conn.reader.end_async()
    assert calls == ["/slow"]
    assert conn.transport.writes == []


@run_in_loop
async def test_a_socket_backed_up_before_the_hand_over_says_so() -> None:
    # The transport tells its protocol once; a stream that takes over later must still know.
    seen: list[bool] = []

    def action(reader: RequestReader, request: Request) -> None:
        seen.append(reader.writing_paused)
        reader.hand_over()

    conn = Conn(FakeHandler(action=action))
    conn.reader.pause_writing()
    conn.reader.resume_writing()
    conn.reader.pause_writing()
    conn.feed(get("/v1/sse"))
    assert seen == []  # one request at a time: it waits for the buffer to drain
    conn.reader.resume_writing()
    assert seen == [False]


@run_in_loop
async def test_hand_over_resumes_reading_paused_behind_an_async_request() -> None:
    # A stream must read its socket, or it never sees the client leave.
    def action(reader: RequestReader, request: Request) -> None:
        if request.path == "/slow":
            reader.begin_async()
        elif request.path == "/v1/sse":
            reader.hand_over()
        else:
            reader.respond(OK, keep_alive=True)

    conn = Conn(FakeHandler(action=action))
    conn.feed(get("/slow"))
    conn.feed(b"".join(get(f"/q{i}") for i in range(3)) + get("/v1/sse"))
    assert not conn.transport.reading  # requests wait behind /slow
    conn.reader.respond(OK, keep_alive=True)
    conn.reader.end_async()  # serves the queue; the last request becomes a stream
    assert conn.reader.transport is None
    assert conn.transport.reading


# --- the admission: sockets and the per-turn request budget ---------------------------------


@run_in_loop
async def test_a_new_socket_evicts_the_reader_that_waited_longest() -> None:
    # Issue 10 (3): 200 sockets that never finish a request locked out every client and
    # /healthz. Readers have their own budget; at it, the longest-waiting one gives way.
    metrics = Metrics()
    admission = Admission(connection_limit=50, metrics=metrics)
    assert admission.reader_budget == MIN_READERS
    slow = [Conn(admission=admission, metrics=metrics) for _ in range(MIN_READERS)]
    for conn in slow:
        conn.feed(b"GET / HTTP/1.1\r\nX-Slow: ")
    slow[0].feed(b"a")  # a byte more does not make it any younger

    fresh = Conn(FakeHandler(action=answer(keep_alive=True)), admission=admission, metrics=metrics)
    assert slow[0].transport.aborted and slow[0].transport.writes == []
    assert not any(c.transport.aborted for c in slow[1:])
    fresh.feed(get("/healthz"))
    assert [status for status, _, _ in fresh.responses()] == [200]
    assert admission.open_readers == MIN_READERS
    assert metrics.rejected["request_timeout"] == 1
    assert metrics.rejected["connection_limit"] == 0

    # The evicted socket's connection_lost comes later and must not be counted twice.
    slow[0].reader.connection_lost(None)
    assert admission.open_readers == MIN_READERS
    # The answered keep-alive socket now waits longest of all but the slow ones.
    for i in range(1, MIN_READERS):
        Conn(admission=admission, metrics=metrics)
        assert slow[i].transport.aborted
    assert not fresh.transport.aborted
    Conn(admission=admission, metrics=metrics)
    assert fresh.transport.aborted


@run_in_loop
async def test_no_evictable_reader_means_503_and_close() -> None:
    metrics = Metrics()
    admission = Admission(connection_limit=1, metrics=metrics, reader_budget=3)
    busy = FakeHandler(action=lambda reader, request: reader.begin_async())
    conns = [Conn(busy, admission=admission, metrics=metrics) for _ in range(3)]
    for conn in conns:
        conn.feed(get("/publish"))  # each one is being answered: none is evicted

    refused = Conn(admission=admission, metrics=metrics)
    [(status, headers, body)] = refused.responses()
    assert status == 503
    assert headers["retry-after"] == str(RETRY_AFTER_SECONDS)
    assert headers["connection"] == "close"
    assert error_code(body) == "connection_limit"
    assert refused.transport.closed
    assert metrics.rejected["connection_limit"] == 1
    assert not any(c.transport.aborted or c.transport.closed for c in conns)

    # A refused socket reads nothing and has no header timer.
    refused.feed(get())
    await advance(HEADER_TIMEOUT + 1)
    assert refused.handler.requests == []
    assert len(refused.transport.writes) == 1
    refused.reader.connection_lost(None)
    assert admission.open_readers == 3


@run_in_loop
async def test_a_stream_leaves_the_reader_budget_and_keeps_its_socket_slot() -> None:
    admission = Admission(connection_limit=10, metrics=Metrics(), reader_budget=2)
    conn = Conn(FakeHandler(action=lambda reader, request: reader.hand_over()), admission)
    conn.feed(get("/v1/sse"))
    assert (admission.open_readers, admission.open_sockets) == (0, 1)
    others = [Conn(admission=admission) for _ in range(2)]
    assert not any(c.transport.aborted or c.transport.writes for c in others)
    admission.socket_closed()  # the stream's socket goes
    assert (admission.open_readers, admission.open_sockets) == (2, 2)


@run_in_loop
async def test_connection_lost_releases_the_socket_slot() -> None:
    metrics = Metrics()
    admission = Admission(connection_limit=1, metrics=metrics, reader_budget=4)
    busy = FakeHandler(action=lambda reader, request: reader.begin_async())
    conns = [Conn(busy, admission=admission, metrics=metrics) for _ in range(4)]
    for conn in conns:
        conn.feed(get())
    assert admission.open_sockets == 4
    conns[0].reader.connection_lost(None)
    assert admission.open_sockets == 3
    conns[1].reader.connection_lost(ConnectionResetError())
    assert admission.open_sockets == 2
    # The freed slots admit new sockets again.
    again = [Conn(admission=admission, metrics=metrics) for _ in range(2)]
    assert all(c.transport.writes == [] for c in again)
    assert metrics.rejected["connection_limit"] == 0


@run_in_loop
async def test_a_reader_waiting_for_its_turn_is_not_evicted() -> None:
    # A reconnect storm: requests wait on the gateway's budget, not on a slow client.
    admission = Admission(connection_limit=1000, metrics=Metrics(), reader_budget=2)
    first = Conn(FakeHandler(action=answer(keep_alive=False)), admission=admission)
    admission.request_budget = 0
    first.feed(get("/waits"))
    Conn(admission=admission)
    Conn(admission=admission)  # evicts the second, not the one waiting for its turn
    assert not first.transport.aborted
    await turns(2)
    assert [r.path for r in first.handler.requests] == ["/waits"]


@run_in_loop
async def test_connection_lost_stops_the_timer_and_the_reader() -> None:
    conn = Conn()
    conn.feed(b"GET / HTTP/1.1\r\n")
    conn.reader.connection_lost(None)
    await advance(HEADER_TIMEOUT + 1)
    assert conn.transport.writes == []
    conn.feed(b"Host: gw\r\n\r\n")
    assert conn.handler.requests == []
    assert conn.admission.open_sockets == 0


@run_in_loop
async def test_requests_beyond_the_turn_budget_wait_for_a_later_turn() -> None:
    metrics = Metrics()
    admission = Admission(connection_limit=1000, metrics=metrics)
    conns = [Conn(admission=admission, metrics=metrics) for _ in range(REQUESTS_PER_TICK + 1)]
    for conn in conns:  # all in this one loop turn
        conn.feed(get("/turn"))
    for conn in conns[:-1]:
        assert len(conn.handler.requests) == 1
        assert conn.transport.pause_reading_calls == 0
    last = conns[-1]
    assert last.handler.requests == []
    assert last.transport.pause_reading_calls == 1
    assert not last.transport.reading

    await turns(2)
    assert last.transport.resume_reading_calls == 1
    assert last.transport.reading
    assert [r.path for r in last.handler.requests] == ["/turn"]
    assert all(len(c.handler.requests) == 1 for c in conns)


@run_in_loop
async def test_bytes_read_while_waiting_keep_their_order() -> None:
    admission = Admission(connection_limit=1000, metrics=Metrics())
    others = [Conn(admission=admission) for _ in range(REQUESTS_PER_TICK)]
    for other in others:
        other.feed(get())
    conn = Conn(FakeHandler(action=answer(keep_alive=True)), admission=admission)
    data = get("/a") + get("/b")
    conn.feed(data[:10])
    conn.feed(data[10:])  # read before the pause took effect
    assert conn.handler.requests == []
    await turns(3)
    assert [r.path for r in conn.handler.requests] == ["/a", "/b"]


@run_in_loop
async def test_waiting_socket_that_goes_away_is_not_served() -> None:
    admission = Admission(connection_limit=1000, metrics=Metrics())
    others = [Conn(admission=admission) for _ in range(REQUESTS_PER_TICK)]
    for other in others:
        other.feed(get())
    conn = Conn(admission=admission)
    conn.feed(get("/gone"))
    conn.reader.connection_lost(None)
    await turns(3)
    assert conn.handler.requests == []
    assert conn.transport.resume_reading_calls == 0
    assert admission.request_budget == REQUESTS_PER_TICK  # it spent nothing


def test_response_type_is_the_one_encoded() -> None:
    # Sanity of the helper used above: one write is one parseable response.
    from sse_gateway.wire.http import encode_response

    data = encode_response(Response(204), keep_alive=True)
    assert parse_response(data)[0] == 204


# --- transient stream refusals: 503 JSON, or a 200 close an EventSource survives ------------


def sse_request(accept: bytes | None) -> Request:
    headers = {b"host": b"gw"}
    if accept is not None:
        headers[b"accept"] = accept
    return Request("GET", "/v1/sse", "", headers, keep_alive=True)


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (b"text/event-stream", True),
        (b"Text/Event-Stream", True),
        (b"text/html, text/event-stream;q=0.9", True),
        (None, False),
        (b"*/*", False),
        (b"application/json", False),
        (b"text/event", False),
    ],
)
def test_accepts_event_stream(accept: bytes | None, expected: bool) -> None:
    assert accepts_event_stream(sse_request(accept)) is expected


@pytest.mark.parametrize("code", ["draining", "connection_limit", "broker_unavailable"])
def test_unavailable_stream_is_a_200_close_with_a_spread_retry(code: str) -> None:
    response = unavailable_stream(code, 2000, [("Access-Control-Allow-Origin", "https://a")])
    status, headers, body = parse_response(encode_response(response, keep_alive=False))
    assert status == 200
    assert headers["content-type"] == "text/event-stream; charset=utf-8"
    assert headers["cache-control"] == "no-cache, no-transform"
    assert headers["retry-after"] == str(RETRY_AFTER_SECONDS)
    assert headers["content-length"] == str(len(body))
    assert headers["access-control-allow-origin"] == "https://a"
    assert "transfer-encoding" not in headers
    # One frame: `event: close` with its `retry:` and the reason; no `retry:`-only block.
    assert body.startswith(b"event: close\nretry: ") and body.count(b"\n\n") == 1
    parsed = parse_sse(body)
    [event] = parsed.events
    assert event.type == "close" and event.id == ""
    payload = json.loads(event.data)
    assert payload["reason"] == code
    assert payload == {"reason": code, "message": error_message(unavailable(code).body)}
    assert parsed.retry is not None and 2000 <= parsed.retry < 2000 + RETRY_SPREAD_MS


def test_unavailable_stream_retries_are_spread() -> None:
    retries = {parse_sse(unavailable_stream("draining", 1000).body).retry for _ in range(100)}
    assert len(retries) > 1


def error_message(body: bytes) -> str:
    message: str = json.loads(body)["message"]
    return message


@pytest.mark.parametrize(
    "head",
    [
        b"GET /" + b"u" * (MAX_HEADER_BYTES * 2),  # a request line (URL) that never ends
        b"GET / HTTP/1.1\r\nX-" + b"n" * (MAX_HEADER_BYTES * 2),  # a header name
        b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * (MAX_HEADER_BYTES // 4),  # many headers
    ],
)
@run_in_loop
async def test_an_endless_request_head_answers_431_as_it_arrives(head: bytes) -> None:
    conn = Conn()
    for start in range(0, len(head), 4096):
        conn.feed(head[start : start + 4096])
        await turns(2)
        if conn.transport.closed:
            break
    assert [status for status, _, _ in conn.responses()] == [431]
    assert conn.transport.closed


@run_in_loop
async def test_a_large_body_sent_with_its_head_is_not_counted_as_head() -> None:
    conn = Conn()
    body = b"x" * (MAX_HEADER_BYTES * 3)
    conn.feed(b"POST /nowhere HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    await turns(2)
    assert 431 not in [status for status, _, _ in conn.responses()]


@pytest.mark.parametrize(
    ("head", "why"),
    [
        (b"GET /healthz HTTP/1.1\r\n\r\n", "must have a Host"),
        (b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "more than one Host"),
        (
            b"GET /v1/sse HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer x\r\n"
            b"Authorization: Bearer y\r\n\r\n",
            "more than one Authorization",
        ),
    ],
)
@run_in_loop
async def test_heads_rfc_9112_refuses_are_400(head: bytes, why: str) -> None:
    conn = Conn()
    conn.feed(head)
    [(status, headers, body)] = conn.responses()
    assert status == 400 and why in json.loads(body)["message"]
    assert headers["connection"] == "close" and conn.transport.closed
    assert conn.handler.requests == []


@run_in_loop
async def test_an_http10_request_needs_no_host() -> None:
    conn = Conn()
    conn.feed(b"GET /healthz HTTP/1.0\r\n\r\n")
    assert len(conn.handler.requests) == 1


# --- hostile pipelining, lingering closes, framing (issue 10 hostile pass) --------------------


@run_in_loop
async def test_the_turn_budget_counts_requests_not_reads() -> None:
    # One read of 7,000 pipelined /healthz cost 12 s of CPU in one loop turn.
    admission = Admission(connection_limit=1000, metrics=Metrics())
    conns = [Conn(FakeHandler(action=answer(keep_alive=True)), admission) for _ in range(20)]
    for conn in conns:
        conn.feed(get("/healthz") * 50)
    counts = [len(c.handler.requests) for c in conns]
    assert sum(counts) == REQUESTS_PER_TICK
    assert max(counts) == PIPELINED_PER_TURN  # one pipelining socket cannot take the turn
    for _ in range(20):
        before = sum(len(c.handler.requests) for c in conns)
        await turns(1)
        assert sum(len(c.handler.requests) for c in conns) - before <= REQUESTS_PER_TICK
    assert all(len(c.handler.requests) == 50 for c in conns)
    assert all(c.transport.reading for c in conns)


@run_in_loop
async def test_a_client_that_is_gone_gets_no_more_answers() -> None:
    conn = Conn(FakeHandler(action=answer(keep_alive=True)))
    conn.feed(get("/healthz") * 500)
    assert len(conn.handler.requests) == PIPELINED_PER_TURN
    conn.transport.closed = True  # a write failed: the transport is closing
    await turns(10)
    assert len(conn.handler.requests) == PIPELINED_PER_TURN
    gone = Conn(FakeHandler(action=answer(keep_alive=True)))
    gone.transport.closed = True
    gone.feed(get("/healthz") * 5)  # requests parsed after the client left are not served
    assert gone.handler.requests == []


@run_in_loop
async def test_a_reader_whose_answers_go_unread_can_be_evicted() -> None:
    # 70 sockets that pipelined /metrics and never read locked the reader budget and /healthz.
    admission = Admission(connection_limit=10, metrics=Metrics(), reader_budget=2)
    hog = Conn(FakeHandler(action=answer(keep_alive=True)), admission=admission)
    _backs_up_after(hog, 1)
    hog.feed(get("/metrics") * 50)
    other = Conn(admission=admission)
    Conn(admission=admission)  # evicts the hog, not the newer idle socket
    assert hog.transport.aborted
    assert not other.transport.aborted


@run_in_loop
async def test_a_reader_with_requests_pipelined_behind_the_one_in_flight_can_be_evicted() -> None:
    admission = Admission(connection_limit=10, metrics=Metrics(), reader_budget=2)
    slow = FakeHandler(action=lambda reader, request: reader.begin_async())
    one = Conn(slow, admission=admission)
    one.feed(get("/publish"))
    many = Conn(slow, admission=admission)
    many.feed(get("/publish") + get("/a") + get("/b"))
    Conn(admission=admission)
    assert many.transport.aborted  # pipelining: waits on itself
    assert not one.transport.aborted  # one request being answered: waits on the gateway


@run_in_loop
async def test_a_refusal_lingers_so_the_client_can_read_it() -> None:
    conn = Conn()
    conn.transport.eof_capable = True
    conn.feed(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES + 2048))
    [(status, headers, _)] = conn.responses()
    assert status == 431 and headers["connection"] == "close"
    # The write side is shut; what the client still sends is read and dropped.
    assert conn.transport.eof_written and not conn.transport.closed
    assert conn.transport.reading
    conn.feed(b"a" * 100_000)
    assert len(conn.transport.writes) == 1
    await advance(HEADER_TIMEOUT + 0.5)
    assert conn.transport.closed


@run_in_loop
async def test_an_endless_trailer_answers_431() -> None:
    # httptools keeps a trailer value until its line ends (and joins it quadratically).
    conn = Conn(FakeHandler(body_limit=0))
    conn.feed(b"POST /v1/publish HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
    conn.feed(b"1\r\na\r\n0\r\nX-Trailer: ")
    for _ in range(20):
        if conn.transport.closed:
            break
        conn.feed(b"t" * 4096)
    [(status, _, _)] = conn.responses()
    assert status == 431


@run_in_loop
async def test_a_body_in_one_byte_chunks_is_still_a_body() -> None:
    conn = Conn(FakeHandler(body_limit=100_000))
    body = b"x" * 20_000
    chunks = b"".join(b"1\r\n" + body[i : i + 1] + b"\r\n" for i in range(len(body)))
    conn.feed(
        b"POST /p HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
    )
    [request] = conn.handler.requests
    assert request.body == body


@run_in_loop
async def test_expect_100_continue_for_a_body_that_is_kept() -> None:
    head = b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
    kept = Conn(FakeHandler(body_limit=100))
    kept.feed(head)
    assert kept.transport.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    kept.feed(b"ok")
    assert kept.handler.requests[0].body == b"ok"
    dropped = Conn(FakeHandler(body_limit=0))
    dropped.feed(head)
    assert dropped.transport.writes == []


@run_in_loop
async def test_http_2_0_on_this_port_answers_505() -> None:
    # llhttp takes HTTP/2.0 for a version it knows (other versions are 400 bad_request).
    conn = Conn()
    conn.feed(b"GET /healthz HTTP/2.0\r\nHost: h\r\n\r\n")
    [(status, _, body)] = conn.responses()
    assert status == 505
    assert error_code(body) == "http_version_not_supported"


@run_in_loop
async def test_a_handler_bug_is_not_mistaken_for_a_malformed_request() -> None:
    def broken(reader: RequestReader, request: Request) -> None:
        raise KeyError("bug")

    conn = Conn(FakeHandler(action=broken))
    with pytest.raises(KeyError):
        conn.feed(get())


@run_in_loop
async def test_a_malformed_request_behind_an_async_one_is_refused_after_its_answer() -> None:
    # Fuzzing: the 400 was written before the answer owed to the request in front of it.
    conn = Conn(FakeHandler(action=lambda reader, request: reader.begin_async()))
    conn.feed(get("/publish") + b"GET /x HTTP\x00/1.1\r\n\r\n")
    assert conn.transport.writes == []
    conn.reader.respond(OK, keep_alive=True)
    conn.reader.end_async()
    assert [status for status, _, _ in conn.responses()] == [200, 400]
    assert conn.transport.closed


@run_in_loop
async def test_a_body_announced_over_the_limit_is_refused_before_it_is_sent() -> None:
    conn = Conn(FakeHandler(body_limit=100))
    conn.feed(
        b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 1000000000\r\nExpect: 100-continue\r\n\r\n"
    )
    [(status, _, body)] = conn.responses()  # no 100 Continue first
    assert status == 413 and error_code(body) == "payload_too_large"


@run_in_loop
async def test_the_http2_preface_answers_505() -> None:
    conn = Conn()
    conn.feed(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    [(status, _, body)] = conn.responses()
    assert status == 505 and error_code(body) == "http_version_not_supported"


@run_in_loop
async def test_no_100_continue_ahead_of_an_answer_still_owed() -> None:
    def action(reader: RequestReader, request: Request) -> None:
        reader.begin_async()

    conn = Conn(FakeHandler(action=action, body_limit=100))
    conn.feed(
        post("/p", b"a")
        + b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
    )
    assert conn.transport.writes == []


# --- refusals count in sse_gateway_connections_rejected_total ------------------------------------


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", "bad_request"),  # no path known yet
        (b"GET /v1/sse HTTP/1.1\r\nBad Header Name: x\r\n\r\n", "bad_request"),
        (b"GET /v1/sse HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "bad_request"),
        (_with_header_bytes(MAX_HEADER_BYTES + 1), "request_header_fields_too_large"),
        (b"GET /v1/sse" + b"a" * MAX_HEADER_BYTES, "request_header_fields_too_large"),
        (b"GET /v1/sse HTTP/2.0\r\nHost: gw\r\n\r\n", "http_version_not_supported"),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "http_version_not_supported"),
        (post("/v1/publish", b"0123456789X"), "payload_too_large"),
    ],
)
@run_in_loop
async def test_every_refusal_of_the_http_layer_counts_under_its_code(raw: bytes, code: str) -> None:
    # Issue 12: 400, 431, 505 (and 413) were answered but never counted.
    conn = Conn(FakeHandler(body_limit=10))
    conn.feed(raw)
    [(_, _, body)] = conn.responses()
    assert error_code(body) == code
    assert conn.metrics.rejected == {code: 1}


@run_in_loop
async def test_a_refusal_behind_an_async_request_counts_once() -> None:
    conn = Conn(FakeHandler(action=lambda reader, request: reader.begin_async()))
    conn.feed(get("/v1/sse") + b"GET /x HTTP\x00/1.1\r\n\r\n")
    assert conn.metrics.rejected == {"bad_request": 1}  # counted when refused, not when sent
    conn.reader.respond(OK, keep_alive=True)
    conn.reader.end_async()
    assert [status for status, _, _ in conn.responses()] == [200, 400]
    assert conn.metrics.rejected == {"bad_request": 1}


@run_in_loop
async def test_a_request_timeout_counts_as_request_timeout() -> None:
    conn = Conn()
    conn.feed(b"GET /v1/sse HTTP/1.1\r\nHost: g")
    await advance(HEADER_TIMEOUT + 0.1)
    assert [status for status, _, _ in conn.responses()] == [408]
    assert conn.metrics.rejected == {"request_timeout": 1}


@run_in_loop
async def test_answered_requests_count_no_refusal() -> None:
    conn = Conn(FakeHandler(action=answer(keep_alive=True)))
    conn.feed(get("/v1/sse") + get("/healthz"))
    await turns(2)
    assert [status for status, _, _ in conn.responses()] == [200, 200]
    assert conn.metrics.rejected == {}


@run_in_loop
@pytest.mark.parametrize("target", [b"ig", b"host:", b"[::1"])
async def test_a_request_target_httptools_cannot_parse_is_400(target: bytes) -> None:
    # Fuzzing: `CONNECT ig HTTP/1.1` made parse_url raise out of data_received.
    conn = Conn()
    conn.feed(b"CONNECT " + target + b" HTTP/1.1\r\nHost: gw\r\n\r\n")
    [(status, _, body)] = conn.responses()
    assert status == 400 and error_code(body) == "bad_request"
