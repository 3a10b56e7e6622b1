"""Who is online (issue 12): `GET /v1/players/{brand}/{player}` across two gateway
processes on one Redis, `GET /v1/stats`, and `online` in the publish answer."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support.asserts import assert_error, assert_retry_after
from support.procs import Gateway, GatewayFactory, RedisServer, running_pair, wait_for
from support.sse import Response, read_events

pytestmark = pytest.mark.timeout(120)

KEY = "presence-api-test-key-0123456789abcdefghij"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def pair(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gateway, Gateway]]:
    """Two gateway processes on one Redis, with the publish API key."""
    flags = ["--redis", redis_server.url, "--publish-api-key", KEY, "--keepalive-period", "1s"]
    with running_pair(flags, workdir=tmp_path_factory.mktemp("presence")) as pair:
        yield pair


def ok(response: Response, status: int = 200) -> dict[str, Any]:
    detail = f"{response.status} {response.body[:300]!r}"
    assert response.status == status, detail
    assert (response.header("Content-Type") or "").startswith("application/json"), detail
    body: dict[str, Any] = response.json()
    return body


def player(gateway: Gateway, brand: str, player_id: str) -> dict[str, Any]:
    return ok(gateway.get(f"/v1/players/{brand}/{player_id}", AUTH))


def complete(gateway: Gateway, brand: str, player_id: str) -> dict[str, Any]:
    """`player()` once every subscribed process answered: a reply may miss the 0.5 s wait on
    a loaded machine, and then the next request is asked (never a pass or fail on time)."""

    def answered() -> dict[str, Any] | None:
        body = player(gateway, brand, player_id)
        return body if body["answered"] >= body["instances"] else None

    found: dict[str, Any] = wait_for(answered, timeout=30, what="every instance answered")
    return found


def stats(gateway: Gateway) -> dict[str, Any]:
    return ok(gateway.get("/v1/stats", AUTH))


def publish(gateway: Gateway, brand: str, player_id: str, n: int) -> dict[str, Any]:
    body = {"brand_id": brand, "player_id": player_id, "type": "n", "data": n}
    headers = {**AUTH, "Content-Type": "application/json"}
    return ok(
        gateway.request("POST", "/v1/publish", headers=headers, body=json.dumps(body).encode()),
        202,
    )


def test_a_player_on_two_instances(pair: tuple[Gateway, Gateway], ids: Callable[..., str]) -> None:
    a, b = pair
    brand, pid = ids("b"), ids("p")
    assert publish(a, brand, pid, 0)["online"] is False  # never connected

    before = time.time()
    clients = [a.stream(brand, pid), a.stream(brand, pid), b.stream(brand, pid)]
    after = time.time()
    try:
        body = complete(a, brand, pid)
        assert body == {
            "brand_id": brand,
            "player_id": pid,
            "online": True,
            "connections": 3,
            "local_connections": 2,
            "instances": 2,
            "answered": 2,
            "since": body["since"],
            "last_event_id": None,  # nothing delivered live to these streams yet
        }
        assert before - 1 <= body["since"] <= after + 1, (before, body, after)

        published = publish(b, brand, pid, 1)
        assert published["online"] is True and published["receivers"] == 2, published
        for client in clients:
            assert read_events(client, 1)[0].id == published["id"]
        # Asked on either instance, the same count, and the event written on both.
        for asker, local in ((a, 2), (b, 1)):
            body = complete(asker, brand, pid)
            assert (body["connections"], body["local_connections"]) == (3, local), body
            assert body["answered"] == 2 and body["instances"] == 2, body
            assert body["last_event_id"] == published["id"], body
            assert before - 1 <= body["since"] <= after + 1, body
    finally:
        for client in clients:
            client.close()

    def gone() -> dict[str, Any] | None:
        body = player(b, brand, pid)
        return body if body["instances"] == 0 else None

    body = wait_for(gone, what="both instances unsubscribed")
    assert body["online"] is False and body["connections"] == 0, body
    assert (body["local_connections"], body["answered"], body["since"]) == (0, 0, None), body
    wait_for(lambda: publish(a, brand, pid, 2)["online"] is False, what="publish says offline")


def test_stats_count_per_brand_and_rates_move(
    pair: tuple[Gateway, Gateway], ids: Callable[..., str]
) -> None:
    a, b = pair
    brand, other = ids("b"), ids("c")
    start = stats(a)
    assert set(start) == {
        "pid",
        "instance",
        "connections",
        "connections_by_brand",
        "subscribed_channels",
        "events_received_per_second",
        "events_delivered_per_second",
        "window_seconds",
    }
    assert start["pid"] == a.pid and start["window_seconds"] == 60
    assert start["instance"] != stats(b)["instance"]
    assert brand not in start["connections_by_brand"]

    p1, p2, p3 = ids("p"), ids("p"), ids("p")
    clients = [a.stream(brand, p1), a.stream(brand, p1), a.stream(brand, p2)]
    clients.append(a.stream(other, p3))
    clients.append(b.stream(brand, p3))  # on the other instance: not counted by `a`
    try:
        now = stats(a)
        assert now["connections_by_brand"][brand] == 3, now
        assert now["connections_by_brand"][other] == 1, now
        assert now["connections"] >= start["connections"] + 4, (start, now)
        assert now["subscribed_channels"] >= start["subscribed_channels"] + 3, (start, now)
        for n in range(20):
            publish(b, brand, p1, n)
        for client in clients[:2]:
            read_events(client, 20)
        moved = stats(a)
        # 20 events received, 40 frames written, within the last minute.
        assert moved["events_received_per_second"] > 0, moved
        assert moved["events_delivered_per_second"] > moved["events_received_per_second"], moved
    finally:
        for client in clients:
            client.close()
    wait_for(lambda: brand not in stats(a)["connections_by_brand"], what="brand gone from stats")


@pytest.mark.parametrize("target", ["/v1/stats", "/v1/players/b/p"], ids=["stats", "players"])
@pytest.mark.parametrize("authorization", [None, "Bearer wrong", KEY, f"Basic {KEY}"])
def test_without_the_key_is_401(
    pair: tuple[Gateway, Gateway], target: str, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = pair[0].get(target, headers)
    assert_error(response, 401, "invalid_api_key")
    assert (response.header("WWW-Authenticate") or "").startswith("Bearer")


@pytest.mark.parametrize(
    ("target", "field"),
    [
        ("/v1/players/b%2Fx/p", "brand_id"),
        ("/v1/players/b:c/p", "brand_id"),
        ("/v1/players/b/p*", "player_id"),
        ("/v1/players/b/", "player_id"),
        (f"/v1/players/b/{'p' * 65}", "player_id"),
        ("/v1/players//p", "brand_id"),
    ],
)
def test_bad_ids_are_400(pair: tuple[Gateway, Gateway], target: str, field: str) -> None:
    response = pair[0].get(target, AUTH)
    assert_error(response, 400, "invalid_field")
    assert response.json()["field"] == field


def test_other_shapes_and_methods(pair: tuple[Gateway, Gateway]) -> None:
    a = pair[0]
    assert_error(a.get("/v1/players/b", AUTH), 404, "not_found")
    assert_error(a.get("/v1/players/b/p/x", AUTH), 404, "not_found")
    for target in ("/v1/stats", "/v1/players/b/p"):
        response = a.request("POST", target, headers=AUTH, body=b"{}")
        assert_error(response, 405, "method_not_allowed")
        assert response.header("Allow") == "GET"


def test_no_key_means_no_endpoints(gateway: Gateway) -> None:
    for target in ("/v1/stats", "/v1/players/b/p"):
        assert_error(gateway.get(target, AUTH), 404, "not_found")


def test_embedded_broker_is_this_process(
    gateway_factory: GatewayFactory, ids: Callable[..., str]
) -> None:
    gateway = gateway_factory("--publish-api-key", KEY)  # no Redis: the embedded broker
    brand, pid = ids("b"), ids("p")
    with gateway.stream(brand, pid), gateway.stream(brand, pid):
        body = player(gateway, brand, pid)
        assert (body["connections"], body["local_connections"]) == (2, 2), body
        assert (body["instances"], body["answered"], body["online"]) == (1, 1, True), body
    body = wait_for(
        lambda: (found := player(gateway, brand, pid))["instances"] == 0 and found,
        what="the embedded broker unsubscribed",
    )
    assert (body["online"], body["connections"], body["answered"]) == (False, 0, 0), body


def test_redis_down_is_503(
    gateway_factory: GatewayFactory, fresh_redis: RedisServer, ids: Callable[..., str]
) -> None:
    gateway = gateway_factory("--publish-api-key", KEY, redis=fresh_redis)
    brand, pid = ids("b"), ids("p")
    assert player(gateway, brand, pid)["online"] is False
    fresh_redis.kill()
    response = gateway.get(f"/v1/players/{brand}/{pid}", AUTH)
    assert_error(response, 503, "broker_unavailable")
    assert_retry_after(response)
    ok(gateway.get("/v1/stats", AUTH))  # this process's own numbers need no Redis


def test_the_first_commands_after_a_redis_restart_succeed(
    gateway_factory: GatewayFactory, fresh_redis: RedisServer, ids: Callable[..., str]
) -> None:
    """A restarted Redis closed the command pool's idle connections, which look open until
    used: each failed its next command (a 503, or a lost presence reply) until the reconnect
    of the Pub/Sub connection began dropping them."""
    gateway = gateway_factory("--publish-api-key", KEY, redis=fresh_redis)
    brand, pid = ids("b"), ids("p")
    assert player(gateway, brand, pid)["online"] is False  # one pooled connection now
    fresh_redis.kill()
    fresh_redis.start()
    wait_for(lambda: gateway.readyz()[0] == 200, timeout=60, what="/readyz 200 after the restart")
    assert player(gateway, brand, pid)["online"] is False  # was 503: the stale connection
    assert publish(gateway, brand, pid, 1)["online"] is False


def test_connections_closed_by_the_redis_idle_timeout_are_not_used(
    gateway_factory: GatewayFactory, fresh_redis: RedisServer, ids: Callable[..., str]
) -> None:
    """Redis' `timeout` (a managed Redis often sets one) closes idle command connections while
    the Pub/Sub connection stays: the pool must not send the next command on one of them."""
    gateway = gateway_factory("--publish-api-key", KEY, redis=fresh_redis)
    brand, pid = ids("b"), ids("p")
    assert player(gateway, brand, pid)["online"] is False  # one pooled connection now
    r = fresh_redis.client()
    try:
        r.config_set("timeout", 1)

        def only_pubsub_and_this_client() -> bool:
            clients = r.client_list(_type="normal")
            return len(clients) == 1  # this client; the gateway's pool connection is gone

        wait_for(only_pubsub_and_this_client, timeout=30, what="redis to close idle clients")
        assert player(gateway, brand, pid)["online"] is False  # was 503: the closed connection
    finally:
        r.config_set("timeout", 0)
        r.close()
