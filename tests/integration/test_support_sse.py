"""The test suite's own SSE parser and chunk decoder must themselves conform, or every stream
assertion is moot."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.sse import (
    ChunkError,
    Response,
    SSEClient,
    SSEEvent,
    SSEParser,
    _ChunkedDecoder,
    dechunk,
    parse_stream,
    request,
)


def test_whatwg_examples() -> None:
    stream = (
        b"\xef\xbb\xbfretry: 1234\n\n"
        b": a comment\n"
        b'event: connected\r\ndata: {"a":1}\r\n\r\n'
        b"data: line1\rdata: line2\r\rid: 7\nevent: x\ndata\n\n"
        b"data:no-space\nretry: nope\nfoo: bar\n\n"
        b"data: incomplete"
    )
    frames = parse_stream(stream)
    assert frames == [
        SSEEvent(retry=1234),
        SSEEvent(event="connected", data='{"a":1}', has_data=True, event_field=True),
        SSEEvent(data="line1\nline2", has_data=True),
        SSEEvent(event="x", data="", id="7", has_data=True, event_field=True),
        SSEEvent(data="no-space", has_data=True),
    ]
    assert frames[0].is_retry_only


def test_cr_split_across_chunks_is_one_line_break() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\n\r") == []  # the last CR may still be the start of a CRLF
    assert parser.feed(b"\n") == [SSEEvent(data="a", has_data=True)]
    assert parser.feed(b"\r\n") == []  # one more empty line: nothing to dispatch
    assert parser.feed(b"data: b\n\n") == [SSEEvent(data="b", has_data=True)]


_values = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r\n\0"), max_size=20)


@given(
    events=st.lists(st.tuples(_values, st.lists(_values, min_size=1, max_size=3)), max_size=5),
    eol=st.sampled_from(["\n", "\r", "\r\n"]),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
)
def test_roundtrip_any_line_ending_any_chunking(
    events: list[tuple[str, list[str]]], eol: str, cuts: list[int]
) -> None:
    text = ""
    for name, lines in events:
        text += f"event: {name}{eol}" if name else ""
        text += "".join(f"data: {line}{eol}" for line in lines) + eol
    data = text.encode()
    parser = SSEParser()
    out: list[SSEEvent] = []
    start = 0
    for cut in sorted({min(c, len(data)) for c in cuts}):
        out += parser.feed(data[start:cut])
        start = cut
    out += parser.feed(data[start:]) + parser.feed_eof()
    assert [(e.event, e.data) for e in out] == [
        (name or "message", "\n".join(lines)) for name, lines in events
    ]


# --------------------------------------------------------------------------- chunked bodies


def chunked(*frames: bytes, end: bool = True) -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(f), f) for f in frames)
    return body + (b"0\r\n\r\n" if end else b"")


@given(
    frames=st.lists(st.binary(min_size=1, max_size=40), max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=10),
)
def test_chunked_decoder_any_split(frames: list[bytes], cuts: list[int]) -> None:
    data = chunked(*frames)
    decoder = _ChunkedDecoder()
    out = b""
    start = 0
    for cut in sorted({min(c, len(data)) for c in cuts}):
        assert not decoder.done
        out += decoder.feed(data[start:cut])
        start = cut
    out += decoder.feed(data[start:])
    assert decoder.done
    assert out == b"".join(frames)
    assert decoder.sizes == [len(f) for f in frames] + [0]
    assert dechunk(data) == (b"".join(frames), True)
    assert dechunk(chunked(*frames, end=False)) == (b"".join(frames), False)


@pytest.mark.parametrize(
    "data",
    [
        b"zz\r\ndata\r\n",  # not hex
        b"\r\n",  # no size
        b"3\r\nabcXY",  # no CRLF after the data
        b"3\r\nabc\r\n0\r\n\r\nextra",  # bytes after the end
        b"0\r\nX-Trailer: 1\r\n\r\n",  # a trailer: the gateway sends none
    ],
    ids=["not-hex", "no-size", "no-crlf", "after-end", "trailer"],
)
def test_chunked_decoder_is_strict(data: bytes) -> None:
    with pytest.raises(ChunkError):
        _ChunkedDecoder().feed(data)


def test_chunked_decoder_refuses_anything_after_the_end_in_a_later_feed() -> None:
    decoder = _ChunkedDecoder()
    assert decoder.feed(chunked(b"a")) == b"a"
    with pytest.raises(ChunkError):
        decoder.feed(b"1\r\nb\r\n")


HEAD = [("Content-Type", "text/event-stream")]


def client_pair(chunked_body: bool, leftover: bytes = b"") -> tuple[SSEClient, socket.socket]:
    """An SSEClient on one end of a socket pair; the test writes the body on the other."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    headers = [*HEAD, ("Transfer-Encoding", "chunked")] if chunked_body else HEAD
    return SSEClient(ours, Response(200, "OK", list(headers)), leftover), theirs


