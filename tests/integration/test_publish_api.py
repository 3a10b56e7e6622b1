"""POST /v1/publish: auth, validation, batches, size limits, Redis down, and delivery."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from support.asserts import assert_error, assert_retry_after
from support.procs import Gateway, GatewayFactory, RedisServer, running_gateway, wait_for
from support.sse import Response, read_events

pytestmark = pytest.mark.timeout(90)

KEY = "publish-api-test-key-0123456789abcdefghij"
STREAM_ID = re.compile(r"\d+-\d+")


@pytest.fixture(scope="module")
def gw(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One gateway with the publish API for the tests that do not break anything."""
    workdir: Path = tmp_path_factory.mktemp("publish-api")
    flags = ["--redis", redis_server.url, "--publish-api-key", KEY, "--keepalive-period", "1s"]
    with running_gateway(flags, workdir=workdir) as gateway:
        yield gateway


def post(
    gateway: Gateway,
    body: Any,
    *,
    key: str | None = KEY,
    authorization: str | None = None,
    raw: bytes | None = None,
) -> Response:
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    elif key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = raw if raw is not None else json.dumps(body).encode()
    return gateway.request("POST", "/v1/publish", headers=headers, body=data, timeout=30)


def event(brand: str, player: str, type_: str = "notification", data: Any = None) -> dict[str, Any]:
    return {"brand_id": brand, "player_id": player, "type": type_, "data": data}


def accepted(response: Response) -> dict[str, Any]:
    detail = f"{response.status} {response.body[:300]!r}"
    assert response.status == 202, detail
    assert (response.header("Content-Type") or "").startswith("application/json"), detail
    body: dict[str, Any] = response.json()
    return body


def history_len(r: redis.Redis, brand: str, player: str) -> int:
    length: int = r.xlen(f"SSE::{brand}::{player}")
    return length


# --------------------------------------------------------------------------- availability


def test_no_key_means_no_endpoint(gateway: Gateway) -> None:
    for authorization in (None, "Bearer anything"):
        response = post(gateway, event("b", "p", data=1), key=None, authorization=authorization)
        assert_error(response, 404, "not_found")
    assert_error(gateway.get("/v1/publish"), 404, "not_found")


def test_other_methods_are_405(gw: Gateway) -> None:
    for method in ("GET", "PUT", "DELETE"):
        response = gw.request(method, "/v1/publish", headers={"Authorization": f"Bearer {KEY}"})
        assert_error(response, 405, "method_not_allowed")
        assert "POST" in (response.header("Allow") or "")


# --------------------------------------------------------------------------- auth


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        f"Basic {KEY}",
        f"Bearer {KEY}x",
        f"Bearer {KEY[:-1]}",
        f"Bearer {KEY.upper()}",
        "Bearer wrong",
        KEY,
    ],
)
def test_bad_api_key_is_401_and_publishes_nothing(
    gw: Gateway, r: redis.Redis, ids: Callable[..., str], authorization: str | None
) -> None:
    brand, player = ids("b"), ids("p")
    headers = {} if authorization is None else {"Authorization": authorization}
    body = json.dumps(event(brand, player, data=1)).encode()
    response = gw.request("POST", "/v1/publish", headers=headers, body=body)
    assert_error(response, 401, "invalid_api_key")
    assert (response.header("WWW-Authenticate") or "").startswith("Bearer")
    assert history_len(r, brand, player) == 0


def test_scheme_is_case_insensitive(gw: Gateway, ids: Callable[..., str]) -> None:
    response = post(gw, event(ids("b"), ids("p"), data=1), authorization=f"bearer {KEY}")
    assert STREAM_ID.fullmatch(accepted(response)["id"])


# --------------------------------------------------------------------------- publishing


def test_single_event_is_stored_published_and_delivered(
    gw: Gateway, r: redis.Redis, ids: Callable[..., str]
) -> None:
    brand, player = ids("b"), ids("p")
    nobody = accepted(post(gw, event(brand, player, data={"n": 0})))
    assert STREAM_ID.fullmatch(nobody["id"]), nobody
    assert nobody["receivers"] == 0 and nobody["online"] is False
    with gw.stream(brand, player) as client:
        data = {"title": "Bonus! ✓", "amount": 12.5, "tags": ["a", "b"], "none": None}
        body = accepted(post(gw, event(brand, player, "bonus.credited:v1", data)))
        assert body["receivers"] == 1 and body["online"] is True
        [got] = read_events(client, 1)
    assert (got.id, got.event, got.json()) == (body["id"], "bonus.credited:v1", data)
    entries = r.xrange(f"SSE::{brand}::{player}")
    assert [e[0].decode() for e in entries] == [nobody["id"], body["id"]]
    fields = entries[1][1]
    assert fields[b"t"] == b"bonus.credited:v1"
    assert json.loads(fields[b"d"]) == data
    assert r.ttl(f"SSE::{brand}::{player}") > 0


