"""One typed settings object, read once at start from env vars and `serve` flags (flag wins)."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# The keys file has a module of its own; its names are part of the settings' surface.
from sse_gateway.keys_file import BrandKey as BrandKey
from sse_gateway.keys_file import BrandKeys as BrandKeys
from sse_gateway.keys_file import load_jwt_keys as load_jwt_keys
from sse_gateway.redis_address import RedisAddress as RedisAddress
from sse_gateway.redis_address import parse_redis_address as parse_redis_address

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
WORKERS_AUTO = 0
"""`Settings.workers` for `--workers auto` (SSE_WORKERS=auto), resolved at start by
`sse_gateway.sizing.plan_workers`."""
MAX_WORKERS = 64


def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    """`10.0.0.0/8, 192.168.1.7, ::1` → networks; ValueError names a bad entry."""
    networks = []
    for part in text.split(","):
        entry = part.strip()
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError as exc:
            raise ValueError(f"{entry!r} is not an IP address or CIDR block") from exc
    return tuple(networks)


class SettingsError(ValueError):
    """A configuration value that cannot be used; the CLI exits with status 2. `variable` is
    the name the user gave it under: the `serve` flag (`--workers`) or the environment
    variable (`SSE_WORKERS`)."""

    def __init__(self, variable: str, value: str, reason: str) -> None:
        super().__init__(f"{variable}: invalid value {value!r}: {reason}")
        self.variable = variable
        self.value = value
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Settings:
    redis: RedisAddress | None = None
    connection_limit: int = 50_000
    keepalive_period: float = 15.0
    header_timeout: float = 10.0
    connect_rate_per_ip: float = 0.0
    trusted_proxies: tuple[IPNetwork, ...] = ()
    event_buffer_size: int = 50
    host: str = "0.0.0.0"
    port: int = 8080
    metrics_port: int | None = None  # a listener of its own for /metrics (+ /healthz, /readyz)
    metrics_host: str = "127.0.0.1"
    metrics_max_brands: int = 100
    jwt_secret: str | None = field(default=None, repr=False)
    jwt_keys_file: str | None = None
    jwt_keys: Mapping[str, BrandKeys] = field(default_factory=dict, repr=False)
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_max_ttl: float = 86_400.0
    jwks_refresh: float = 300.0
    retry_ms: int = 3000
    max_event_bytes: int = 65_536
    drain_seconds: float = 10.0
    shutdown_delay: float = 0.0
    cors_origins: frozenset[str] = frozenset()
    publish_api_key: str | None = field(default=None, repr=False)
    history_size: int = 100
    history_ttl: float = 86_400.0
    max_connections_per_player: int = 10
    workers: int = 1
    """Worker processes; `WORKERS_AUTO` until the server resolves it (sizing.plan_workers)."""
    log_format: str = "text"
    log_level: str = "INFO"
    dev: bool = False

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: its env var, its `serve` flag and how to parse it."""

    attr: str
    env: str
    flag: str
    help: str


