"""SSE_METRICS_PORT (issue 10 item 17): /metrics on a listener of its own, 404 on the public
port."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from support.asserts import assert_error
from support.procs import (
    DEFAULT_SECRET,
    REPO,
    GatewayFactory,
    Metrics,
    RedisServer,
    free_port,
    gateway_env,
    wait_for,
)
from support.sse import request

pytestmark = pytest.mark.timeout(90)


def raw_exchange(port: int, data: bytes) -> bytes:
    """Sends `data` and reads until the gateway closes: every byte it answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


@pytest.mark.parametrize("via", ["flag", "env"])
def test_metrics_are_served_on_the_metrics_port_only(
    gateway_factory: GatewayFactory, via: str
) -> None:
    metrics_port = free_port()
    if via == "flag":
        gateway = gateway_factory("--metrics-port", str(metrics_port))
    else:
        gateway = gateway_factory(env={"SSE_METRICS_PORT": str(metrics_port)})

    scrape = request(metrics_port, "GET", "/metrics")
    assert scrape.status == 200, scrape
    assert (scrape.header("Content-Type") or "").startswith("text/plain; version=0.0.4")
    assert b"# TYPE sse_gateway_connections gauge" in scrape.body
    head = raw_exchange(
        metrics_port, b"HEAD /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n"
    )
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n"), head
    for probe, status in (("/healthz", "ok"), ("/readyz", "ready")):
        answer = request(metrics_port, "GET", probe)
        assert (answer.status, answer.json()) == (200, {"status": status}), answer
    # Nothing else is served there: no stream, no publish, no demo page.
    for path in ("/v1/sse", "/v1/publish", "/", "/demo"):
        assert_error(request(metrics_port, "GET", path), 404, "not_found")
    refused = request(metrics_port, "POST", "/metrics")
    assert_error(refused, 405, "method_not_allowed")
    assert refused.header("Allow") == "GET, HEAD"

    # The public port answers everything but /metrics, as before.
    assert_error(gateway.get("/metrics"), 404, "not_found")
    assert gateway.get("/healthz").status == 200
    assert gateway.get("/readyz").status == 200
    assert f"/metrics on 127.0.0.1:{metrics_port} only" in gateway.logs()


def test_without_a_metrics_port_metrics_stay_on_the_public_port(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = gateway_factory()
    assert b"# TYPE sse_gateway_connections gauge" in gateway.get("/metrics").body


def test_metrics_listener_counts_the_public_ports_streams(
    gateway_factory: GatewayFactory,
) -> None:
    """One process, two listeners: the metrics port reports the public port's streams."""
    metrics_port = free_port()
    gateway = gateway_factory("--metrics-port", str(metrics_port))
    client = gateway.stream("brand", "p1")
    try:
        body = request(metrics_port, "GET", "/metrics").body.decode()
        assert Metrics.parse(body).value("sse_gateway_connections", brand="brand") == 1, body
    finally:
        client.close()


@pytest.mark.timeout(60)
def test_workers_share_the_metrics_port(
    gateway_factory: GatewayFactory, redis_server: RedisServer
) -> None:
    """Each worker binds the metrics port too (SO_REUSEPORT); a scrape reaches one of them."""
    metrics_port = free_port()
    gateway = gateway_factory(
        "--workers", "2", "--metrics-port", str(metrics_port), redis=redis_server
    )
    for _ in range(6):
        assert request(metrics_port, "GET", "/metrics").status == 200
    # The gateway is ready when one worker is; the other may still be starting.
    wait_for(
        lambda: gateway.logs().count(f"/metrics on 127.0.0.1:{metrics_port} only") == 2,
        what="both workers on the metrics port",
    )
    assert_error(gateway.get("/metrics"), 404, "not_found")


def test_a_taken_metrics_port_fails_the_start() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "sse_gateway",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(free_port()),
                "--metrics-port",
                str(taken),
                "--jwt-secret",
                DEFAULT_SECRET,
            ],
            env=gateway_env(),
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO,
            check=False,
        )
    assert run.returncode == 1, run.stderr[-800:]
    assert f"cannot listen on 127.0.0.1:{taken} for metrics" in run.stderr, run.stderr[-800:]


@pytest.mark.parametrize(
    ("flags", "variable"),
    [
        (["--port", "9311", "--metrics-port", "9311"], "--metrics-port: invalid value"),
        (["--metrics-host", "0.0.0.0"], "--metrics-host: invalid value"),
    ],
)
def test_metrics_settings_that_cannot_work_exit_2(flags: list[str], variable: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "sse_gateway", "serve", *flags, "--jwt-secret", DEFAULT_SECRET],
        env=gateway_env(),
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        check=False,
    )
    assert run.returncode == 2, run.stderr[-800:]
    assert variable in run.stderr, run.stderr[-800:]
