"""HTTP helpers: query parsing and response encoding."""

from __future__ import annotations

import json

import pytest

from sse_gateway.wire.http import (
    BadQuery,
    Request,
    Response,
    encode_response,
    error_response,
    json_response,
    parse_query,
    stream_head,
)


def split_response(raw: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, "no blank line after the head"
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = []
    for line in header_lines:
        name, colon, value = line.partition(":")
        assert colon, f"malformed header line {line!r}"
        headers.append((name, value.strip()))
    return status_line, headers, body


def header_values(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [value for key, value in headers if key.lower() == name.lower()]


# --- parse_query -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", {}),
        ("token=abc", {"token": "abc"}),
        ("token=a.b.c&brand_id=b1", {"token": "a.b.c", "brand_id": "b1"}),
        ("a=", {"a": ""}),
        ("a", {"a": ""}),
        ("a=1&&b=2", {"a": "1", "b": "2"}),
        ("q=%C3%A9%20x+y", {"q": "é x y"}),
        ("a=1;b=2", {"a": "1;b=2"}),
        ("Token=x&token=y", {"Token": "x", "token": "y"}),
        ("a=%zz", {"a": "%zz"}),
    ],
)
def test_parse_query(query: str, expected: dict[str, str]) -> None:
    assert parse_query(query) == expected


@pytest.mark.parametrize(
    "query",
    [
        "token=a&token=b",
        "token=a&token=a",
        "token=&token=x",
        "a&a",
        "brand_id=b1&x=1&brand_id=b2",
        "t%6Fken=a&token=b",
    ],
)
def test_parse_query_refuses_repeated_parameters(query: str) -> None:
    with pytest.raises(BadQuery, match="repeated"):
        parse_query(query)


@pytest.mark.parametrize("query", ["a=%ff", "%ff=1", "a=%C3"])
def test_parse_query_refuses_bad_utf8(query: str) -> None:
    with pytest.raises(BadQuery):
        parse_query(query)


def test_bad_query_is_a_value_error() -> None:
    assert issubclass(BadQuery, ValueError)


# --- responses -------------------------------------------------------------------------------


def test_json_response_keep_alive() -> None:
    raw = encode_response(json_response(200, {"status": "ok"}), keep_alive=True)
    status, headers, body = split_response(raw)
    assert status == "HTTP/1.1 200 OK"
    assert body == b'{"status":"ok"}'
    assert header_values(headers, "Content-Type") == ["application/json"]
    assert header_values(headers, "Content-Length") == [str(len(body))]
    assert header_values(headers, "Connection") == ["keep-alive"]
    assert header_values(headers, "Server") == ["sse-gateway"]


def test_response_close() -> None:
    raw = encode_response(json_response(200, {}), keep_alive=False)
    _, headers, _ = split_response(raw)
    assert header_values(headers, "Connection") == ["close"]


def test_content_length_counts_bytes_not_characters() -> None:
    raw = encode_response(json_response(200, {"t": "é✓𝄞"}), keep_alive=True)
    _, headers, body = split_response(raw)
    assert json.loads(body) == {"t": "é✓𝄞"}
    assert header_values(headers, "Content-Length") == [str(len(body))]
    assert len(body) > len(body.decode("utf-8"))


def test_error_response_body_and_extra_headers() -> None:
    response = error_response(405, "method_not_allowed", "use GET", [("Allow", "GET, OPTIONS")])
    raw = encode_response(response, keep_alive=False)
    status, headers, body = split_response(raw)
    assert status == "HTTP/1.1 405 Method Not Allowed"
    assert json.loads(body) == {"error": "method_not_allowed", "message": "use GET"}
    assert header_values(headers, "Allow") == ["GET, OPTIONS"]
    assert header_values(headers, "Content-Type") == ["application/json"]


