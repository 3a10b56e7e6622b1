"""The Redis ACL users of docs/operations.md ("Redis ACL users"), run as written on a real
Redis: a whole flow works with them (nothing lands in `ACL LOG`), and each is refused what
it does not need."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from support.procs import REPO, Gateway, GatewayFactory, RedisServer, cli, wait_for
from support.sse import is_event, request

from sse_gateway.publish import SyncPublisher

pytestmark = pytest.mark.timeout(120)
KEY = "acl-test-publish-key-0123456789abcdef"
PASSWORDS = {"GATEWAY_PASSWORD": "gw-secret-1", "PUBLISHER_PASSWORD": "pub-secret-2"}


def documented_acl_lines() -> dict[str, str]:
    """The `ACL SETUSER` lines of docs/operations.md, by user name."""
    text = (REPO / "docs" / "operations.md").read_text()
    section = text.split("### Redis ACL users", 1)[1]
    found = {m[1]: m[0] for m in re.finditer(r"^ACL SETUSER (\S+) .*$", section, re.MULTILINE)}
    assert sorted(found) == ["sse-gateway", "sse-publisher"], found
    return found


@pytest.fixture
def acl_redis(fresh_redis: RedisServer) -> Iterator[redis.Redis]:
    """The session's default user (for the checks) on a Redis with the two documented users."""
    admin = fresh_redis.client()
    for line in documented_acl_lines().values():
        for placeholder, password in PASSWORDS.items():
            line = line.replace(placeholder, password)
        assert admin.execute_command(*line.split()) == b"OK"
    admin.execute_command("ACL", "LOG", "RESET")
    admin.config_resetstat()
    try:
        yield admin
    finally:
        admin.close()


def url(server: RedisServer, user: str) -> str:
    password = PASSWORDS["GATEWAY_PASSWORD" if user == "sse-gateway" else "PUBLISHER_PASSWORD"]
    return f"redis://{user}:{password}@127.0.0.1:{server.port}/0"


def post(gateway: Gateway, path: str, body: dict[str, Any]) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    response = gateway.request("POST", path, headers=headers, body=json.dumps(body).encode())
    assert response.status in (200, 202), (response.status, response.body)
    answer: dict[str, Any] = response.json()
    return answer


