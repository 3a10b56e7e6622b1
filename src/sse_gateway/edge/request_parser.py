"""RequestParser: bytes in, complete `Request`s out, with the limits of a request head and body.

httptools does the parsing; this class keeps what its callbacks deliver (URL, headers, the
body a handler asked for) and checks, as bytes arrive, what httptools would let grow: the
raw head (an unterminated header value is buffered by httptools until its line ends), the
counted request line and headers, the body. A request that breaks a rule raises
`RequestRefused` with the answer to send, out of `feed`; the request reader sends it and
closes.
"""

from __future__ import annotations

from collections.abc import Callable

import httptools

from sse_gateway.wire.http import Request, ambiguous_head, error_response

MAX_HEADER_BYTES = 16 * 1024
# The raw head may exceed what the callbacks count (line ends, "HTTP/1.1", spaces) by this much.
HEAD_SLACK_BYTES = 1024

# A body sent in 1-byte chunks carries 5 bytes of framing per byte ("1\r\na\r\n").
FRAMING_PER_BODY_BYTE = 8

BodyLimit = Callable[[bytes, list[tuple[bytes, bytes]]], int]


class RequestRefused(Exception):
    """The request breaks a rule: answer `response` (whose error code is `code`), then close
    the connection. The reader counts it under `code` in sse_connections_rejected_total
    whatever the path, which may not be known yet (a malformed request line)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(status)
        self.code = code
        self.response = error_response(status, code, message)


class _Stopped(Exception):
    """Raised from a callback once the parser is stopped (bytes after a stream's request)."""


def _too_large() -> RequestRefused:
    return RequestRefused(
        431,
        "request_header_fields_too_large",
        f"request line and headers exceed {MAX_HEADER_BYTES} bytes",
    )


def _body_too_large() -> RequestRefused:
    return RequestRefused(413, "payload_too_large", "request body is too large")


def _version_refused() -> RequestRefused:
    return RequestRefused(
        505, "http_version_not_supported", "only HTTP/1.1 and HTTP/1.0 are served"
    )


def _content_length(headers: list[tuple[bytes, bytes]]) -> int:
    """The announced body size (0 when none or not a number: httptools refuses those)."""
    for name, value in headers:
        if name == b"content-length":
            return int(value) if value.strip().isdigit() else 0
    return 0


def _drop(request: Request) -> None:
    """What a stopped parser does with a request: nothing."""


def _expects_continue(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(name == b"expect" and value.lower() == b"100-continue" for name, value in headers)


class RequestParser:
    """One connection's parser. `body_limit(url, headers)` says how many bytes of a POST's
    body to keep (0: read and drop it); `on_request(request)` gets each complete request;
    `on_continue()` is asked to send `100 Continue` to a client that waits for it before
    sending a body that will be kept."""

    __slots__ = (
        "_body",
        "_body_left",
        "_body_limit",
        "_body_seen",
        "_framing",
        "_head_raw",
        "_header_bytes",
        "_headers",
        "_on_continue",
        "_on_request",
        "_parser",
        "_refusal",
        "_url",
        "stopped",
    )

    def __init__(
        self,
        body_limit: BodyLimit,
        on_request: Callable[[Request], None],
        on_continue: Callable[[], None] | None = None,
    ) -> None:
        self._body_limit = body_limit
        self._on_request = on_request
        self._on_continue = on_continue
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        # Raw bytes of the request head received so far, or -1 once its headers are complete.
        self._head_raw = 0
        self._body: bytearray | None = None
        self._body_left = 0
        # After the head: raw bytes fed, and body bytes seen. What lies between is chunk
        # framing and trailers, which httptools keeps until a trailer line ends.
        self._framing = 0
        self._body_seen = 0
        self._refusal: RequestRefused | None = None
        self.stopped = False

    @property
    def in_head(self) -> bool:
        """Whether part of a request head has arrived (and not all of it)."""
        return self._head_raw > 0

    def feed(self, data: bytes) -> None:
        """Parses `data`; `on_request` runs for each request completed in it.

        Raises RequestRefused (the parser is then stopped). Bytes fed once `stop()` was
        called, even from within `on_request`, are ignored.
        """
        parser = self._parser
        if parser is None:
            return
        if self._head_raw == 0 and data.startswith(b"PRI * HTTP/2.0"):
            self.stop()  # the preface of HTTP/2 with prior knowledge (h2c)
            raise _version_refused()
        if self._head_raw >= 0:
            end = data.find(b"\r\n\r\n")
            self._head_raw += len(data) if end < 0 else end + 4
            if self._head_raw > MAX_HEADER_BYTES + HEAD_SLACK_BYTES:
                self.stop()
                raise _too_large()
        else:
            self._framing += len(data)
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # an Upgrade header on an ordinary request: answered as plain HTTP
        except httptools.HttpParserError as exc:
            refusal, self._refusal = self._refusal, None
            cause = exc.__context__
            if refusal is None and isinstance(cause, Exception):
                bug = not isinstance(cause, _Stopped | RequestRefused)
                if bug:  # behind on_request, not the client's fault: surface it
                    self.stop()
                    raise cause from exc
            if self.stopped and refusal is None:
                return  # stopped from on_request: the rest is not ours to parse
            self.stop()
            if refusal is None:
                refusal = RequestRefused(400, "bad_request", "malformed HTTP request")
            raise refusal from exc
        if self._head_raw < 0 and self._framing - self._body_seen > MAX_HEADER_BYTES + (
            FRAMING_PER_BODY_BYTE * self._body_seen
        ):
            # Far more chunk framing than chunk data: an endless trailer or chunk extension.
            self.stop()
            raise _too_large()

    def stop(self) -> None:
        """Parses nothing more; forgets what may hold a token, and the objects that would
        keep a reader that handed its socket over alive in a reference cycle until the
        garbage collector's next full pass."""
        self.stopped = True
        self._url = b""
        self._headers = []
        self._body = None
        self._parser = None
        self._on_request = _drop
        self._on_continue = None

    def _refuse(self, refusal: RequestRefused) -> None:
        self._refusal = refusal
        raise refusal

    # --- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.stopped:
            raise _Stopped
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        self._body = None
        self._framing = 0
        self._body_seen = 0

    def on_url(self, url: bytes) -> None:
        if self.stopped:
            raise _Stopped
        self._url += url
        self._header_bytes += len(url)
        if self._header_bytes > MAX_HEADER_BYTES:
            self._refuse(_too_large())

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.stopped:
            raise _Stopped
        self._headers.append((name.lower(), value))
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > MAX_HEADER_BYTES:
            self._refuse(_too_large())

    def on_headers_complete(self) -> None:
        if self.stopped:
            raise _Stopped
        parser = self._parser
        assert parser is not None  # stopped parsers raise above
        self._head_raw = -1
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            self._refuse(_version_refused())
        refusal = ambiguous_head(self._headers, version)
        if refusal is not None:
            self._refuse(RequestRefused(400, "bad_request", refusal))
        # Only a body the handler asks for is kept; any other is read and dropped.
        if parser.get_method() == b"POST":
            limit = self._body_limit(self._url, self._headers)
            if limit > 0:
                if _content_length(self._headers) > limit:  # refused before it is sent
                    self._refuse(_body_too_large())
                self._body = bytearray()
                self._body_left = limit
                if (
                    self._on_continue is not None
                    and version == "1.1"
                    and _expects_continue(self._headers)
                ):
                    self._on_continue()

    def on_body(self, chunk: bytes) -> None:
        if self.stopped:
            raise _Stopped
        self._body_seen += len(chunk)
        body = self._body
        if body is None:
            return
        body += chunk
        self._body_left -= len(chunk)
        if self._body_left < 0:
            self._body = None
            self._refuse(_body_too_large())

    def on_message_complete(self) -> None:
        if self.stopped:
            raise _Stopped
        parser = self._parser
        assert parser is not None  # stopped parsers raise above
        self._head_raw = 0  # the next request's head, on a keep-alive connection
        try:
            url = httptools.parse_url(self._url)
        except httptools.HttpParserInvalidURLError:  # e.g. CONNECT's authority form
            self._refuse(RequestRefused(400, "bad_request", "malformed request target"))
        request = Request(
            method=parser.get_method().decode("ascii", "replace"),
            path=url.path.decode("latin-1") if url.path else "/",
            query_string=url.query.decode("latin-1") if url.query else "",
            headers=dict(self._headers),
            keep_alive=parser.should_keep_alive(),
            body=bytes(self._body) if self._body else b"",
            http_version=parser.get_http_version(),
        )
        self._headers = []
        self._body = None
        self._on_request(request)