def test_sse_client_reads_a_chunked_stream_to_its_last_chunk() -> None:
    connected = b"id: 0-0\nevent: connected\nretry: 50\ndata: {}\n\n"
    close = b'event: close\nretry: 70\ndata: {"reason":"shutdown","message":"m"}\n\n'
    wire = chunked(connected, b"event: n\ndata: 1\n\n", close)
    client, server = client_pair(True, wire[:7])  # the head's read held a bit of the body
    with client, server:
        cut = len(chunked(connected, end=False)) + 3  # the first chunk and a bit of the next
        server.sendall(wire[7:cut])
        first = client.next_frame(timeout=5)
        assert (first.event, first.id, first.retry) == ("connected", "0-0", 50)
        server.sendall(wire[cut:])
        assert client.next_frame(timeout=5).event == "n"
        assert client.next_frame(timeout=5).event == "close"
        assert client.ended and client.eof and not client.socket_closed
        with pytest.raises(EOFError):
            client.next_frame(timeout=5)  # the body is over, even with the socket still open
        assert bytes(client.wire) == wire
        assert bytes(client.raw) == connected + b"event: n\ndata: 1\n\n" + close
        assert client.chunks() == [connected, b"event: n\ndata: 1\n\n", close]
        assert client.retries == [50, 70]
        server.close()
        assert client.wait_closed(timeout=5)
        assert client.socket_closed


def test_sse_client_chunked_stream_cut_without_its_last_chunk() -> None:
    client, server = client_pair(True)
    with client, server:
        server.sendall(chunked(b"event: n\ndata: 1\n\n", end=False) + b"20\r\nevent: n\nda")
        server.close()
        assert client.next_frame(timeout=5).event == "n"
        with pytest.raises(EOFError):
            client.next_frame(timeout=5)
        assert client.eof and client.socket_closed and not client.ended
        assert [f.event for f in client.frames] == ["n"]  # the cut frame is dropped


def test_sse_client_garbled_chunk_framing_fails() -> None:
    client, server = client_pair(True)
    with client, server:
        server.sendall(b"HTTP/1.1 431 Request Header Fields Too Large\r\n\r\n")
        with pytest.raises(ChunkError):
            client.next_frame(timeout=5)


def test_sse_client_plain_body_ends_only_with_the_socket() -> None:
    client, server = client_pair(False)
    with client, server:
        server.sendall(b"event: a\ndata: 1\n\nevent: b\ndata: 2\n\n")
        assert [client.next_frame(timeout=5).event for _ in range(2)] == ["a", "b"]
        assert not client.eof and not client.chunked
        server.sendall(b"data: partial")
        server.close()
        with pytest.raises(EOFError):
            client.next_frame(timeout=5)
        assert client.eof and not client.ended
        assert bytes(client.wire) == bytes(client.raw)


def test_read_body_of_a_chunked_response() -> None:
    client, server = client_pair(True)
    with client, server:
        server.sendall(chunked(b'{"error":', b'"x"}'))
        assert client.read_body(timeout=5) == b'{"error":"x"}'


def test_request_reads_a_bounded_event_stream_whole() -> None:
    """A refusal's `200 text/event-stream` with Content-Length: the body may come later than
    the head; `request` waits for all of it (an endless stream keeps only what came)."""
    body = b'event: close\nretry: 3000\ndata: {"reason":"draining","message":"m"}\n\n'
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(body)
                )
                time.sleep(0.3)
                conn.sendall(body)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        response = request(port, "GET", "/v1/sse", timeout=5)
        thread.join(5)
    assert response.body == body
    [frame] = parse_stream(response.body)
    assert (frame.event, frame.retry) == ("close", 3000)
