"""Real clients: httpx-sse, headless Chromium's EventSource (same and cross origin), CORS, and
the embedded broker fed through `POST /v1/publish`."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse
from support.asserts import assert_error
from support.browser import chromium
from support.procs import Gateway, GatewayFactory, RedisServer, publish, wait_for
from support.sse import assert_position_id, request

pytestmark = pytest.mark.timeout(90)

PUBLISH_KEY = "publish-key-for-tests-0123456789"


# ----------------------------------------------------------------------------- httpx-sse


def test_httpx_sse_reads_connected_and_published_event(
    gateway_factory: GatewayFactory, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    gw = gateway_factory("--keepalive-period", "500ms", redis=redis_server)
    brand, player = ids("b"), ids("p")
    r = redis_server.client()
    seen: list[tuple[str, str, str, int | None]] = []
    headers = {"Authorization": f"Bearer {gw.token(brand, player)}"}
    with (
        httpx.Client(timeout=httpx.Timeout(15.0), trust_env=False) as client,
        connect_sse(client, "GET", f"{gw.url}/v1/sse", headers=headers) as source,
    ):
        assert source.response.status_code == 200
        assert source.response.headers.get("transfer-encoding") == "chunked"
        for sse in source.iter_sse():
            if sse.event == "heartbeat":
                continue
            # httpx-sse yields every block that set a field: there is no `retry:`-only one
            # (it would be an empty "message"), the retry comes inside `connected`.
            seen.append((sse.event, sse.id, sse.data, sse.retry))
            if sse.event == "connected":
                publish(r, brand, player, {"type": "greeting", "data": {"hi": 1}, "id": "9-1"})
            if sse.event == "greeting":
                break
    r.close()
    assert [s[0] for s in seen] == ["connected", "greeting"], seen
    assert json.loads(seen[0][2])["player_id"] == player
    assert_position_id(seen[0][1])  # the resume id of an empty history
    assert seen[0][3] == 3000
    assert seen[1][1:] == ("9-1", '{"hi":1}', None)


# ----------------------------------------------------------------------------- CORS


class _PageHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<!doctype html><title>other origin</title>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def page_server() -> Iterator[str]:
    """A page on another origin (another port of 127.0.0.1)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _PageHandler)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def cors_page() -> Iterator[str]:
    """The origin of a foreign page, listed in `cors_gateway`'s SSE_CORS_ORIGINS."""
    with page_server() as origin:
        yield origin


@pytest.fixture
def cors_gateway(
    gateway_factory: GatewayFactory, redis_server: RedisServer, cors_page: str
) -> Gateway:
    return gateway_factory(
        "--cors-origins",
        f"{cors_page},http://other.example:8443",
        redis=redis_server,
    )


def test_cors_disallowed_origin_is_403(cors_gateway: Gateway, cors_page: str) -> None:
    token = cors_gateway.token("cb", "cp")
    port = int(cors_page.rsplit(":", 1)[1])
    https_twin = cors_page.replace("http://", "https://")
    for origin in ("http://evil.example", f"http://127.0.0.1:{port + 1}", "null", https_twin):
        response = request(cors_gateway.port, "GET", f"/v1/sse?token={token}", {"Origin": origin})
        assert_error(response, 403, "origin_not_allowed")
        assert response.header("Access-Control-Allow-Origin") is None


def test_cors_allowed_origin_gets_credentials_headers(
    cors_gateway: Gateway, cors_page: str
) -> None:
    origin = cors_page
    token = cors_gateway.token("cb", "cp")
    with cors_gateway.open(f"/v1/sse?token={token}", {"Origin": origin}) as client:
        assert client.status == 200, client.response
        assert client.response.header("Access-Control-Allow-Origin") == origin
        assert client.response.header("Access-Control-Allow-Credentials") == "true"
        assert "origin" in (client.response.header("Vary") or "").lower()
        assert client.wait_connected()["player_id"] == "cp"
    with cors_gateway.open(f"/v1/sse?token={token}", {"Origin": "http://other.example:8443"}) as c:
        assert c.status == 200
        assert c.response.header("Access-Control-Allow-Origin") == "http://other.example:8443"


