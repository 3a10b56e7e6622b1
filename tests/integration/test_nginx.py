"""The shipped nginx configuration (deploy/nginx/sse-gateway.conf), run by real nginx.

nginx runs as a child process (no root needed, no daemon, temp paths under the test's
directory) with the shipped file itself: only its `listen 80;` and `server 127.0.0.1:8080;`
lines are replaced. `EventSourceLike` behaves like a browser EventSource: it reconnects after
the `retry:` it was given, with `Last-Event-ID`, and fails for good on any answer that is not
`200 text/event-stream`, as WHATWG HTML prescribes; the last test runs Chromium's own.
docs/operations.md ("Behind nginx") describes what each test shows.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from support.browser import chromium
from support.procs import REPO, Gateway, GatewayFactory, RedisServer, free_port, wait_for
from support.sse import SSEClient, SSEEvent, SSEParser, parse_stream, request

from sse_gateway.publish import SyncPublisher

pytestmark = pytest.mark.timeout(90)

SHIPPED_CONF = REPO / "deploy" / "nginx" / "sse-gateway.conf"
LISTEN_LINE = "listen 80;"
UPSTREAM_LINE = "server 127.0.0.1:8080;"
PUBLISH_KEY = "nginx-test-publish-key-0123456789abcdef"
#: What nginx answers on /v1/sse while no gateway can be reached, byte for byte.
FALLBACK_BODY = (
    b"event: close\nretry: 3000\n"
    b'data: {"reason":"gateway_unavailable","message":"the gateway is not reachable"}\n\n'
)
OUTAGE_SECONDS = 4.0


# --------------------------------------------------------------------------- nginx


def nginx_binary() -> str:
    """The Debian package's nginx; its absence fails the test (`make test` installs it)."""
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None
    )
    if found is None:
        pytest.fail("nginx is not installed: run `make system-deps` (Debian package nginx)")
    return found


def site_config(upstream_port: int, listen_port: int) -> str:
    """The shipped file with only its upstream address and listen port replaced."""
    text = SHIPPED_CONF.read_text()
    for line, replacement in (
        (LISTEN_LINE, f"listen 127.0.0.1:{listen_port};"),
        (UPSTREAM_LINE, f"server 127.0.0.1:{upstream_port};"),
    ):
        # the directive itself, at the start of a line (not a mention in a comment)
        text, found = re.subn(rf"^(\s*){re.escape(line)}", rf"\g<1>{replacement}", text, flags=re.M)
        assert found == 1, f"{SHIPPED_CONF} should have exactly one {line!r} directive"
    return text


class Nginx:
    """`nginx` in the foreground on 127.0.0.1 and a free port, in front of `upstream_port`."""

    def __init__(self, workdir: Path, upstream_port: int) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.upstream_port = upstream_port
        self.stderr_path = workdir / "nginx.stderr"
        self.access_log = workdir / "access.log"
        self.proc: subprocess.Popen[bytes] | None = None
        (workdir / "sse-gateway.conf").write_text(site_config(upstream_port, self.port))
        # As root nginx would run its workers as `nobody`, who cannot enter pytest's private
        # temp directories; any other user runs them as itself (and nginx ignores `user`).
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name};\n" if os.geteuid() == 0 else ""
        temp = "\n".join(
            f"    {kind}_temp_path {workdir / kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (workdir / "nginx.conf").write_text(
            f"{user}worker_processes 1;\n"
            "events { worker_connections 1024; }\n"
            "http {\n"
            f"{temp}\n"
            "    log_format upstream '$request_method $uri $status $upstream_status"
            " $body_bytes_sent';\n"
            f"    access_log {self.access_log} upstream;\n"
            # A platform's http {} that compresses event streams too: the stream location of
            # the shipped file must still send them uncompressed.
            "    gzip on; gzip_min_length 1; gzip_types text/event-stream application/json;\n"
            f"    include {workdir / 'sse-gateway.conf'};\n"
            "}\n"
        )

    @property
    def command(self) -> list[str]:
        return [
            nginx_binary(),
            "-p",
            str(self.workdir),
            "-c",
            str(self.workdir / "nginx.conf"),
            "-g",
            f"daemon off; pid {self.workdir / 'nginx.pid'}; error_log stderr;",
        ]

    def start(self, timeout: float = 10.0) -> Nginx:
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                self.command, stdout=err, stderr=subprocess.STDOUT, cwd=self.workdir
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}:\n{self.logs()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1),
            ):
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"nginx not listening within {timeout}s:\n{self.logs()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM (fast shutdown: open streams are cut), SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def logs(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def access_lines(self) -> list[str]:
        if not self.access_log.exists():
            return []
        return self.access_log.read_text().splitlines()


