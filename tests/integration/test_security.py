"""The security suite (issue 10): what an attacker on the internet may try, against a real
gateway and Redis.

Each numbered item of issue 10 has its tests where the behaviour lives; `INDEX` names them
and `test_every_item_of_the_index_exists` keeps it true. This module adds what must keep
holding end to end: frames that cannot be forged through a published message (read with a
conforming WHATWG parser), and 200 players who never see one another's events.
"""

from __future__ import annotations

import ast
import json
import random
from pathlib import Path

import pytest
import redis
from support.procs import Gateway, publish, wait_for
from support.sse import SSEClient
from unit.sse_spec_parser import parse_sse

pytestmark = pytest.mark.timeout(120)

TESTS = Path(__file__).resolve().parents[1]

# Issue 10 item -> the tests that pin it ("path::name").
INDEX: dict[str, list[str]] = {
    "1 pipelined requests never read": [
        "integration/test_dos.py::test_pipelined_requests_never_read_keep_memory_bounded",
        "unit/test_request_reader.py::"
        "test_pipelined_requests_are_not_answered_while_answers_wait_unread",
        "unit/test_request_reader.py::"
        "test_a_client_that_never_reads_its_answers_is_reset_after_the_idle_timeout",
    ],
    "2 endless header value": [
        "integration/test_dos.py::test_a_header_value_without_a_line_end_gets_431_early",
        "unit/test_request_reader.py::test_an_endless_request_head_answers_431_as_it_arrives",
    ],
    "3 half-open sockets, SSE_HEADER_TIMEOUT, slowloris": [
        "integration/test_dos.py::"
        "test_half_open_sockets_lock_out_neither_streams_nor_health_checks",
        "integration/test_dos.py::test_header_timeout_is_configurable",
        "integration/test_dos.py::test_slowloris_with_a_thousand_half_open_sockets",
        "unit/test_request_reader.py::test_a_new_socket_evicts_the_reader_that_waited_longest",
    ],
    "4 Host and Authorization rules of RFC 9112": [
        "unit/test_request_reader.py::test_heads_rfc_9112_refuses_are_400",
    ],
    "5 session lifetime: session_expired, SSE_JWT_MAX_TTL": [
        "integration/test_session_limits.py::"
        "test_a_stream_ends_with_session_expired_and_a_new_token_resumes_it_losing_nothing",
        "integration/test_session_limits.py::"
        "test_default_max_ttl_refuses_tokens_that_expire_more_than_a_day_ahead",
        "integration/test_session_limits.py::test_max_ttl_from_the_environment",
        "integration/test_session_limits.py::"
        "test_chromium_event_source_on_session_expired_and_on_too_many_connections",
    ],
    "6 aud without SSE_JWT_AUDIENCE": [
        "integration/test_http_errors.py::test_audience_and_issuer_are_enforced",
        "unit/test_auth.py::test_a_token_with_an_audience_is_refused_when_none_is_configured",
    ],
    "7 canonical base64url only": [
        "unit/test_auth.py::test_only_the_canonical_spelling_of_each_token_part_verifies",
    ],
    "8 an empty variable is unset": [
        "unit/test_settings.py::test_an_empty_jwt_secret_env_var_is_unset_next_to_a_keys_file",
        "integration/test_config_cli.py::test_empty_jwt_secret_is_refused",
    ],
    "9 key rotation: kid, SIGHUP, JWKS": [
        "integration/test_key_rotation.py::test_sighup_rotates_keys_and_streams_stay_open",
        "integration/test_key_rotation.py::"
        "test_sighup_reaches_every_worker_and_restarted_workers_keep_the_new_keys",
        "integration/test_key_rotation.py::test_jwks_brand_and_early_refresh_on_an_unknown_kid",
        "integration/test_key_rotation.py::"
        "test_jwks_is_refetched_every_period_and_a_failed_fetch_keeps_the_keys",
    ],
    "12 SSE_MAX_CONNECTIONS_PER_PLAYER": [
        "integration/test_session_limits.py::test_the_newest_stream_over_the_per_player_cap_gives_way",
        "integration/test_session_limits.py::test_one_token_cannot_take_every_slot_of_an_instance",
    ],
    "13 per-address connect rate": [
        "integration/test_dos.py::test_connect_rate_per_ip_answers_429_with_retry_after",
        "integration/test_dos.py::test_x_forwarded_for_from_an_untrusted_peer_is_ignored",
        "unit/test_ratelimit.py::test_client_key",
    ],
    "14 CORS headers on errors": [
        "integration/test_clients.py::test_cors_errors_to_an_allowed_origin_are_readable",
    ],
    "15 HEAD answers carry no content": [
        "integration/test_http_errors.py::"
        "test_an_answer_to_head_has_no_content_whatever_its_status",
    ],
    "16 --dev never shows or mints with real keys": [
        "integration/test_config_cli.py::test_dev_mode_refuses_real_keys",
        "integration/test_config_cli.py::test_dev_mode_listens_on_loopback_unless_told",
    ],
    "17 /metrics on a listener of its own": [
        "integration/test_metrics_port.py::test_metrics_are_served_on_the_metrics_port_only",
        "integration/test_metrics_port.py::test_workers_share_the_metrics_port",
    ],
    "tests: fuzz targets of the request reader and the envelope parser": [
        "fuzz/test_fuzz_targets.py::test_seed_corpus_replays_clean",
        "fuzz/test_fuzz_targets.py::test_fuzz_target_briefly",
    ],
    "holds: alg none, algorithm confusion": [
        "integration/test_http_errors.py::test_invalid_token",
        "integration/test_auth_keys.py::test_wrong_key_or_algorithm_is_refused",
    ],
    "holds: id charset": [
        "integration/test_http_errors.py::test_invalid_player_id",
        "integration/test_http_errors.py::test_invalid_brand_id",
    ],
    "holds: frame injection": [
        "integration/test_security.py::test_published_messages_cannot_forge_frames",
        "unit/test_frames.py::test_data_cannot_end_the_frame_or_forge_fields",
    ],
    "holds: no cross-player delivery": [
        "integration/test_security.py::test_200_players_never_receive_one_anothers_events",
    ],
}


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    }


