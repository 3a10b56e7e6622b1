"""Regressions of the review fixes: each test failed before them, against real processes.

Pipelined requests after a stream, unauthorized bodies, >64-bit history ids, the worker
supervisor, and draining with idle keep-alive sockets.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

import pytest
import redis
from support.asserts import assert_error
from support.procs import (
    DEFAULT_SECRET,
    REPO,
    Gateway,
    GatewayFactory,
    RedisServer,
    free_port,
    gateway_env,
    wait_for,
)
from support.sse import (
    Response,
    SSEClient,
    assert_position_id,
    build_request,
    parse_head,
    read_events,
)

from sse_gateway.publish import SyncPublisher

pytestmark = pytest.mark.timeout(90)

PUBLISH_KEY = "regression-publish-key-0123456789"
BEYOND_64_BITS = "99999999999999999999-0"  # > 2**64 - 1: Redis refuses it as a stream id
MIB = 1 << 20


# --------------------------------------------------------------------------- helpers


def bearer(gateway: Gateway, brand: str, player: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {gateway.token(brand, player)}"}


def channel_of(brand: str, player: str) -> str:
    return f"SSE::{brand}::{player}"


def numsub(r: redis.Redis, channel: str) -> int:
    return int(dict(r.pubsub_numsub(channel)).get(channel.encode(), 0))


def read_stream(sock: socket.socket, timeout: float = 15.0) -> tuple[list[Response], SSEClient]:
    """Reads the (bounded) responses before the SSE head, then hands the socket to SSEClient."""
    deadline = time.monotonic() + timeout
    buf = b""
    before: list[Response] = []

    def more() -> None:
        nonlocal buf
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no SSE response within {timeout}s: {buf[:300]!r}")
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(f"closed before an SSE response: {before!r} {buf[:300]!r}")
        buf += chunk

    while True:
        while b"\r\n\r\n" not in buf:
            more()
        head, _, buf = buf.partition(b"\r\n\r\n")
        response = parse_head(head)
        if (response.header("Content-Type") or "").startswith("text/event-stream"):
            sock.setblocking(False)
            return before, SSEClient(sock, response, buf)
        length = int(response.header("Content-Length") or 0)
        while len(buf) < length:
            more()
        response.body, buf = buf[:length], buf[length:]
        before.append(response)


def pipelined(gateway: Gateway, payload: bytes) -> tuple[list[Response], SSEClient]:
    """Sends several requests in one write; returns the responses before the stream, and it."""
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=15)
    try:
        sock.sendall(payload)
        return read_stream(sock)
    except BaseException:
        sock.close()
        raise


def connected_payload(client: SSEClient, timeout: float = 15.0) -> dict[str, Any] | None:
    """The `connected` event's data, or None when the stream ended (or stalled) before it."""
    try:
        return client.wait_connected(timeout)
    except (EOFError, TimeoutError):
        return None


def assert_only_sse(client: SSEClient, quiet: float = 0.5) -> None:
    """Nothing but SSE in the stream's body: no HTTP response written into it."""
    with contextlib.suppress(EOFError):
        client.drain_available(quiet)  # a response in the chunked body raises ChunkError too
    wire = bytes(client.wire)
    assert b"HTTP/1." not in wire, f"a pipelined request was answered inside the stream: {wire!r}"


def assert_stream_released(gateway: Gateway, r: redis.Redis, channel: str) -> None:
    """After the client closed: no stream counted, the channel unsubscribed."""
    wait_for(
        lambda: gateway.metrics().total("sse_gateway_connections") == 0,
        timeout=15,
        what=f"no stream (now {gateway.metrics().total('sse_gateway_connections')})",
    )
    wait_for(lambda: numsub(r, channel) == 0, timeout=15, what=f"PUBSUB NUMSUB {channel} == 0")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@contextlib.contextmanager
