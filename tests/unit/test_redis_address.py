"""EVENTS_REDIS_STORAGE's cluster, sentinel and TLS forms (sse_gateway.redis_address)."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import pytest

from sse_gateway.redis_address import RedisAddress, parse_redis_address
from sse_gateway.settings import parse_value


def test_cluster_seed_nodes() -> None:
    address = parse_redis_address("redis+cluster://u:pw@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002")
    assert address.mode == "cluster"
    assert address.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 7001), ("::1", 7002))
    assert (address.host, address.port) == ("10.0.0.1", 7000)
    assert (address.username, address.password, address.tls) == ("u", "pw", False)
    assert address.url() == "redis+cluster://u:***@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002"


def test_cluster_over_tls_with_a_private_ca() -> None:
    address = parse_redis_address("rediss+cluster://h1:7000,h2?ssl_ca_certs=/etc/ca.pem")
    assert address.tls and address.mode == "cluster"
    assert address.nodes == (("h1", 7000), ("h2", 6379))
    assert address.ssl_ca_certs == "/etc/ca.pem"


def test_sentinel_with_master_name_db_and_sentinel_credentials() -> None:
    address = parse_redis_address(
        "redis+sentinel://:datapw@s1:26379,s2:26380/mymaster/2?sentinel_password=sp"
    )
    assert address.mode == "sentinel"
    assert address.master_name == "mymaster" and address.db == 2
    assert address.nodes == (("s1", 26379), ("s2", 26380))
    assert address.password == "datapw" and address.sentinel_password == "sp"
    assert address.url() == "redis+sentinel://:***@s1:26379,s2:26380/mymaster/2"


def test_with_node_keeps_credentials_and_tls_and_is_single() -> None:
    seed = parse_redis_address("rediss+cluster://u:pw@h1:7000?ssl_ca_certs=/ca")
    node = seed.with_node("10.1.1.1", 7005)
    assert node == RedisAddress(
        "10.1.1.1", 7005, username="u", password="pw", tls=True, ssl_ca_certs="/ca"
    )
    assert node.all_nodes == (("10.1.1.1", 7005),)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("redis://h1,h2", "several hosts"),
        ("redis+sentinel://s1:26379", "master name"),
        ("redis+sentinel://s1:26379/", "master name"),
        ("redis+cluster://h:7000/3", "only database 0"),
        ("redis://h?ssl_ca_certs=/ca", "needs TLS"),
        ("rediss://h?ssl_keyfile=/k", "needs ssl_certfile"),
        ("rediss://h?verify=no", "unknown option"),
        ("redis://h?sentinel_password=x", "unknown option"),
        ("rediss://h?ssl_ca_certs=", "non-empty"),
        ("redis+cluster://h1:7000,", "missing host"),
        ("redis+cluster://h1:0", "1-65535"),
        ("redis://::1", "brackets"),
        ("redis+clusters://h", "scheme must be"),
    ],
)
def test_refused_with_the_reason(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_redis_address(text)


def test_ssl_context_trusts_the_given_ca_and_presents_the_client_certificate(
    tmp_path: Path,
) -> None:
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=t",
         "-keyout", str(key), "-out", str(cert), "-days", "1"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    address = parse_redis_address(
        f"rediss://h?ssl_ca_certs={cert}&ssl_certfile={cert}&ssl_keyfile={key}"
    )
    context = address.ssl_context()
    assert context is not None and context.verify_mode == ssl.CERT_REQUIRED
    assert any(c.get("subject") == ((("commonName", "t"),),) for c in context.get_ca_certs())
    assert parse_redis_address("redis://h").ssl_context() is None
    with pytest.raises(OSError):
        parse_redis_address(f"rediss://h?ssl_ca_certs={tmp_path}/missing.pem").ssl_context()


def test_settings_take_sentinel() -> None:
    address = parse_value("redis", "redis+sentinel://s1:26379,s2:26379/mymaster")
    assert address.mode == "sentinel" and address.master_name == "mymaster"
