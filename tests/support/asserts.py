"""Assertions shared by the integration tests."""

from __future__ import annotations

import json
from typing import Any

from .sse import Response


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
