"""JSON logs on a real gateway and Redis (issue 12, Logs): a whole session with many tokens,
tickets, the publish key and JWT keys-file material, then the gateway's whole output
(stdout and stderr) is read back. Every line is one JSON object with the stable keys, the
stream lines carry their brand, player, connection id, reason and duration, and not one
token, ticket, key or secret appears anywhere in it."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
import redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from support.procs import (
    DEFAULT_SECRET,
    Gateway,
    GatewayFactory,
    RedisServer,
    claims_for,
    wait_for,
)
from support.sse import request

from sse_gateway.logs import STABLE_KEYS

pytestmark = pytest.mark.timeout(180)

PUBLISH_KEY = "log-test-publish-key-" + "k3y" * 10
WRONG_KEY = "log-test-wrong-publish-key-" + "w0ng" * 8
KEYS_FILE_SECRET = "keys-file-hs256-secret-" + "s3cr" * 8
RELOADED_SECRET = "keys-file-reloaded-secret-" + "r3ld" * 8
STREAM_KEYS = ("brand", "player", "conn", "reason", "duration")


def write_keys(path: Path, content: object) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(content))
    os.replace(temporary, path)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def post(gw: Gateway, path: str, key: str, body: object) -> int:
    headers = {**bearer(key), "Content-Type": "application/json"}
    return gw.request("POST", path, headers=headers, body=json.dumps(body).encode()).status


def test_a_whole_session_logs_json_lines_and_no_secret(
    gateway_factory: GatewayFactory,
    redis_server: RedisServer,
    r: redis.Redis,
    tmp_path: Path,
    ids: Callable[..., str],
) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    hs_brand, rsa_brand, brand = ids("hs"), ids("rs"), ids("b")
    keys = tmp_path / "keys.json"
    write_keys(
        keys,
        {
            hs_brand: [{"alg": "HS256", "key": KEYS_FILE_SECRET, "kid": "one"}],
            rsa_brand: [{"alg": "RS256", "key": pem}],
        },
    )
    gw = gateway_factory(
        "--log-format",
        "json",
        "--log-level",
        "DEBUG",
        "--publish-api-key",
        PUBLISH_KEY,
        "--jwt-keys-file",
        str(keys),
        "--keepalive-period",
        "1s",
        redis=redis_server,
        jwt_secret=None,
    )
    secrets = [PUBLISH_KEY, WRONG_KEY, KEYS_FILE_SECRET, RELOADED_SECRET, DEFAULT_SECRET]
    # The PEM's base64 body, line by line: no piece of the key material either.
    secrets += [line for line in pem.splitlines() if line and not line.startswith("-----")]

    def hs_token(player: str, secret: str = KEYS_FILE_SECRET, kid: str = "one") -> str:
        return jwt.encode(
            claims_for(hs_brand, player), secret, algorithm="HS256", headers={"kid": kid}
        )

    def rs_token(player: str) -> str:
        return jwt.encode(claims_for(rsa_brand, player), private, algorithm="RS256")

    tokens: list[str] = []
    opened: list[tuple[str, str]] = []

    def stream(target: str, headers: dict[str, str], who: tuple[str, str]) -> None:
        with gw.open(target, headers) as client:
            assert client.status == 200, client.read_body()
            client.wait_connected()
            opened.append(who)

    # Tokens in the header and in ?token=, from both kinds of key.
    for n in range(6):
        player = f"p{n}"
        token = hs_token(player) if n % 2 else rs_token(player)
        tokens.append(token)
        owner = hs_brand if n % 2 else rsa_brand
        if n % 3:
            stream("/v1/sse", bearer(token), (owner, player))
        else:
            stream(f"/v1/sse?token={token}", {}, (owner, player))

    # Tickets: issued for a token, taken once by ?ticket=, refused the second time.
    tickets: list[str] = []
    for n in range(3):
        token = hs_token(f"t{n}")
        tokens.append(token)
        response = request(gw.port, "POST", "/v1/tickets", bearer(token))
        assert response.status == 200, response.body
        ticket = response.json()["ticket"]
        tickets.append(ticket)
        stream(f"/v1/sse?ticket={ticket}", {}, (hs_brand, f"t{n}"))
        assert request(gw.port, "GET", f"/v1/sse?ticket={ticket}").status == 401

    # Refused tokens: garbage, a wrong secret, an unknown brand; in the header and the query.
    bad = [
        "not.a-valid.token-" + "g4rb" * 8,
        hs_token("x", secret="a-wrong-secret-" + "wr0n" * 8),
        jwt.encode(claims_for(brand, "x"), "unknown-brand-secret-" + "ub" * 16, "HS256"),
    ]
    tokens += bad
    for token in bad:
        assert request(gw.port, "GET", "/v1/sse", bearer(token)).status == 401
        assert request(gw.port, "GET", f"/v1/sse?token={token}").status == 401

    # The publish API with its key and with a wrong one; the kill switch, refused and used.
    live = hs_token("live")
    tokens.append(live)
    with gw.open("/v1/sse", bearer(live)) as client:
        client.wait_connected()
        event = {"brand_id": hs_brand, "player_id": "live", "type": "note", "data": 1}
        assert post(gw, "/v1/publish", PUBLISH_KEY, event) == 202
        client.wait_event("note")
        assert post(gw, "/v1/publish", WRONG_KEY, event) == 401
        kill = {"brand_id": hs_brand, "player_id": "live", "reason": "log test"}
        assert post(gw, "/v1/disconnect", WRONG_KEY, kill) == 401
        assert post(gw, "/v1/disconnect", PUBLISH_KEY, kill) == 200
        client.wait_event("disconnected")
    opened.append((hs_brand, "live"))

    # SIGHUP puts a new secret in force; a token made with it is accepted.
    write_keys(keys, {hs_brand: [{"alg": "HS256", "key": RELOADED_SECRET, "kid": "two"}]})
    gw.signal(signal.SIGHUP)

    def reloaded() -> bool:
        return "reloaded" in gw.logs()

    wait_for(reloaded, what="the reload's log line")
    token = hs_token("after", secret=RELOADED_SECRET, kid="two")
    tokens.append(token)
    stream("/v1/sse", bearer(token), (hs_brand, "after"))

    gw.stop()
    output = gw.logs()

    for secret in [*secrets, *tokens, *tickets]:
        assert secret not in output, f"{secret[:12]}… is in the gateway's output"
    # A JWT's signature alone is the secret part of it.
    for token in tokens:
        assert token.rsplit(".", 1)[-1] not in output

    entries = []
    for line in output.splitlines():
        entry = json.loads(line)  # every line, not only the ones this test expects
        assert isinstance(entry, dict), line
        assert set(STABLE_KEYS) <= set(entry), line
        assert entry["ts"] and entry["level"] and entry["logger"] and entry["event"], line
        entries.append(entry)

    def of(event: str) -> list[dict[str, Any]]:
        return [e for e in entries if e["event"] == event]

    opens, closes = of("stream_open"), of("stream_close")
    assert sorted((e["brand"], e["player"]) for e in opens) == sorted(opened)
    assert sorted((e["brand"], e["player"]) for e in closes) == sorted(opened)
    for entry in opens + closes:
        assert entry["logger"] == "sse_gateway.connection"
        assert entry["conn"] and entry["brand"] and entry["player"], entry
    for entry in closes:
        assert isinstance(entry["duration"], float | int) and entry["duration"] >= 0, entry
        assert entry["reason"], entry
    assert {e["conn"] for e in opens} == {e["conn"] for e in closes}
    assert len({e["conn"] for e in opens}) == len(opened)
    [kicked] = [e for e in closes if e["player"] == "live"]
    assert kicked["reason"] == "kicked"

    [done] = of("disconnect")
    assert (done["brand"], done["player"], done["reason"]) == (hs_brand, "live", "log test")
    assert done["logger"] == "sse_gateway.audit" and done["receivers"] >= 1
    assert [e["reason"] for e in of("disconnect_refused")] == ["invalid_api_key"]
    assert of("disconnect_applied") and of("listening") and of("keys_reload")
    assert of("broker_connected")
