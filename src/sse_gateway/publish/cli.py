"""`sse-gateway publish`: one event, through Redis or through a gateway's HTTP API."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

import redis.exceptions

from sse_gateway.publish import (
    DEFAULT_HISTORY_SIZE,
    DEFAULT_HISTORY_TTL,
    InvalidEvent,
    PublishUnavailable,
    SyncPublisher,
    prepare_event,
)
from sse_gateway.settings import OPTIONS, SettingsError, parse_value

EXIT_USAGE = 2
EXIT_UNAVAILABLE = 1


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def publish_command(args: argparse.Namespace) -> int:
    try:
        data = json.loads(args.data)
    except ValueError as exc:
        return _fail(f"--data: invalid value {args.data!r}: not JSON ({exc})")
    try:
        prepare_event(args.brand, args.player, args.event_type, data)
    except InvalidEvent as exc:
        return _fail(str(exc))
    if args.gateway:
        return _via_gateway(args, data)
    address = args.redis or os.environ.get("EVENTS_REDIS_STORAGE")
    if not address:
        return _fail(
            "no Redis: set EVENTS_REDIS_STORAGE or --redis, or use --gateway URL to publish "
            "through a running gateway (the embedded broker lives inside the gateway process)"
        )
    try:
        history: dict[str, Any] = {}
        for attr, flag in (("history_size", "--history-size"), ("history_ttl", "--history-ttl")):
            option = next(o for o in OPTIONS if o.attr == attr)
            raw = getattr(args, attr)
            name = flag if raw is not None else option.env
            raw = raw if raw is not None else os.environ.get(option.env)
            if raw is not None:
                try:
                    history[attr] = parse_value(attr, raw)
                except ValueError as exc:
                    raise SettingsError(name, raw, str(exc)) from exc
        publisher = SyncPublisher.from_url(
            address,
            history_size=history.get("history_size", DEFAULT_HISTORY_SIZE),
            history_ttl=int(history.get("history_ttl", DEFAULT_HISTORY_TTL)),
        )
    except ValueError as exc:  # SettingsError, or a bad Redis address
        return _fail(str(exc))
    except PublishUnavailable as exc:  # a cluster client reads the slots when made
        return _fail(str(exc), EXIT_UNAVAILABLE)
    except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError) as exc:
        # A cluster client connects as it is made (a single Redis only on the publish).
        return _fail(f"redis unavailable: {exc}", EXIT_UNAVAILABLE)
    try:
        event_id = publisher.publish(args.brand, args.player, args.event_type, data)
    except PublishUnavailable as exc:
        return _fail(str(exc), EXIT_UNAVAILABLE)
    finally:
        publisher.close()
    print(event_id)
    print(f"received by {event_id.receivers} gateway process(es)", file=sys.stderr)
    return 0


def _via_gateway(args: argparse.Namespace, data: object) -> int:
    key = args.api_key or os.environ.get("SSE_PUBLISH_API_KEY")
    if not key:
        return _fail("--gateway needs --api-key or SSE_PUBLISH_API_KEY")
    body = json.dumps(
        {"brand_id": args.brand, "player_id": args.player, "type": args.event_type, "data": data}
    ).encode()
    request = urllib.request.Request(
        args.gateway.rstrip("/") + "/v1/publish",
        data=body,
        method="POST",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            print(json.loads(response.read())["id"])
            return 0
    except urllib.error.HTTPError as exc:
        return _fail(f"gateway answered {exc.code}: {exc.read().decode(errors='replace')}", 1)
    except (urllib.error.URLError, OSError) as exc:
        return _fail(f"gateway unreachable: {exc}", EXIT_UNAVAILABLE)