@pytest.mark.parametrize("data", [None, 0, -1.5, True, "text", "", [], {}, [1, [2, {"x": None}]]])
def test_any_json_data(gw: Gateway, ids: Callable[..., str], data: Any) -> None:
    brand, player = ids("b"), ids("p")
    with gw.stream(brand, player) as client:
        body = accepted(post(gw, event(brand, player, data=data)))
        [got] = read_events(client, 1)
    assert got.id == body["id"]
    assert got.json() == data


def test_batch(gw: Gateway, r: redis.Redis, ids: Callable[..., str]) -> None:
    brand, p1, p2 = ids("b"), ids("p"), ids("q")
    batch = [event(brand, p1 if n % 3 else p2, "n", n) for n in range(9)]
    batch.append(event(brand, ids("nobody"), "n", 9))
    with gw.stream(brand, p1) as c1, gw.stream(brand, p2) as c2:
        body = accepted(post(gw, batch))
        assert set(body) == {"ids", "online"}
        assert len(body["ids"]) == 10
        # Online: each event's player has a stream (the last one's player never connected).
        assert body["online"] == [True] * 9 + [False]
        assert all(STREAM_ID.fullmatch(i) for i in body["ids"])
        got1, got2 = read_events(c1, 6), read_events(c2, 3)
    expected1 = [
        (i, b["data"]) for i, b in zip(body["ids"], batch, strict=True) if b["player_id"] == p1
    ]
    expected2 = [
        (i, b["data"]) for i, b in zip(body["ids"], batch, strict=True) if b["player_id"] == p2
    ]
    assert [(e.id, e.json()) for e in got1] == expected1
    assert [(e.id, e.json()) for e in got2] == expected2
    assert history_len(r, brand, p1) == 6
    assert history_len(r, brand, p2) == 3


def test_batch_of_1000_accepted_1001_refused(
    gw: Gateway, r: redis.Redis, ids: Callable[..., str]
) -> None:
    brand, player = ids("b"), ids("p")
    body = accepted(post(gw, [event(brand, player, "n", n) for n in range(1000)]))
    assert len(body["ids"]) == len(set(body["ids"])) == 1000
    sid = [tuple(int(x) for x in i.split("-")) for i in body["ids"]]
    assert sid == sorted(sid)
    assert history_len(r, brand, player) == 101  # the history size (default 100), + 1

    other = ids("p")
    refused = post(gw, [event(brand, other, "n", n) for n in range(1001)])
    assert_error(refused, 400, "invalid_batch")
    assert_error(post(gw, []), 400, "invalid_batch")
    assert history_len(r, brand, other) == 0


@pytest.mark.parametrize(
    "raw", [b"", b"not json", b"{", b'{"brand_id": "b",}', b"\xff\xfe{}", b"[1, 2", b"NaN x"]
)
def test_body_not_json(gw: Gateway, raw: bytes) -> None:
    assert_error(post(gw, None, raw=raw), 400, "invalid_json")


BAD_FIELDS: list[tuple[str, dict[str, Any]]] = [
    ("brand_id", {"brand_id": None}),
    ("brand_id", {"brand_id": ""}),
    ("brand_id", {"brand_id": "a::b"}),
    ("brand_id", {"brand_id": "a b"}),
    ("brand_id", {"brand_id": "b*"}),
    ("brand_id", {"brand_id": "x" * 65}),
    ("brand_id", {"brand_id": 7}),
    ("brand_id", {"brand_id": "é"}),
    ("player_id", {"player_id": None}),
    ("player_id", {"player_id": ""}),
    ("player_id", {"player_id": "p::q"}),
    ("player_id", {"player_id": "p?"}),
    ("player_id", {"player_id": "x" * 65}),
    ("player_id", {"player_id": ["p"]}),
    ("type", {"type": None}),
    ("type", {"type": ""}),
    ("type", {"type": "has space"}),
    ("type", {"type": "line\nbreak"}),
    ("type", {"type": "x" * 65}),
    ("type", {"type": 3}),
    ("type", {"type": "connected"}),
    ("type", {"type": "heartbeat"}),
    ("type", {"type": "error"}),
    ("type", {"type": "close"}),
    ("type", {"type": "disconnected"}),
]


@pytest.mark.parametrize(("field", "change"), BAD_FIELDS)
def test_invalid_field_is_named(
    gw: Gateway, r: redis.Redis, ids: Callable[..., str], field: str, change: dict[str, Any]
) -> None:
    brand, player = ids("b"), ids("p")
    body = {**event(brand, player, data=1), **change}
    body = {k: v for k, v in body.items() if v is not None}
    error = assert_error(post(gw, body), 400, "invalid_field")
    assert error["field"] == field
    assert history_len(r, brand, player) == 0


