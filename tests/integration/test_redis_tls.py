"""TLS to Redis beyond the system CA store: a private CA and a client certificate
(`rediss://…?ssl_ca_certs=…&ssl_certfile=…&ssl_keyfile=…`), against a real redis-server with
`--tls-port` and `tls-auth-clients yes`; certificates made by openssl in the test."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from support.procs import REDIS_SERVER, GatewayFactory, cli, free_port, wait_for
from support.sse import is_event

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl"),
]


@dataclass(frozen=True)
class TLSRedis:
    port: int
    certs: Path

    def url(self, *, ca: bool = True, client_cert: bool = True) -> str:
        options = []
        if ca:
            options.append("ssl_ca_certs=" + quote(str(self.certs / "ca.pem")))
        if client_cert:
            options.append("ssl_certfile=" + quote(str(self.certs / "client.pem")))
            options.append("ssl_keyfile=" + quote(str(self.certs / "client.key")))
        query = "?" + "&".join(options) if options else ""
        return f"rediss://127.0.0.1:{self.port}/0{query}"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_certs(directory: Path) -> None:
    """A private CA; a server certificate for IP 127.0.0.1 and a client certificate it signs."""
    directory.mkdir(parents=True)
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=sse-gateway test CA", cwd=directory,
    )  # fmt: skip
    for name, extensions in (
        ("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ):
        (directory / f"{name}.ext").write_text(extensions)
        _openssl(
            "req", "-new", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}", cwd=directory,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
            "-extfile", f"{name}.ext", cwd=directory,
        )  # fmt: skip


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TLSRedis]:
    certs = tmp_path / "certs"
    make_certs(certs)
    port = free_port()
    log = tmp_path / "redis.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [
                REDIS_SERVER, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                "--tls-cert-file", str(certs / "server.pem"),
                "--tls-key-file", str(certs / "server.key"),
                "--tls-ca-cert-file", str(certs / "ca.pem"),
                "--tls-auth-clients", "yes",
                "--save", "", "--appendonly", "no", "--dir", str(tmp_path),
            ],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for(lambda: "Ready to accept connections" in log.read_text(), timeout=20)
        yield TLSRedis(port, certs)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_private_ca_and_client_certificate(
    gateway_factory: GatewayFactory, tls_redis: TLSRedis, ids: Callable[..., str]
) -> None:
    url = tls_redis.url()
    gateway = gateway_factory("--history-size", "50", redis=url)
    brand, player = ids("b"), ids("p")
    client, _ = gateway.player_stream(brand, player)
    argv = ["publish", "--redis", url, "--brand", brand, "--player", player, "--type", "t"]
    published = []
    for n in range(2):
        done = cli(*argv, "--data", str(n))
        assert done.returncode == 0, done.stderr
        published.append(done.stdout.strip())
    with client:
        got = [client.read_until(is_event)[-1] for _ in range(2)]
    assert [(f.id, f.json()) for f in got] == list(zip(published, [0, 1], strict=True))
    # Replay goes through the history read connection, over TLS too.
    again, _ = gateway.player_stream(brand, player, last_id=published[0])
    with again:
        assert [f.id for f in again.read_until(is_event)[-1:]] == published[1:]
    status, body = gateway.readyz()
    assert status == 200, body


@pytest.mark.parametrize(
    ("ca", "client_cert", "reason"),
    [
        (True, False, "certificate required"),
        (False, True, "CERTIFICATE_VERIFY_FAILED"),
    ],
    ids=["no-client-certificate", "system-ca-only"],
)
def test_refused_without_client_certificate_or_private_ca(
    gateway_factory: GatewayFactory, tls_redis: TLSRedis, ca: bool, client_cert: bool, reason: str
) -> None:
    url = tls_redis.url(ca=ca, client_cert=client_cert)
    gateway = gateway_factory(redis=url, ready=False)
    line = wait_for(
        lambda: next((x for x in gateway.logs().splitlines() if "redis unreachable" in x), None),
        timeout=20,
        what="the gateway to log why it cannot reach redis",
    )
    assert f"127.0.0.1:{tls_redis.port}" in line
    assert reason.lower() in line.lower(), line
    for _ in range(3):
        assert gateway.readyz() == (503, {"status": "not_ready", "reason": "broker_disconnected"})
        time.sleep(0.2)
    done = cli("publish", "--redis", url, "--brand", "b", "--player", "p", "--type", "t",
               "--data", "1")  # fmt: skip
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "redis unavailable" in done.stderr, done.stderr
    assert "Traceback" not in gateway.logs()
