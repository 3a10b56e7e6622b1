"""Real SSE clients across restarts and outages (issue 9 items 1, 8, 10, 11).

Every stream begins with `id: <resume id>`, `event: connected` and `retry:` in one frame, so
a client that has read only `connected` and then loses its connection resumes exactly where
it was. A stream the gateway closes and wants the client back from ends with `event: close`
and `retry:`. A transient refusal of an event-stream request is a `200 text/event-stream`
close, which an EventSource survives. HTTP/1.1 streams are chunked (urllib3-based clients
read every frame at once), HTTP/1.0 ones close-delimited. No client sees an empty event.

Clients: headless Chromium's EventSource, the npm `eventsource` and
`@microsoft/fetch-event-source` packages on Node.js (scripts in tests/js), sseclient-py over
requests, httpx-sse, and raw sockets.
"""

from __future__ import annotations

import contextlib
import json
import queue
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import sseclient
from httpx_sse import connect_sse
from support.asserts import assert_error, assert_retry_after
from support.browser import chromium
from support.procs import Gateway, GatewayFactory, RedisServer, free_port, wait_for
from support.sse import (
    Response,
    SSEClient,
    SSEEvent,
    parse_head,
    parse_stream,
    read_events,
    request,
)

from sse_gateway.publish import SyncPublisher

pytestmark = pytest.mark.timeout(90)