def test_cors_same_origin_is_allowed(cors_gateway: Gateway) -> None:
    """A page served by the gateway itself is not a cross-origin request."""
    token = cors_gateway.token("cb", "cp")
    with cors_gateway.open(f"/v1/sse?token={token}", {"Origin": cors_gateway.url}) as client:
        assert client.status == 200, client.response
        client.wait_connected()


def test_cors_preflight(cors_gateway: Gateway, cors_page: str) -> None:
    origin = cors_page
    response = request(
        cors_gateway.port,
        "OPTIONS",
        "/v1/sse",
        {
            "Origin": origin,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization, x-brand-id, last-event-id",
        },
    )
    assert response.status in (200, 204), response
    assert response.header("Access-Control-Allow-Origin") == origin
    assert response.header("Access-Control-Allow-Credentials") == "true"
    assert "GET" in (response.header("Access-Control-Allow-Methods") or "")
    allowed = (response.header("Access-Control-Allow-Headers") or "").lower()
    assert "authorization" in allowed and "x-brand-id" in allowed, allowed
    evil = request(
        cors_gateway.port,
        "OPTIONS",
        "/v1/sse",
        {"Origin": "http://evil.example", "Access-Control-Request-Method": "GET"},
    )
    assert evil.header("Access-Control-Allow-Origin") is None
    assert evil.status >= 400, evil


def test_no_cors_origins_configured_refuses_foreign_origin(gateway: Gateway) -> None:
    token = gateway.token("cb", "cp")
    response = request(
        gateway.port, "GET", f"/v1/sse?token={token}", {"Origin": "http://x.example"}
    )
    assert_error(response, 403, "origin_not_allowed")
    # no Origin at all (curl, servers): allowed
    with gateway.open(f"/v1/sse?token={token}") as client:
        assert client.status == 200


# ----------------------------------------------------------------------------- embedded broker


def test_embedded_broker_and_publish_endpoint(
    gateway_factory: GatewayFactory, ids: Callable[..., str]
) -> None:
    gw = gateway_factory("--keepalive-period", "1s", env={"SSE_PUBLISH_API_KEY": PUBLISH_KEY})
    assert gw.readyz() == (200, {"status": "ready"})
    brand, player = ids("b"), ids("p")
    body = {"brand_id": brand, "player_id": player, "type": "notification", "data": {"x": [1]}}
    with gw.stream(brand, player) as client, gw.stream(brand, ids("other")) as bystander:
        response = request(
            gw.port,
            "POST",
            "/v1/publish",
            {"Authorization": f"Bearer {PUBLISH_KEY}", "Content-Type": "application/json"},
            json.dumps(body).encode(),
        )
        assert response.status == 202, response
        event_id = response.json()["id"]
        assert isinstance(event_id, str) and event_id
        event = client.wait_event("notification")
        assert event.json() == {"x": [1]}
        assert event.id == event_id
        assert [f for f in bystander.drain_available(0.3) if f.event == "notification"] == []
    for auth in (None, "Bearer wrong-key", f"Basic {PUBLISH_KEY}", PUBLISH_KEY):
        headers = {"Content-Type": "application/json"}
        if auth is not None:
            headers["Authorization"] = auth
        refused = request(gw.port, "POST", "/v1/publish", headers, json.dumps(body).encode())
        assert refused.status == 401, (auth, refused)
        assert isinstance(refused.json().get("error"), str)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        json.dumps({"brand_id": "b", "player_id": "p", "type": "a b", "data": 1}).encode(),
        json.dumps({"brand_id": "b", "player_id": "p", "type": "connected", "data": 1}).encode(),
        json.dumps({"brand_id": "b::x", "player_id": "p", "type": "t", "data": 1}).encode(),
        json.dumps({"brand_id": "b", "player_id": "p*", "type": "t", "data": 1}).encode(),
        json.dumps({"brand_id": "b", "player_id": "p", "type": "t"}).encode(),
    ],
    ids=["not-json", "bad-type", "reserved-type", "bad-brand", "bad-player", "no-data"],
)
def test_publish_endpoint_rejects_bad_bodies(gateway_factory: GatewayFactory, body: bytes) -> None:
    gw = gateway_factory(env={"SSE_PUBLISH_API_KEY": PUBLISH_KEY})
    response = request(
        gw.port,
        "POST",
        "/v1/publish",
        {"Authorization": f"Bearer {PUBLISH_KEY}", "Content-Type": "application/json"},
        body,
    )
    assert response.status == 400, response
    assert isinstance(response.json().get("error"), str)


