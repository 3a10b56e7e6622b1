"""Session control for operators (issue 10 items 10 and 11), with real gateways and Redis.

Kill switch: `POST /v1/disconnect` closes a player's (or a brand's) streams on every
instance with `event: disconnected`, and with `block_seconds` refuses their new streams
(403 `blocked`) on every instance until the block ends. Connect tickets: `POST /v1/tickets`
trades a token for a single-use ticket that `GET /v1/sse?ticket=` takes once, on any
instance.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from support.asserts import assert_error, assert_www_authenticate
from support.procs import Gateway, GatewayFactory, RedisServer, publish, running_pair, wait_for
from support.sse import Response, SSEClient, SSEEvent, read_events, request

pytestmark = pytest.mark.timeout(120)

KEY = "control-api-test-key-0123456789abcdefghij"
ORIGIN = "https://casino.example"
RETRY_MS = 3000
RETRY_SPREAD_MS = 10_000


@pytest.fixture(scope="module")
def pair(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gateway, Gateway]]:
    """Two gateway instances on one Redis, with the publish API key and an allowed origin."""
    flags = [
        "--redis",
        redis_server.url,
        "--publish-api-key",
        KEY,
        "--keepalive-period",
        "1s",
        "--cors-origins",
        ORIGIN,
    ]
    with running_pair(flags, workdir=tmp_path_factory.mktemp("session-control")) as pair:
        yield pair


def post_disconnect(
    gateway: Gateway, body: Any, *, key: str | None = KEY, raw: bytes | None = None
) -> Response:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = raw if raw is not None else json.dumps(body).encode()
    return gateway.request("POST", "/v1/disconnect", headers=headers, body=data, timeout=30)


def disconnected(response: Response) -> dict[str, Any]:
    assert response.status == 200, f"{response.status} {response.body[:300]!r}"
    body: dict[str, Any] = response.json()
    return body


def sse_get(gateway: Gateway, brand: str, player: str, **headers: str) -> Response:
    token = gateway.token(brand, player)
    return request(gateway.port, "GET", "/v1/sse", {"Authorization": f"Bearer {token}", **headers})


def assert_disconnected(client: SSEClient, reason: str, blocked: bool) -> dict[str, Any]:
    """The stream ends (a clean end of the chunked body) with `event: disconnected` as its
    last frame: the reason given, whether a block came with it, a spread `retry:`."""
    assert client.wait_closed(15), "the stream was not closed"
    last: SSEEvent = client.frames[-1]
    assert last.event == "disconnected", client.frames
    assert last.id is None, last
    assert last.retry is not None and RETRY_MS <= last.retry < RETRY_MS + RETRY_SPREAD_MS, last
    data: dict[str, Any] = last.json()
    assert data["reason"] == reason, data
    assert data["blocked"] is blocked, data
    assert bytes(client.wire).endswith(b"0\r\n\r\n"), "not a clean end of the chunked body"
    return data


def block_ttl(r: redis.Redis, brand: str, player: str | None = None) -> int:
    key = f"SSE:block:{brand}" if player is None else f"SSE:block:{brand}:{player}"
    ttl: int = r.ttl(key)
    return ttl


def store_block(r: redis.Redis, key: str, seconds: int) -> None:
    """What lua/disconnect.lua stores for a block, without its control message."""
    seconds_now, micros = r.time()
    r.set(key, "{}", ex=seconds)
    r.zadd("SSE:blocks", {key: seconds_now * 1000 + micros // 1000 + seconds * 1000})


def audit_lines(gateway: Gateway) -> list[str]:
    return [line for line in gateway.logs().splitlines() if "sse_gateway.audit" in line]


# ----------------------------------------------------------------------------- kill switch


def test_disconnect_closes_the_players_streams_on_every_instance(
    pair: tuple[Gateway, Gateway], r: redis.Redis, ids: Callable[..., str]
) -> None:
    a, b = pair
    brand, player, other = ids("b"), ids("p"), ids("q")
    kicked_before = [
        gw.metrics().value("sse_gateway_connections_closed_total", reason="kicked") for gw in pair
    ]
    targets = [a.stream(brand, player), b.stream(brand, player), b.stream(brand, player)]
    bystanders = [a.stream(brand, other), b.stream(brand, other)]
    try:
        body = disconnected(
            post_disconnect(a, {"brand_id": brand, "player_id": player, "reason": "account_locked"})
        )
        assert body["receivers"] == 2, body  # one Pub/Sub connection per gateway process
        assert body["blocked"] is False and body["block_expires_in"] is None, body
        for client in targets:
            data = assert_disconnected(client, "account_locked", blocked=False)
            assert "block_seconds" not in data
        # Other players of the brand keep their streams, on both instances.
        publish(r, brand, other, {"type": "still-here", "data": 1})
        for client in bystanders:
            assert read_events(client, 1)[0].event == "still-here"
    finally:
        for client in targets + bystanders:
            client.close()
    assert (
        a.metrics().value("sse_gateway_connections_closed_total", reason="kicked")
        == kicked_before[0] + 1
    )
    assert (
        b.metrics().value("sse_gateway_connections_closed_total", reason="kicked")
        == kicked_before[1] + 2
    )
    # Without a block the player may come back at once, on either instance.
    assert block_ttl(r, brand, player) == -2
    for gateway in pair:
        with gateway.stream(brand, player):
            pass


def test_block_refuses_new_streams_on_every_instance_until_it_ends(
    pair: tuple[Gateway, Gateway], r: redis.Redis, ids: Callable[..., str]
) -> None:
    a, b = pair
    brand, player = ids("b"), ids("p")
    rejected_before = b.metrics().value("sse_gateway_connections_rejected_total", reason="blocked")
    client = b.stream(brand, player)
    with client:
        body = disconnected(
            post_disconnect(
                a,
                {
                    "brand_id": brand,
                    "player_id": player,
                    "reason": "self_exclusion",
                    "block_seconds": 600,
                    "requested_by": "agent-17",
                },
            )
        )
        assert body["blocked"] is True and 599 <= body["block_expires_in"] <= 600, body
        data = assert_disconnected(client, "self_exclusion", blocked=True)
        assert data["block_seconds"] == 600
    assert 590 <= block_ttl(r, brand, player) <= 600
    for gateway in pair:
        # An EventSource's reconnect: a 403 ends it for good (no 200 it would survive).
        for accept in ({}, {"Accept": "text/event-stream"}):
            error = assert_error(sse_get(gateway, brand, player, **accept), 403, "blocked")
            assert "blocked" in error["message"]
    assert (
        b.metrics().value("sse_gateway_connections_rejected_total", reason="blocked")
        >= rejected_before + 2
    )
    # Other players are not blocked.
    with a.stream(brand, ids("other")):
        pass
    # The block ends (here: made to end now) and both instances serve the player again.
    r.pexpire(f"SSE:block:{brand}:{player}", 1)
    for gateway in pair:
        wait_for(lambda g=gateway: sse_get(g, brand, player).status == 200, what="unblocked")


def test_brand_wide_disconnect_with_block(
    pair: tuple[Gateway, Gateway], r: redis.Redis, ids: Callable[..., str]
) -> None:
    a, b = pair
    brand, other_brand = ids("b"), ids("c")
    # A brand whose id starts like the target's is another brand.
    prefixed = brand + "x"
    targets = [a.stream(brand, ids("p")), b.stream(brand, ids("p")), b.stream(brand, ids("p"))]
    bystanders = [a.stream(other_brand, "p1"), b.stream(prefixed, "p1")]
    try:
        body = disconnected(
            post_disconnect(b, {"brand_id": brand, "reason": "maintenance", "block_seconds": 120})
        )
        assert body["player_id"] is None and body["blocked"] is True, body
        for client in targets:
            assert_disconnected(client, "maintenance", blocked=True)
        for client, (brand_id, player) in zip(
            bystanders, [(other_brand, "p1"), (prefixed, "p1")], strict=True
        ):
            publish(r, brand_id, player, {"type": "alive", "data": 0})
            assert read_events(client, 1)[0].event == "alive"
    finally:
        for client in targets + bystanders:
            client.close()
    assert 110 <= block_ttl(r, brand) <= 120
    for gateway in pair:
        assert_error(sse_get(gateway, brand, ids("new")), 403, "blocked")
        assert sse_get(gateway, prefixed, "p2").status == 200
    r.delete(f"SSE:block:{brand}")  # what docs/api.md says lifts a block
    for gateway in pair:
        assert sse_get(gateway, brand, ids("new")).status == 200


def test_a_block_is_lengthened_never_shortened(
    pair: tuple[Gateway, Gateway], r: redis.Redis, ids: Callable[..., str]
) -> None:
    a, _ = pair
    brand, player = ids("b"), ids("p")
    target = {"brand_id": brand, "player_id": player, "reason": "r"}
    disconnected(post_disconnect(a, {**target, "block_seconds": 300}))
    shorter = disconnected(post_disconnect(a, {**target, "block_seconds": 5}))
    assert 295 <= shorter["block_expires_in"] <= 300, shorter
    assert block_ttl(r, brand, player) > 200
    # A kick without block_seconds reports the block still in force.
    plain = disconnected(post_disconnect(a, target))
    assert plain["blocked"] is True and plain["block_expires_in"] > 200, plain
    longer = disconnected(post_disconnect(a, {**target, "block_seconds": 900}))
    assert 895 <= longer["block_expires_in"] <= 900, longer
    assert block_ttl(r, brand, player) > 800


def test_a_block_stored_while_an_instance_could_not_hear_closes_its_streams_after(
    pair: tuple[Gateway, Gateway], r: redis.Redis, ids: Callable[..., str]
) -> None:
    """A disconnect published while an instance's Pub/Sub connection is down never reaches
    it; once it is back, the blocks stored meanwhile close the streams they cover."""
    a, b = pair
    brand, player, other = ids("b"), ids("p"), ids("q")
    with b.stream(brand, player) as client, b.stream(brand, other) as bystander:
        # What a disconnect with a block stores (the key and its index entry); its message
        # went by unheard.
        store_block(r, f"SSE:block:{brand}:{player}", 60)
        assert not client.wait_closed(0.3)
        assert r.client_kill_filter(_type="pubsub") >= 2  # every instance drops and reconnects
        data = assert_disconnected(client, "blocked", blocked=True)
        assert "block_seconds" not in data
        event_id = publish_event(a, brand, other, 7)
        assert read_events(bystander, 1)[0].id == event_id
    assert any("after a broker outage" in line and player in line for line in audit_lines(b))


def test_an_instance_started_after_a_block_refuses_the_player(
    pair: tuple[Gateway, Gateway],
    gateway_factory: GatewayFactory,
    redis_server: RedisServer,
    r: redis.Redis,
    ids: Callable[..., str],
) -> None:
    """A process learns the blocks in force from the index when it connects: it never
    heard their control messages."""
    a, _ = pair
    brand, player, blocked_brand = ids("b"), ids("p"), ids("c")
    target = {"brand_id": brand, "player_id": player, "reason": "r", "block_seconds": 300}
    disconnected(post_disconnect(a, target))
    disconnected(
        post_disconnect(a, {"brand_id": blocked_brand, "reason": "r", "block_seconds": 300})
    )
    scores = dict(r.zrange("SSE:blocks", 0, -1, withscores=True))
    assert f"SSE:block:{brand}:{player}".encode() in scores
    assert f"SSE:block:{blocked_brand}".encode() in scores
    late = gateway_factory(redis=redis_server)
    assert_error(sse_get(late, brand, player), 403, "blocked")
    assert_error(sse_get(late, blocked_brand, ids("p")), 403, "blocked")
    with late.stream(brand, ids("other")):
        pass
    # Lifted by hand (the key only): served again, on every instance.
    r.delete(f"SSE:block:{brand}:{player}")
    for gateway in (*pair, late):
        assert sse_get(gateway, brand, player).status == 200


def test_every_use_is_audited(pair: tuple[Gateway, Gateway], ids: Callable[..., str]) -> None:
    a, _ = pair
    brand, player = ids("b"), ids("p")
    body = {
        "brand_id": brand,
        "player_id": player,
        "reason": 'locked: "fraud" check',
        "block_seconds": 60,
        "requested_by": "ops@casino.example",
    }
    headers = {"Authorization": f"Bearer {KEY}", "X-Forwarded-For": "203.0.113.7"}
    response = a.request("POST", "/v1/disconnect", headers=headers, body=json.dumps(body).encode())
    disconnected(response)
    post_disconnect(a, {"brand_id": brand, "reason": "x"}, key="wrong-key")
    post_disconnect(a, {"brand_id": brand, "reason": ""})

    def logged() -> list[str]:
        return [line for line in audit_lines(a) if brand in line or "refused" in line]

    lines = wait_for(lambda: len(logged()) >= 2 and logged(), what="audit lines")
    done = [line for line in lines if "disconnect:" in line and brand in line]
    assert len(done) == 1, lines
    line = done[0]
    for part in (
        f"brand={brand}",
        f"player={player}",
        'reason="locked: \\"fraud\\" check"',
        "block_seconds=60",
        'requested_by="ops@casino.example"',
        "remote=127.0.0.1",
        'forwarded_for="203.0.113.7"',
        "receivers=2",
        "blocked=yes",
    ):
        assert part in line, (part, line)
    refused = [line for line in audit_lines(a) if "disconnect refused" in line]
    assert any("invalid API key" in line for line in refused), refused
    assert any("reason" in line and "non-empty" in line for line in refused), refused
    # Each instance notes what it closed.
    assert any("disconnect applied" in line and brand in line for line in audit_lines(a))


def test_publishers_cannot_forge_a_disconnected_frame(
    pair: tuple[Gateway, Gateway], ids: Callable[..., str]
) -> None:
    a, _ = pair
    brand, player = ids("b"), ids("p")
    body = {"brand_id": brand, "player_id": player, "type": "disconnected", "data": {}}
    response = a.request(
        "POST",
        "/v1/publish",
        headers={"Authorization": f"Bearer {KEY}"},
        body=json.dumps(body).encode(),
    )
    assert assert_error(response, 400, "invalid_field")["field"] == "type"


BAD_BODIES: list[tuple[str, dict[str, Any]]] = [
    ("brand_id", {"brand_id": None}),
    ("brand_id", {"brand_id": ""}),
    ("brand_id", {"brand_id": "a::b"}),
    ("brand_id", {"brand_id": "a:b"}),
    ("brand_id", {"brand_id": "b*"}),
    ("brand_id", {"brand_id": "x" * 65}),
    ("brand_id", {"brand_id": 7}),
    ("player_id", {"player_id": ""}),
    ("player_id", {"player_id": "p q"}),
    ("player_id", {"player_id": ["p"]}),
    ("player_id", {"player_id": "x" * 65}),
    ("reason", {"reason": None}),
    ("reason", {"reason": ""}),
    ("reason", {"reason": "   "}),
    ("reason", {"reason": 5}),
    ("reason", {"reason": "x" * 257}),
    ("reason", {"reason": "two\nlines"}),
    ("reason", {"reason": "nul\x00"}),
    ("block_seconds", {"block_seconds": -1}),
    ("block_seconds", {"block_seconds": 1.5}),
    ("block_seconds", {"block_seconds": "60"}),
    ("block_seconds", {"block_seconds": True}),
    ("block_seconds", {"block_seconds": 366 * 86_400 + 1}),
    ("requested_by", {"requested_by": ""}),
    ("requested_by", {"requested_by": 3}),
    ("requested_by", {"requested_by": "x" * 129}),
    ("block_second", {"block_second": 60}),
]


@pytest.mark.parametrize(("field", "change"), BAD_BODIES)
def test_invalid_input_is_400_and_does_nothing(
    pair: tuple[Gateway, Gateway],
    r: redis.Redis,
    ids: Callable[..., str],
    field: str,
    change: dict[str, Any],
) -> None:
    a, _ = pair
    brand, player = ids("b"), ids("p")
    body = {"brand_id": brand, "player_id": player, "reason": "r", "block_seconds": 60}
    body = {k: v for k, v in {**body, **change}.items() if v is not None}
    with a.stream(brand, player) as client:
        error = assert_error(post_disconnect(a, body), 400, "invalid_field")
        assert error["field"] == field, error
        assert not client.wait_closed(0.3), "an invalid request closed a stream"
    assert block_ttl(r, brand, player) == -2 and block_ttl(r, brand) == -2


@pytest.mark.parametrize("raw", [b"", b"not json", b"{", b"[1, 2]", b'"text"', b"null"])
def test_body_not_a_json_object(pair: tuple[Gateway, Gateway], raw: bytes) -> None:
    response = post_disconnect(pair[0], None, raw=raw)
    assert response.status == 400, response
    assert response.json()["error"] in ("invalid_json", "invalid_field")


def test_limits_at_the_edge(pair: tuple[Gateway, Gateway], ids: Callable[..., str]) -> None:
    """The longest reason, the largest block and a brand-wide kill without block pass."""
    a, _ = pair
    brand = ids("b")
    body = {"brand_id": brand, "reason": "é" * 256, "block_seconds": 0, "player_id": None}
    assert disconnected(post_disconnect(a, body))["blocked"] is False
    body = {"brand_id": brand, "player_id": "p", "reason": "r", "block_seconds": 366 * 86_400}
    assert disconnected(post_disconnect(a, body))["block_expires_in"] > 366 * 86_400 - 10


@pytest.mark.parametrize(
    "authorization", [None, "", "Bearer", f"Basic {KEY}", f"Bearer {KEY}x", "Bearer wrong", KEY]
)
def test_bad_api_key_is_401(
    pair: tuple[Gateway, Gateway],
    r: redis.Redis,
    ids: Callable[..., str],
    authorization: str | None,
) -> None:
    a, _ = pair
    brand, player = ids("b"), ids("p")
    headers = {} if authorization is None else {"Authorization": authorization}
    body = {"brand_id": brand, "player_id": player, "reason": "r", "block_seconds": 60}
    with a.stream(brand, player) as client:
        response = a.request(
            "POST", "/v1/disconnect", headers=headers, body=json.dumps(body).encode()
        )
        assert_error(response, 401, "invalid_api_key")
        assert (response.header("WWW-Authenticate") or "").startswith("Bearer")
        assert not client.wait_closed(0.3)
    assert block_ttl(r, brand, player) == -2


def test_methods_and_no_key(
    pair: tuple[Gateway, Gateway], gateway: Gateway, ids: Callable[..., str]
) -> None:
    for method in ("GET", "PUT", "DELETE"):
        response = pair[0].request(
            method, "/v1/disconnect", headers={"Authorization": f"Bearer {KEY}"}
        )
        assert_error(response, 405, "method_not_allowed")
        assert response.header("Allow") == "POST"
    # Without SSE_PUBLISH_API_KEY there is no kill switch (as there is no publish API).
    body = json.dumps({"brand_id": ids("b"), "reason": "r"}).encode()
    for authorization in ("Bearer anything", None):
        headers = {} if authorization is None else {"Authorization": authorization}
        response = gateway.request("POST", "/v1/disconnect", headers=headers, body=body)
        assert_error(response, 404, "not_found")


def test_redis_down_is_503(
    gateway_factory: GatewayFactory, fresh_redis: RedisServer, ids: Callable[..., str]
) -> None:
    gateway = gateway_factory("--publish-api-key", KEY, redis=fresh_redis)
    fresh_redis.kill()
    body = {"brand_id": ids("b"), "reason": "r", "block_seconds": 60}
    assert_error(post_disconnect(gateway, body), 503, "broker_unavailable")
    assert any("disconnect failed" in line for line in audit_lines(gateway))


def test_embedded_broker_kill_switch_and_tickets(
    gateway_factory: GatewayFactory, ids: Callable[..., str]
) -> None:
    """Without Redis the one process keeps blocks and tickets in memory."""
    gateway = gateway_factory("--publish-api-key", KEY)
    brand, player = ids("b"), ids("p")
    with gateway.stream(brand, player) as client:
        body = disconnected(
            post_disconnect(
                gateway,
                {"brand_id": brand, "player_id": player, "reason": "lock", "block_seconds": 60},
            )
        )
        assert body["receivers"] == 1 and body["blocked"] is True, body
        assert_disconnected(client, "lock", blocked=True)
    assert_error(sse_get(gateway, brand, player), 403, "blocked")
    assert sse_get(gateway, brand, ids("other")).status == 200
    ticket = issue(gateway, gateway.token(brand, ids("t")))["ticket"]
    with gateway.open(f"/v1/sse?ticket={ticket}") as client:
        assert client.status == 200
        client.wait_connected()
    assert_error(request(gateway.port, "GET", f"/v1/sse?ticket={ticket}"), 401, "invalid_ticket")


# ----------------------------------------------------------------------------- tickets


TICKET = re.compile(r"[A-Za-z0-9_-]{43}")


def issue(gateway: Gateway, token: str, **headers: str) -> dict[str, Any]:
    response = request(
        gateway.port, "POST", "/v1/tickets", {"Authorization": f"Bearer {token}", **headers}
    )
    assert response.status == 200, f"{response.status} {response.body[:300]!r}"
    assert response.header("Cache-Control") == "no-store", response.headers
    body: dict[str, Any] = response.json()
    assert TICKET.fullmatch(body["ticket"]), body
    return body


def ticket_key(ticket: str) -> str:
    return "SSE:ticket:" + hashlib.sha256(ticket.encode()).hexdigest()


def test_a_ticket_opens_one_stream_once_on_any_instance(
    pair: tuple[Gateway, Gateway], r: redis.Redis, ids: Callable[..., str]
) -> None:
    a, b = pair
    brand, player = ids("b"), ids("p")
    body = issue(a, a.token(brand, player))
    ticket = body["ticket"]
    assert body["expires_in"] == 30
    assert 0 < r.ttl(ticket_key(ticket)) <= 30
    assert r.get(f"SSE:ticket:{ticket}") is None  # stored under its hash only
    with b.open(f"/v1/sse?ticket={ticket}") as client:
        assert client.status == 200
        connected = client.wait_connected()
        assert (connected["brand_id"], connected["player_id"]) == (brand, player)
        assert r.exists(ticket_key(ticket)) == 0
        for gateway in pair:  # used: refused everywhere, also as an EventSource would ask
            response = request(
                gateway.port, "GET", f"/v1/sse?ticket={ticket}", {"Accept": "text/event-stream"}
            )
            assert_error(response, 401, "invalid_ticket")
            assert_www_authenticate(response, error="invalid_token")
        publish(r, brand, player, {"type": "n", "data": 1})
        assert read_events(client, 1)[0].json() == 1
    # Tickets and tokens are never logged.
    for gateway in pair:
        logs = gateway.logs()
        assert ticket not in logs and a.token(brand, player).split(".")[2] not in logs


def test_tickets_are_unique(pair: tuple[Gateway, Gateway], ids: Callable[..., str]) -> None:
    a, _ = pair
    token = a.token(ids("b"), ids("p"))
    tickets = {issue(a, token)["ticket"] for _ in range(20)}
    assert len(tickets) == 20


def test_an_expired_ticket_is_refused(
    pair: tuple[Gateway, Gateway], r: redis.Redis, ids: Callable[..., str]
) -> None:
    a, b = pair
    ticket = issue(a, a.token(ids("b"), ids("p")))["ticket"]
    r.pexpire(ticket_key(ticket), 1)  # what 30 s do
    wait_for(lambda: r.exists(ticket_key(ticket)) == 0, what="ticket expired")
    assert_error(request(b.port, "GET", f"/v1/sse?ticket={ticket}"), 401, "invalid_ticket")


def test_a_ticket_never_outlives_its_token(
    pair: tuple[Gateway, Gateway], r: redis.Redis, ids: Callable[..., str]
) -> None:
    a, _ = pair
    token = a.token(ids("b"), ids("p"), ttl=10)
    body = issue(a, token)
    # The token itself is accepted until exp plus the 5 s clock leeway: so is its ticket.
    assert 1 <= body["expires_in"] <= 15, body
    assert 0 < r.ttl(ticket_key(body["ticket"])) <= 15


def test_ticket_with_last_event_id_replays(
    pair: tuple[Gateway, Gateway], r: redis.Redis, ids: Callable[..., str]
) -> None:
    """The reconnect recipe: a new ticket, and the last event id in the query."""
    a, b = pair
    brand, player = ids("b"), ids("p")
    with a.stream(brand, player) as client:
        first = publish_event(a, brand, player, 1)
        assert read_events(client, 1)[0].id == first
    missed = [publish_event(a, brand, player, n) for n in (2, 3)]
    ticket = issue(b, b.token(brand, player))["ticket"]
    with b.open(f"/v1/sse?ticket={ticket}&last_event_id={first}") as client:
        assert client.wait_connected()["recovered"] is True
        assert [e.id for e in read_events(client, 2)] == missed


def publish_event(gateway: Gateway, brand: str, player: str, data: int) -> str:
    body = {"brand_id": brand, "player_id": player, "type": "n", "data": data}
    response = gateway.request(
        "POST",
        "/v1/publish",
        headers={"Authorization": f"Bearer {KEY}"},
        body=json.dumps(body).encode(),
    )
    assert response.status == 202, response
    event_id: str = response.json()["id"]
    return event_id


def test_a_blocked_player_with_a_ticket_is_refused(
    pair: tuple[Gateway, Gateway], ids: Callable[..., str]
) -> None:
    a, b = pair
    brand, player = ids("b"), ids("p")
    ticket = issue(a, a.token(brand, player))["ticket"]
    disconnected(
        post_disconnect(
            a, {"brand_id": brand, "player_id": player, "reason": "r", "block_seconds": 60}
        )
    )
    assert_error(request(b.port, "GET", f"/v1/sse?ticket={ticket}"), 403, "blocked")
    # A page that fetches its own tickets reads the block where an EventSource could not.
    for gateway in pair:
        token = gateway.token(brand, player)
        response = request(
            gateway.port,
            "POST",
            "/v1/tickets",
            {"Authorization": f"Bearer {token}", "Origin": ORIGIN},
        )
        assert_error(response, 403, "blocked")
        assert response.header("Access-Control-Allow-Origin") == ORIGIN


def test_ticket_request_refusals(pair: tuple[Gateway, Gateway], ids: Callable[..., str]) -> None:
    a, _ = pair
    brand, player = ids("b"), ids("p")
    token = a.token(brand, player)
    # Only the header carries the token: the point is to keep it out of URLs.
    response = request(a.port, "POST", f"/v1/tickets?token={token}")
    assert_error(response, 401, "missing_token")
    assert_www_authenticate(response, error=None)
    response = request(a.port, "POST", "/v1/tickets", {"Authorization": "Bearer junk"})
    assert_error(response, 401, "invalid_token")
    expired = a.token(brand, player, ttl=-60)
    response = request(a.port, "POST", "/v1/tickets", {"Authorization": f"Bearer {expired}"})
    assert_error(response, 401, "token_expired")
    response = request(a.port, "POST", "/v1/tickets", {"Authorization": f"Basic {token}"})
    assert_error(response, 401, "invalid_token")
    mismatch = {"Authorization": f"Bearer {token}", "X-Brand-ID": "other"}
    assert_error(request(a.port, "POST", "/v1/tickets", mismatch), 403, "brand_mismatch")
    for method in ("GET", "PUT"):
        response = request(a.port, method, "/v1/tickets", {"Authorization": f"Bearer {token}"})
        assert_error(response, 405, "method_not_allowed")


def test_stream_request_ticket_refusals(
    pair: tuple[Gateway, Gateway], ids: Callable[..., str]
) -> None:
    a, _ = pair
    brand, player = ids("b"), ids("p")
    token = a.token(brand, player)
    unknown = "A" * 43
    for bad in ("", "short", "x" * 44, "A" * 42 + "!", unknown):
        response = request(a.port, "GET", f"/v1/sse?ticket={bad}")
        assert_error(response, 401, "invalid_ticket")
        assert_www_authenticate(response, error="invalid_token")
    ticket = issue(a, token)["ticket"]
    both = f"/v1/sse?ticket={ticket}&token={token}"
    assert_error(request(a.port, "GET", both), 400, "bad_request")
    twice = f"/v1/sse?ticket={ticket}&ticket={ticket}"
    assert_error(request(a.port, "GET", twice), 400, "bad_request")
    mismatch = request(a.port, "GET", f"/v1/sse?ticket={ticket}", {"X-Brand-ID": "other"})
    assert_error(mismatch, 403, "brand_mismatch")
    # That redemption used the ticket up.
    assert_error(request(a.port, "GET", f"/v1/sse?ticket={ticket}"), 401, "invalid_ticket")
    # An Authorization header wins over a ticket, which it leaves unused.
    ticket = issue(a, token)["ticket"]
    other = a.token(brand, "someone-else")
    with a.open(f"/v1/sse?ticket={ticket}", {"Authorization": f"Bearer {other}"}) as client:
        assert client.wait_connected()["player_id"] == "someone-else"
    with a.open(f"/v1/sse?ticket={ticket}") as client:
        assert client.wait_connected()["player_id"] == player


def test_tickets_cors(pair: tuple[Gateway, Gateway], ids: Callable[..., str]) -> None:
    a, _ = pair
    token = a.token(ids("b"), ids("p"))
    preflight = request(
        a.port,
        "OPTIONS",
        "/v1/tickets",
        {
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert preflight.status == 204, preflight
    assert preflight.header("Access-Control-Allow-Origin") == ORIGIN
    assert "POST" in (preflight.header("Access-Control-Allow-Methods") or "")
    assert "Authorization" in (preflight.header("Access-Control-Allow-Headers") or "")
    body = issue(a, token, Origin=ORIGIN)
    response = request(
        a.port, "POST", "/v1/tickets", {"Authorization": f"Bearer {token}", "Origin": ORIGIN}
    )
    assert response.header("Access-Control-Allow-Origin") == ORIGIN
    assert response.header("Access-Control-Allow-Credentials") == "true"
    # A refusal is readable by the page too.
    refused = request(
        a.port, "POST", "/v1/tickets", {"Authorization": "Bearer junk", "Origin": ORIGIN}
    )
    assert_error(refused, 401, "invalid_token")
    assert refused.header("Access-Control-Allow-Origin") == ORIGIN
    assert "WWW-Authenticate" in (refused.header("Access-Control-Expose-Headers") or "")
    # Another origin gets neither a ticket nor CORS headers.
    stranger = {"Authorization": f"Bearer {token}", "Origin": "https://evil.example"}
    response = request(a.port, "POST", "/v1/tickets", stranger)
    assert_error(response, 403, "origin_not_allowed")
    assert response.header("Access-Control-Allow-Origin") is None
    preflight = request(a.port, "OPTIONS", "/v1/tickets", {"Origin": "https://evil.example"})
    assert_error(preflight, 403, "origin_not_allowed")
    # The ticket issued to the allowed origin opens its stream from that origin.
    with a.open(f"/v1/sse?ticket={body['ticket']}", {"Origin": ORIGIN}) as client:
        assert client.status == 200
        assert client.response.header("Access-Control-Allow-Origin") == ORIGIN
        client.wait_connected()


def test_redis_down_tickets_are_503(
    gateway_factory: GatewayFactory, fresh_redis: RedisServer, ids: Callable[..., str]
) -> None:
    gateway = gateway_factory(redis=fresh_redis)
    token = gateway.token(ids("b"), ids("p"))
    ticket = issue(gateway, token)["ticket"]
    fresh_redis.kill()
    response = request(gateway.port, "POST", "/v1/tickets", {"Authorization": f"Bearer {token}"})
    assert_error(response, 503, "broker_unavailable")
    response = request(gateway.port, "GET", f"/v1/sse?ticket={ticket}")
    assert_error(response, 503, "broker_unavailable")