def serve_process(
    *flags: str, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], IO[bytes]]]:
    """`sse-gateway serve` in its own process group, stderr in a file; the group is killed after."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sse_gateway", "serve", "--host", "127.0.0.1", *flags],
            env=gateway_env(env),
            stdout=subprocess.DEVNULL,
            stderr=log,
            cwd=REPO,
            start_new_session=True,
        )
        try:
            yield proc, log
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def wait_exit(
    proc: subprocess.Popen[bytes], log: IO[bytes], timeout: float
) -> tuple[int | None, str, float]:
    """(exit code, or None if still running at the deadline; stderr so far; seconds waited)."""
    started = time.monotonic()
    try:
        code: int | None = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        code = None
    waited = time.monotonic() - started
    log.seek(0)
    return code, log.read().decode("utf-8", "replace"), waited


# --------------------------------------------------------------------------- 1. pipelining


def test_huge_header_request_pipelined_after_stream_is_never_answered(
    gateway: Gateway, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    """Bytes after `GET /v1/sse` in the same packet: no 431 in the stream, no leaked stream."""
    brand, player = ids("pipe"), ids("p")
    channel = channel_of(brand, player)
    r = redis_server.client()
    # The second request's header is over 16 KiB: it was answered 431 inside the stream,
    # which then closed without being counted as closed (and stayed subscribed).
    payload = build_request("GET", "/v1/sse", bearer(gateway, brand, player)) + build_request(
        "GET", "/", {"X-Pad": "a" * 17_000}
    )
    for _ in range(2):  # twice: a leak would show as a stream still counted after the first
        before, client = pipelined(gateway, payload)
        with client:
            assert before == []
            assert client.status == 200
            connected = connected_payload(client)
            assert_only_sse(client)
            assert connected is not None, f"stream ended before `connected`: {bytes(client.raw)!r}"
            # still a working stream
            r.publish(channel, '{"type":"after-pipeline","data":1}')
            assert client.wait_event("after-pipeline").json() == 1
            assert_only_sse(client, quiet=0.2)
        assert_stream_released(gateway, r, channel)
    r.close()


def test_publish_then_stream_then_healthz_pipelined(
    gateway_factory: GatewayFactory, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    """POST /v1/publish (async) + GET /v1/sse + GET /healthz: the healthz is not served."""
    gateway = gateway_factory("--publish-api-key", PUBLISH_KEY, redis=redis_server)
    brand, player = ids("pipe"), ids("p")
    channel = channel_of(brand, player)
    body = json.dumps({"brand_id": brand, "player_id": ids("other"), "type": "n", "data": 1})
    payload = (
        build_request(
            "POST", "/v1/publish", {"Authorization": f"Bearer {PUBLISH_KEY}"}, body.encode()
        )
        + build_request("GET", "/v1/sse", bearer(gateway, brand, player))
        + build_request("GET", "/healthz")
    )
    r = redis_server.client()
    before, client = pipelined(gateway, payload)
    with client:
        assert [response.status for response in before] == [202], before
        assert client.status == 200
        connected = connected_payload(client)
        assert_only_sse(client)
        assert connected is not None, f"stream ended before `connected`: {bytes(client.raw)!r}"
        assert connected["player_id"] == player
        r.publish(channel, '{"type":"live","data":2}')
        assert client.wait_event("live").json() == 2
        assert_only_sse(client, quiet=0.2)
    assert_stream_released(gateway, r, channel)
    r.close()


# --------------------------------------------------------------------------- 2. request bodies


def test_unauthorized_post_body_is_not_buffered(gateway_factory: GatewayFactory) -> None:
    """Big bodies to a 404 path and to /v1/publish with a wrong key: read and dropped."""
    gateway = gateway_factory("--publish-api-key", PUBLISH_KEY)
    assert gateway.get("/healthz").status == 200
    sent = 40 * MIB  # per connection, of a body of sent + 1 MiB
    chunk = b"x" * MIB
    targets = [
        ("/nowhere", {}),
        ("/v1/publish", {"Authorization": "Bearer not-the-key"}),
    ]
    baseline = rss_bytes(gateway.pid)
    socks: list[socket.socket] = []
    try:
        for target, headers in targets:
            sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=30)
            socks.append(sock)
            head = build_request("POST", target, {**headers, "Content-Length": str(sent + MIB)})
            sock.sendall(head)
            for _ in range(sent // MIB):
                sock.sendall(chunk)
        # sendall returned: the gateway has read all but what the socket buffers hold
        peak = baseline
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            peak = max(peak, rss_bytes(gateway.pid))
            time.sleep(0.1)
        growth = peak - baseline
        assert growth < 24 * MIB, (
            f"gateway RSS grew by {growth / MIB:.1f} MiB while receiving "
            f"{len(targets)} x {sent // MIB} MiB of bodies nobody will use"
        )
        responses = []
        for sock in socks:
            sock.sendall(chunk)  # the body's last MiB: now the request is complete
        for sock in socks:
            sock.settimeout(15)
            data = b""
            while b"\r\n\r\n" not in data:
                got = sock.recv(65536)
                assert got, f"closed without a response: {data!r}"
                data += got
            head, _, rest = data.partition(b"\r\n\r\n")
            response = parse_head(head)
            length = int(response.header("Content-Length") or 0)
            while len(rest) < length:
                got = sock.recv(65536)
                assert got, "response body truncated"
                rest += got
            response.body = rest[:length]
            responses.append(response)
        assert_error(responses[0], 404, "not_found")
        assert_error(responses[1], 401, "invalid_api_key")
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.timeout(60)
def test_body_that_never_completes_is_closed_by_the_request_timer(
    gateway_factory: GatewayFactory,
) -> None:
    """The 10 s request timer runs until the whole message is in, body included."""
    gateway = gateway_factory("--publish-api-key", PUBLISH_KEY)
    requests = [
        b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789",
        b"POST /v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + PUBLISH_KEY.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n[{",
    ]
    socks = []
    started = time.monotonic()
    try:
        for raw in requests:
            sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=30)
            sock.sendall(raw)
            socks.append(sock)
        for sock, raw in zip(socks, requests, strict=True):
            data = b""
            while True:
                remaining = 25 - (time.monotonic() - started)
                if remaining <= 0:
                    pytest.fail(f"{raw[:30]!r}: still open {25}s later, no response: {data!r}")
                sock.settimeout(remaining)
                try:
                    got = sock.recv(65536)
                except TimeoutError:
                    continue
                except ConnectionResetError:
                    got = b""
                if not got:
                    break
                data += got
            elapsed = time.monotonic() - started
            assert elapsed < 20, f"{raw[:30]!r}: closed only after {elapsed:.1f}s"
            if data:  # a 408, or just the close
                head, _, body = data.partition(b"\r\n\r\n")
                response = parse_head(head)
                response.body = body
                assert_error(response, 408, "request_timeout")
    finally:
        for sock in socks:
            sock.close()


# --------------------------------------------------------------------------- 3. >64-bit ids


def test_last_event_id_beyond_64_bits_does_not_spoil_other_replays(
    gateway: Gateway, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    """Two replays in the same loop tick (one batch): the >64-bit id fails only its own."""
    brand, victim, attacker = ids("b"), ids("victim"), ids("attacker")
    publisher = SyncPublisher.from_url(redis_server.url)
    published = [str(publisher.publish(brand, victim, "n", i)) for i in range(5)]
    publisher.close()
    # Both channels stay subscribed, so each replay's history read starts at once.
    keepers = [gateway.stream(brand, victim), gateway.stream(brand, attacker)]
    socks = [socket.create_connection(("127.0.0.1", gateway.port), timeout=15) for _ in range(2)]
    clients: list[SSEClient] = []
    try:
        time.sleep(0.3)  # both sockets accepted by the gateway
        requests = [
            build_request(
                "GET", "/v1/sse", {**bearer(gateway, brand, victim), "Last-Event-ID": published[1]}
            ),
            build_request(
                "GET",
                "/v1/sse",
                {**bearer(gateway, brand, attacker), "Last-Event-ID": BEYOND_64_BITS},
            ),
        ]
        # Stopped, the gateway reads both requests in the same tick when it resumes.
        gateway.signal(signal.SIGSTOP)
        try:
            for sock, raw in zip(socks, requests, strict=True):
                sock.sendall(raw)
            time.sleep(0.3)
        finally:
            gateway.signal(signal.SIGCONT)
        for sock in socks:
            before, client = read_stream(sock)
            assert before == []
            clients.append(client)
        victim_client, attacker_client = clients
        assert attacker_client.status == 200
        assert attacker_client.wait_connected()["recovered"] is False
        assert attacker_client.connected is not None
        assert_position_id(attacker_client.connected.id)  # the end of its (empty) history
        assert victim_client.status == 200
        connected = victim_client.wait_connected()
        assert connected["recovered"] is True, f"victim's replay spoiled: {connected}"
        assert victim_client.connected is not None
        assert victim_client.connected.id == published[1]  # resumes from its own id
        replayed = read_events(victim_client, 3)
        assert [f.id for f in replayed] == published[2:]
        assert [f.json() for f in replayed] == [2, 3, 4]
    finally:
        with contextlib.suppress(ProcessLookupError):
            gateway.signal(signal.SIGCONT)
        for client in clients + keepers:
            client.close()
        for sock in socks:
            sock.close()


def test_pubsub_reconnect_after_beyond_64_bit_id_does_not_freeze_others(
    gateway_factory: GatewayFactory, fresh_redis: RedisServer, ids: Callable[..., str]
) -> None:
    """A plain PUBLISH with a >64-bit id, then a Pub/Sub drop: every channel's refill works."""
    gateway = gateway_factory("--keepalive-period", "1s", redis=fresh_redis)
    brand, bad, good = ids("b"), ids("bad"), ids("good")
    r = fresh_redis.client()
    publisher = SyncPublisher.from_url(fresh_redis.url)
    bad_client = gateway.stream(brand, bad)
    good_client = gateway.stream(brand, good)
    try:
        r.publish(channel_of(brand, bad), f'{{"type":"x","data":1,"id":"{BEYOND_64_BITS}"}}')
        assert bad_client.wait_event("x").id == BEYOND_64_BITS
        publisher.publish(brand, good, "before", 1)
        assert good_client.wait_event("before").json() == 1
        reconnects = gateway.metrics().value("sse_gateway_broker_reconnects_total")
        assert r.client_kill_filter(_type="pubsub") >= 1
        wait_for(
            lambda: gateway.metrics().value("sse_gateway_broker_reconnects_total") > reconnects,
            timeout=20,
            what="the gateway's Pub/Sub reconnect",
        )
        after = [str(publisher.publish(brand, good, "after", i)) for i in range(3)]
        got = read_events(good_client, 3, timeout=10)
        assert [f.id for f in got] == after, "the unrelated player's delivery froze"
        assert [f.event for f in got] == ["after"] * 3
        publisher.publish(brand, bad, "later", 7)
        assert read_events(bad_client, 1, timeout=10)[0].json() == 7
    finally:
        bad_client.close()
        good_client.close()
        publisher.close()
        r.close()


