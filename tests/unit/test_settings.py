"""Settings: durations, Redis addresses, env/flag precedence, error reporting, keys files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from sse_gateway.edge.auth import TokenVerifier
from sse_gateway.settings import (
    OPTIONS,
    BrandKey,
    BrandKeys,
    RedisAddress,
    Settings,
    SettingsError,
    load_jwt_keys,
    load_settings,
    parse_duration,
    parse_redis_address,
)


def public_pem(private: object) -> str:
    key = private.public_key()  # type: ignore[attr-defined]
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


@pytest.fixture(scope="module")
def rsa_pem() -> str:
    return public_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture(scope="module")
def ec_pem() -> str:
    return public_pem(ec.generate_private_key(ec.SECP256R1()))


@pytest.fixture(scope="module")
def ed_pem() -> str:
    return public_pem(ed25519.Ed25519PrivateKey.generate())


# --- parse_duration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("15", 15.0),
        ("1.5", 1.5),
        ("0", 0.0),
        ("500ms", 0.5),
        ("50ms", 0.05),
        ("15s", 15.0),
        ("2.5s", 2.5),
        ("1m", 60.0),
        ("1.5m", 90.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        (" 15s ", 15.0),
        ("15 s", 15.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    ["", " ", "s", "ms", "abc", "-1", "-1s", "1.", ".5", "1e3", "15 sec", "1min", "1w", "1S",
     "nan", "inf", "0x10", "1,5", "1s2", "15s15"],
)  # fmt: skip
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


# --- parse_redis_address ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("redis-host", RedisAddress("redis-host")),
        ("10.0.0.5", RedisAddress("10.0.0.5")),
        ("redis-host:6380", RedisAddress("redis-host", 6380)),
        ("[::1]:6380", RedisAddress("::1", 6380)),
        ("[::1]", RedisAddress("::1")),
        ("redis://h", RedisAddress("h")),
        ("redis://h:1/2", RedisAddress("h", 1, 2)),
        ("redis://user:pw@h:1/2", RedisAddress("h", 1, 2, "user", "pw")),
        ("redis://:pw@h", RedisAddress("h", password="pw")),
        ("redis://user:p%40ss%3Aw@h", RedisAddress("h", username="user", password="p@ss:w")),
        ("redis://h/", RedisAddress("h")),
        ("redis://[::1]:7000/3", RedisAddress("::1", 7000, 3)),
        ("rediss://h", RedisAddress("h", tls=True)),
        ("rediss://u:pw@h:6390/1", RedisAddress("h", 6390, 1, "u", "pw", tls=True)),
        ("  redis://h:7  ", RedisAddress("h", 7)),
    ],
)
def test_parse_redis_address(text: str, expected: RedisAddress) -> None:
    assert parse_redis_address(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "http://h",
        "unix:///tmp/redis.sock",
        "redis://",
        "redis://:pw@",
        "redis://h:99999",
        "redis://h:port",
        "h:-1",
        "redis://h/db",
        "redis://h/1/2",
        "redis://h/-1",
    ],
)
def test_parse_redis_address_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_redis_address(text)


def test_redis_port_zero_is_refused_not_replaced_by_the_default() -> None:
    """`h:0` names no usable Redis port; silently connecting to 6379 instead hides the typo."""
    with pytest.raises(ValueError):
        parse_redis_address("redis://h:0")


def test_redis_url_redacts_the_password() -> None:
    address = parse_redis_address("rediss://u:s3cret@h:6390/1")
    assert address.url() == "rediss://u:***@h:6390/1"
    assert "s3cret" not in address.url()
    assert address.url(redact=False) == "rediss://u:s3cret@h:6390/1"
    assert parse_redis_address("[::1]:6380").url() == "redis://[::1]:6380/0"


# --- load_settings ---------------------------------------------------------------------------


def test_defaults_without_env_or_flags() -> None:
    settings = load_settings({}, {}, dev=False)
    assert settings == Settings()
    assert settings.redis is None
    assert settings.keepalive_period == 15.0
    assert settings.jwt_max_ttl == 86_400.0  # docs/operations.md says why 24 h
    assert settings.max_connections_per_player == 10


def test_max_connections_per_player_zero_is_no_cap() -> None:
    settings = load_settings({"SSE_MAX_CONNECTIONS_PER_PLAYER": "0"}, {}, dev=False)
    assert settings.max_connections_per_player == 0


def test_every_option_is_read_from_its_env_var(tmp_path: Path) -> None:
    keys = tmp_path / "k.json"
    keys.write_text(json.dumps({"b": {"alg": "HS256", "key": "brand-secret"}}))
    env = {
        "EVENTS_REDIS_STORAGE": "redis://h:1/2",
        "SSE_CONNECTION_LIMIT": "1_000",
        "SSE_KEEPALIVE_PERIOD": "500ms",
        "SSE_HEADER_TIMEOUT": "2.5s",
        "SSE_CONNECT_RATE_PER_IP": "2.5",
        "SSE_TRUSTED_PROXIES": "10.0.0.0/8,::1",
        "SSE_EVENT_BUFFER_SIZE": "7",
        "SSE_HOST": "127.0.0.1",
        "SSE_PORT": "9000",
        "SSE_METRICS_PORT": "9100",
        "SSE_METRICS_HOST": "10.0.0.5",
        "SSE_JWT_SECRET": "s",
        "SSE_JWT_KEYS_FILE": str(keys),
        "SSE_JWT_AUDIENCE": "aud",
        "SSE_JWT_ISSUER": "iss",
        "SSE_JWT_MAX_TTL": "90m",
        "SSE_MAX_CONNECTIONS_PER_PLAYER": "3",
        "SSE_METRICS_MAX_BRANDS": "7",
        "SSE_JWKS_REFRESH": "90s",
        "SSE_RETRY_MS": "0",
        "SSE_MAX_EVENT_BYTES": "64",
        "SSE_DRAIN_SECONDS": "2s",
        "SSE_SHUTDOWN_DELAY": "1500ms",
        "SSE_CORS_ORIGINS": "https://a.example, http://b.example:8080/",
        "SSE_PUBLISH_API_KEY": "k",
        "SSE_HISTORY_SIZE": "250",
        "SSE_HISTORY_TTL": "2d",
        "SSE_WORKERS": "4",
        "SSE_LOG_FORMAT": "json",
        "SSE_LOG_LEVEL": "debug",
    }
    assert {option.env for option in OPTIONS} == set(env)
    settings = load_settings(env, {}, dev=True)
    assert settings.redis == RedisAddress("h", 1, 2)
    assert settings.connection_limit == 1000
    assert settings.keepalive_period == pytest.approx(0.5)
    assert settings.header_timeout == 2.5
    assert settings.connect_rate_per_ip == 2.5
    assert [str(n) for n in settings.trusted_proxies] == ["10.0.0.0/8", "::1/128"]
    assert settings.event_buffer_size == 7
    assert (settings.host, settings.port) == ("127.0.0.1", 9000)
    assert (settings.metrics_host, settings.metrics_port) == ("10.0.0.5", 9100)
    assert settings.jwt_secret == "s"
    assert settings.jwt_keys == {"b": BrandKeys((BrandKey("HS256", "brand-secret"),))}
    assert (settings.jwt_audience, settings.jwt_issuer) == ("aud", "iss")
    assert settings.jwt_max_ttl == 5400.0
    assert settings.max_connections_per_player == 3
    assert settings.metrics_max_brands == 7
    assert settings.jwks_refresh == 90.0
    assert settings.retry_ms == 0
    assert settings.max_event_bytes == 64
    assert settings.drain_seconds == 2.0
    assert settings.shutdown_delay == 1.5
    assert settings.cors_origins == frozenset({"https://a.example", "http://b.example:8080"})
    assert settings.publish_api_key == "k"
    assert settings.history_size == 250
    assert settings.history_ttl == 2 * 86400.0
    assert settings.workers == 4
    assert (settings.log_format, settings.log_level) == ("json", "DEBUG")
    assert settings.dev is True


@pytest.mark.parametrize(
    ("attr", "env_value", "flag_value", "expected"),
    [
        ("port", "9000", "9100", 9100),
        ("keepalive_period", "1m", "2s", 2.0),
        ("redis", "env-host:1", "flag-host:2", RedisAddress("flag-host", 2)),
        ("jwt_secret", "env-secret", "flag-secret", "flag-secret"),
        ("log_level", "ERROR", "info", "INFO"),
    ],
)
def test_flag_wins_over_env(attr: str, env_value: str, flag_value: str, expected: object) -> None:
    option = next(o for o in OPTIONS if o.attr == attr)
    settings = load_settings({option.env: env_value}, {attr: flag_value}, dev=False)
    assert getattr(settings, attr) == expected


def test_metrics_port_is_off_by_default_and_binds_loopback_when_set() -> None:
    assert (Settings().metrics_port, Settings().metrics_host) == (None, "127.0.0.1")
    settings = load_settings({"SSE_METRICS_PORT": "9100"}, {}, dev=False)
    assert (settings.metrics_host, settings.metrics_port) == ("127.0.0.1", 9100)


@pytest.mark.parametrize(
    ("env", "flags", "name", "other"),
    [
        ({"SSE_METRICS_PORT": "8080"}, {}, "SSE_METRICS_PORT", "SSE_PORT (--port), default 8080"),
        ({"SSE_PORT": "9000", "SSE_METRICS_PORT": "9000"}, {}, "SSE_METRICS_PORT", "SSE_PORT"),
        ({}, {"port": "9000", "metrics_port": "9000"}, "--metrics-port", "--port"),
        ({"SSE_PORT": "9000"}, {"metrics_port": "9000"}, "--metrics-port", "SSE_PORT"),
    ],
)
def test_metrics_port_must_differ_from_the_public_port(
    env: dict[str, str], flags: dict[str, str], name: str, other: str
) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(env, flags, dev=False)
    assert info.value.variable == name
    assert info.value.reason == f"must differ from {other}"


@pytest.mark.parametrize(
    ("env", "flags", "name"),
    [
        ({"SSE_METRICS_HOST": "10.0.0.5"}, {}, "SSE_METRICS_HOST"),
        ({}, {"metrics_host": "10.0.0.5"}, "--metrics-host"),
    ],
)
def test_metrics_host_without_metrics_port_is_refused(
    env: dict[str, str], flags: dict[str, str], name: str
) -> None:
    """It would do nothing: /metrics stays on the public port."""
    with pytest.raises(SettingsError) as info:
        load_settings(env, flags, dev=False)
    assert info.value.variable == name
    assert "SSE_METRICS_PORT (--metrics-port)" in info.value.reason


@pytest.mark.parametrize(
    ("env", "flags", "name"),
    [
        ({"SSE_WORKERS": "2"}, {}, "SSE_WORKERS"),
        ({}, {"workers": "2"}, "--workers"),
        ({"SSE_WORKERS": "3"}, {"workers": "2"}, "--workers"),  # the flag wins, and is named
    ],
)
def test_workers_without_redis_names_what_the_user_typed(
    env: dict[str, str], flags: dict[str, str], name: str
) -> None:
    # Issue 12: `serve --workers 2` without Redis said `SSE_WORKERS: invalid value`.
    with pytest.raises(SettingsError) as info:
        load_settings(env, flags, dev=False)
    assert info.value.variable == name
    assert str(info.value).startswith(f"{name}: invalid value '2': ")
    assert "EVENTS_REDIS_STORAGE (--redis)" in info.value.reason


def test_an_unreadable_keys_file_given_as_a_flag_names_the_flag(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({}, {"jwt_keys_file": str(tmp_path / "missing.json")}, dev=False)
    assert info.value.variable == "--jwt-keys-file"


def test_shutdown_delay_defaults_to_none_and_is_bounded() -> None:
    assert load_settings({}, {}, dev=False).shutdown_delay == 0.0
    for bad in ("11m", "-1s", "soon"):
        with pytest.raises(SettingsError) as info:
            load_settings({"SSE_SHUTDOWN_DELAY": bad}, {}, dev=False)
        assert info.value.variable == "SSE_SHUTDOWN_DELAY"


def test_flag_set_to_none_falls_back_to_env() -> None:
    settings = load_settings({"SSE_PORT": "9000"}, {"port": None}, dev=False)
    assert settings.port == 9000


def test_a_valid_flag_does_not_hide_a_bad_env_var_of_another_option() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({"SSE_PORT": "x"}, {"host": "127.0.0.1"}, dev=False)
    assert info.value.variable == "SSE_PORT"


def test_a_flag_overrides_a_bad_env_value_of_the_same_option() -> None:
    assert load_settings({"SSE_PORT": "nope"}, {"port": "9000"}, dev=False).port == 9000


def test_empty_env_var_counts_as_unset() -> None:
    settings = load_settings({"SSE_PORT": "", "EVENTS_REDIS_STORAGE": ""}, {}, dev=False)
    assert settings.port == 8080
    assert settings.redis is None


def test_an_empty_jwt_secret_env_var_is_unset_next_to_a_keys_file(tmp_path: Path) -> None:
    # Issue 10 item 8: it was an error, so a container spec that writes `SSE_JWT_SECRET=`
    # beside SSE_JWT_KEYS_FILE could not start. Alone it is unset (the CLI then refuses to
    # start without any key: tests/integration/test_config_cli.py).
    assert load_settings({"SSE_JWT_SECRET": ""}, {}, dev=False).jwt_secret is None
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"b1": {"alg": "HS256", "key": "k" * 32}}))
    settings = load_settings({"SSE_JWT_SECRET": "", "SSE_JWT_KEYS_FILE": str(keys)}, {}, dev=False)
    assert settings.jwt_secret is None and "b1" in settings.jwt_keys


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("SSE_PORT", "http"),
        ("SSE_PORT", "70000"),
        ("SSE_CONNECTION_LIMIT", "0"),
        ("SSE_CONNECTION_LIMIT", "-5"),
        ("SSE_EVENT_BUFFER_SIZE", "ten"),
        ("SSE_KEEPALIVE_PERIOD", "10ms"),
        ("SSE_KEEPALIVE_PERIOD", "2h"),
        ("SSE_KEEPALIVE_PERIOD", "fast"),
        ("SSE_HEADER_TIMEOUT", "50ms"),
        ("SSE_HEADER_TIMEOUT", "1h"),
        ("SSE_HEADER_TIMEOUT", "soon"),
        ("SSE_CONNECT_RATE_PER_IP", "-1"),
        ("SSE_CONNECT_RATE_PER_IP", "fast"),
        ("SSE_TRUSTED_PROXIES", "10.0.0.0/33"),
        ("SSE_TRUSTED_PROXIES", "proxy.internal"),
        ("SSE_DRAIN_SECONDS", "2h"),
        ("SSE_RETRY_MS", "-1"),
        ("SSE_MAX_EVENT_BYTES", "63"),
        ("SSE_HISTORY_SIZE", "0"),
        ("SSE_HISTORY_SIZE", "100001"),
        ("SSE_HISTORY_TTL", "500ms"),
        ("SSE_HISTORY_TTL", "366d"),
        ("SSE_JWT_MAX_TTL", "0"),
        ("SSE_JWT_MAX_TTL", "500ms"),
        ("SSE_JWT_MAX_TTL", "366d"),
        ("SSE_JWT_MAX_TTL", "forever"),
        ("SSE_MAX_CONNECTIONS_PER_PLAYER", "-1"),
        ("SSE_MAX_CONNECTIONS_PER_PLAYER", "ten"),
        ("SSE_METRICS_MAX_BRANDS", "-1"),
        ("SSE_METRICS_MAX_BRANDS", "10001"),
        ("SSE_WORKERS", "65"),
        ("SSE_WORKERS", "0"),
        ("SSE_CORS_ORIGINS", "*"),
        ("SSE_CORS_ORIGINS", "https://ok.example,*"),
        ("SSE_CORS_ORIGINS", "example.com"),
        ("SSE_CORS_ORIGINS", "https://a.example/path"),
        ("SSE_LOG_FORMAT", "yaml"),
        ("SSE_LOG_LEVEL", "TRACE"),
        ("EVENTS_REDIS_STORAGE", "http://h"),
        ("EVENTS_REDIS_STORAGE", "h:port"),
        ("SSE_HOST", "   "),
        ("SSE_METRICS_PORT", "65536"),
        ("SSE_METRICS_PORT", "metrics"),
        ("SSE_METRICS_HOST", "   "),
    ],
)
def test_settings_error_names_the_env_var_and_the_bad_value(env: str, value: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({env: value}, {}, dev=False)
    error = info.value
    assert error.variable == env
    assert error.value == value
    assert error.reason
    assert env in str(error)
    assert repr(value) in str(error)
    assert isinstance(error, ValueError)


@pytest.mark.parametrize(
    ("attr", "value"),
    [("port", "-1"), ("keepalive_period", "1d"), ("redis", ""), ("host", "")],
)
def test_settings_error_names_the_flag_when_the_flag_is_bad(attr: str, value: str) -> None:
    option = next(o for o in OPTIONS if o.attr == attr)
    with pytest.raises(SettingsError) as info:
        load_settings({}, {attr: value}, dev=False)
    assert info.value.variable == option.flag
    assert info.value.value == value
    assert option.flag in str(info.value)


@pytest.mark.parametrize(
    ("attr", "env"), [("jwt_secret", "SSE_JWT_SECRET"), ("publish_api_key", "SSE_PUBLISH_API_KEY")]
)
def test_secret_values_are_not_shown_in_errors(attr: str, env: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({}, {attr: ""}, dev=False)
    assert info.value.value == "***"
    assert info.value.variable == next(o.flag for o in OPTIONS if o.attr == attr)


def test_settings_repr_hides_secrets() -> None:
    settings = load_settings(
        {"SSE_JWT_SECRET": "top-secret-value", "SSE_PUBLISH_API_KEY": "publish-key-value"},
        {},
        dev=False,
    )
    assert "top-secret-value" not in repr(settings)
    assert "publish-key-value" not in repr(settings)


# --- keys file -------------------------------------------------------------------------------


def write_keys(tmp_path: Path, content: object) -> str:
    path = tmp_path / "keys.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def keys_file_error(path: str) -> SettingsError:
    with pytest.raises(SettingsError) as info:
        load_settings({"SSE_JWT_KEYS_FILE": path}, {}, dev=False)
    assert info.value.variable == "SSE_JWT_KEYS_FILE"
    assert info.value.value == path
    return info.value


def test_keys_file_with_every_algorithm_loads(
    tmp_path: Path, rsa_pem: str, ec_pem: str, ed_pem: str
) -> None:
    path = write_keys(
        tmp_path,
        {
            "r": {"alg": "RS256", "key": rsa_pem},
            "e": {"alg": "ES256", "key": ec_pem},
            "d": {"alg": "EdDSA", "key": ed_pem},
            "h": {"alg": "HS256", "key": "shared"},
        },
    )
    settings = load_settings({"SSE_JWT_KEYS_FILE": path}, {}, dev=False)
    assert settings.jwt_keys_file == path
    assert settings.jwt_keys == {
        "r": BrandKeys((BrandKey("RS256", rsa_pem),)),
        "e": BrandKeys((BrandKey("ES256", ec_pem),)),
        "d": BrandKeys((BrandKey("EdDSA", ed_pem),)),
        "h": BrandKeys((BrandKey("HS256", "shared"),)),
    }
    assert load_jwt_keys(path) == settings.jwt_keys


def test_keys_file_missing(tmp_path: Path) -> None:
    error = keys_file_error(str(tmp_path / "absent.json"))
    assert "cannot read" in error.reason


def test_keys_file_is_a_directory(tmp_path: Path) -> None:
    keys_file_error(str(tmp_path))


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{", "not JSON"),
        ("", "not JSON"),
        ({}, "non-empty object"),
        ([], "non-empty object"),
        ('"text"', "non-empty object"),
        ({"bad brand": {"alg": "HS256", "key": "k"}}, "bad brand"),
        ({"a::b": {"alg": "HS256", "key": "k"}}, "a::b"),
        ({"b": "secret"}, "expected an object"),
        ({"b": {"key": "k"}}, "alg must be one of"),
        ({"b": {"alg": "none", "key": "k"}}, "alg must be one of"),
        ({"b": {"alg": "RS512", "key": "k"}}, "alg must be one of"),
        ({"b": {"alg": "hs256", "key": "k"}}, "alg must be one of"),
        ({"b": {"alg": "HS256"}}, "key must be a non-empty string"),
        ({"b": {"alg": "HS256", "key": ""}}, "key must be a non-empty string"),
        ({"b": {"alg": "HS256", "key": 5}}, "key must be a non-empty string"),
        ({"b": {"alg": "RS256", "key": "not a pem"}}, "PEM public key"),
        ({"b": {"alg": "ES256", "key": "not a pem"}}, "PEM public key"),
        ({"b": {"alg": "EdDSA", "key": "not a pem"}}, "PEM public key"),
        ({"b": {"alg": "HS256", "key": "-----BEGIN PUBLIC KEY-----"}}, "shared secret"),
    ],
)
def test_keys_file_validation_errors(tmp_path: Path, content: object, fragment: str) -> None:
    error = keys_file_error(write_keys(tmp_path, content))
    assert fragment in error.reason
    assert "SSE_JWT_KEYS_FILE" in str(error)


def test_keys_file_given_by_flag(tmp_path: Path) -> None:
    path = write_keys(tmp_path, {"b": {"alg": "HS256", "key": "k"}})
    settings = load_settings({}, {"jwt_keys_file": path}, dev=False)
    assert settings.jwt_keys == {"b": BrandKeys((BrandKey("HS256", "k"),))}


def test_bad_key_in_keys_file_names_the_brand(tmp_path: Path) -> None:
    path = write_keys(
        tmp_path,
        {"good": {"alg": "HS256", "key": "k"}, "broken": {"alg": "RS256", "key": "nope"}},
    )
    assert "'broken'" in keys_file_error(path).reason


# Every keys file that load_settings accepts must give a usable TokenVerifier: otherwise the
# gateway passes configuration checks and then dies at start-up with a library traceback instead
# of a SettingsError (exit status 2) naming SSE_JWT_KEYS_FILE.


@pytest.mark.parametrize(
    ("alg", "key_kind"),
    [
        ("RS256", "garbage-pem"),
        ("RS256", "ec"),
        ("ES256", "rsa"),
        ("ES256", "p384"),
        ("EdDSA", "rsa"),
    ],
)
def test_keys_file_key_must_suit_its_algorithm(
    tmp_path: Path, rsa_pem: str, ec_pem: str, alg: str, key_kind: str
) -> None:
    key = {
        "garbage-pem": "-----BEGIN PUBLIC KEY-----\nbm90IGEga2V5\n-----END PUBLIC KEY-----\n",
        "rsa": rsa_pem,
        "ec": ec_pem,
        "p384": public_pem(ec.generate_private_key(ec.SECP384R1())),
    }[key_kind]
    path = write_keys(tmp_path, {"b": {"alg": alg, "key": key}})
    try:
        settings = load_settings({"SSE_JWT_KEYS_FILE": path}, {}, dev=False)
    except SettingsError as error:
        assert error.variable == "SSE_JWT_KEYS_FILE"
        return
    TokenVerifier(secret=None, brand_keys=settings.jwt_keys)  # must not raise
