"""Session lifetime and per-player limits (issue 10 items 5 and 12), on real gateways and Redis.

- A stream ends when its token does: at `exp` (plus the 5 s clock leeway that every `exp`
  check allows) it gets `event: session_expired` and is closed. The same token is refused from
  then on, so an EventSource that reconnects by itself stops (401) instead of looping; a client
  that reconnects with a new token and its last event id loses nothing.
- SSE_JWT_MAX_TTL: a token whose `exp` lies further ahead is refused (401 `invalid_token`).
- SSE_MAX_CONNECTIONS_PER_PLAYER: the newest stream of a player over the cap gives way (a
  `200` with `event: close` `too_many_connections` and a `retry:` of a minute to an
  EventSource, `429` to others); the open ones are never disturbed.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from support.asserts import assert_error, assert_retry_after, assert_www_authenticate
from support.browser import chromium
from support.procs import (
    DEFAULT_SECRET,
    Gateway,
    GatewayFactory,
    RedisServer,
    make_token,
    publish,
    wait_for,
)
from support.sse import SSEClient, SSEEvent, assert_quiet, is_event, read_events, request

from sse_gateway.publish import PUBLISH_SCRIPT, SyncPublisher
from sse_gateway.wire.envelope import RESERVED_TYPES

pytestmark = pytest.mark.timeout(120)

LEEWAY_S = 5
RETRY_MS = 3000  # SSE_RETRY_MS's default
EVENT_STREAM = {"Accept": "text/event-stream"}
#: The `retry:` of a `too_many_connections` refusal: a minute plus 0-10 s of spread.
TOO_MANY_RETRY_MS = 60_000
RETRY_SPREAD_MS = 10_000


def token(brand: str, player: str, exp: float) -> str:
    return make_token(DEFAULT_SECRET, {"brand_id": brand, "sub": player, "exp": exp})


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


class Ticker:
    """Publishes one event every `interval` seconds in a thread, until stopped: events cross
    the moment a stream expires whenever it comes."""

    def __init__(self, publisher: SyncPublisher, brand: str, player: str) -> None:
        self.publisher, self.brand, self.player = publisher, brand, player
        self.ids: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(0.1):
            self.ids.append(str(self.publisher.publish(self.brand, self.player, "tick", n)))
            n += 1

    def __enter__(self) -> Ticker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture
def session_publisher(redis_server: RedisServer) -> Iterator[SyncPublisher]:
    pub = SyncPublisher.from_url(redis_server.url)
    try:
        yield pub
    finally:
        pub.close()


# ----------------------------------------------------------------------------- item 5


@pytest.mark.parametrize("via", ["query", "header"])
def test_a_stream_ends_with_session_expired_and_a_new_token_resumes_it_losing_nothing(
    gateway: Gateway,
    session_publisher: SyncPublisher,
    ids: Callable[..., str],
    via: str,
) -> None:
    publisher = session_publisher
    brand, player = ids("exp-b"), ids("exp-p")
    exp = int(time.time()) + 2
    old = token(brand, player, exp)
    target, headers = (
        ("/v1/sse?token=" + old, EVENT_STREAM)
        if via == "query"
        else (
            "/v1/sse",
            {**EVENT_STREAM, **bearer(old)},
        )
    )
    first = gateway.open(target, headers)
    with first:
        assert first.status == 200
        first.wait_connected()
        before = [str(publisher.publish(brand, player, "before", k)) for k in range(3)]
        assert [e.id for e in read_events(first, 3)] == before
        with Ticker(publisher, brand, player) as ticker:
            # Events keep coming across the expiry: some reach the old stream, the rest
            # must come with the reconnect.
            seen = first.read_until(lambda f: f.event == "session_expired", timeout=30)
            closed_at = time.time()
            at_close = len(ticker.ids)
            wait_for(lambda: len(ticker.ids) >= at_close + 3, what="events after the expiry")
        # Not before the token stops being accepted (exp plus the leeway).
        assert closed_at >= exp + LEEWAY_S
        expired = seen[-1]
        assert expired.event == "session_expired" and expired.has_data
        assert expired.id is None  # the client keeps its last event id
        assert expired.retry == RETRY_MS
        data = expired.json()
        assert set(data) == {"reason", "message"} and data["reason"] == "session_expired"
        assert "token" in data["message"]
        assert first.wait_closed(10)
        assert first.ended, "the chunked body did not end with its last chunk"
        assert [f for f in first.frames if f.event == "session_expired"] == [expired]
        live_before_close = [f.id for f in seen if is_event(f)]
        last_id = first.parser.last_event_id  # what an EventSource sends back
    after = [str(publisher.publish(brand, player, "after", k)) for k in range(3)]

    # An EventSource reconnects by itself with the same URL: the expired token is refused
    # (401 fails it for good: no loop), also when it asks for an event stream.
    for answer in (
        request(gateway.port, "GET", "/v1/sse?token=" + old, EVENT_STREAM),
        request(gateway.port, "GET", "/v1/sse", {**EVENT_STREAM, **bearer(old)}),
    ):
        assert_error(answer, 401, "token_expired")
        assert_www_authenticate(answer, "invalid_token")

    # The page gets a new token and reconnects with its last event id: nothing lost.
    fresh = token(brand, player, time.time() + 600)
    second = gateway.open("/v1/sse", {**EVENT_STREAM, **bearer(fresh), "Last-Event-ID": last_id})
    with second:
        assert second.status == 200
        assert second.wait_connected()["recovered"] is True
        published = before + ticker.ids + after
        assert last_id in published
        missed = published[published.index(last_id) + 1 :]
        replayed = read_events(second, len(missed))
        assert [e.id for e in replayed] == missed
        live = str(publisher.publish(brand, player, "live", 0))
        assert [e.id for e in read_events(second, 1)] == [live]
        assert_quiet(second)
    received = before + live_before_close + [e.id for e in replayed] + [live]
    assert received == before + ticker.ids + after + [live], "lost, repeated or reordered"
    metrics = gateway.metrics()
    assert metrics.value("sse_gateway_connections_closed_total", reason="session_expired") == 1
    assert metrics.value("sse_gateway_connections_rejected_total", reason="token_expired") == 2


@pytest.mark.parametrize("event_type", sorted(RESERVED_TYPES))
def test_publish_lua_refuses_every_reserved_type(
    redis_server: RedisServer, ids: Callable[..., str], event_type: str
) -> None:
    # A publisher must not be able to send a `session_expired` of its own: the page would
    # take it for the gateway's and reconnect.
    r = redis_server.client()
    try:
        key = f"SSE::{ids('lua-b')}::{ids('lua-p')}"
        with pytest.raises(redis.ResponseError, match="reserved"):
            r.eval(PUBLISH_SCRIPT, 1, key, event_type, "1", "10", "60")
        assert r.exists(key) == 0
    finally:
        r.close()


# ----------------------------------------------------------------------------- SSE_JWT_MAX_TTL


def test_default_max_ttl_refuses_tokens_that_expire_more_than_a_day_ahead(
    gateway: Gateway, ids: Callable[..., str]
) -> None:
    brand, player = ids("ttl-b"), ids("ttl-p")
    far = request(
        gateway.port, "GET", "/v1/sse", bearer(token(brand, player, time.time() + 25 * 3600))
    )
    body = assert_error(far, 401, "invalid_token")
    assert "SSE_JWT_MAX_TTL" in body["message"] and "too far ahead" in body["message"]
    assert_www_authenticate(far, "invalid_token")
    with gateway.open("/v1/sse", bearer(token(brand, player, time.time() + 23 * 3600))) as ok:
        assert ok.status == 200
        ok.wait_connected()


def test_max_ttl_from_the_environment(
    gateway_factory: GatewayFactory, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    gw = gateway_factory(redis=redis_server, env={"SSE_JWT_MAX_TTL": "10m"})
    brand, player = ids("ttl-b"), ids("ttl-p")
    refused = request(gw.port, "GET", "/v1/sse", bearer(token(brand, player, time.time() + 660)))
    assert_error(refused, 401, "invalid_token")
    # Not transient: an EventSource gets the 401 too (retrying the same token cannot help).
    refused = request(
        gw.port,
        "GET",
        "/v1/sse",
        {**EVENT_STREAM, **bearer(token(brand, player, time.time() + 660))},
    )
    assert_error(refused, 401, "invalid_token")
    with gw.open("/v1/sse", bearer(token(brand, player, time.time() + 540))) as ok:
        assert ok.status == 200
        ok.wait_connected()
    assert gw.metrics().value("sse_gateway_connections_rejected_total", reason="invalid_token") == 2


# ----------------------------------------------------------------------------- item 12


def assert_too_many_answer(client: SSEClient) -> SSEEvent:
    """The 200 an EventSource survives: one `event: close` (`too_many_connections`) with a
    `retry:` of a minute or more, then the end of the body."""
    assert client.status == 200, client.response
    assert (client.response.header("Content-Type") or "").startswith("text/event-stream")
    assert client.wait_closed(10)
    [frame] = client.frames
    assert frame.event == "close" and frame.id is None
    assert frame.json()["reason"] == "too_many_connections"
    assert "SSE_MAX_CONNECTIONS_PER_PLAYER" in frame.json()["message"]
    assert frame.retry is not None
    assert TOO_MANY_RETRY_MS <= frame.retry < TOO_MANY_RETRY_MS + RETRY_SPREAD_MS
    return frame


def test_the_newest_stream_over_the_per_player_cap_gives_way(
    gateway_factory: GatewayFactory, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    gw = gateway_factory("--max-connections-per-player", "2", redis=redis_server)
    brand, player = ids("cap-b"), ids("cap-p")
    # Two different tokens of one player: the cap counts the player, not the token.
    tabs = [
        gw.open("/v1/sse", {**EVENT_STREAM, **bearer(token(brand, player, time.time() + t))})
        for t in (600, 700)
    ]
    try:
        for tab in tabs:
            assert tab.status == 200
            tab.wait_connected()
        third = gw.open("/v1/sse", {**EVENT_STREAM, **bearer(gw.token(brand, player))})
        with third:
            assert_too_many_answer(third)
        plain = request(gw.port, "GET", "/v1/sse", bearer(gw.token(brand, player)))
        body = assert_error(plain, 429, "too_many_connections")
        assert "SSE_MAX_CONNECTIONS_PER_PLAYER" in body["message"]
        assert assert_retry_after(plain) == TOO_MANY_RETRY_MS // 1000
        # Another player of the same brand is not affected.
        other, _ = gw.player_stream(brand, ids("cap-other"))
        other.close()
        # Nobody was evicted: both open tabs still get events.
        r = redis_server.client()
        publish(r, brand, player, {"type": "still", "data": 1})
        r.close()
        for tab in tabs:
            assert tab.wait_event("still").json() == 1
        metrics = gw.metrics()
        assert (
            metrics.value("sse_gateway_connections_rejected_total", reason="too_many_connections")
            == 2
        )
        assert (
            metrics.value("sse_gateway_connections_closed_total", reason="too_many_connections")
            == 0
        )
        # Once a tab closes, the player gets a stream again.
        tabs[0].close()
        deadline = time.monotonic() + 20
        while True:
            client = gw.open("/v1/sse", {**EVENT_STREAM, **bearer(gw.token(brand, player))})
            with client:
                # Refused, it is a 200 too, with `close` as its first frame.
                if client.status == 200 and client.next_frame(10).event == "connected":
                    break
            assert time.monotonic() < deadline, "no stream 20 s after a tab closed"
            time.sleep(0.2)
    finally:
        for tab in tabs:
            tab.close()


def test_one_token_cannot_take_every_slot_of_an_instance(
    gateway_factory: GatewayFactory, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    # The case: one token opened 60 streams and took all 50 slots. With the default
    # cap (10) it gets 10; the 50 others are refused and the instance still serves others.
    gw = gateway_factory("--connection-limit", "50", redis=redis_server)
    brand, player = ids("greedy-b"), ids("greedy-p")
    greedy = bearer(gw.token(brand, player))
    clients = [gw.open("/v1/sse", {**EVENT_STREAM, **greedy}) for _ in range(60)]
    try:
        served = clients[:10]
        for client in served:
            assert client.status == 200
            client.wait_connected()
        for client in clients[10:]:
            assert_too_many_answer(client)
        others = [gw.player_stream(brand, ids("fair"))[0] for _ in range(5)]
        for client in others:
            client.close()
        metrics = gw.metrics()
        assert (
            metrics.value("sse_gateway_connections_rejected_total", reason="too_many_connections")
            == 50
        )
        assert (
            metrics.value("sse_gateway_connections_rejected_total", reason="connection_limit") == 0
        )
    finally:
        for client in clients:
            client.close()


def test_no_cap_with_zero(
    gateway_factory: GatewayFactory, redis_server: RedisServer, ids: Callable[..., str]
) -> None:
    gw = gateway_factory(redis=redis_server, env={"SSE_MAX_CONNECTIONS_PER_PLAYER": "0"})
    brand, player = ids("nocap-b"), ids("nocap-p")
    clients = [gw.stream(brand, player) for _ in range(12)]
    for client in clients:
        client.close()


# ----------------------------------------------------------------------------- a real EventSource

# Each EventSource of the page logs what it sees under its name. `handles` says whether the
# page follows docs/api.md on `session_expired`: close the EventSource, and open a new one
# with a new token and `last_event_id` (an EventSource sends no Last-Event-ID of its own the
# first time), which the test hands over as `window.__renew(url)`.
PAGE_SCRIPT = """
([name, url, handles]) => {
  window.__log = window.__log || {};
  window.__renew = window.__renew || {};
  const log = (window.__log[name] = window.__log[name] || []);
  const open = (target) => {
    const source = new EventSource(target);
    window["__" + name] = source;
    source.onopen = () => log.push({kind: "open"});
    source.onerror = () => log.push({kind: "error", readyState: source.readyState});
    for (const type of ["connected", "n", "close", "session_expired"]) {
      source.addEventListener(type, (e) => {
        log.push({kind: "event", type: e.type, data: e.data, id: e.lastEventId});
        if (type === "session_expired" && handles) {
          source.close();
          log.push({kind: "renew", lastId: e.lastEventId});
        }
      });
    }
  };
  window.__renew[name] = open;
  open(url);
  return true;
}
"""


def page_log(page: Any, name: str) -> list[dict[str, Any]]:
    log: list[dict[str, Any]] = page.evaluate(f"window.__log[{json.dumps(name)}] || []")
    return log


def wait_log(page: Any, name: str, predicate: Callable[[list[dict[str, Any]]], Any]) -> Any:
    try:
        return wait_for(lambda: predicate(page_log(page, name)), timeout=30, what=name)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nlog: {page_log(page, name)}") from None


def kinds(log: list[dict[str, Any]], kind: str, type_: str | None = None) -> list[dict[str, Any]]:
    return [r for r in log if r["kind"] == kind and type_ in (None, r.get("type"))]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as instance:
        yield instance


@pytest.mark.browser
def test_chromium_event_source_on_session_expired_and_on_too_many_connections(
    browser: Any,
    gateway_factory: GatewayFactory,
    redis_server: RedisServer,
    session_publisher: SyncPublisher,
    ids: Callable[..., str],
) -> None:
    """Chromium's own EventSource. A page that handles `session_expired` as documented
    resumes with a new token and misses nothing; one that does not reconnects once with the
    expired token, gets 401 and stops (no loop). A tab refused by the per-player cap gets its
    `close` event and stays CONNECTING, asking again only after its long `retry:`."""
    publisher = session_publisher
    gw = gateway_factory(
        "--retry-ms", "200", "--max-connections-per-player", "2", redis=redis_server
    )
    brand, player = ids("chr-b"), ids("chr-p")
    short = token(brand, player, int(time.time()) + 1)
    page = browser.new_page()
    try:
        page.goto(f"{gw.url}/healthz")
        for name, handles in (("renewing", True), ("ignoring", False)):
            page.evaluate(PAGE_SCRIPT, [name, f"/v1/sse?token={short}", handles])
            wait_log(page, name, lambda log: kinds(log, "event", "connected"))
        before = str(publisher.publish(brand, player, "n", 0))
        renew = wait_log(page, "renewing", lambda log: kinds(log, "renew"))[-1]
        assert renew["lastId"] == before
        missed = str(publisher.publish(brand, player, "n", 1))
        fresh = token(brand, player, time.time() + 600)
        page.evaluate(
            "([name, url]) => window.__renew[name](url)",
            ["renewing", f"/v1/sse?token={fresh}&last_event_id={renew['lastId']}"],
        )
        wait_log(page, "renewing", lambda log: len(kinds(log, "event", "n")) >= 2)
        live = str(publisher.publish(brand, player, "n", 2))
        renewing = wait_log(
            page, "renewing", lambda log: len(kinds(log, "event", "n")) >= 3 and log
        )
        # The one that ignores the event comes back with its expired token: 401, CLOSED.
        ignoring = wait_log(
            page, "ignoring", lambda log: log[-1] == {"kind": "error", "readyState": 2} and log
        )

        # The cap: "renewing" holds one stream; two more tabs are one too many.
        for name in ("second", "third"):
            page.evaluate(PAGE_SCRIPT, [name, f"/v1/sse?token={fresh}", False])
        wait_log(page, "second", lambda log: kinds(log, "event", "connected"))
        refused = wait_log(page, "third", lambda log: kinds(log, "event", "close") and log)
        time.sleep(2)  # ten times SSE_RETRY_MS: a tab told the plain retry would be back
        third_state = page.evaluate("window.__third.readyState")
        third_log = page_log(page, "third")
        rejected = gw.metrics().value(
            "sse_gateway_connections_rejected_total", reason="too_many_connections"
        )
        for name in ("renewing", "second", "third"):
            page.evaluate(f"window.__{name}.close()")
    finally:
        page.close()

    assert [e["id"] for e in kinds(renewing, "event", "n")] == [before, missed, live], renewing
    connected = kinds(renewing, "event", "connected")
    assert len(connected) == 2 and json.loads(connected[1]["data"])["recovered"] is True
    [expired] = kinds(renewing, "event", "session_expired")
    assert json.loads(expired["data"])["reason"] == "session_expired"

    # Its stream ended (error, CONNECTING), its one reconnect was refused (error, CLOSED).
    assert [(r["kind"], r.get("type"), r.get("readyState")) for r in ignoring] == [
        ("open", None, None),
        ("event", "connected", None),
        ("event", "n", None),
        ("event", "session_expired", None),
        ("error", None, 0),
        ("error", None, 2),
    ], ignoring
    assert gw.metrics().value("sse_gateway_connections_rejected_total", reason="token_expired") == 1

    [close] = kinds(refused, "event", "close")
    assert json.loads(close["data"])["reason"] == "too_many_connections"
    assert third_state == 0, third_log  # CONNECTING: it will ask again, not fail for good
    assert not kinds(third_log, "event", "connected"), third_log
    assert rejected == 1  # asked once in 2 s: no reconnect loop
