"""HTTP/1.1 response encoding and request helpers: pure functions over bytes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl

from sse_gateway.wire.frames import dump_json

SERVER_HEADER = b"Server: sse-gateway\r\n"


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query_string: str
    headers: dict[bytes, bytes]
    keep_alive: bool
    body: bytes = b""
    http_version: str = "1.1"
    """As the request line gave it: "1.0" or "1.1"."""

    def header(self, name: bytes) -> str | None:
        value = self.headers.get(name)
        return None if value is None else value.decode("latin-1")


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


def ambiguous_head(headers: list[tuple[bytes, bytes]], http_version: str) -> str | None:
    """Why a request head must be refused (RFC 9112 §3.2: no Host on HTTP/1.1, or more than
    one), or None. Two Authorization headers are refused too: a proxy that checks the first
    and a server that uses the last would disagree about who the client is. `headers` are
    (lower-case name, value) as they came."""
    hosts = authorizations = 0
    for name, _ in headers:
        if name == b"host":
            hosts += 1
        elif name == b"authorization":
            authorizations += 1
    if hosts > 1:
        return "more than one Host header"
    if hosts == 0 and http_version == "1.1":
        return "an HTTP/1.1 request must have a Host header"
    if authorizations > 1:
        return "more than one Authorization header"
    return None


class BadQuery(ValueError):
    pass


def parse_query(query: str) -> dict[str, str]:
    """Query parameters; a repeated parameter is ambiguous for auth, so it is refused."""
    result: dict[str, str] = {}
    if not query:
        return result  # the usual stream request: a header token and no query at all
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=False, errors="strict")
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadQuery("query string is not valid UTF-8 or percent-encoding") from exc
    for key, value in pairs:
        if key in result:
            raise BadQuery(f"query parameter {key!r} is repeated")
        result[key] = value
    return result


def json_response(status: int, payload: Any, headers: Iterable[tuple[str, str]] = ()) -> Response:
    return Response(status, dump_json(payload).encode("utf-8"), headers=list(headers))


def error_response(
    status: int, code: str, message: str, headers: Iterable[tuple[str, str]] = ()
) -> Response:
    return json_response(status, {"error": code, "message": message}, headers)


def encode_head(
    status: int,
    headers: Iterable[tuple[str, str]],
    *,
    content_type: str | None,
    content_length: int | None,
    keep_alive: bool,
) -> bytes:
    """A response head; `content_type` and `content_length` None leave their header out."""
    reason = HTTPStatus(status).phrase
    lines = [f"HTTP/1.1 {status} {reason}\r\n"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}\r\n")
    if content_length is not None:
        lines.append(f"Content-Length: {content_length}\r\n")
    lines.append("Connection: keep-alive\r\n" if keep_alive else "Connection: close\r\n")
    lines.extend(f"{name}: {value}\r\n" for name, value in headers)
    return "".join(lines).encode("latin-1") + SERVER_HEADER + b"\r\n"


def encode_response(response: Response, *, keep_alive: bool, head_only: bool = False) -> bytes:
    """The bytes of `response`; a 204 has no content, and so neither a Content-Length (RFC
    9110 §8.6: a server MUST NOT send one) nor a Content-Type."""
    if response.status == 204:
        head = encode_head(
            204, response.headers, content_type=None, content_length=None, keep_alive=keep_alive
        )
        return head
    head = encode_head(
        response.status,
        response.headers,
        content_type=response.content_type,
        content_length=len(response.body),
        keep_alive=keep_alive,
    )
    return head if head_only else head + response.body


def stream_head(headers: Iterable[tuple[str, str]], *, chunked: bool = True) -> bytes:
    """The head of an SSE response: never cached, never buffered; the body is chunked
    (`chunked`, for HTTP/1.1 clients: libraries built on urllib3 read a close-delimited body
    only as their buffer fills) or runs until the connection closes (HTTP/1.0)."""
    # no-transform: a compressing proxy (HAProxy `compression`, nginx gzip) leaves the stream
    # alone; a gzip stream reaches the client only when the compressor flushes a block.
    base = [("Cache-Control", "no-cache, no-transform"), ("X-Accel-Buffering", "no")]
    if chunked:
        base.append(("Transfer-Encoding", "chunked"))
    base.extend(headers)
    return encode_head(
        200,
        base,
        content_type="text/event-stream; charset=utf-8",
        content_length=None,
        keep_alive=False,
    )