def test_publish_endpoint_absent_without_key(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory()
    response = request(
        gw.port,
        "POST",
        "/v1/publish",
        {"Authorization": f"Bearer {PUBLISH_KEY}", "Content-Type": "application/json"},
        b'{"brand_id":"b","player_id":"p","type":"t","data":1}',
    )
    assert_error(response, 404, "not_found")


def test_embedded_broker_multi_tab(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory(env={"SSE_PUBLISH_API_KEY": PUBLISH_KEY})
    tabs = [gw.stream("eb", "ep") for _ in range(3)]
    try:
        body = {"brand_id": "eb", "player_id": "ep", "type": "all", "data": "tabs"}
        response = request(
            gw.port,
            "POST",
            "/v1/publish",
            {"Authorization": f"Bearer {PUBLISH_KEY}"},
            json.dumps(body).encode(),
        )
        assert response.status == 202, response
        for tab in tabs:
            assert tab.wait_event("all").json() == "tabs"
    finally:
        for tab in tabs:
            tab.close()


# ----------------------------------------------------------------------------- Chromium


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as instance:
        yield instance


EVENT_SOURCE_SCRIPT = """
([url, withCredentials]) => {
  window.__events = [];
  window.__errors = 0;
  const source = new EventSource(url, {withCredentials});
  window.__source = source;
  for (const type of ["connected", "notification"]) {
    source.addEventListener(type, (e) => {
      window.__events.push({type: e.type, data: e.data, id: e.lastEventId, origin: e.origin});
    });
  }
  source.onerror = () => { window.__errors += 1; };
  return true;
}
"""


@pytest.mark.browser
@pytest.mark.timeout(120)
def test_chromium_event_source_same_origin(
    browser: Any,
    gateway_factory: GatewayFactory,
    redis_server: RedisServer,
    ids: Callable[..., str],
) -> None:
    gw = gateway_factory("--keepalive-period", "1s", redis=redis_server)
    brand, player = ids("b"), ids("p")
    token = gw.token(brand, player)
    page = browser.new_page()
    try:
        page.goto(f"{gw.url}/healthz")
        page.evaluate(EVENT_SOURCE_SCRIPT, [f"/v1/sse?token={token}", False])
        page.wait_for_function("window.__events.some(e => e.type === 'connected')", timeout=30_000)
        r = redis_server.client()
        publish(r, brand, player, {"type": "notification", "data": {"msg": "hé"}, "id": "7-0"})
        r.close()
        page.wait_for_function(
            "window.__events.some(e => e.type === 'notification')", timeout=30_000
        )
        events = page.evaluate("window.__events")
        ready_state = page.evaluate("window.__source.readyState")
        page.evaluate("window.__source.close()")
    finally:
        page.close()
    connected = json.loads(events[0]["data"])
    assert (connected["brand_id"], connected["player_id"]) == (brand, player)
    assert_position_id(events[0]["id"])  # the resume id: an EventSource has one from the start
    note = next(e for e in events if e["type"] == "notification")
    assert json.loads(note["data"]) == {"msg": "hé"}
    assert note["id"] == "7-0"
    assert ready_state == 1  # OPEN: the browser did not see an error and reconnect


@pytest.mark.browser
@pytest.mark.timeout(120)
def test_chromium_event_source_cross_origin(
    browser: Any,
    cors_gateway: Gateway,
    cors_page: str,
    redis_server: RedisServer,
    ids: Callable[..., str],
) -> None:
    brand, player = ids("b"), ids("p")
    token = cors_gateway.token(brand, player)
    page = browser.new_page()
    try:
        page.goto(f"{cors_page}/")
        page.evaluate(EVENT_SOURCE_SCRIPT, [f"{cors_gateway.url}/v1/sse?token={token}", True])
        page.wait_for_function("window.__events.some(e => e.type === 'connected')", timeout=30_000)
        r = redis_server.client()
        publish(r, brand, player, {"type": "notification", "data": [1, 2]})
        r.close()
        page.wait_for_function(
            "window.__events.some(e => e.type === 'notification')", timeout=30_000
        )
        events = page.evaluate("window.__events")
        page.evaluate("window.__source.close()")
    finally:
        page.close()
    note = next(e for e in events if e["type"] == "notification")
    assert json.loads(note["data"]) == [1, 2]
    assert note["origin"] == cors_gateway.url


@pytest.mark.browser
@pytest.mark.timeout(120)
def test_chromium_cross_origin_refused_for_unlisted_origin(
    browser: Any, gateway: Gateway, ids: Callable[..., str]
) -> None:
    """The gateway `gateway` lists no CORS origin: a foreign page's EventSource must fail."""
    token = gateway.token(ids("b"), ids("p"))
    with page_server() as origin:
        page = browser.new_page()
        try:
            page.goto(f"{origin}/")
            page.evaluate(EVENT_SOURCE_SCRIPT, [f"{gateway.url}/v1/sse?token={token}", True])
            page.wait_for_function("window.__errors > 0", timeout=30_000)
            events = page.evaluate("window.__events")
            page.evaluate("window.__source.close()")
        finally:
            page.close()
    assert events == []
    wait_for(
        lambda: (
            gateway.metrics().value(
                "sse_gateway_connections_rejected_total", reason="origin_not_allowed"
            )
            >= 1
        ),
        what="the refusal to be counted",
    )


@pytest.mark.browser
@pytest.mark.timeout(120)
def test_chromium_demo_page_shows_a_published_event(
    browser: Any, gateway_factory: GatewayFactory
) -> None:
    gw = gateway_factory("--dev", "--keepalive-period", "1s", jwt_secret=None)
    page = browser.new_page()
    try:
        page.goto(f"{gw.url}/demo")
        page.click("#connect")
        page.wait_for_function(
            "document.getElementById('log').textContent.includes('connected ')", timeout=30_000
        )
        page.fill(
            "#event",
            '{"brand_id": "demo", "player_id": "player-1", "type": "bonus", "data": {"n": 7}}',
        )
        page.click("#publish")
        page.wait_for_function(
            "document.getElementById('log').textContent.includes('event bonus')", timeout=30_000
        )
        log = page.evaluate("document.getElementById('log').textContent")
    finally:
        page.close()
    assert '"n":7' in log.replace(" ", "")


@pytest.mark.parametrize(
    ("target", "status", "code"),
    [
        ("/v1/sse?token=not-a-token", 401, "invalid_token"),
        ("/v1/sse", 401, "missing_token"),
        ("/v1/sse?token={token}&last_event_id=%20bad%20id", 400, "invalid_last_event_id"),
    ],
)
def test_cors_errors_to_an_allowed_origin_are_readable(
    cors_gateway: Gateway, cors_page: str, target: str, status: int, code: str
) -> None:
    """Issue 10 item 14: without CORS headers on the 401, a page could not tell an expired
    token from an outage (Chromium: `TypeError: Failed to fetch`)."""
    path = target.format(token=cors_gateway.token("cb", "cp"))
    response = request(cors_gateway.port, "GET", path, {"Origin": cors_page})
    assert_error(response, status, code)
    assert response.header("Access-Control-Allow-Origin") == cors_page
    assert response.header("Access-Control-Allow-Credentials") == "true"
    exposed = response.header("Access-Control-Expose-Headers") or ""
    assert {"WWW-Authenticate", "Retry-After"} <= {h.strip() for h in exposed.split(",")}


@pytest.mark.parametrize(
    ("method", "target", "status", "code"),
    [
        ("POST", "/v1/sse", 405, "method_not_allowed"),
        ("GET", "/v1/tickets", 405, "method_not_allowed"),
        ("GET", "/no/such/path", 404, "not_found"),
        ("POST", "/healthz", 405, "method_not_allowed"),
    ],
)
def test_cors_on_every_error_of_the_router_to_an_allowed_origin(
    cors_gateway: Gateway, cors_page: str, method: str, target: str, status: int, code: str
) -> None:
    """Issue 10 item 14, "every response to an allowed origin": the router's own 404 and
    405 too, not only the stream endpoint's refusals."""
    response = request(cors_gateway.port, method, target, {"Origin": cors_page})
    assert_error(response, status, code)
    assert response.header("Access-Control-Allow-Origin") == cors_page
    foreign = request(cors_gateway.port, method, target, {"Origin": "https://evil.example"})
    assert foreign.header("Access-Control-Allow-Origin") is None