@pytest.mark.parametrize(
    ("status", "line"),
    [
        (400, "HTTP/1.1 400 Bad Request"),
        (401, "HTTP/1.1 401 Unauthorized"),
        (403, "HTTP/1.1 403 Forbidden"),
        (404, "HTTP/1.1 404 Not Found"),
        (408, "HTTP/1.1 408 Request Timeout"),
        (431, "HTTP/1.1 431 Request Header Fields Too Large"),
        (503, "HTTP/1.1 503 Service Unavailable"),
    ],
)
def test_status_lines(status: int, line: str) -> None:
    raw = encode_response(error_response(status, "x", "y"), keep_alive=False)
    assert split_response(raw)[0] == line


def test_head_only_keeps_content_length_but_no_body() -> None:
    response = json_response(200, {"status": "ok"})
    full = encode_response(response, keep_alive=True)
    head = encode_response(response, keep_alive=True, head_only=True)
    assert full.startswith(head)
    assert head.endswith(b"\r\n\r\n")
    _, headers, body = split_response(head)
    assert body == b""
    assert header_values(headers, "Content-Length") == [str(len(response.body))]


def test_empty_body_has_content_length_zero() -> None:
    raw = encode_response(Response(200, b"", headers=[("Vary", "Origin")]), keep_alive=True)
    status, headers, body = split_response(raw)
    assert status == "HTTP/1.1 200 OK"
    assert body == b""
    assert header_values(headers, "Content-Length") == ["0"]
    assert header_values(headers, "Vary") == ["Origin"]


def test_a_204_has_neither_content_length_nor_content_type() -> None:
    """RFC 9110 §8.6: a server MUST NOT send Content-Length in a 204 (a CORS preflight's
    answer); a type of no content means nothing either."""
    raw = encode_response(Response(204, b"", headers=[("Vary", "Origin")]), keep_alive=True)
    status, headers, body = split_response(raw)
    assert status == "HTTP/1.1 204 No Content"
    assert body == b""
    assert header_values(headers, "Content-Length") == []
    assert header_values(headers, "Content-Type") == []
    assert header_values(headers, "Vary") == ["Origin"]


def test_custom_content_type() -> None:
    response = Response(200, b"# metrics\n", content_type="text/plain; version=0.0.4")
    _, headers, _ = split_response(encode_response(response, keep_alive=True))
    assert header_values(headers, "Content-Type") == ["text/plain; version=0.0.4"]


def test_each_header_appears_once() -> None:
    raw = encode_response(json_response(200, {}, [("X-A", "1")]), keep_alive=True)
    _, headers, _ = split_response(raw)
    names = [name.lower() for name, _ in headers]
    assert len(names) == len(set(names))


@pytest.mark.parametrize(
    ("kwargs", "transfer_encoding"),
    [({}, ["chunked"]), ({"chunked": True}, ["chunked"]), ({"chunked": False}, [])],
    ids=["default-http11", "http11", "http10"],
)
def test_stream_head(kwargs: dict[str, bool], transfer_encoding: list[str]) -> None:
    raw = stream_head([("Access-Control-Allow-Origin", "https://a.example")], **kwargs)
    status, headers, body = split_response(raw)
    assert status == "HTTP/1.1 200 OK"
    assert body == b""
    assert header_values(headers, "Content-Type") == ["text/event-stream; charset=utf-8"]
    assert header_values(headers, "Cache-Control") == ["no-cache, no-transform"]
    assert header_values(headers, "X-Accel-Buffering") == ["no"]
    assert header_values(headers, "Connection") == ["close"]
    assert header_values(headers, "Content-Length") == []
    # HTTP/1.1: a chunked body (clients on urllib3 read each frame as it comes); HTTP/1.0 has
    # no chunked coding, its body runs until the connection closes.
    assert header_values(headers, "Transfer-Encoding") == transfer_encoding
    assert header_values(headers, "Content-Encoding") == []
    assert header_values(headers, "Access-Control-Allow-Origin") == ["https://a.example"]


def test_request_header_lookup() -> None:
    request = Request("GET", "/v1/sse", "", {b"x-brand-id": b"b\xe91"}, keep_alive=True)
    assert request.header(b"x-brand-id") == "b\xe91"
    assert request.header(b"authorization") is None