JS_DIR = Path(__file__).resolve().parents[1] / "js"
RETRY_MS = 200
#: `retry:` of a close: SSE_RETRY_MS plus a random 0-10 s, so clients do not all come back at once.
RETRY_SPREAD_MS = 10_000
#: How long a client may take to come back after a close: the largest `retry:` and some slack.
RECONNECT_S = (RETRY_MS + RETRY_SPREAD_MS) / 1000 + 5
PUBLISH_KEY = "publish-key-for-tests-0123456789"
EVENT_STREAM = "text/event-stream"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as instance:
        yield instance


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """tests/js installed from its lock file (`npm ci`) when missing or older than the lock."""
    installed = JS_DIR / "node_modules" / ".package-lock.json"
    lock = JS_DIR / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        npm = shutil.which("npm")
        assert npm is not None, "npm is needed for the Node.js client tests"
        done = subprocess.run(
            [npm, "ci", "--prefix", str(JS_DIR), "--no-audit", "--no-fund"],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"
    return JS_DIR / "node_modules"


@pytest.fixture
def redis_publisher(fresh_redis: RedisServer) -> Iterator[SyncPublisher]:
    """The publishing library on this test's own redis-server."""
    pub = SyncPublisher.from_url(fresh_redis.url)
    try:
        yield pub
    finally:
        pub.close()


# ----------------------------------------------------------------------------- helpers


class NodeClient:
    """A tests/js script in a child process; its stdout is JSON lines, kept in `records`."""

    def __init__(self, script: str, *args: str) -> None:
        node = shutil.which("node")
        assert node is not None, "node is needed for the Node.js client tests"
        self.proc = subprocess.Popen(
            [node, str(JS_DIR / script), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=JS_DIR,
        )
        self._records: list[dict[str, Any]] = []
        self._stderr: list[str] = []
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                record = json.loads(line)
            except ValueError:
                record = {"kind": "stdout", "line": line}
            with self._lock:
                self._records.append(record)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._lock:
                self._stderr.append(line)

    @property
    def records(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._records)

    def describe(self) -> str:
        with self._lock:
            return f"records: {self._records}\nstderr: {''.join(self._stderr)}"

    def wait(
        self, predicate: Callable[[list[dict[str, Any]]], Any], timeout: float, what: str
    ) -> Any:
        try:
            return wait_for(lambda: predicate(self.records), timeout=timeout, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.describe()}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for thread in self._threads:
            thread.join(5)

    def __enter__(self) -> NodeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def is_empty_position(event_id: str) -> bool:
    """The resume id of a stream whose history was empty: the end of a millisecond of Redis'
    clock (docs/api.md), a position no entry can have."""
    return re.fullmatch(r"\d+-18446744073709551615", event_id) is not None


def events_of(records: list[dict[str, Any]], type_: str | None = None) -> list[dict[str, Any]]:
    """The dispatched events of a client log (`kind` event), of one type or all."""
    return [r for r in records if r["kind"] == "event" and type_ in (None, r["type"])]


def first_error(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((r for r in records if r["kind"] == "error"), None)


# Chromium: the page keeps the same log as the Node.js script prints.
BROWSER_EVENT_SOURCE = """
([url, types]) => {
  window.__log = [];
  const source = new EventSource(url);
  window.__source = source;
  source.onopen = () => window.__log.push({kind: "open", readyState: source.readyState});
  source.onerror = () => window.__log.push({kind: "error", readyState: source.readyState});
  for (const type of types) {
    source.addEventListener(type, (e) => {
      window.__log.push({kind: "event", type: e.type, data: e.data, id: e.lastEventId});
    });
  }
  return true;
}
"""


def browser_log(page: Any) -> list[dict[str, Any]]:
    log: list[dict[str, Any]] = page.evaluate("window.__log")
    return log


def wait_page(
    page: Any, predicate: Callable[[list[dict[str, Any]]], Any], timeout: float, what: str
) -> Any:
    try:
        return wait_for(lambda: predicate(browser_log(page)), timeout=timeout, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nlog: {browser_log(page)}") from None


def stream_url(gw: Gateway, brand: str, player: str) -> str:
    return f"{gw.url}/v1/sse?token={gw.token(brand, player)}"


def assert_close_data(data: str, reason: str) -> None:
    body = json.loads(data)
    assert body.get("reason") == reason, body
    assert isinstance(body.get("message"), str) and body["message"].strip(), body


def assert_spread_retry(retry: int | None) -> None:
    """A close's `retry:`: SSE_RETRY_MS plus 0-10 s of spread."""
    assert retry is not None, "the close frame has no retry:"
    assert RETRY_MS <= retry <= RETRY_MS + RETRY_SPREAD_MS, retry


def sigterm(gw: Gateway) -> None:
    """SIGTERM: the drain ends every stream with `event: close`; returns once it exited."""
    gw.terminate()
    assert gw.wait(timeout=20) == 0, gw.logs()


def exchange(port: int, raw: bytes, timeout: float = 10.0) -> tuple[Response, bytes]:
    """Sends `raw` and reads the answer until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        deadline = time.monotonic() + timeout
        data = bytearray()
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise AssertionError(f"connection still open after {timeout}s: {data!r}") from None
            if not chunk:
                break
            data += chunk
    head, sep, body = bytes(data).partition(b"\r\n\r\n")
    assert sep, f"no complete response head: {data!r}"
    return parse_head(head), body


def stream_request(gw: Gateway, brand: str, player: str, *, accept: bool) -> bytes:
    headers = [f"Authorization: Bearer {gw.token(brand, player)}"]
    if accept:
        headers.append(f"Accept: {EVENT_STREAM}")
    lines = ["GET /v1/sse HTTP/1.1", f"Host: 127.0.0.1:{gw.port}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def assert_close_answer(gw: Gateway, brand: str, player: str, reason: str) -> None:
    """A transient refusal as an EventSource sees it: `200 text/event-stream`, `Retry-After`,
    a body of one `event: close` with the reason and a spread `retry:`, then the end."""
    head, body = exchange(gw.port, stream_request(gw, brand, player, accept=True))
    detail = f"{head} {body!r}"
    assert head.status == 200, detail
    assert (head.header("Content-Type") or "").startswith(EVENT_STREAM), detail
    assert head.header("Retry-After") == "5", detail
    length = head.header("Content-Length")
    if length is not None:
        assert int(length) == len(body), detail
    elif "chunked" in (head.header("Transfer-Encoding") or "").lower():
        raise AssertionError(f"expected a plain body: {detail}")
    frames = parse_stream(body)
    assert len(frames) == 1, detail
    [frame] = frames
    assert frame.event == "close" and frame.has_data, detail
    assert_close_data(frame.data, reason)
    assert_spread_retry(frame.retry)


def assert_json_refusal(gw: Gateway, brand: str, player: str, reason: str) -> None:
    """Without `Accept: text/event-stream` (curl, probes): `503` JSON with `Retry-After`."""
    token = gw.token(brand, player)
    response = request(gw.port, "GET", "/v1/sse", {"Authorization": f"Bearer {token}"})
    assert_error(response, 503, reason)
    assert_retry_after(response)


class RawStream:
    """An SSE request on a raw socket, HTTP/1.0 or 1.1; keeps the head and the body's bytes
    as they came (chunk framing included)."""

    def __init__(self, port: int, version: str, token: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(
            f"GET /v1/sse HTTP/{version}\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {token}\r\nAccept: {EVENT_STREAM}\r\n\r\n".encode()
        )
        self.data = bytearray()
        self.version = version
        self.eof = False

    @property
    def head(self) -> Response:
        raw_head, sep, _ = bytes(self.data).partition(b"\r\n\r\n")
        assert sep, f"no complete head: {bytes(self.data)!r}"
        return parse_head(raw_head)

    @property
    def body(self) -> bytes:
        return bytes(self.data).partition(b"\r\n\r\n")[2]

    def decoded(self) -> bytes:
        """The body without chunk framing, as far as it came."""
        return dechunk(self.body)[0] if self.version == "1.1" else self.body

    def _recv(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"timed out; read so far: {bytes(self.data)!r}"
        self.sock.settimeout(remaining)
        chunk = self.sock.recv(65536)
        if chunk:
            self.data += chunk
        else:
            self.eof = True

    def read_until(self, predicate: Callable[[RawStream], bool], timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not (b"\r\n\r\n" in self.data and predicate(self)):
            assert not self.eof, f"the stream ended: {bytes(self.data)!r}"
            self._recv(deadline)

    def read_to_eof(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.eof:
            self._recv(deadline)

    def __enter__(self) -> RawStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def dechunk(data: bytes) -> tuple[bytes, bool]:
    """A chunked body's content so far, and whether its last chunk (`0` CRLF CRLF) came."""
    out = bytearray()
    position = 0
    while True:
        line_end = data.find(b"\r\n", position)
        if line_end < 0:
            return bytes(out), False
        size = int(data[position:line_end].split(b";")[0], 16)
        start = line_end + 2
        if size == 0:
            assert data[start:] in (b"", b"\r", b"\r\n"), data[start:]
            return bytes(out), data[start:] == b"\r\n"
        if len(data) < start + size + 2:
            out += data[start : start + size]
            return bytes(out), False
        assert data[start + size : start + size + 2] == b"\r\n", data[start : start + size + 2]
        out += data[start : start + size]
        position = start + size + 2


def post_event(gw: Gateway, brand: str, player: str, type_: str, data: Any) -> str:
    """Publishes through the gateway's `POST /v1/publish` (embedded broker); the event id."""
    body = {"brand_id": brand, "player_id": player, "type": type_, "data": data}
    response = request(
        gw.port,
        "POST",
        "/v1/publish",
        {"Authorization": f"Bearer {PUBLISH_KEY}", "Content-Type": "application/json"},
        json.dumps(body).encode(),
    )
    assert response.status == 202, response
    event_id: str = response.json()["id"]
    return event_id


def open_connected(
    gw: Gateway, brand: str, player: str, last_id: str | None = None
) -> tuple[SSEClient, SSEEvent]:
    """A stream and its first frame, which must be `connected` with `id:` and `retry:`."""
    headers = {"Authorization": f"Bearer {gw.token(brand, player)}", "Accept": EVENT_STREAM}
    if last_id is not None:
        headers["Last-Event-ID"] = last_id
    client = gw.open(headers=headers)
    try:
        assert client.status == 200, client.read_body()
        frame = client.next_frame(timeout=10)
        assert frame.event == "connected" and frame.has_data, f"first frame: {frame}"
        assert frame.retry == RETRY_MS, f"first frame: {frame}"
        assert frame.id is not None, f"connected has no id: {frame}"
        prefix = f"id: {frame.id}\nevent: connected\nretry: {RETRY_MS}\ndata: ".encode()
        assert bytes(client.raw).startswith(prefix), bytes(client.raw[:200])
    except BaseException:
        client.close()
        raise
    return client, frame


def no_more_events(client: SSEClient, quiet: float = 0.5) -> None:
    extra = [f for f in client.drain_available(quiet) if f.has_data and f.event != "heartbeat"]
    assert not extra, f"unexpected events: {extra}"


# ----------------------------------------------------------------------------- item 1: resume id


@pytest.mark.browser
def test_chromium_event_source_resumes_after_gateway_restart(
    browser: Any,
    gateway_factory: GatewayFactory,
    redis_server: RedisServer,
    publisher: SyncPublisher,
    ids: Callable[..., str],
) -> None:
    """The page's EventSource has seen only `connected` when the gateway restarts: it comes
    back by itself with the resume id and gets the event published meanwhile, once."""
    gw = gateway_factory("--retry-ms", str(RETRY_MS), redis=redis_server)
    brand, player = ids("b"), ids("p")
    earlier = str(publisher.publish(brand, player, "notification", {"n": 0}))
    page = browser.new_page()
    try:
        page.goto(f"{gw.url}/healthz")
        types = ["connected", "notification", "close"]
        page.evaluate(BROWSER_EVENT_SOURCE, [f"/v1/sse?token={gw.token(brand, player)}", types])
        wait_page(page, lambda log: events_of(log, "connected"), 15, "connected")

        sigterm(gw)
        missed = str(publisher.publish(brand, player, "notification", {"n": 1}))
        gw.start()

        wait_page(page, lambda log: events_of(log, "notification"), RECONNECT_S * 2, "missed")
        live = str(publisher.publish(brand, player, "notification", {"n": 2}))
        wait_page(page, lambda log: len(events_of(log, "notification")) >= 2, 15, "live event")
        time.sleep(0.3)
        log = browser_log(page)
        ready_state = page.evaluate("window.__source.readyState")
        page.evaluate("window.__source.close()")
    finally:
        page.close()
    connected = events_of(log, "connected")
    # The resume id: the history's newest entry, so a reconnect from it does not replay it.
    assert connected[0]["id"] == earlier, log
    assert_close_data(events_of(log, "close")[0]["data"], "shutdown")
    assert len(connected) == 2, log
    assert json.loads(connected[1]["data"])["recovered"] is True, log
    notes = [(e["id"], json.loads(e["data"])) for e in events_of(log, "notification")]
    assert notes == [(missed, {"n": 1}), (live, {"n": 2})], log
    assert ready_state == 1, log


def test_npm_eventsource_resumes_after_gateway_restart(
    node_modules: Path,
    gateway_factory: GatewayFactory,
    redis_server: RedisServer,
    publisher: SyncPublisher,
    ids: Callable[..., str],
) -> None:
    """The same with the npm `eventsource` package, from an empty history (a position id)."""
    gw = gateway_factory("--retry-ms", str(RETRY_MS), redis=redis_server)
    brand, player = ids("b"), ids("p")
    url = stream_url(gw, brand, player)
    with NodeClient("eventsource-client.mjs", url, "connected,notification,close") as client:
        client.wait(lambda rs: events_of(rs, "connected"), 15, "connected")

        sigterm(gw)
        missed = str(publisher.publish(brand, player, "notification", {"n": 1}))
        gw.start()

        client.wait(lambda rs: events_of(rs, "notification"), RECONNECT_S * 2, "missed event")
        live = str(publisher.publish(brand, player, "notification", {"n": 2}))
        client.wait(lambda rs: len(events_of(rs, "notification")) >= 2, 15, "live event")
        time.sleep(0.3)
        records = client.records
    connected = events_of(records, "connected")
    assert is_empty_position(connected[0]["id"]), records
    assert_close_data(events_of(records, "close")[0]["data"], "shutdown")
    assert len(connected) == 2, records
    assert json.loads(connected[1]["data"])["recovered"] is True, records
    notes = [(e["id"], json.loads(e["data"])) for e in events_of(records, "notification")]
    assert notes == [(missed, {"n": 1}), (live, {"n": 2})], records
    assert not [e for e in records if e["kind"] == "error" and e["readyState"] == 2], records


def kill_switch(gw: Gateway, brand: str, player: str, block_seconds: int) -> None:
    body = {"brand_id": brand, "player_id": player, "reason": "account_locked"}
    if block_seconds:
        body["block_seconds"] = block_seconds  # type: ignore[assignment]
    response = request(
        gw.port,
        "POST",
        "/v1/disconnect",
        {"Authorization": f"Bearer {PUBLISH_KEY}", "Content-Type": "application/json"},
        json.dumps(body).encode(),
    )
    assert response.status == 200, response


def test_npm_eventsource_stops_for_good_when_disconnected_with_a_block(
    node_modules: Path,
    gateway_factory: GatewayFactory,
    redis_server: RedisServer,
    ids: Callable[..., str],
) -> None:
    """The retry behaviour of the kill switch (issue 10 item 10): the EventSource gets
    `event: disconnected`, reconnects by itself after its `retry:`, is refused 403 `blocked`
    and gives up (readyState 2): no reconnect loop."""
    gw = gateway_factory(
        "--retry-ms", str(RETRY_MS), "--publish-api-key", PUBLISH_KEY, redis=redis_server
    )
    brand, player = ids("b"), ids("p")
    url = stream_url(gw, brand, player)
    with NodeClient("eventsource-client.mjs", url, "connected,disconnected") as client:
        client.wait(lambda rs: events_of(rs, "connected"), 15, "connected")
        kill_switch(gw, brand, player, block_seconds=600)
        client.wait(
            lambda rs: [r for r in rs if r["kind"] == "error" and r["readyState"] == 2],
            RECONNECT_S,
            "the EventSource to give up",
        )
        time.sleep(0.5)
        records = client.records
    [disconnected] = events_of(records, "disconnected")
    assert json.loads(disconnected["data"]) == {
        "reason": "account_locked",
        "blocked": True,
        "block_seconds": 600,
    }
    assert len(events_of(records, "connected")) == 1, records
    errors = [r for r in records if r["kind"] == "error"]
    # The end of the body (reconnecting: 0), then the 403 (closed for good: 2), and no more.
    assert [e["readyState"] for e in errors] == [0, 2], records
    assert errors[1]["code"] == 403, records
    assert gw.metrics().value("sse_gateway_connections_rejected_total", reason="blocked") == 1


def test_npm_eventsource_comes_back_after_a_disconnect_without_block(
    node_modules: Path,
    gateway_factory: GatewayFactory,
    redis_server: RedisServer,
    ids: Callable[..., str],
) -> None:
    """Without a block, a disconnect is a kick: the EventSource reconnects by itself after
    `retry:` (SSE_RETRY_MS plus spread) and is served again."""
    gw = gateway_factory(
        "--retry-ms", str(RETRY_MS), "--publish-api-key", PUBLISH_KEY, redis=redis_server
    )
    brand, player = ids("b"), ids("p")
    url = stream_url(gw, brand, player)
    with NodeClient("eventsource-client.mjs", url, "connected,disconnected") as client:
        client.wait(lambda rs: events_of(rs, "connected"), 15, "connected")
        kill_switch(gw, brand, player, block_seconds=0)
        client.wait(lambda rs: len(events_of(rs, "connected")) == 2, RECONNECT_S, "reconnected")
        records = client.records
    [disconnected] = events_of(records, "disconnected")
    assert json.loads(disconnected["data"]) == {"reason": "account_locked", "blocked": False}
    assert not [r for r in records if r["kind"] == "error" and r["readyState"] == 2], records


def test_embedded_broker_resume_id_replays_what_came_after(
    gateway_factory: GatewayFactory, ids: Callable[..., str]
) -> None:
    """Memory broker: a reconnect with `connected`'s id replays exactly what followed it."""
    gw = gateway_factory("--retry-ms", str(RETRY_MS), env={"SSE_PUBLISH_API_KEY": PUBLISH_KEY})
    brand, player = ids("b"), ids("p")

    # Empty history: the resume id is a position; a reconnect with it gets what came since.
    client, connected = open_connected(gw, brand, player)
    with client:
        assert connected.id is not None and is_empty_position(connected.id)
        assert "recovered" not in connected.json()
        no_more_events(client, 0.2)
    position = connected.id
    first = post_event(gw, brand, player, "notification", 1)
    client, connected = open_connected(gw, brand, player, position)
    with client:
        assert connected.id == position  # a recovered replay resumes from the client's own id
        assert connected.json()["recovered"] is True
        assert [(e.id, e.json()) for e in read_events(client, 1, timeout=10)] == [(first, 1)]
        no_more_events(client)

    # Non-empty history: the resume id is its newest entry, which is not sent again.
    client, connected = open_connected(gw, brand, player)
    with client:
        assert connected.id == first
        assert "recovered" not in connected.json()
        no_more_events(client, 0.2)
    second = post_event(gw, brand, player, "notification", 2)
    third = post_event(gw, brand, player, "notification", 3)
    client, connected = open_connected(gw, brand, player, first)
    with client:
        assert connected.id == first
        assert connected.json()["recovered"] is True
        replayed = read_events(client, 2, timeout=10)
        assert [(e.id, e.json()) for e in replayed] == [(second, 2), (third, 3)]
        no_more_events(client)
        fourth = post_event(gw, brand, player, "notification", 4)
        assert [(e.id, e.json()) for e in read_events(client, 1, timeout=10)] == [(fourth, 4)]
        no_more_events(client)


def test_first_streams_after_a_redis_restart_go_live(
    gateway_factory: GatewayFactory, fresh_redis: RedisServer, ids: Callable[..., str]
) -> None:
    """Every stream now reads where the history ends before `connected`. After Redis restarts
    (pub/sub back, /readyz 200), a new stream must go live, not be closed because a pooled
    command connection from before the restart is dead."""
    gw = gateway_factory("--retry-ms", str(RETRY_MS), redis=fresh_redis)
    brand = ids("b")
    client, _ = gw.player_stream(brand, ids("p"))  # its history read pools a connection
    client.close()
    fresh_redis.kill()
    fresh_redis.start()
    wait_for(lambda: gw.readyz()[0] == 200, timeout=30, what="/readyz 200 (Redis back)")
    token = gw.token(brand, ids("p"))
    for _ in range(3):
        with gw.open(headers={"Authorization": f"Bearer {token}"}) as client:
            assert client.status == 200
            first = client.next_event(timeout=10)  # `retry:`-only blocks aside
            assert first.event == "connected", f"{first}\n{gw.logs()[-2000:]}"


def test_resume_from_an_empty_history_is_not_recovered_when_the_history_expired(
    gateway_factory: GatewayFactory, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    """The resume id of an empty history (a position) must not claim a recovery once events were
    lost: an event published after it, expired (SSE_HISTORY_TTL) before the client came back,
    then a newer one. A client whose resume id was a real entry is told `recovered: false`
    here; one that resumed from a position must be told the same, not get `true` and the newer event
    alone (docs/publishing.md: when exactly-once cannot be promised, the client is told)."""
    gw = gateway_factory("--retry-ms", str(RETRY_MS), "--history-ttl", "1s", redis=redis_server)
    brand, player = ids("b"), ids("p")
    client, connected = open_connected(gw, brand, player)
    client.close()
    assert connected.id is not None and is_empty_position(connected.id)
    with contextlib.closing(SyncPublisher.from_url(redis_server.url, history_ttl=1)) as pub:
        pub.publish(brand, player, "notification", "expires")
        time.sleep(2.5)
        pub.publish(brand, player, "notification", "newer")
    client, resumed = open_connected(gw, brand, player, connected.id)
    with client:
        replayed = [(f.id, f.data) for f in client.drain_available(0.5) if f.has_data]
    assert resumed.json()["recovered"] is False, (
        f"recovered: true although an event expired unsent; replayed only {replayed}"
    )


# ----------------------------------------------------------------------------- item 8: refusals


@pytest.mark.browser
def test_chromium_event_source_keeps_reconnecting_while_redis_is_down(
    browser: Any,
    gateway_factory: GatewayFactory,
    fresh_redis: RedisServer,
    redis_publisher: SyncPublisher,
    ids: Callable[..., str],
) -> None:
    gw = gateway_factory("--retry-ms", str(RETRY_MS), redis=fresh_redis)
    brand, player = ids("b"), ids("p")
    page = browser.new_page()
    try:
        page.goto(f"{gw.url}/healthz")
        fresh_redis.kill()
        wait_for(lambda: gw.readyz()[0] == 503, timeout=30, what="/readyz 503 (Redis down)")

        types = ["connected", "notification", "close"]
        page.evaluate(BROWSER_EVENT_SOURCE, [f"/v1/sse?token={gw.token(brand, player)}", types])
        error = wait_page(page, first_error, 15, "the refused connection's error")
        log = browser_log(page)
        assert error["readyState"] == 0, f"the EventSource gave up (CLOSED): {log}"
        assert_close_data(events_of(log, "close")[0]["data"], "broker_unavailable")
        assert not events_of(log, "connected"), log
        time.sleep(1)
        assert page.evaluate("window.__source.readyState") != 2, browser_log(page)

        fresh_redis.start()
        wait_for(lambda: gw.readyz()[0] == 200, timeout=30, what="/readyz 200 (Redis back)")
        wait_page(page, lambda log: events_of(log, "connected"), RECONNECT_S, "connected")
        event_id = str(redis_publisher.publish(brand, player, "notification", {"back": True}))
        wait_page(page, lambda log: events_of(log, "notification"), 15, "the event")
        log = browser_log(page)
        page.evaluate("window.__source.close()")
    finally:
        page.close()
    [note] = events_of(log, "notification")
    assert (note["id"], json.loads(note["data"])) == (event_id, {"back": True})
    assert all(r["readyState"] != 2 for r in log if r["kind"] == "error"), log


def test_npm_eventsource_keeps_reconnecting_while_redis_is_down(
    node_modules: Path,
    gateway_factory: GatewayFactory,
    fresh_redis: RedisServer,
    redis_publisher: SyncPublisher,
    ids: Callable[..., str],
) -> None:
    gw = gateway_factory("--retry-ms", str(RETRY_MS), redis=fresh_redis)
    brand, player = ids("b"), ids("p")
    fresh_redis.kill()
    wait_for(lambda: gw.readyz()[0] == 503, timeout=30, what="/readyz 503 (Redis down)")
    url = stream_url(gw, brand, player)
    with NodeClient("eventsource-client.mjs", url, "connected,notification,close") as client:
        error = client.wait(first_error, 15, "the refused connection's error")
        assert error["readyState"] == 0, f"the EventSource gave up: {client.describe()}"
        assert_close_data(events_of(client.records, "close")[0]["data"], "broker_unavailable")

        fresh_redis.start()
        wait_for(lambda: gw.readyz()[0] == 200, timeout=30, what="/readyz 200 (Redis back)")
        client.wait(lambda rs: events_of(rs, "connected"), RECONNECT_S, "connected")
        event_id = str(redis_publisher.publish(brand, player, "notification", {"back": True}))
        client.wait(lambda rs: events_of(rs, "notification"), 15, "the event")
        records = client.records
    [note] = events_of(records, "notification")
    assert (note["id"], json.loads(note["data"])) == (event_id, {"back": True})
    assert all(r["readyState"] != 2 for r in records if r["kind"] == "error"), records


def test_redis_down_refusal_depends_on_accept(
    gateway_factory: GatewayFactory, fresh_redis: RedisServer, ids: Callable[..., str]
) -> None:
    """broker_unavailable: an event-stream request gets the 200 close answer, any other 503."""
    gw = gateway_factory("--retry-ms", str(RETRY_MS), redis=fresh_redis)
    brand = ids("b")
    fresh_redis.kill()
    wait_for(lambda: gw.readyz()[0] == 503, timeout=30, what="/readyz 503 (Redis down)")
    assert_close_answer(gw, brand, ids("p"), "broker_unavailable")
    assert_json_refusal(gw, brand, ids("p"), "broker_unavailable")
    metrics = gw.metrics()
    assert metrics.value("sse_gateway_connections_rejected_total", reason="broker_unavailable") == 2
    assert metrics.total("sse_gateway_connections") == 0


def test_connection_limit_refusal_depends_on_accept(
    gateway_factory: GatewayFactory, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    gw = gateway_factory("--retry-ms", str(RETRY_MS), "--connection-limit", "1", redis=redis_server)
    brand = ids("b")
    with gw.stream(brand, ids("p")):
        assert_close_answer(gw, brand, ids("p"), "connection_limit")
        assert_json_refusal(gw, brand, ids("p"), "connection_limit")


def test_stream_request_before_the_broker_connects_at_start(
    node_modules: Path,
    gateway_factory: GatewayFactory,
    tmp_path_factory: pytest.TempPathFactory,
    ids: Callable[..., str],
) -> None:
    """A gateway that starts while Redis is down: an EventSource that comes before the broker
    is subscribed gets the 200 close answer (not a 503 it would give up on), and is in once
    Redis shows up."""
    port = free_port()
    gw = gateway_factory(
        "--retry-ms", str(RETRY_MS), redis=f"redis://127.0.0.1:{port}/0", ready=False
    )
    brand, player = ids("b"), ids("p")
    assert_close_answer(gw, brand, ids("p"), "broker_unavailable")
    url = stream_url(gw, brand, player)
    with NodeClient("eventsource-client.mjs", url, "connected,notification,close") as client:
        error = client.wait(first_error, 15, "the refused connection's error")
        assert error["readyState"] == 0, f"the EventSource gave up: {client.describe()}"
        server = RedisServer(tmp_path_factory.mktemp("late-redis"), port=port).start()
        try:
            wait_for(lambda: gw.readyz()[0] == 200, timeout=30, what="/readyz 200 (Redis up)")
            client.wait(lambda rs: events_of(rs, "connected"), RECONNECT_S, "connected")
            with contextlib.closing(SyncPublisher.from_url(server.url)) as pub:
                event_id = str(pub.publish(brand, player, "notification", "late"))
            client.wait(lambda rs: events_of(rs, "notification"), 15, "the event")
            records = client.records
        finally:
            server.stop()
    [note] = events_of(records, "notification")
    assert (note["id"], note["data"]) == (event_id, '"late"')
    assert_close_data(events_of(records, "close")[0]["data"], "broker_unavailable")
    assert all(r["readyState"] != 2 for r in records if r["kind"] == "error"), records


# ----------------------------------------------------------------------------- item 10: framing


def test_sseclient_py_over_requests_reads_connected_at_once(
    gateway_factory: GatewayFactory,
    redis_server: RedisServer,
    publisher: SyncPublisher,
    ids: Callable[..., str],
) -> None:
    """sseclient-py iterates a requests response (urllib3 reads of 128 bytes): `connected`
    arrives at once, not when heartbeats (SSE_KEEPALIVE_PERIOD, 15 s) fill the buffer."""
    gw = gateway_factory(redis=redis_server)  # default keep-alive
    brand, player = ids("b"), ids("p")
    received: queue.Queue[tuple[float, Any] | BaseException | None] = queue.Queue()
    session = requests.Session()
    session.trust_env = False
    started = time.monotonic()
    response = session.get(
        f"{gw.url}/v1/sse",
        headers={"Authorization": f"Bearer {gw.token(brand, player)}", "Accept": EVENT_STREAM},
        stream=True,
        timeout=(5, 60),
    )

    def read() -> None:
        try:
            for event in sseclient.SSEClient(response).events():
                received.put((time.monotonic(), event))
        except BaseException as exc:
            received.put(exc)
        finally:
            received.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def next_event(timeout: float, what: str) -> tuple[float, Any]:
        try:
            item = received.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"sseclient-py got no {what} within {timeout}s") from None
        assert isinstance(item, tuple), f"the stream ended before {what}: {item!r}"
        return item

    try:
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith(EVENT_STREAM)
        at, connected = next_event(3, "connected")
        assert connected.event == "connected", vars(connected)
        assert at - started < 3
        assert json.loads(connected.data)["player_id"] == player
        assert connected.id is not None and is_empty_position(connected.id)
        event_id = str(publisher.publish(brand, player, "notification", {"n": 1}))
        _, event = next_event(3, "the published event")
        assert (event.event, event.id, json.loads(event.data)) == (
            "notification",
            event_id,
            {"n": 1},
        )
        gw.terminate()
        _, close = next_event(15, "the close at shutdown")
        assert close.event == "close", vars(close)
        assert_close_data(close.data, "shutdown")
    finally:
        gw.stop()
        response.close()
        session.close()
        reader.join(10)


def test_http10_stream_is_close_delimited_http11_chunked(
    gateway_factory: GatewayFactory,
    redis_server: RedisServer,
    publisher: SyncPublisher,
    ids: Callable[..., str],
) -> None:
    """The same player over HTTP/1.0 (body until the connection closes) and HTTP/1.1 (chunked,
    ended by the last chunk), from `connected` to the `close` of a SIGTERM."""
    gw = gateway_factory("--retry-ms", str(RETRY_MS), redis=redis_server)
    brand, player = ids("b"), ids("p")
    token = gw.token(brand, player)
    with RawStream(gw.port, "1.0", token) as plain, RawStream(gw.port, "1.1", token) as chunked:
        for stream in (plain, chunked):
            stream.read_until(lambda s: b"\n\n" in s.decoded())  # `connected`
            assert stream.head.status == 200, stream.head
            assert (stream.head.header("Content-Type") or "").startswith(EVENT_STREAM)
            assert stream.head.header("Content-Length") is None, stream.head
        assert plain.head.header("Transfer-Encoding") is None, plain.head
        assert chunked.head.header("Transfer-Encoding") == "chunked", chunked.head

        event_id = str(publisher.publish(brand, player, "notification", {"n": 1}))
        for stream in (plain, chunked):
            stream.read_until(lambda s: event_id.encode() in s.decoded())
        gw.terminate()
        for stream in (plain, chunked):
            stream.read_to_eof(timeout=15)
    assert gw.wait(timeout=20) == 0

    assert b"\r\n" not in plain.body, plain.body  # no chunk framing
    assert plain.body.endswith(b"\n\n"), plain.body[-100:]
    decoded, complete = dechunk(chunked.body)
    assert complete, f"the chunked body did not end with its last chunk: {chunked.body[-100:]!r}"
    for body in (plain.body, decoded):
        assert re.match(
            rb"id: \d+-18446744073709551615\nevent: connected\nretry: %d\ndata: " % RETRY_MS, body
        ), body[:200]
        frames = [f for f in parse_stream(body) if f.event != "heartbeat"]
        assert [f.event for f in frames] == ["connected", "notification", "close"], frames
        assert json.loads(frames[0].data)["player_id"] == player
        assert (frames[1].id, frames[1].json()) == (event_id, {"n": 1})
        assert_close_data(frames[2].data, "shutdown")
        assert_spread_retry(frames[2].retry)


# ----------------------------------------------------------------------------- item 11: no phantoms


def test_httpx_sse_sees_no_empty_event_at_connect_or_shutdown(
    gateway_factory: GatewayFactory,
    redis_server: RedisServer,
    publisher: SyncPublisher,
    ids: Callable[..., str],
) -> None:
    """httpx-sse yields every block that had a field: the stream has no `retry:`-only one."""
    gw = gateway_factory("--retry-ms", str(RETRY_MS), redis=redis_server)
    brand, player = ids("b"), ids("p")
    seen: list[tuple[str, str, str, int | None]] = []
    headers = {"Authorization": f"Bearer {gw.token(brand, player)}"}
    event_id = None
    with (
        httpx.Client(timeout=httpx.Timeout(20.0), trust_env=False) as client,
        connect_sse(client, "GET", f"{gw.url}/v1/sse", headers=headers) as source,
    ):
        assert source.response.status_code == 200
        for sse in source.iter_sse():
            if sse.event == "heartbeat" and sse.data:
                continue
            seen.append((sse.event, sse.data, sse.id, sse.retry))
            if sse.event == "connected":
                event_id = str(publisher.publish(brand, player, "notification", {"n": 1}))
            elif sse.event == "notification":
                gw.terminate()
            if len(seen) > 5:
                break
    assert [s[0] for s in seen] == ["connected", "notification", "close"], seen
    connected, note, close = seen
    assert is_empty_position(connected[2]) and connected[3] == RETRY_MS, seen
    assert json.loads(connected[1])["player_id"] == player
    assert (note[1], note[2]) == ('{"n":1}', event_id), seen
    assert_close_data(close[1], "shutdown")
    assert_spread_retry(close[3])
    assert gw.wait(timeout=20) == 0


def test_fetch_event_source_sees_no_empty_message_at_connect_or_shutdown(
    node_modules: Path,
    gateway_factory: GatewayFactory,
    redis_server: RedisServer,
    publisher: SyncPublisher,
    ids: Callable[..., str],
) -> None:
    """@microsoft/fetch-event-source calls onmessage at every blank line, fields or not."""
    gw = gateway_factory("--retry-ms", str(RETRY_MS), redis=redis_server)
    brand, player = ids("b"), ids("p")

    def messages(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in records if r["kind"] == "message" and r["event"] != "heartbeat"]

    with NodeClient("fetch-event-source-client.mjs", stream_url(gw, brand, player)) as client:
        client.wait(lambda rs: messages(rs), 15, "the first message")
        event_id = str(publisher.publish(brand, player, "notification", {"n": 1}))
        client.wait(lambda rs: len(messages(rs)) >= 2, 15, "the published event")
        gw.terminate()
        client.wait(lambda rs: any(r["kind"] == "closed" for r in rs), 15, "the end")
        assert client.proc.wait(10) == 0
        records = client.records
    [opened] = [r for r in records if r["kind"] == "open"]
    assert opened["status"] == 200 and opened["contentType"].startswith(EVENT_STREAM), records
    got = messages(records)
    assert [m["event"] for m in got] == ["connected", "notification", "close"], records
    connected, note, close = got
    assert is_empty_position(connected["id"]) and connected["retry"] == RETRY_MS, records
    assert json.loads(connected["data"])["player_id"] == player
    assert (note["id"], json.loads(note["data"])) == (event_id, {"n": 1}), records
    assert_close_data(close["data"], "shutdown")
    assert_spread_retry(close["retry"])
    assert not [r for r in records if r["kind"] == "error"], records
    assert gw.wait(timeout=20) == 0