OPTIONS: tuple[Option, ...] = (
    Option("redis", "EVENTS_REDIS_STORAGE", "--redis", "Redis address; unset: embedded broker"),
    Option("connection_limit", "SSE_CONNECTION_LIMIT", "--connection-limit", "max SSE streams"),
    Option("keepalive_period", "SSE_KEEPALIVE_PERIOD", "--keepalive-period", "e.g. 15s, 500ms"),
    Option(
        "header_timeout",
        "SSE_HEADER_TIMEOUT",
        "--header-timeout",
        "time to send a complete request, and keep-alive idle time, e.g. 10s",
    ),
    Option("event_buffer_size", "SSE_EVENT_BUFFER_SIZE", "--event-buffer-size", "queued events"),
    Option("host", "SSE_HOST", "--host", "listen address"),
    Option("port", "SSE_PORT", "--port", "listen port"),
    Option("metrics_port", "SSE_METRICS_PORT", "--metrics-port", "/metrics here, not on --port"),
    Option("metrics_host", "SSE_METRICS_HOST", "--metrics-host", "its listen address"),
    Option(
        "metrics_max_brands",
        "SSE_METRICS_MAX_BRANDS",
        "--metrics-max-brands",
        "brands with a metric label of their own; the rest are `other`",
    ),
    Option("jwt_secret", "SSE_JWT_SECRET", "--jwt-secret", "HS256 secret for every brand"),
    Option("jwt_keys_file", "SSE_JWT_KEYS_FILE", "--jwt-keys-file", "per-brand keys (JSON)"),
    Option("jwt_audience", "SSE_JWT_AUDIENCE", "--jwt-audience", "required aud"),
    Option("jwt_issuer", "SSE_JWT_ISSUER", "--jwt-issuer", "required iss"),
    Option(
        "connect_rate_per_ip",
        "SSE_CONNECT_RATE_PER_IP",
        "--connect-rate-per-ip",
        "stream requests per second per client address (burst the same); 0: off",
    ),
    Option(
        "trusted_proxies",
        "SSE_TRUSTED_PROXIES",
        "--trusted-proxies",
        "CIDRs whose X-Forwarded-For is believed",
    ),
    Option("jwt_max_ttl", "SSE_JWT_MAX_TTL", "--jwt-max-ttl", "refuse exp further ahead, e.g. 24h"),
    Option("jwks_refresh", "SSE_JWKS_REFRESH", "--jwks-refresh", "JWKS refetch period, e.g. 5m"),
    Option("retry_ms", "SSE_RETRY_MS", "--retry-ms", "retry: sent to clients"),
    Option("max_event_bytes", "SSE_MAX_EVENT_BYTES", "--max-event-bytes", "max message size"),
    Option("drain_seconds", "SSE_DRAIN_SECONDS", "--drain-seconds", "SIGTERM drain time"),
    Option(
        "shutdown_delay",
        "SSE_SHUTDOWN_DELAY",
        "--shutdown-delay",
        "after SIGTERM, /readyz 503 while still serving, before the drain, e.g. 5s; 0: none",
    ),
    Option("cors_origins", "SSE_CORS_ORIGINS", "--cors-origins", "comma-separated origins"),
    Option(
        "publish_api_key", "SSE_PUBLISH_API_KEY", "--publish-api-key", "enables POST /v1/publish"
    ),
    Option("history_size", "SSE_HISTORY_SIZE", "--history-size", "events kept per player"),
    Option("history_ttl", "SSE_HISTORY_TTL", "--history-ttl", "history expiry, e.g. 24h"),
    Option(
        "max_connections_per_player",
        "SSE_MAX_CONNECTIONS_PER_PLAYER",
        "--max-connections-per-player",
        "streams per player per process; 0: no cap",
    ),
    Option(
        "workers",
        "SSE_WORKERS",
        "--workers",
        "worker processes (SO_REUSEPORT), or auto: enough for the connection limit under the "
        "open-file limit, at least one per CPU",
    ),
    Option("log_format", "SSE_LOG_FORMAT", "--log-format", "text or json"),
    Option("log_level", "SSE_LOG_LEVEL", "--log-level", "DEBUG, INFO, WARNING, ERROR"),
)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str) -> float:
    """Seconds from `15`, `1.5`, `500ms`, `15s`, `1m`, `1h`, `1d`."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError("expected seconds as a number, or a number with ms, s, m, h or d")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def _positive_int(text: str, *, minimum: int = 1, maximum: int | None = None) -> int:
    try:
        value = int(text.strip().replace("_", ""))
    except ValueError as exc:
        raise ValueError("expected an integer") from exc
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and at most {maximum}" if maximum is not None else ""
        raise ValueError(f"expected at least {minimum}{upper}")
    return value


def parse_value(attr: str, text: str) -> Any:
    """Turns one raw string into the typed value of `attr`; ValueError explains a bad one."""
    if attr == "redis":
        address = parse_redis_address(text)
        try:
            address.ssl_context()  # a CA or certificate file that cannot be read fails here
        except (OSError, ValueError) as exc:
            raise ValueError(f"TLS files: {exc}") from exc
        return address
    if attr in ("connection_limit", "event_buffer_size"):
        return _positive_int(text)
    if attr == "history_size":
        return _positive_int(text, maximum=100_000)
    if attr == "history_ttl":
        seconds = parse_duration(text)
        if not 1 <= seconds <= 365 * 86400:
            raise ValueError("must be between 1s and 365 days")
        return seconds
    if attr == "jwt_max_ttl":
        seconds = parse_duration(text)
        if not 1 <= seconds <= 365 * 86400:
            raise ValueError("must be between 1s and 365 days")
        return seconds
    if attr == "max_connections_per_player":
        return _positive_int(text, minimum=0)
    if attr == "metrics_max_brands":
        return _positive_int(text, minimum=0, maximum=10_000)
    if attr == "workers":
        if text.strip().lower() == "auto":
            return WORKERS_AUTO
        try:
            return _positive_int(text, maximum=MAX_WORKERS)
        except ValueError as exc:
            raise ValueError(f"{exc}, or auto") from exc
    if attr in ("port", "metrics_port"):
        return _positive_int(text, minimum=0, maximum=65535)
    if attr == "retry_ms":
        return _positive_int(text, minimum=0, maximum=86_400_000)
    if attr == "max_event_bytes":
        return _positive_int(text, minimum=64)
    if attr == "jwks_refresh":
        seconds = parse_duration(text)
        if not 1 <= seconds <= 86400:
            raise ValueError("must be between 1s and 24h")
        return seconds
    if attr == "keepalive_period":
        seconds = parse_duration(text)
        if not 0.05 <= seconds <= 3600:
            raise ValueError("must be between 50ms and 1h")
        return seconds
    if attr == "connect_rate_per_ip":
        try:
            rate = float(text)
        except ValueError as exc:
            raise ValueError("expected requests per second, e.g. 5 or 0.5; 0 turns it off") from exc
        if not 0 <= rate <= 1_000_000:
            raise ValueError("must be between 0 (off) and 1000000")
        return rate
    if attr == "trusted_proxies":
        return parse_networks(text)
    if attr == "header_timeout":
        seconds = parse_duration(text)
        if not 0.1 <= seconds <= 600:
            raise ValueError("must be between 100ms and 10m")
        return seconds
    if attr == "drain_seconds":
        seconds = parse_duration(text)
        if seconds > 3600:
            raise ValueError("must be at most 1h")
        return seconds
    if attr == "shutdown_delay":
        seconds = parse_duration(text)
        if seconds > 600:
            raise ValueError("must be at most 10m")
        return seconds
    if attr == "cors_origins":
        origins = frozenset(o.strip().rstrip("/") for o in text.split(",") if o.strip())
        for origin in origins:
            if origin != "*" and not re.match(r"^https?://[^/\s]+$", origin):
                raise ValueError(f"origin {origin!r} is not scheme://host[:port]")
        if "*" in origins:
            raise ValueError("'*' cannot be combined with credentials; list exact origins")
        return origins
    if attr == "log_format":
        if text not in ("text", "json"):
            raise ValueError("expected text or json")
        return text
    if attr == "log_level":
        level = text.upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError("expected DEBUG, INFO, WARNING or ERROR")
        return level
    if attr in ("host", "metrics_host"):
        if not text.strip():
            raise ValueError("empty host")
        return text.strip()
    if attr == "jwt_secret" and ("-----BEGIN" in text or text.startswith("ssh-")):
        raise ValueError("an HS256 secret, not a PEM/SSH key (use SSE_JWT_KEYS_FILE for those)")
    if attr in ("jwt_secret", "jwt_audience", "jwt_issuer", "jwt_keys_file", "publish_api_key"):
        if not text:
            raise ValueError("empty value")
        return text
    raise AssertionError(attr)


_SECRETS = frozenset({"jwt_secret", "publish_api_key"})
_URL_PASSWORD = re.compile(r"(://[^/@:]*:)[^@]*@")


def _shown(attr: str, raw: str) -> str:
    """A bad value as an error message may show it: secrets hidden, a URL's password too."""
    if attr in _SECRETS:
        return "***"
    if attr == "redis":
        return _URL_PASSWORD.sub(r"\1***@", raw)
    return raw