def test_documented_users_run_a_whole_flow(
    gateway_factory: GatewayFactory,
    fresh_redis: RedisServer,
    acl_redis: redis.Redis,
    ids: Callable[..., str],
) -> None:
    flags = ("--publish-api-key", KEY, "--keepalive-period", "1s")
    gateway = gateway_factory(*flags, redis=url(fresh_redis, "sse-gateway"))
    brand, player = ids("b"), ids("p")
    client, _ = gateway.player_stream(brand, player)

    # Publishes: the library and the CLI as the publisher user, the HTTP API as the gateway.
    publisher = SyncPublisher.from_url(url(fresh_redis, "sse-publisher"))
    try:
        first = str(publisher.publish(brand, player, "lib", 1))
    finally:
        publisher.close()
    argv = ["publish", "--redis", url(fresh_redis, "sse-publisher"), "--brand", brand]
    done = cli(*argv, "--player", player, "--type", "cli", "--data", "2")
    assert done.returncode == 0, done.stderr
    http = post(
        gateway, "/v1/publish", {"brand_id": brand, "player_id": player, "type": "http", "data": 3}
    )
    published = [first, done.stdout.strip(), http["id"]]
    got = [client.read_until(is_event)[-1] for _ in range(3)]
    assert [f.id for f in got] == published

    # Replay with Last-Event-ID (the history read connection).
    again, connected = gateway.player_stream(brand, player, last_id=first)
    assert connected.get("recovered", True) is not False, connected
    assert [again.read_until(is_event)[-1].id for _ in range(2)] == published[1:]

    # Who is online: a query and its replies on the control channel, PUBSUB NUMSUB.
    def online() -> dict[str, Any] | None:
        response = gateway.get(f"/v1/players/{brand}/{player}", {"Authorization": f"Bearer {KEY}"})
        assert response.status == 200, response.body
        body: dict[str, Any] = response.json()
        return body if body["answered"] >= body["instances"] == 1 else None

    assert wait_for(online, timeout=30)["connections"] == 2

    # A connect ticket: SET with a TTL, then GETDEL.
    token = gateway.token(brand, ids("t"))
    response = request(gateway.port, "POST", "/v1/tickets", {"Authorization": f"Bearer {token}"})
    assert response.status == 200, response.body
    with gateway.open(f"/v1/sse?ticket={response.json()['ticket']}") as ticketed:
        assert ticketed.status == 200
        ticketed.wait_connected()

    # The kill switch with a block: disconnect.lua, then a new stream is refused.
    body = {"brand_id": brand, "player_id": player, "reason": "acl", "block_seconds": 60}
    assert post(gateway, "/v1/disconnect", body)["receivers"] == 1
    for stream in (client, again):
        with stream:
            assert stream.wait_closed(15)
            assert stream.frames[-1].event == "disconnected"
    refused = gateway.get("/v1/sse", {"Authorization": f"Bearer {gateway.token(brand, player)}"})
    assert refused.status == 403, refused.body
    # A gateway started now reads the index of blocks (ZRANGE) and refuses the player too.
    second = gateway_factory(*flags, redis=url(fresh_redis, "sse-gateway"))
    refused = second.get("/v1/sse", {"Authorization": f"Bearer {second.token(brand, player)}"})
    assert refused.status == 403, refused.body

    assert acl_redis.execute_command("ACL", "LOG") == []
    # Nothing granted for show: every command of the lists ran in this flow (scripts' calls
    # count in commandstats too). PING is the Pub/Sub keep-alive, every 5 s.
    granted = {
        entry[1:]
        for line in documented_acl_lines().values()
        for entry in line.split()
        if entry.startswith("+")
    }

    def unused() -> set[str]:
        ran = {name.removeprefix("cmdstat_") for name in acl_redis.info("commandstats")}
        return granted - ran

    try:
        wait_for(lambda: not unused(), timeout=20)
    except AssertionError:
        raise AssertionError(f"granted but never used: {sorted(unused())}") from None
    for gw in (gateway, second):
        assert "NOPERM" not in gw.logs() and "Traceback" not in gw.logs()


def _refused(client: redis.Redis, *command: str) -> None:
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.execute_command(*command)


def test_documented_users_are_refused_what_they_do_not_need(
    fresh_redis: RedisServer, acl_redis: redis.Redis
) -> None:
    acl_redis.set("SSE:ticket:abc", "x")
    acl_redis.xadd("SSE::b::p", {"t": "n", "d": "1"})
    publisher = redis.Redis(
        port=fresh_redis.port, username="sse-publisher", password=PASSWORDS["PUBLISHER_PASSWORD"]
    )
    gateway = redis.Redis(
        port=fresh_redis.port, username="sse-gateway", password=PASSWORDS["GATEWAY_PASSWORD"]
    )
    with publisher, gateway:
        _refused(publisher, "SUBSCRIBE", "SSE::b::p")
        _refused(publisher, "PSUBSCRIBE", "SSE::control")
        _refused(publisher, "GET", "SSE:ticket:abc")
        _refused(publisher, "GETDEL", "SSE:ticket:abc")
        _refused(publisher, "XRANGE", "SSE::b::p", "-", "+")
        _refused(publisher, "PUBLISH", "SSE::control", "{}")
        _refused(publisher, "EVAL", "return 1", "0")
        # A script of its own runs with its rights: no read through the back door.
        sha = publisher.script_load("return redis.call('XRANGE', KEYS[1], '-', '+')")
        with pytest.raises(redis.exceptions.ResponseError, match="can't run this command"):
            publisher.evalsha(sha, 1, "SSE::b::p")
        _refused(publisher, "SET", "SSE:block:b", "x")
        # What it is for still works: a plain PUBLISH on a player's channel.
        assert publisher.publish("SSE::b::p", "{}") == 0
        _refused(gateway, "GET", "other")
        _refused(gateway, "PUBLISH", "other", "x")
        _refused(gateway, "KEYS", "*")
        _refused(gateway, "CONFIG", "GET", "maxclients")
        _refused(gateway, "FLUSHALL")
        assert gateway.xrange("SSE::b::p")
    assert acl_redis.get("SSE:ticket:abc") == b"x"
