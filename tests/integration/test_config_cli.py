"""The command line: configuration errors exit 2, `token`, `--dev`, `--help`."""

from __future__ import annotations

import re
import select
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jwt
import pytest
from support.procs import (
    DEFAULT_SECRET,
    Gateway,
    GatewayFactory,
    RedisServer,
    cli,
    free_port,
    gateway_env,
    wait_for,
)
from support.sse import SSEClient, assert_position_id, request

pytestmark = pytest.mark.timeout(60)

JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


def serve(*flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`serve` that must fail fast; a valid configuration would hang until the timeout."""
    return cli(
        "serve", "--host", "127.0.0.1", "--port", str(free_port()), *flags, env=env, timeout=30
    )


@pytest.mark.parametrize(
    ("flags", "env", "name", "value"),
    [
        ([], {"SSE_KEEPALIVE_PERIOD": "abc"}, "SSE_KEEPALIVE_PERIOD", "abc"),
        (["--port", "99999"], {}, "--port", "99999"),
        ([], {"SSE_CONNECTION_LIMIT": "0"}, "SSE_CONNECTION_LIMIT", "0"),
        ([], {"SSE_CONNECTION_LIMIT": "many"}, "SSE_CONNECTION_LIMIT", "many"),
        (["--keepalive-period", "10ms"], {}, "--keepalive-period", "10ms"),
        ([], {"SSE_RETRY_MS": "-5"}, "SSE_RETRY_MS", "-5"),
        ([], {"SSE_MAX_EVENT_BYTES": "1k"}, "SSE_MAX_EVENT_BYTES", "1k"),
        ([], {"SSE_DRAIN_SECONDS": "forever"}, "SSE_DRAIN_SECONDS", "forever"),
        ([], {"EVENTS_REDIS_STORAGE": "http://127.0.0.1:1"}, "EVENTS_REDIS_STORAGE", "http://"),
        ([], {"SSE_CORS_ORIGINS": "*"}, "SSE_CORS_ORIGINS", "*"),
        ([], {"SSE_LOG_FORMAT": "xml"}, "SSE_LOG_FORMAT", "xml"),
        ([], {"SSE_JWT_KEYS_FILE": "/nonexistent/keys.json"}, "SSE_JWT_KEYS_FILE", "/nonexistent"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_invalid_setting_exits_2_naming_it(
    flags: list[str], env: dict[str, str], name: str, value: str
) -> None:
    result = serve("--jwt-secret", DEFAULT_SECRET, *flags, env=env)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert name in result.stderr, result.stderr
    assert value in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("flags", "env", "named", "not_named"),
    [
        (["--workers", "2"], {}, "--workers: invalid value '2'", "SSE_WORKERS"),
        ([], {"SSE_WORKERS": "2"}, "SSE_WORKERS: invalid value '2'", "--workers:"),
        (["--metrics-host", "127.0.0.1"], {}, "--metrics-host: invalid value", "SSE_METRICS_HOST"),
    ],
)
def test_a_setting_is_named_as_the_user_gave_it(
    flags: list[str], env: dict[str, str], named: str, not_named: str
) -> None:
    # Issue 12: `serve --workers 2` without Redis said `SSE_WORKERS: invalid value`.
    result = serve("--jwt-secret", DEFAULT_SECRET, *flags, env=env)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert named in result.stderr, result.stderr
    assert not_named not in result.stderr, result.stderr


def test_no_jwt_setting_exits_2() -> None:
    result = serve()
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "SSE_JWT_SECRET" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_empty_jwt_secret_is_refused() -> None:
    result = serve(env={"SSE_JWT_SECRET": ""})
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "SSE_JWT_SECRET" in result.stderr


def test_jwt_secret_never_echoed_in_errors() -> None:
    secret = "do-not-print-this-secret-0123456789"
    result = serve(env={"SSE_JWT_SECRET": secret, "SSE_CONNECTION_LIMIT": "0"})
    assert result.returncode == 2
    assert secret not in result.stderr + result.stdout


def test_flag_wins_over_env(
    gateway_factory: GatewayFactory, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    gw = gateway_factory(
        "--keepalive-period",
        "300ms",
        redis=redis_server,
        env={"SSE_KEEPALIVE_PERIOD": "abc", "SSE_CONNECTION_LIMIT": "7"},
    )
    with gw.stream(ids("b"), ids("p"), wait_connected=False) as client:
        assert client.wait_connected()["heartbeat_interval"] == pytest.approx(0.3)
    assert gw.metrics().value("sse_gateway_connection_limit") == 7


def test_env_only_configuration(
    gateway_factory: GatewayFactory, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    """EVENTS_REDIS_STORAGE and SSE_JWT_SECRET from the environment alone."""
    gw = gateway_factory(
        jwt_secret=None,
        env={
            "EVENTS_REDIS_STORAGE": f"127.0.0.1:{redis_server.port}",
            "SSE_JWT_SECRET": DEFAULT_SECRET,
        },
    )
    gw.secret = DEFAULT_SECRET
    brand, player = ids("b"), ids("p")
    with gw.stream(brand, player) as client:
        r = redis_server.client()
        r.publish(f"SSE::{brand}::{player}", b'{"type":"env","data":1}')
        r.close()
        assert client.wait_event("env").json() == 1


def test_serve_help_lists_every_flag() -> None:
    from sse_gateway.settings import OPTIONS

    result = cli("serve", "--help")
    assert result.returncode == 0, result.stderr
    for option in OPTIONS:
        assert option.flag in result.stdout, option.flag
    assert "--dev" in result.stdout
    shown = " ".join(result.stdout.split())  # argparse wraps lines at any space
    assert "(env SSE_CONNECTION_LIMIT; default 50000)" in shown, result.stdout
    assert "(env SSE_HEADER_TIMEOUT; default 10s)" in shown, result.stdout


def test_token_command(
    gateway_factory: GatewayFactory, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    secret = "token-command-secret-0123456789abcdef"
    result = cli("token", "--brand", "tb", "--player", "tp", env={"SSE_JWT_SECRET": secret})
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert JWT_RE.fullmatch(token), result.stdout
    claims = jwt.decode(token, secret, algorithms=["HS256"])
    assert (claims["brand_id"], claims["sub"]) == ("tb", "tp")
    assert 3000 < claims["exp"] - time.time() <= 3600 + 5
    gw = gateway_factory(redis=redis_server, jwt_secret=secret)
    with gw.open(headers={"Authorization": f"Bearer {token}"}) as client:
        assert client.status == 200
        connected = client.wait_connected()
    assert (connected["brand_id"], connected["player_id"]) == ("tb", "tp")


def test_token_command_ttl_and_console_script() -> None:
    secret = "token-command-secret-0123456789abcdef"
    script = Path(sys.executable).parent / "sse-gateway"
    assert script.exists(), "console script sse-gateway not installed"
    result = subprocess.run(
        [str(script), "token", "--brand", "tb", "--player", "tp", "--ttl", "60"],
        env={"SSE_JWT_SECRET": secret, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), secret, algorithms=["HS256"])
    assert 0 < claims["exp"] - time.time() <= 65


def test_token_command_refuses_without_secret_or_with_bad_ids() -> None:
    result = cli("token", "--brand", "tb", "--player", "tp")
    assert result.returncode != 0
    assert not JWT_RE.search(result.stdout)
    result = cli(
        "token", "--brand", "a::b", "--player", "tp", env={"SSE_JWT_SECRET": DEFAULT_SECRET}
    )
    assert result.returncode != 0
    assert not JWT_RE.search(result.stdout)


def _read_until(proc: subprocess.Popen[bytes], needle: bytes, timeout: float) -> bytes:
    assert proc.stdout is not None
    data = b""
    deadline = time.monotonic() + timeout
    while needle not in data:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{needle!r} not seen within {timeout}s: {data!r}"
        ready, _, _ = select.select([proc.stdout], [], [], remaining)
        if ready:
            chunk = proc.stdout.read1(65536)  # type: ignore[attr-defined]
            assert chunk, f"curl ended before {needle!r}: {data!r}"
            data += chunk
    return data


@pytest.mark.timeout(90)
def test_dev_mode_prints_working_token_and_curl(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory("--dev", "--keepalive-period", "300ms", jwt_secret=None)
    logs = wait_for(lambda: "curl -N" in gw.logs() and gw.logs(), what="the dev banner")
    assert isinstance(logs, str)
    tokens = JWT_RE.findall(logs)
    assert tokens, logs
    with SSEClient.connect(gw.port, "/v1/sse", {"Authorization": f"Bearer {tokens[0]}"}) as client:
        assert client.status == 200
        client.wait_connected()
        client.wait_event("heartbeat")
    for path in ("/", "/demo"):
        page = request(gw.port, "GET", path)
        assert page.status == 200, (path, page)
        assert (page.header("Content-Type") or "").startswith("text/html")
    curl_line = next(line for line in logs.splitlines() if "curl -N" in line)
    argv = shlex.split(curl_line[curl_line.index("curl -N") :])
    assert argv[0] == "curl"
    urls = [a for a in argv if a.startswith("http")]
    assert urls and all(u.startswith(f"http://127.0.0.1:{gw.port}/") for u in urls), argv
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    proc = subprocess.Popen(
        [*argv, "--silent", "--noproxy", "*"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        out = _read_until(proc, b"event: connected", 20)
        out += _read_until(proc, b"event: heartbeat", 20)
        # curl decodes the chunked body: the first frame is `connected` with its resume id
        # (the demo player's history is empty: a position) and its retry, in one block.
        first = re.match(rb"id: (\d+-\d+)\nevent: connected\nretry: 3000\ndata: \{", out)
        assert first is not None, out[:200]
        assert_position_id(first.group(1).decode())
        publish_lines = [
            line[line.index("curl ") :]
            for line in logs.splitlines()
            if "/v1/publish" in line and "curl " in line
        ]
        if publish_lines:
            sent = subprocess.run(
                [*shlex.split(publish_lines[0]), "--silent", "--noproxy", "*"],
                capture_output=True,
                timeout=20,
                check=False,
            )
            assert sent.returncode == 0, sent
            assert b'"id"' in sent.stdout, sent.stdout
            _read_until(proc, b"event: notification", 20)
    finally:
        proc.kill()
        proc.wait(10)


def test_without_dev_there_is_no_demo_page(gateway: Gateway) -> None:
    for path in ("/", "/demo"):
        assert request(gateway.port, "GET", path).status == 404


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SSE_JWT_SECRET", "a-real-secret-that-dev-mode-must-not-use-0123"),
        ("SSE_PUBLISH_API_KEY", "a-real-publish-key-that-dev-mode-must-not-show"),
    ],
)
def test_dev_mode_refuses_real_keys(variable: str, value: str) -> None:
    """Issue 10 item 16: --dev next to real keys handed out the publish key and minted 24 h
    tokens with the real secret on /demo."""
    result = serve("--dev", env={variable: value})
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert variable in result.stderr
    assert value not in result.stderr + result.stdout


def test_dev_mode_listens_on_loopback_unless_told() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sse_gateway", "serve", "--dev", "--port", str(port)],
        env=gateway_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        line = ""
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if "listening on" in line or not line:
                break
        assert f"listening on 127.0.0.1:{port}" in line, line
    finally:
        proc.terminate()
        proc.wait(timeout=30)
