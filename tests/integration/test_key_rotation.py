"""Key rotation without a hard cutover (issue 10 item 9), on a real gateway: SIGHUP reloads
SSE_JWT_KEYS_FILE while streams stay open (also under --workers, through the supervisor), an
invalid file keeps the keys in force, and a brand's JWKS is fetched from a local server."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
import redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from support.asserts import assert_error
from support.procs import (
    Gateway,
    GatewayFactory,
    RedisServer,
    claims_for,
    free_port,
    publish,
    wait_for,
)
from support.sse import SSEClient, request

from sse_gateway.edge.jwks import MAX_JWKS_BYTES, JwksError, fetch_url
from sse_gateway.server import WORKER_MIN_LIFETIME

pytestmark = pytest.mark.timeout(120)


def _pem(private: Any) -> str:
    public: bytes = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return public.decode()


@pytest.fixture(scope="module")
def key_a() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def key_b() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def tok(brand: str, player: str, key: Any, alg: str, kid: str | None) -> str:
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(claims_for(brand, player), key, algorithm=alg, headers=headers)


def status(gw: Gateway, token: str) -> int:
    return request(gw.port, "GET", "/v1/sse", {"Authorization": f"Bearer {token}"}).status


def open_stream(gw: Gateway, token: str) -> SSEClient:
    client = gw.open(headers={"Authorization": f"Bearer {token}"})
    assert client.status == 200, client.read_body()
    client.wait_connected()
    return client


def assert_delivered(r: redis.Redis, client: SSEClient, brand: str, player: str, n: int) -> None:
    publish(r, brand, player, {"type": "probe", "data": n})
    event = client.wait_event("probe")
    assert json.loads(event.data) == n


def write_keys(path: Path, content: object) -> None:
    # Written whole and renamed, as a config management tool does: a SIGHUP never reads half.
    temporary = path.with_suffix(".tmp")
    temporary.write_text(content if isinstance(content, str) else json.dumps(content))
    os.replace(temporary, path)


def log_count(gw: Gateway, needle: str) -> int:
    return gw.logs().count(needle)


def rotation_scenario(
    gw: Gateway, path: Path, r: redis.Redis, key_a: Any, key_b: Any, *, processes: int
) -> None:
    """A stream opened with key A stays open across a SIGHUP that adds B and removes A; then
    B admits and A is refused; then an invalid file keeps B in force."""
    player = "p-rotation"
    stream = open_stream(gw, tok("rot", player, key_a, "RS256", "a"))
    write_keys(path, {"rot": [{"alg": "ES256", "key": _pem(key_b), "kid": "b"}]})
    gw.signal(signal.SIGHUP)
    changed = "brand 'rot': added kid 'b'; removed kid 'a'"
    wait_for(lambda: log_count(gw, changed) == processes, what=f"{processes} reloads")
    for _ in range(4 * processes):
        assert status(gw, tok("rot", "p2", key_b, "ES256", "b")) == 200
        response = request(
            gw.port,
            "GET",
            "/v1/sse",
            {"Authorization": f"Bearer {tok('rot', 'p2', key_a, 'RS256', 'a')}"},
        )
        assert_error(response, 401, "invalid_token")
        assert status(gw, tok("rot", "p2", key_a, "RS256", None)) == 401
    assert_delivered(r, stream, "rot", player, 1)

    write_keys(path, '{"rot": [{"alg": "ES256", "key": "not a key", "kid": "c"}]}')
    gw.signal(signal.SIGHUP)
    refused = "not reloaded, the keys in force stay"
    wait_for(lambda: log_count(gw, refused) == processes, what=f"{processes} refusals")
    assert "ERROR" in next(line for line in gw.logs().splitlines() if refused in line)
    for _ in range(4 * processes):
        assert status(gw, tok("rot", "p2", key_b, "ES256", "b")) == 200
        assert status(gw, tok("rot", "p2", key_a, "RS256", "a")) == 401
    assert_delivered(r, stream, "rot", player, 2)
    assert gw.running()
    stream.close()
    logs = gw.logs()
    assert "BEGIN PUBLIC KEY" not in logs and "not a key" not in logs


@pytest.fixture
def keys_path(tmp_path: Path, key_a: Any) -> Path:
    path = tmp_path / "keys.json"
    write_keys(path, {"rot": [{"alg": "RS256", "key": _pem(key_a), "kid": "a"}]})
    return path


def test_sighup_rotates_keys_and_streams_stay_open(
    gateway_factory: GatewayFactory,
    redis_server: RedisServer,
    r: redis.Redis,
    keys_path: Path,
    key_a: Any,
    key_b: Any,
) -> None:
    gw = gateway_factory("--jwt-keys-file", str(keys_path), redis=redis_server, jwt_secret=None)
    rotation_scenario(gw, keys_path, r, key_a, key_b, processes=1)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def test_sighup_reaches_every_worker_and_restarted_workers_keep_the_new_keys(
    gateway_factory: GatewayFactory,
    redis_server: RedisServer,
    r: redis.Redis,
    keys_path: Path,
    key_a: Any,
    key_b: Any,
) -> None:
    started = time.monotonic()
    gw = gateway_factory(
        "--jwt-keys-file", str(keys_path), "--workers", "2", redis=redis_server, jwt_secret=None
    )
    rotation_scenario(gw, keys_path, r, key_a, key_b, processes=2)
    pids = {int(p) for p in re.findall(r"\[(\d+)\] .*removed kid 'a'", gw.logs())}
    assert len(pids) == 2, gw.logs()  # each worker reloaded, not one twice
    # Workers that die after the rotation come back with the keys in force (the supervisor
    # reloaded them too), not with those it started with: A stays refused on every worker.
    workers = _children(gw.pid)
    assert sorted(workers) == sorted(pids)
    wait_for(lambda: "SIGHUP: reloading" in gw.logs(), what="supervisor log")
    # A worker that dies younger than this makes the supervisor give up (a crash at start).
    time.sleep(max(0.0, started + WORKER_MIN_LIFETIME + 0.5 - time.monotonic()))
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: gw.logs().count("restarting it") == 2, what="two restarts")
    wait_for(lambda: gw.logs().count("sse-gateway listening on") == 4, what="two new workers")
    for _ in range(8):
        assert status(gw, tok("rot", "p3", key_b, "ES256", "b")) == 200
        assert status(gw, tok("rot", "p3", key_a, "RS256", "a")) == 401


def test_sighup_without_a_keys_file_is_logged_and_harmless(gateway: Gateway) -> None:
    """Before: SIGHUP's default action ended the process, streams and all."""
    stream = gateway.stream("b1", "p1")
    gateway.signal(signal.SIGHUP)
    wait_for(lambda: "no SSE_JWT_KEYS_FILE to reload" in gateway.logs(), what="the log")
    assert gateway.running()
    assert gateway.get("/healthz").status == 200
    stream.next_event(timeout=5)  # a heartbeat: still open
    stream.close()