# --------------------------------------------------------------------------- 5-6. workers


@pytest.mark.parametrize("via", ["flag", "env"])
def test_workers_without_redis_exit_2_naming_what_was_typed(via: str) -> None:
    """The embedded broker lives in one process: workers would not see each other's events.
    The error names the flag or the variable, as given (issue 12, "small truths")."""
    flags = ["--port", str(free_port()), "--jwt-secret", DEFAULT_SECRET]
    env: dict[str, str] = {}
    if via == "flag":
        flags += ["--workers", "2"]
    else:
        env["SSE_WORKERS"] = "2"
    with serve_process(*flags, env=env) as (proc, log):
        code, err, _ = wait_exit(proc, log, timeout=20)
    assert code is not None, f"serve --workers 2 without Redis is still running: {err[-500:]}"
    assert code == 2, f"exit {code}: {err[-500:]}"
    assert ("--workers" if via == "flag" else "SSE_WORKERS") in err, err[-500:]


@pytest.mark.timeout(60)
def test_workers_on_a_taken_port_exit_instead_of_crash_looping(
    redis_server: RedisServer,
) -> None:
    """Workers that die at start (port in use) are not restarted forever."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with serve_process(
            "--port",
            str(port),
            "--workers",
            "2",
            "--redis",
            redis_server.url,
            "--jwt-secret",
            DEFAULT_SECRET,
        ) as (proc, log):
            code, err, waited = wait_exit(proc, log, timeout=20)
    restarts = err.count("restarting it")
    assert code is not None, f"still running after 20s ({restarts} worker restarts): {err[-800:]}"
    assert code != 0, err[-800:]
    assert waited < 20
    assert "cannot listen" in err, err[-800:]


# --------------------------------------------------------------------------- 7. drain


def test_sigterm_with_idle_keepalive_socket_exits_quickly(
    gateway_factory: GatewayFactory, redis_server: RedisServer
) -> None:
    """Draining waits for streams only: an idle health-check socket does not hold it."""
    gateway = gateway_factory("--drain-seconds", "8", redis=redis_server)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=15) as sock:
        sock.sendall(build_request("GET", "/healthz"))
        data = b""
        while b'{"status":"ok"}' not in data:
            got = sock.recv(4096)
            assert got, f"closed: {data!r}"
            data += got
        assert b"Connection: keep-alive" in data, data
        started = time.monotonic()
        gateway.terminate()
        code = gateway.wait(timeout=30)
        elapsed = time.monotonic() - started
    assert code == 0, gateway.logs()[-1000:]
    assert elapsed < 5, f"exit took {elapsed:.1f}s with 0 streams (drain time 8s)"