@pytest.fixture
def nginx_factory(tmp_path: Path) -> Iterator[Callable[[int], Nginx]]:
    started: list[Nginx] = []

    def factory(upstream_port: int) -> Nginx:
        proxy = Nginx(tmp_path / f"nginx-{len(started)}", upstream_port)
        started.append(proxy)
        return proxy.start()

    try:
        yield factory
    finally:
        for proxy in started:
            proxy.stop()


# --------------------------------------------------------------------------- an EventSource


@dataclass
class Answer:
    """One response the client got (or the network error it ran into instead)."""

    status: int | None = None
    content_type: str | None = None
    body_start: bytes = b""
    events: list[SSEEvent] = field(default_factory=list)
    error: str | None = None


class EventSourceLike(threading.Thread):
    """What a browser EventSource does, on http.client (chunked, Content-Length, keep-alive).

    Connects with `Accept: text/event-stream` and, once it has one, `Last-Event-ID`; applies
    every `retry:` as it is read; at the end of a 200 event stream (or on a network error)
    waits the reconnection time and connects again; on any other answer it fails for good.
    """

    def __init__(self, port: int, target: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.target = target
        self.headers = dict(headers or {})
        self.reconnection_ms = 3000  # a browser's default until a `retry:` says otherwise
        self.last_event_id = ""
        self.answers: list[Answer] = []
        self.events: list[SSEEvent] = []
        self.failed: Answer | None = None
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._conn: http.client.HTTPConnection | None = None

    def run(self) -> None:
        while not self._closing.is_set():
            answer = Answer()
            with self._lock:
                self.answers.append(answer)
            if not self._connect_once(answer):
                self.failed = answer
                return
            self._closing.wait(self.reconnection_ms / 1000)

    def _connect_once(self, answer: Answer) -> bool:
        """One request; False when the EventSource must fail for good."""
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache", **self.headers}
        if self.last_event_id:
            headers["Last-Event-ID"] = self.last_event_id
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        self._conn = conn
        parser = SSEParser()
        try:
            conn.request("GET", self.target, headers=headers)
            response = conn.getresponse()
            answer.status = response.status
            answer.content_type = response.getheader("Content-Type")
            mime = (answer.content_type or "").split(";")[0].strip().lower()
            if response.status != 200 or mime != "text/event-stream":
                answer.body_start = response.read(2048)
                return False
            while not self._closing.is_set():
                chunk = response.read1(65536)
                if not chunk:
                    break
                if len(answer.body_start) < 4096:
                    answer.body_start += chunk
                self._dispatch(answer, parser, parser.feed(chunk))
            self._dispatch(answer, parser, parser.feed_eof())
        except (OSError, http.client.HTTPException) as exc:
            answer.error = repr(exc)  # a network error: reconnect
        finally:
            conn.close()
        return True

    def _dispatch(self, answer: Answer, parser: SSEParser, frames: list[SSEEvent]) -> None:
        if parser.retries:
            self.reconnection_ms = parser.retries[-1]
        for frame in frames:
            if frame.id is not None:
                self.last_event_id = frame.id
            if frame.has_data:
                with self._lock:
                    answer.events.append(frame)
                    self.events.append(frame)

    def of_type(self, event_type: str) -> list[SSEEvent]:
        with self._lock:
            return [e for e in self.events if e.event == event_type]

    def connected_count(self) -> int:
        return len(self.of_type("connected"))

    def stop(self) -> None:
        self._closing.set()
        conn = self._conn
        if conn is not None and conn.sock is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        self.join(10)

    def summary(self) -> str:
        with self._lock:
            return "\n".join(
                f"  {a.status} {a.content_type} events={[(e.event, e.id) for e in a.events]}"
                f" error={a.error} start={a.body_start[:200]!r}"
                for a in self.answers
            )


def is_fallback(answer: Answer) -> bool:
    return any(
        e.event == "close" and e.json().get("reason") == "gateway_unavailable"
        for e in answer.events
    )


class FakeUpstream(threading.Thread):
    """One-shot upstream: records the request nginx sends, answers an event stream without
    `X-Accel-Buffering` (so only nginx's own configuration can keep it unbuffered), one frame
    now and one when `release` is set. `chunked`: HTTP/1.1 chunked body, else close-delimited
    (`Connection: close`, no length). With its default buffering, nginx 1.22 holds a
    close-delimited body back until the upstream closes; chunked ones it passes on as they
    come."""

    def __init__(self, *, chunked: bool) -> None:
        super().__init__(daemon=True)
        self.chunked = chunked
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.request_head = b""
        self.release = threading.Event()

    def run(self) -> None:
        # OSError: nginx never came (the test failed first) or the test closed the listener
        with contextlib.suppress(OSError):
            self._serve()

    def _serve(self) -> None:
        self.listener.settimeout(15)
        conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(15)
            while b"\r\n\r\n" not in self.request_head:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                self.request_head += chunk
            framing = b"Transfer-Encoding: chunked" if self.chunked else b"Connection: close"
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n%s\r\n\r\n" % framing
                + self.body(b"event: one\ndata: 1\n\n")
            )
            self.release.wait(15)
            conn.sendall(self.body(b"event: two\ndata: 2\n\n"))
            if self.chunked:
                conn.sendall(b"0\r\n\r\n")

    def body(self, data: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data

    def headers(self) -> dict[str, str]:
        lines = self.request_head.decode("latin-1").split("\r\n\r\n")[0].split("\r\n")
        return {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}

    def close(self) -> None:
        self.release.set()
        self.listener.close()
        self.join(10)


# --------------------------------------------------------------------------- helpers


def publish_via(port: int, brand: str, player: str, n: int) -> str:
    """POST /v1/publish (through nginx); the new event's id."""
    body = json.dumps({"brand_id": brand, "player_id": player, "type": "tick", "data": {"n": n}})
    response = request(
        port,
        "POST",
        "/v1/publish",
        {"Authorization": f"Bearer {PUBLISH_KEY}", "Content-Type": "application/json"},
        body.encode(),
    )
    assert response.status == 202, (response.status, response.body)
    event_id: str = response.json()["id"]
    return event_id


def whole_answer(port: int, headers: dict[str, str]) -> tuple[int, str | None, bytes, str]:
    """Status, Content-Type, body and Retry-After of a bounded answer on /v1/sse; in an
    event stream each `retry:` value is blanked (the gateway spreads it at random)."""
    with SSEClient.connect(port, "/v1/sse", headers, timeout=5) as client:
        body = client.read_body(timeout=5)
        content_type = client.response.header("Content-Type")
        if (content_type or "").startswith("text/event-stream"):
            body = re.sub(rb"(?m)^retry: ?[0-9]+$", b"retry: *", body)
        return client.status, content_type, body, client.response.header("Retry-After") or ""


def ticks(client: EventSourceLike) -> list[tuple[str | None, int]]:
    return [(e.id, e.json()["n"]) for e in client.of_type("tick")]


def gateway_behind_nginx(
    gateway_factory: GatewayFactory,
    nginx_factory: Callable[[int], Nginx],
    redis_server: RedisServer,
    *flags: str,
) -> tuple[Gateway, Nginx]:
    gateway = gateway_factory(
        "--keepalive-period",
        "1s",
        "--publish-api-key",
        PUBLISH_KEY,
        *flags,
        redis=redis_server,
    )
    return gateway, nginx_factory(gateway.port)


# --------------------------------------------------------------------------- tests


def test_fallback_is_one_sse_event_with_its_retry(nginx_factory: Callable[[int], Nginx]) -> None:
    """No gateway at all: the stream location answers 200 with exactly the close event;
    the other locations pass nginx's 502 on, unchanged."""
    proxy = nginx_factory(free_port())  # nothing listens there: connection refused

    # Accept-Encoding: the enclosing http {} gzips event streams (see Nginx); not this one.
    headers = {"Last-Event-ID": "1-0", "Accept-Encoding": "gzip"}
    response = request(proxy.port, "GET", "/v1/sse?token=x", headers)
    assert response.status == 200
    assert response.header("Content-Encoding") is None
    assert response.header("Content-Type") == "text/event-stream"
    assert response.header("Cache-Control") == "no-cache, no-transform"
    assert response.header("Content-Length") == str(len(FALLBACK_BODY))
    assert response.header("Access-Control-Allow-Origin") is None  # no Origin, none echoed
    # `request` keeps what came with the head of an event stream: the whole body here.
    assert response.body == FALLBACK_BODY
    frames = parse_stream(response.body)
    assert len(frames) == 1, frames  # no separate retry-only block
    assert frames[0].event == "close" and frames[0].retry == 3000 and frames[0].id is None
    assert frames[0].json() == {
        "reason": "gateway_unavailable",
        "message": "the gateway is not reachable",
    }

    # a cross-origin page can read it, and its preflight passes
    origin = "https://app.example"
    for method in ("GET", "OPTIONS"):
        answer = request(proxy.port, method, "/v1/sse", {"Origin": origin})
        assert answer.status == 200, (method, answer)
        assert answer.header("Access-Control-Allow-Origin") == origin
        assert answer.header("Access-Control-Allow-Credentials") == "true"
        assert "Last-Event-ID" in (answer.header("Access-Control-Allow-Headers") or "")

    # only the stream location is rewritten
    for target in ("/healthz", "/metrics"):
        assert request(proxy.port, "GET", target).status == 502, target
    assert request(proxy.port, "POST", "/v1/publish", body=b"{}").status == 502

    refused = [line for line in proxy.access_lines() if line.startswith("GET /v1/sse ")]
    assert refused and all(" 200 502 " in line for line in refused), refused


def test_operations_doc_quotes_the_shipped_file() -> None:
    """The excerpt in docs/operations.md ("Behind nginx") is the shipped configuration."""
    doc = (REPO / "docs" / "operations.md").read_text()
    section = doc.split("\n## Behind nginx\n", 1)[1].split("\n## ", 1)[0]
    excerpt = section.split("```nginx\n", 1)[1].split("```", 1)[0]
    shipped = [line.strip() for line in SHIPPED_CONF.read_text().splitlines()]
    for line in (x.strip() for x in excerpt.splitlines()):
        if line and line != "}":
            # a shipped line may carry a trailing comment after the directive
            assert any(s == line or s.startswith(line + " ") for s in shipped), line


@pytest.mark.parametrize("chunked", [False, True], ids=["close-delimited", "chunked"])
def test_stream_location_forwards_headers_and_never_holds_frames(
    nginx_factory: Callable[[int], Nginx], chunked: bool
) -> None:
    """The stream location's own settings, with an upstream that does not ask for anything:
    a frame goes out before the next one exists, uncompressed even when the enclosing http {}
    compresses event streams, and the request reaches the upstream with the client's
    Authorization and Last-Event-ID, X-Forwarded-For, the client's Host and HTTP/1.1."""
    upstream = FakeUpstream(chunked=chunked)
    upstream.start()
    try:
        proxy = nginx_factory(upstream.port)
        headers = {
            "Authorization": "Bearer the-jwt",
            "Last-Event-ID": "1795000000000-7",
            "Accept": "text/event-stream",
            "Accept-Encoding": "gzip",
        }
        with SSEClient.connect(proxy.port, "/v1/sse?brand_id=b1", headers, timeout=5) as stream:
            assert stream.status == 200
            assert stream.response.header("Content-Encoding") is None
            first = stream.next_frame(timeout=3)  # the upstream holds the second one back
            assert (first.event, first.data) == ("one", "1")
            upstream.release.set()
            second = stream.next_frame(timeout=3)
            assert (second.event, second.data) == ("two", "2")

        request_line = upstream.request_head.split(b"\r\n")[0]
        assert request_line == b"GET /v1/sse?brand_id=b1 HTTP/1.1"
        seen = upstream.headers()
        assert seen["authorization"] == "Bearer the-jwt"
        assert seen["last-event-id"] == "1795000000000-7"
        assert seen["x-forwarded-for"] == "127.0.0.1"
        assert seen["x-forwarded-proto"] == "http"
        assert seen["host"] == f"127.0.0.1:{proxy.port}"
        assert "connection" not in seen  # not `close`: the upstream connection may be reused
    finally:
        upstream.close()


def test_gateway_answers_pass_through_unchanged(
    gateway_factory: GatewayFactory,
    nginx_factory: Callable[[int], Nginx],
    redis_server: RedisServer,
    ids: Callable[..., str],
    publisher: SyncPublisher,
) -> None:
    """With the gateway up: the stream is unbuffered, its own refusals (503 included) reach
    the client as the gateway sent them, and the other locations are plain proxies."""
    gateway, proxy = gateway_behind_nginx(
        gateway_factory, nginx_factory, redis_server, "--connection-limit", "1"
    )
    brand, player = ids("b"), ids("p")
    auth = {"Authorization": f"Bearer {gateway.token(brand, player)}"}

    # Same-origin page through nginx: Host is passed on, so the gateway sees its own origin.
    headers = {**auth, "Origin": f"http://127.0.0.1:{proxy.port}"}
    with SSEClient.connect(proxy.port, "/v1/sse", headers) as stream:
        assert stream.status == 200, stream.read_body()
        assert (stream.response.header("Content-Type") or "").startswith("text/event-stream")
        stream.wait_connected()
        # unbuffered: each event arrives on its own, at once
        for n in range(3):
            started = time.monotonic()
            event_id = publisher.publish(brand, player, "tick", {"n": n})
            frame = stream.wait_event("tick", timeout=5)
            assert (frame.id, frame.json()) == (event_id, {"n": n})
            assert time.monotonic() - started < 1.0
        heartbeat = stream.wait_event("heartbeat", timeout=5)  # every 1 s, not held back
        assert heartbeat.has_data

        # The gateway's own refusal (connection limit: the stream above holds the only slot)
        # reaches the client as the gateway made it, never as nginx's fallback
        # (proxy_intercept_errors off): the 503 JSON for a client that can read it, and
        # whatever the gateway answers an EventSource (Accept: text/event-stream).
        refused = gateway.get("/v1/sse", auth)
        assert refused.status == 503, refused
        for accept in ({}, {"Accept": "text/event-stream"}):
            direct = whole_answer(gateway.port, {**auth, **accept})
            proxied = whole_answer(proxy.port, {**auth, **accept})
            assert proxied == direct, accept
            assert b"gateway_unavailable" not in proxied[2]

    missing = request(proxy.port, "GET", "/v1/sse")
    assert missing.status == 401, missing
    assert missing.json()["error"] == "missing_token"
    assert missing.header("WWW-Authenticate") is not None

    assert request(proxy.port, "GET", "/healthz").status == 200
    metrics = request(proxy.port, "GET", "/metrics")
    assert metrics.status == 200 and b"sse_gateway_connections" in metrics.body
    publish_via(proxy.port, brand, player, 99)  # 202 through the proxy


def test_client_survives_a_gateway_outage_behind_nginx(
    gateway_factory: GatewayFactory,
    nginx_factory: Callable[[int], Nginx],
    redis_server: RedisServer,
    ids: Callable[..., str],
    publisher: SyncPublisher,
) -> None:
    """The gateway is stopped (SIGTERM) and kept down 4 s while events are published, then
    started again on the same port. Through nginx, an EventSource connected before and one
    that connects during the outage both get every event exactly once, in order, and never
    an answer that would have closed them for good."""
    gateway, proxy = gateway_behind_nginx(
        gateway_factory, nginx_factory, redis_server, "--retry-ms", "500"
    )
    brand, player = ids("b"), ids("p")
    token = gateway.token(brand, player)

    # A: an EventSource-like client that sends the token as a header (a polyfill's way).
    early = EventSourceLike(proxy.port, "/v1/sse", {"Authorization": f"Bearer {token}"})
    early.start()
    late: EventSourceLike | None = None
    try:
        wait_for(early.connected_count, timeout=10, what="A connected through nginx")
        before = [(publish_via(proxy.port, brand, player, n), n) for n in range(5)]
        wait_for(lambda: ticks(early) == before, timeout=10, what="A got the first events")

        # ---- outage
        gateway.terminate()
        down_at = time.monotonic()
        assert gateway.wait(15) == 0, gateway.logs()

        # nginx itself answers a stream request meanwhile: 200, one close event with retry.
        probe = request(proxy.port, "GET", "/v1/sse", {"Authorization": f"Bearer {token}"})
        assert probe.status == 200, probe
        assert probe.header("Content-Type") == "text/event-stream"
        assert probe.body == FALLBACK_BODY

        # B: a page opened during the outage, token and resume point in the URL (a browser
        # EventSource cannot set headers). Its first answer is nginx's fallback.
        late = EventSourceLike(
            proxy.port,
            f"/v1/sse?token={quote(token)}&last_event_id={quote(before[-1][0])}",
        )
        late.start()
        during: list[tuple[str, int]] = []
        for n in range(5, 10):  # through Redis: the gateway's publish API is down too
            during.append((publisher.publish(brand, player, "tick", {"n": n}), n))
            time.sleep(OUTAGE_SECONDS / 6)
        wait_for(lambda: late.answers and is_fallback(late.answers[0]), timeout=5, what="B")
        time.sleep(max(0.0, down_at + OUTAGE_SECONDS - time.monotonic()))
        outage = time.monotonic() - down_at
        gateway.start()  # same port
        # ---- back

        after = [(publish_via(proxy.port, brand, player, n), n) for n in range(10, 15)]
        everything = before + during + after
        wait_for(lambda: ticks(early) == everything, timeout=20, what="A got every event")
        wait_for(lambda: ticks(late) == during + after, timeout=20, what="B got every event")
        time.sleep(0.5)  # nothing more (no duplicate) arrives late
    finally:
        early.stop()
        if late is not None:
            late.stop()

    report = f"A:\n{early.summary()}\nB:\n{late.summary()}\nnginx:\n" + "\n".join(
        proxy.access_lines()
    )
    assert outage >= OUTAGE_SECONDS
    assert early.failed is None and late.failed is None, report
    assert ticks(early) == everything, report
    assert ticks(late) == during + after, report
    for client in (early, late):
        for answer in client.answers:
            if answer.status is not None:  # a network error has none (nginx never went away)
                assert answer.status == 200, report
                assert answer.content_type is not None
                assert answer.content_type.startswith("text/event-stream"), report
    # B went through the fallback and came back on its retry; A may have, depending on the
    # random spread of the gateway's shutdown `retry:`.
    assert is_fallback(late.answers[0]), report
    assert late.connected_count() >= 1, report
    streams = [line for line in proxy.access_lines() if line.startswith("GET /v1/sse ")]
    assert any(" 200 502 " in line for line in streams), streams  # refused upstream, 200 out
    print(report)  # shown with -s / on failure: what each client saw


# --------------------------------------------------------------------------- Chromium


class _BlankPage(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(b"<!doctype html><title>page</title>")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def other_origin() -> Iterator[str]:
    """A page on another origin than nginx's (for a cross-origin EventSource)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _BlankPage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture
def browser() -> Iterator[Any]:
    with chromium() as instance:
        yield instance


LISTEN_SCRIPT = """
([url, withCredentials]) => {
  window.__ticks = [];
  window.__closes = [];
  window.__errors = 0;
  window.__connected = 0;
  const source = new EventSource(url, {withCredentials});
  window.__source = source;
  source.addEventListener("tick", (e) => {
    window.__ticks.push([e.lastEventId, JSON.parse(e.data).n]);
  });
  source.addEventListener("connected", () => { window.__connected += 1; });
  source.addEventListener("close", (e) => { window.__closes.push(JSON.parse(e.data).reason); });
  source.onerror = () => { window.__errors += 1; };
  return true;
}
"""


@pytest.mark.browser
def test_chromium_event_source_survives_a_gateway_outage_behind_nginx(
    browser: Any,
    other_origin: str,
    gateway_factory: GatewayFactory,
    nginx_factory: Callable[[int], Nginx],
    redis_server: RedisServer,
    ids: Callable[..., str],
    publisher: SyncPublisher,
) -> None:
    """The real thing: Chromium's EventSource, one on nginx's origin connected before the
    gateway stops and one opened during the outage from another origin. Neither is closed
    (an nginx 502 would close both for good); both end up with every event."""
    gateway, proxy = gateway_behind_nginx(
        gateway_factory,
        nginx_factory,
        redis_server,
        "--retry-ms",
        "500",
        "--cors-origins",
        other_origin,
    )
    brand, player = ids("b"), ids("p")
    token = quote(gateway.token(brand, player))
    same = browser.new_page()
    cross = browser.new_page()
    try:
        same.goto(f"http://127.0.0.1:{proxy.port}/healthz")
        same.evaluate(LISTEN_SCRIPT, [f"/v1/sse?token={token}", False])
        same.wait_for_function("window.__connected > 0", timeout=15_000)  # then subscribed
        before = [[publish_via(proxy.port, brand, player, n), n] for n in range(3)]
        same.wait_for_function(f"window.__ticks.length >= {len(before)}", timeout=15_000)

        gateway.terminate()
        down_at = time.monotonic()
        assert gateway.wait(15) == 0, gateway.logs()
        cross.goto(f"{other_origin}/")
        url = f"http://127.0.0.1:{proxy.port}/v1/sse?token={token}&last_event_id={before[-1][0]}"
        cross.evaluate(LISTEN_SCRIPT, [url, True])
        during = [[publisher.publish(brand, player, "tick", {"n": n}), n] for n in range(3, 6)]
        cross.wait_for_function("window.__closes.includes('gateway_unavailable')", timeout=5_000)
        assert cross.evaluate("window.__source.readyState") != 2  # not CLOSED
        time.sleep(max(0.0, down_at + OUTAGE_SECONDS - time.monotonic()))
        gateway.start()

        after = [[publish_via(proxy.port, brand, player, n), n] for n in range(6, 9)]
        expected = json.dumps(during + after, separators=(",", ":"))
        cross.wait_for_function(f"JSON.stringify(window.__ticks) === '{expected}'", timeout=15_000)
        expected = json.dumps(before + during + after, separators=(",", ":"))
        same.wait_for_function(f"JSON.stringify(window.__ticks) === '{expected}'", timeout=20_000)
        for page in (same, cross):
            assert page.evaluate("window.__source.readyState") == 1  # OPEN
        same_closes = same.evaluate("window.__closes")
    finally:
        for page in (same, cross):
            with contextlib.suppress(Exception):
                page.evaluate("window.__source && window.__source.close()")
            page.close()
    # the gateway's own close on SIGTERM, then nginx's while the gateway was away (if the
    # spread retry ended during the outage)
    assert set(same_closes) <= {"shutdown", "gateway_unavailable"}, same_closes
