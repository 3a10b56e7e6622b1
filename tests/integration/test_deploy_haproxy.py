"""The HAProxy snippet of docs/operations.md ("Load balancers: HAProxy, cloud, HTTP/2"), run
by real HAProxy in front of a real gateway: it is a valid configuration, and a stream
through it arrives uncompressed and carries each event before the next one is published
(nothing held back), and heartbeats. Skipped where haproxy is not installed (Debian:
`apt-get install haproxy`).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.procs import REPO, GatewayFactory, RedisServer, free_port, port_open, wait_for
from support.sse import SSEClient

from sse_gateway.publish import SyncPublisher

pytestmark = pytest.mark.timeout(60)

DOCS = REPO / "docs" / "operations.md"
BIND_LINE = "bind :443 ssl crt /etc/haproxy/certs/site.pem alpn h2,http/1.1"
SERVER_LINES = ("server gw1 10.0.0.11:8080 check", "server gw2 10.0.0.12:8080 check")


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
    if found is None:
        pytest.skip("haproxy not installed: the documented snippet is not run")
    return found


def documented_snippet() -> str:
    blocks = re.findall(r"```haproxy\n(.*?)```", DOCS.read_text(), flags=re.DOTALL)
    assert len(blocks) == 1, "one HAProxy snippet in docs/operations.md"
    snippet: str = blocks[0]
    return snippet


def local_config(listen_port: int, gateway_port: int, backend_extra: str = "") -> str:
    """The snippet with its TLS bind and its two example servers replaced, and
    `backend_extra` lines added to its backend; nothing else."""
    text = documented_snippet()
    if backend_extra:
        assert "backend sse_gateway\n" in text
        text = text.replace("backend sse_gateway\n", f"backend sse_gateway\n{backend_extra}")
    for line in (BIND_LINE, *SERVER_LINES):
        assert line in text, f"the test replaces {line!r}: keep it in the snippet or update"
    text = text.replace(BIND_LINE, f"bind 127.0.0.1:{listen_port}")
    text = text.replace(SERVER_LINES[0], f"server gw1 127.0.0.1:{gateway_port} check")
    lines = [line for line in text.splitlines() if line.strip() != SERVER_LINES[1]]
    return "\n".join(lines) + "\n"


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[Callable[..., int]]:
    """Starts HAProxy (foreground, this test's config) in front of a gateway port; returns
    the port it listens on. Stopped after the test."""
    binary = haproxy_binary()
    started: list[subprocess.Popen[bytes]] = []

    def start(gateway_port: int, backend_extra: str = "") -> int:
        port = free_port()
        config = tmp_path / "haproxy.cfg"
        config.write_text(local_config(port, gateway_port, backend_extra))
        check = subprocess.run(
            [binary, "-c", "-f", str(config)], capture_output=True, text=True, check=False
        )
        assert check.returncode == 0, check.stdout + check.stderr
        with open(tmp_path / "haproxy.log", "ab") as log:
            started.append(
                subprocess.Popen([binary, "-db", "-f", str(config)], stdout=log, stderr=log)
            )
        wait_for(lambda: port_open(port), what="haproxy listening")
        return port

    try:
        yield start
    finally:
        for proc in started:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


# An operator who turns on compression for event streams: the gateway's `Cache-Control:
# no-transform` keeps HAProxy from gzipping the stream (which would hold frames back).
COMPRESSION = "    compression algo gzip\n    compression type text/event-stream\n"


@pytest.mark.parametrize("backend_extra", ["", COMPRESSION], ids=["as documented", "gzip on"])
def test_documented_haproxy_config_streams_each_frame(
    backend_extra: str,
    haproxy: Callable[..., int],
    gateway_factory: GatewayFactory,
    redis_server: RedisServer,
    publisher: SyncPublisher,
    ids: Callable[..., str],
) -> None:
    gateway = gateway_factory("--keepalive-period", "1s", redis=redis_server)
    port = haproxy(gateway.port, backend_extra)
    brand, player = ids("haproxy"), ids("p")
    headers = {
        "Authorization": f"Bearer {gateway.token(brand, player)}",
        # As browsers send it: a compressing proxy would take it as leave to compress.
        "Accept-Encoding": "gzip, deflate, br",
    }
    client = SSEClient.connect(port, "/v1/sse", headers, timeout=10)
    try:
        assert client.status == 200
        assert client.response.header("Content-Encoding") is None
        client.wait_connected()
        for n in range(3):
            # The next event is published only once this one came through: a proxy that
            # held frames back (buffering, compression) would stall here.
            publisher.publish(brand, player, "bet", {"n": n})
            assert client.wait_event("bet", timeout=10).json() == {"n": n}
        assert client.wait_event("heartbeat", timeout=10).json()["ts"] > 0
    finally:
        client.close()


def test_snippet_keeps_open_streams_when_a_check_fails() -> None:
    """The snippet must not cut the sessions of a server whose /readyz is 503 (a Redis
    outage, the shutdown delay): see the docs' list of what a balancer needs."""
    snippet = documented_snippet()
    directives = [line.split("#")[0] for line in snippet.splitlines()]
    assert not any("shutdown-sessions" in line for line in directives)
    assert any(line.split() == ["option", "httpchk", "GET", "/readyz"] for line in directives)