# --- JWKS ------------------------------------------------------------------------------------


class JwksHost:
    """A JWKS document on 127.0.0.1, replaceable at any time; counts the fetches."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = {"keys": []}
        self.fetches = 0
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/jwks.json":
                    host.fetches += 1
                    self._send(200, json.dumps(host.document).encode())
                elif self.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", "/jwks.json")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif self.path == "/big":
                    self._send(200, b" " * (MAX_JWKS_BYTES + 1))
                else:
                    self._send(404, b"{}")

            def _send(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str = "/jwks.json") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def publish(self, *keys: tuple[Any, str]) -> None:
        entries = []
        for private, kid in keys:
            algorithm: Any = RSAAlgorithm if isinstance(private, rsa.RSAPrivateKey) else ECAlgorithm
            entry = algorithm.to_jwk(private.public_key(), as_dict=True)
            entries.append({**entry, "kid": kid, "use": "sig"})
        self.document = {"keys": entries}


@pytest.fixture
def jwks_host() -> Iterator[JwksHost]:
    host = JwksHost()
    host.thread.start()
    try:
        yield host
    finally:
        host.server.shutdown()
        host.server.server_close()


def test_fetch_url(jwks_host: JwksHost, key_a: Any) -> None:
    jwks_host.publish((key_a, "a"))
    assert json.loads(fetch_url(jwks_host.url()))["keys"][0]["kid"] == "a"
    with pytest.raises(JwksError, match="HTTP 302"):  # redirects are not followed
        fetch_url(jwks_host.url("/redirect"))
    with pytest.raises(JwksError, match="larger than"):
        fetch_url(jwks_host.url("/big"))
    with pytest.raises(JwksError, match="HTTP 404"):
        fetch_url(jwks_host.url("/absent"))
    with pytest.raises(JwksError, match="cannot fetch"):
        fetch_url(f"http://127.0.0.1:{free_port()}/jwks.json")  # nothing listens there


def jwks_gateway(
    factory: GatewayFactory, tmp_path: Path, host: JwksHost, redis_server: RedisServer, refresh: str
) -> Gateway:
    path = tmp_path / "jwks-keys.json"
    write_keys(path, {"j": {"jwks_url": host.url()}})
    return factory(
        "--jwt-keys-file",
        str(path),
        "--jwks-refresh",
        refresh,
        redis=redis_server,
        jwt_secret=None,
    )


def test_jwks_brand_and_early_refresh_on_an_unknown_kid(
    gateway_factory: GatewayFactory,
    redis_server: RedisServer,
    tmp_path: Path,
    jwks_host: JwksHost,
    key_a: Any,
    key_b: Any,
) -> None:
    jwks_host.publish((key_a, "k1"))
    gw = jwks_gateway(gateway_factory, tmp_path, jwks_host, redis_server, "1h")
    assert jwks_host.fetches == 1  # fetched before the gateway listened
    assert "brand 'j': 1 keys from JWKS http://127.0.0.1" in gw.logs()
    assert status(gw, tok("j", "p1", key_a, "RS256", "k1")) == 200
    assert status(gw, tok("j", "p1", key_b, "ES256", "k1")) == 401  # k1 is RS256

    jwks_host.publish((key_a, "k1"), (key_b, "k2"))
    # The first token with k2 is refused (nothing waits on a fetch) and makes one fetch early.
    assert status(gw, tok("j", "p1", key_b, "ES256", "k2")) == 401
    wait_for(lambda: status(gw, tok("j", "p1", key_b, "ES256", "k2")) == 200, what="k2")
    assert jwks_host.fetches == 2
    # More made-up kids within the gap make no more fetches.
    for n in range(5):
        assert status(gw, tok("j", "p1", key_b, "ES256", f"made-up-{n}")) == 401
    assert status(gw, tok("j", "p1", key_a, "RS256", "k1")) == 200
    assert jwks_host.fetches == 2
    assert "added kid 'k2'" in gw.logs()


def test_jwks_is_refetched_every_period_and_a_failed_fetch_keeps_the_keys(
    gateway_factory: GatewayFactory,
    redis_server: RedisServer,
    tmp_path: Path,
    jwks_host: JwksHost,
    key_a: Any,
    key_b: Any,
) -> None:
    jwks_host.publish((key_a, "k1"))
    gw = jwks_gateway(gateway_factory, tmp_path, jwks_host, redis_server, "1s")
    assert status(gw, tok("j", "p1", key_a, "RS256", "k1")) == 200
    jwks_host.publish((key_b, "k2"))
    seen = jwks_host.fetches
    wait_for(lambda: jwks_host.fetches >= seen + 2, what="two periodic fetches")
    assert status(gw, tok("j", "p1", key_b, "ES256", "k2")) == 200
    assert status(gw, tok("j", "p1", key_a, "RS256", "k1")) == 401
    # The host now serves a document without a usable key: the keys in force stay.
    jwks_host.document = {"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}
    wait_for(lambda: "no usable signing key" in gw.logs(), what="the failed fetch")
    assert status(gw, tok("j", "p1", key_b, "ES256", "k2")) == 200
