"""`sse-gateway serve`, `token`, `publish` and `publish-script`."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Sequence

from sse_gateway import __version__
from sse_gateway.edge.auth import make_token, random_secret
from sse_gateway.logs import configure_logging
from sse_gateway.settings import OPTIONS, Settings, SettingsError, load_settings, parse_value

log = logging.getLogger("sse_gateway")

EXIT_USAGE = 2
DEV_BRAND = "demo"
DEV_PLAYER = "player-1"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sse-gateway", description="Server-Sent Events gateway fed by Redis Pub/Sub."
    )
    parser.add_argument("--version", action="version", version=f"sse-gateway {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the gateway",
        description="Run the gateway. Every flag overrides the environment variable named.",
    )
    for option in OPTIONS:
        serve.add_argument(option.flag, dest=option.attr, metavar="VALUE", help=_help(option))
    serve.add_argument(
        "--dev",
        action="store_true",
        help="development mode: throwaway JWT secret and publish key, sample token, demo page",
    )

    token = commands.add_parser("token", help="print a player token signed with SSE_JWT_SECRET")
    token.add_argument("--brand", required=True, help="brand id")
    token.add_argument("--player", required=True, help="player id (the token's sub)")
    token.add_argument("--ttl", type=float, default=3600.0, help="seconds until expiry")
    token.add_argument("--secret", help="HS256 secret (default: $SSE_JWT_SECRET)")
    publish = commands.add_parser(
        "publish",
        help="publish an event for a player (history + PUBLISH); prints its id",
        description="Publish through Redis (EVENTS_REDIS_STORAGE / --redis), or through a "
        "running gateway's POST /v1/publish (--gateway URL, with SSE_PUBLISH_API_KEY).",
    )
    publish.add_argument("--brand", required=True, help="brand id")
    publish.add_argument("--player", required=True, help="player id")
    publish.add_argument("--type", required=True, dest="event_type", help="event type")
    publish.add_argument("--data", required=True, help="event data as JSON")
    publish.add_argument("--redis", help="Redis address (default: $EVENTS_REDIS_STORAGE)")
    publish.add_argument("--gateway", help="base URL of a gateway, e.g. http://127.0.0.1:8080")
    publish.add_argument("--api-key", help="publish API key (default: $SSE_PUBLISH_API_KEY)")
    publish.add_argument("--history-size", help="default 100 (env SSE_HISTORY_SIZE)")
    publish.add_argument("--history-ttl", default=None, help="e.g. 24h (env SSE_HISTORY_TTL)")
    script = commands.add_parser(
        "publish-script",
        help="print the shipped publish.lua, for publishers in other languages",
        description="Print publish.lua (SCRIPT LOAD it, then EVALSHA), its path or its SHA1.",
    )
    shown = script.add_mutually_exclusive_group()
    shown.add_argument("--path", action="store_true", help="print the file's path instead")
    shown.add_argument("--sha", action="store_true", help="print its SHA1 (EVALSHA) instead")
    return parser


def _help(option: object) -> str:
    from sse_gateway.settings import Option

    assert isinstance(option, Option)
    default = default_text(option.attr)
    if default is None:
        return f"{option.help} (env {option.env})"
    return f"{option.help} (env {option.env}; default {default})"


def default_text(attr: str) -> str | None:
    """The default of setting `attr` as it would be typed (`10s`, `50000`, `INFO`), or None
    when it has none to show (unset, empty). What is shown always parses back to the default."""
    value = getattr(Settings(), attr)
    if value is None or value == () or value == frozenset() or isinstance(value, bool):
        return None
    if isinstance(value, float):
        number = str(int(value)) if value.is_integer() else repr(value)
        duration = _duration_text(value)
        try:
            if parse_value(attr, duration) == value:
                return duration
        except ValueError:
            pass  # not a duration (a rate)
        return number
    return str(value)


def _duration_text(seconds: float) -> str:
    """`10s`, `5m`, `24h`, `500ms`: the largest unit that divides `seconds` exactly."""
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if seconds and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    if seconds == 0:
        return "0s"
    milliseconds = seconds * 1000
    return f"{int(milliseconds) if milliseconds.is_integer() else milliseconds}ms"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "token":
        return _token(args)
    if args.command == "publish-script":
        return _publish_script(args)
    if args.command == "publish":
        from sse_gateway.publish.cli import publish_command

        return publish_command(args)
    return _serve(args)


def _token(args: argparse.Namespace) -> int:
    secret = args.secret or os.environ.get("SSE_JWT_SECRET")
    if not secret:
        print("error: no secret: set SSE_JWT_SECRET or pass --secret", file=sys.stderr)
        return EXIT_USAGE
    if args.ttl <= 0:
        print(f"error: --ttl: invalid value {args.ttl!r}: must be positive", file=sys.stderr)
        return EXIT_USAGE
    try:
        print(make_token(secret, args.brand, args.player, args.ttl))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def _publish_script(args: argparse.Namespace) -> int:
    from sse_gateway.publish import PUBLISH_SCRIPT, PUBLISH_SCRIPT_PATH, PUBLISH_SCRIPT_SHA

    if args.path:
        print(PUBLISH_SCRIPT_PATH)
    elif args.sha:
        print(PUBLISH_SCRIPT_SHA)
    else:
        sys.stdout.write(PUBLISH_SCRIPT)
    return 0


def _serve(args: argparse.Namespace) -> int:
    flags = {option.attr: getattr(args, option.attr) for option in OPTIONS}
    try:
        settings = load_settings(os.environ, flags, dev=args.dev)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if settings.dev:
        real = [
            name
            for name, value in (
                ("SSE_JWT_SECRET", settings.jwt_secret),
                ("SSE_JWT_KEYS_FILE", settings.jwt_keys_file),
                ("SSE_PUBLISH_API_KEY", settings.publish_api_key),
            )
            if value
        ]
        if real:
            # Dev mode hands out a sample token and the publish key (banner, /demo): with real
            # keys that would mint real tokens for anyone who reaches the page.
            print(
                f"error: --dev makes throwaway keys and shows them; unset {', '.join(real)} "
                "or run without --dev",
                file=sys.stderr,
            )
            return EXIT_USAGE
        if flags.get("host") is None and not os.environ.get("SSE_HOST"):
            settings = settings.replace(host="127.0.0.1")  # loopback unless told otherwise
    if settings.jwt_secret is None and not settings.jwt_keys:
        if not settings.dev:
            print(
                "error: no token key: set SSE_JWT_SECRET or SSE_JWT_KEYS_FILE "
                "(or run with --dev for a throwaway secret)",
                file=sys.stderr,
            )
            return EXIT_USAGE
        settings = settings.replace(jwt_secret=random_secret())
    if settings.dev and settings.publish_api_key is None:
        settings = settings.replace(publish_api_key=random_secret())
    configure_logging(settings.log_format, settings.log_level)
    if settings.jwt_secret is not None and len(settings.jwt_secret.encode()) < 32:
        log.warning("SSE_JWT_SECRET is shorter than 32 bytes; HS256 wants at least 32")
    if settings.dev:
        _print_dev_banner(settings)
    from sse_gateway.server import run

    return run(settings)


def _print_dev_banner(settings: Settings) -> None:
    host = settings.host if settings.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    base = f"http://{host}:{settings.port}"
    lines = ["", "sse-gateway dev mode"]
    if settings.redis is None:
        lines.append("  broker: embedded in-memory (single process, nothing leaves it)")
    if settings.jwt_secret is not None:
        token = make_token(settings.jwt_secret, DEV_BRAND, DEV_PLAYER, ttl=24 * 3600)
        publish_body = (
            f'{{"brand_id":"{DEV_BRAND}","player_id":"{DEV_PLAYER}",'
            '"type":"notification","data":{"title":"hello"}}'
        )
        lines += [
            f"  demo page: {base}/demo",
            f"  sample token (brand {DEV_BRAND}, player {DEV_PLAYER}, 24h):",
            f"    {token}",
            "  stream it:",
            f"    curl -N -H 'Authorization: Bearer {token}' {base}/v1/sse",
        ]
        if settings.publish_api_key is not None:
            command = (
                f"curl -X POST -H 'Authorization: Bearer {settings.publish_api_key}' "
                f"-H 'Content-Type: application/json' -d {shlex.quote(publish_body)} "
                f"{base}/v1/publish"
            )
            lines += ["  publish to it:", f"    {command}"]
    lines.append("")
    print("\n".join(lines), flush=True)
