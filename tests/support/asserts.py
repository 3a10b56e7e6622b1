"""Assertions shared by the integration tests."""

from __future__ import annotations

import json
from typing import Any

from .sse import Response, SSEClient, SSEEvent, parse_stream

#: A close that wants the client back says `retry:` SSE_RETRY_MS plus a random 0 to 10 s
#: (`streams.stream.spread_retry`), so that clients closed together do not return together.
RETRY_SPREAD_MS = 10_000
#: The `Retry-After` of a transient refusal (`edge.admission.RETRY_AFTER_SECONDS`).
RETRY_AFTER_SECONDS = 5


def assert_error(response: Response, status: int, code: str) -> dict[str, Any]:
    """`status` with `Content-Type: application/json` and body `{"error": code, "message": ...}`."""
    detail = f"{response.status} {response.headers} {response.body[:500]!r}"
    assert response.status == status, f"expected {status} {code}, got {detail}"
    content_type = response.header("Content-Type") or ""
    assert content_type.split(";")[0].strip().lower() == "application/json", detail
    try:
        body = json.loads(response.body)
    except ValueError as exc:
        raise AssertionError(f"error body is not JSON: {detail}") from exc
    assert isinstance(body, dict), detail
    assert body.get("error") == code, detail
    assert isinstance(body.get("message"), str), detail
    assert body["message"].strip(), f"empty message: {detail}"
    return body


def assert_www_authenticate(response: Response, error: str | None) -> None:
    value = response.header("WWW-Authenticate")
    assert value is not None, f"no WWW-Authenticate header: {response.headers}"
    assert value.startswith("Bearer"), value
    assert 'realm="sse-gateway"' in value, value
    if error is None:
        assert "error=" not in value, value
    else:
        assert f'error="{error}"' in value, value


def assert_retry_after(response: Response) -> int:
    value = response.header("Retry-After")
    assert value is not None, f"no Retry-After header: {response.headers}"
    assert value.strip().isdigit(), f"Retry-After must be delay-seconds, got {value!r}"
    return int(value)


def assert_close_frame(frame: SSEEvent, reason: str, retry_ms: int) -> dict[str, Any]:
    """`event: close`, no `id:`, `retry:` SSE_RETRY_MS plus 0-10 s of spread, and data
    `{"reason": reason, "message": <non-empty text>}`. Returns the data."""
    assert frame.event == "close" and frame.has_data, f"not an `event: close`: {frame!r}"
    assert frame.id is None, f"a close frame has no id: {frame!r}"
    assert frame.retry is not None, f"the close frame has no retry: {frame!r}"
    assert retry_ms <= frame.retry < retry_ms + RETRY_SPREAD_MS, (
        f"close retry {frame.retry} not in [{retry_ms}, {retry_ms + RETRY_SPREAD_MS})"
    )
    data = frame.json()
    assert isinstance(data, dict) and set(data) == {"reason", "message"}, data
    assert data["reason"] == reason, data
    assert isinstance(data["message"], str) and data["message"].strip(), data
    return data


def assert_farewell(
    client: SSEClient, reason: str, retry_ms: int, timeout: float = 15.0
) -> SSEEvent:
    """The gateway ends the stream and wants the client back: the socket closes, the last
    frame is the one `event: close` (reason, spread `retry:`), and a chunked body ends with
    its last chunk (a graceful end, not a cut). No `retry:`-only block was ever sent."""
    assert client.wait_closed(timeout), "the stream was not closed"
    frames = client.frames
    assert frames, f"the stream closed with no frame at all: {bytes(client.wire)[:300]!r}"
    last = frames[-1]
    assert_close_frame(last, reason, retry_ms)
    assert [f for f in frames if f.event == "close"] == [last], frames
    assert not [f for f in frames if f.is_retry_only], f"a retry:-only block: {frames}"
    if client.chunked:
        assert client.ended, f"no last chunk: {bytes(client.wire)[-100:]!r}"
    return last


def assert_close_answer(response: Response, reason: str, retry_ms: int) -> SSEEvent:
    """A transient refusal of a stream to a client that accepts `text/event-stream`: `200
    text/event-stream` (an EventSource survives it and comes back after `retry`),
    `Retry-After`, `Cache-Control: no-cache, no-transform`, a `Content-Length` body of exactly one
    `event: close` whose reason is the error code."""
    detail = f"{response.status} {response.headers} {response.body[:500]!r}"
    assert response.status == 200, f"expected the 200 close answer ({reason}), got {detail}"
    content_type = (response.header("Content-Type") or "").split(";")[0].strip().lower()
    assert content_type == "text/event-stream", detail
    assert response.header("Cache-Control") == "no-cache, no-transform", detail
    assert assert_retry_after(response) == RETRY_AFTER_SECONDS, detail
    assert response.header("Transfer-Encoding") is None, detail
    assert response.header("Content-Length") == str(len(response.body)), detail
    frames = parse_stream(response.body)
    assert len(frames) == 1, f"expected one frame (no retry:-only block): {detail}"
    assert_close_frame(frames[0], reason, retry_ms)
    return frames[0]