def test_missing_data_is_named(gw: Gateway, r: redis.Redis, ids: Callable[..., str]) -> None:
    brand, player = ids("b"), ids("p")
    body = {"brand_id": brand, "player_id": player, "type": "n"}
    assert assert_error(post(gw, body), 400, "invalid_field")["field"] == "data"
    assert history_len(r, brand, player) == 0


@pytest.mark.parametrize("body", [42, "text", None, True])
def test_body_not_an_object(gw: Gateway, body: Any) -> None:
    response = post(gw, body)
    assert response.status == 400, response
    assert response.json()["error"] in ("invalid_field", "invalid_json", "invalid_batch")


def test_one_bad_event_refuses_the_whole_batch(
    gw: Gateway, r: redis.Redis, ids: Callable[..., str]
) -> None:
    brand, player = ids("b"), ids("p")
    batch = [event(brand, player, "n", n) for n in range(5)]
    batch[3]["type"] = "heartbeat"
    error = assert_error(post(gw, batch), 400, "invalid_field")
    assert error["field"] == "type"
    assert "[3]" in error["message"]
    batch[3] = "not an object"  # type: ignore[call-overload]
    assert post(gw, batch).status == 400
    assert history_len(r, brand, player) == 0


def test_too_large_event_is_413(gw: Gateway, r: redis.Redis, ids: Callable[..., str]) -> None:
    brand, player = ids("b"), ids("p")
    big = "x" * 70_000  # over the default SSE_MAX_EVENT_BYTES of 65536
    assert_error(post(gw, event(brand, player, data=big)), 413, "payload_too_large")
    batch = [event(brand, player, data=1), event(brand, player, data=big)]
    assert_error(post(gw, batch), 413, "payload_too_large")
    assert history_len(r, brand, player) == 0
    # well under the limit is fine
    accepted(post(gw, event(brand, player, data="x" * 30_000)))


def test_accepted_means_delivered_near_the_size_limit(
    gateway_factory: GatewayFactory, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    """An event the API accepts must not be dropped by the gateway as too large."""
    gateway = gateway_factory(
        "--publish-api-key", KEY, "--max-event-bytes", "1024", redis=redis_server
    )
    brand, player = ids("b"), ids("p")
    outcomes: dict[int, int] = {}
    with gateway.stream(brand, player) as client:
        for size in range(880, 1040, 4):
            for char in ("x", "é"):  # é: two bytes in UTF-8
                text = char * (size // len(char.encode()))
                response = post(gateway, event(brand, player, "n", text))
                outcomes[response.status] = outcomes.get(response.status, 0) + 1
                if response.status == 413:
                    continue
                body = accepted(response)
                [got] = read_events(client, 1)
                assert (got.id, got.json()) == (body["id"], text), f"{size} bytes of {char!r}"
        # a request body far over what any batch may hold
        huge = post(gateway, [event(brand, player, "n", "x" * 900)] * 2000)
        assert_error(huge, 413, "payload_too_large")
    assert outcomes.get(202) and outcomes.get(413), outcomes
    assert gateway.metrics().value("sse_gateway_events_dropped_total", reason="too_large") == 0


def test_published_counter(gw: Gateway, ids: Callable[..., str]) -> None:
    before = gw.metrics().value("sse_gateway_events_published_total")
    accepted(post(gw, [event(ids("b"), ids("p"), "n", n) for n in range(3)]))
    accepted(post(gw, event(ids("b"), ids("p"), "n", 0)))
    assert gw.metrics().value("sse_gateway_events_published_total") == before + 4


# --------------------------------------------------------------------------- Redis down


def test_redis_down_is_503_then_recovers(
    gateway_factory: GatewayFactory, fresh_redis: RedisServer, ids: Callable[..., str]
) -> None:
    gateway = gateway_factory("--publish-api-key", KEY, redis=fresh_redis)
    brand, player = ids("b"), ids("p")
    accepted(post(gateway, event(brand, player, data=0)))
    fresh_redis.kill()
    for body in (event(brand, player, data=1), [event(brand, player, data=2)]):
        response = post(gateway, body)
        assert_error(response, 503, "broker_unavailable")
        assert_retry_after(response)
    fresh_redis.start()
    wait_for(lambda: gateway.readyz()[0] == 200, timeout=30, what="gateway reconnected")
    # nothing of what was refused got stored: the restarted Redis has only what follows
    wait_for(lambda: post(gateway, event(brand, player, data=3)).status == 202, timeout=30)
    client = fresh_redis.client()
    try:
        stored = [json.loads(f[b"d"]) for _, f in client.xrange(f"SSE::{brand}::{player}")]
    finally:
        client.close()
    assert 1 not in stored and 2 not in stored
    assert stored[-1] == 3