def test_every_item_of_the_index_exists() -> None:
    missing = []
    for item, refs in INDEX.items():
        for ref in refs:
            file, _, name = ref.partition("::")
            path = TESTS / file
            if not path.exists() or name not in _test_names(path):
                missing.append(f"{item}: {ref}")
    assert not missing


# --- frames cannot be forged ----------------------------------------------------------------

FORGERIES = [
    "\n\nevent: close\ndata: {}\n\n",
    "\r\rid: 999-0\r",
    "\r\nretry: 1\r\n\r\n",
    "x\u2028y\u0085z",  # not SSE line breaks: kept as they are
    "\x00nul",
]


def test_published_messages_cannot_forge_frames(gateway: Gateway, r: redis.Redis) -> None:
    client, _ = gateway.player_stream("sec", "forger")
    try:
        wait_for(lambda: r.pubsub_numsub("SSE::sec::forger")[0][1] >= 1)
        sent = []
        for i, text in enumerate(FORGERIES):
            message = {"type": "note", "id": f"f-{i}", "data": {"text": text, "list": [text]}}
            publish(r, "sec", "forger", message)
            sent.append(message)
        # Fields that cannot be sent safely are dropped, not escaped into the stream.
        for bad in (
            {"type": "note\nevent: close", "data": 1},
            {"type": "note", "id": "x\ny", "data": 1},
            {"type": "note", "id": "x\rretry: 1", "data": 1},
            {"type": "close", "data": 1},
        ):
            publish(r, "sec", "forger", bad)
        publish(r, "sec", "forger", {"type": "note", "id": "last", "data": "end"})
        client.read_until(lambda f: f.id == "last", timeout=15)
        parsed = parse_sse(bytes(client.raw))
    finally:
        client.close()
    events = [e for e in parsed.events if e.type != "heartbeat"]
    assert [e.type for e in events] == ["connected"] + ["note"] * (len(FORGERIES) + 1)
    for event, message in zip(events[1:], sent, strict=False):
        assert event.id == message["id"]
        assert json.loads(event.data) == message["data"]
    assert events[-1].id == "last" and json.loads(events[-1].data) == "end"
    assert parsed.retry == 3000  # only the gateway's own retry:


# --- players are isolated ---------------------------------------------------------------------


def test_200_players_never_receive_one_anothers_events(gateway: Gateway, r: redis.Redis) -> None:
    players = [f"iso-{i}" for i in range(200)]
    clients: dict[str, SSEClient] = {}
    try:
        for player in players:
            clients[player], _ = gateway.player_stream("sec", player)
        wait_for(lambda: r.pubsub_numsub(f"SSE::sec::{players[-1]}")[0][1] >= 1)
        order = players * 3
        random.Random(7).shuffle(order)
        for n, player in enumerate(order):
            publish(r, "sec", player, {"type": "mine", "id": f"m-{n}", "data": {"to": player}})
        for player, client in clients.items():
            expected = [f"m-{n}" for n, p in enumerate(order) if p == player]
            got = client.read_until(lambda f, last=expected[-1]: f.id == last, timeout=15)
            mine = [f for f in got if f.event == "mine"]
            assert [f.id for f in mine] == expected
            assert all(f.json()["to"] == player for f in mine)
        # Nothing else arrives late for anyone.
        for client in clients.values():
            assert [f for f in client.drain_available(quiet=0.05) if f.event == "mine"] == []
    finally:
        for client in clients.values():
            client.close()
