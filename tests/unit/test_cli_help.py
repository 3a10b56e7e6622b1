"""`serve --help` shows each setting's default as it would be typed (issue 12)."""

from __future__ import annotations

import contextlib
import io

import pytest

from sse_gateway.cli import _duration_text, build_parser, default_text
from sse_gateway.settings import OPTIONS, Option, Settings, parse_value


def serve_help() -> str:
    """The `serve --help` text, its lines joined (argparse wraps them at any space)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", "--help"])
    assert exit_info.value.code == 0
    return " ".join(out.getvalue().split())


@pytest.mark.parametrize(
    ("env", "shown"),
    [
        ("SSE_CONNECTION_LIMIT", "50000"),
        ("SSE_HEADER_TIMEOUT", "10s"),
        ("SSE_KEEPALIVE_PERIOD", "15s"),
        ("SSE_HISTORY_TTL", "24h"),
        ("SSE_JWKS_REFRESH", "5m"),
        ("SSE_PORT", "8080"),
        ("SSE_CONNECT_RATE_PER_IP", "0"),
        ("SSE_LOG_LEVEL", "INFO"),
    ],
)
def test_serve_help_shows_the_defaults(env: str, shown: str) -> None:
    assert f"(env {env}; default {shown})" in serve_help()


@pytest.mark.parametrize("env", ["EVENTS_REDIS_STORAGE", "SSE_JWT_SECRET", "SSE_CORS_ORIGINS"])
def test_a_setting_without_a_default_shows_none(env: str) -> None:
    assert f"(env {env})" in serve_help()


@pytest.mark.parametrize("option", OPTIONS, ids=lambda option: option.env)
def test_a_shown_default_parses_back_to_the_default(option: Option) -> None:
    attr = option.attr
    shown = default_text(attr)
    if shown is not None:
        assert parse_value(attr, shown) == getattr(Settings(), attr)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0, "0s"), (0.5, "500ms"), (1.5, "1500ms"), (10.0, "10s"), (90.0, "90s"), (86400.0, "24h")],
)
def test_duration_text(seconds: float, text: str) -> None:
    assert _duration_text(seconds) == text