def _both_names(attr: str) -> str:
    """A setting the user did not give, named both ways: `SSE_PORT (--port)`."""
    option = next(o for o in OPTIONS if o.attr == attr)
    return f"{option.env} ({option.flag})"


def load_settings(
    env: Mapping[str, str], flags: Mapping[str, str | None], *, dev: bool
) -> Settings:
    """Builds the settings from env vars, then flags (flag wins). Raises SettingsError, which
    names each setting as the user gave it: the flag, or the env var."""
    values: dict[str, Any] = {"dev": dev}
    given: dict[str, str] = {}  # attr -> the flag or env var its value came from
    for option in OPTIONS:
        raw = flags.get(option.attr)
        name = option.flag
        if raw is None:
            raw = env.get(option.env)
            name = option.env
            if raw == "":
                # An empty env var counts as unset, as in most deployment tools (a container
                # spec writes `SSE_JWT_SECRET=` next to SSE_JWT_KEYS_FILE). An empty secret
                # alone still fails the start: no key is configured.
                continue
        if raw is None:
            continue
        try:
            values[option.attr] = parse_value(option.attr, raw)
        except ValueError as exc:
            raise SettingsError(name, _shown(option.attr, raw), str(exc)) from exc
        given[option.attr] = name

    if values.get("workers", 1) > 1 and "redis" not in values:
        raise SettingsError(
            given["workers"],
            str(values["workers"]),
            f"the embedded broker lives in one process; set {_both_names('redis')} to use workers",
        )
    if (metrics_port := values.get("metrics_port")) is None and "metrics_host" in values:
        raise SettingsError(
            given["metrics_host"], values["metrics_host"], f"needs {_both_names('metrics_port')}"
        )
    if metrics_port and metrics_port == values.get("port", Settings().port):
        port = given.get("port") or f"{_both_names('port')}, default {Settings().port}"
        raise SettingsError(given["metrics_port"], str(metrics_port), f"must differ from {port}")
    keys_file = values.get("jwt_keys_file")
    if keys_file is not None:
        try:
            values["jwt_keys"] = load_jwt_keys(keys_file)
        except ValueError as exc:
            raise SettingsError(given["jwt_keys_file"], keys_file, str(exc)) from exc
    return Settings(**values)
