"""Real processes for the integration tests: redis-server and the gateway."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

import jwt
import redis
from prometheus_client.parser import text_string_to_metric_families

from .sse import Response, SSEClient, request

REPO = Path(__file__).resolve().parents[2]
REDIS_SERVER = "/usr/bin/redis-server"
DEFAULT_SECRET = "integration-test-secret-" + "0123456789abcdef" * 3  # 72 bytes
#: Env vars the gateway reads; removed from the inherited environment so the host cannot leak in.
GATEWAY_ENV_PREFIXES = ("SSE_", "EVENTS_REDIS_STORAGE")

T = TypeVar("T")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(
    predicate: Callable[[], T], timeout: float = 15.0, interval: float = 0.05, what: str = ""
) -> T:
    """Polls until `predicate()` is truthy and returns it; AssertionError at the deadline."""
    deadline = time.monotonic() + timeout
    last: T = predicate()
    while not last:
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)
        last = predicate()
    return last


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def gateway_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(GATEWAY_ENV_PREFIXES)}
    src = str(REPO / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def cli(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Runs `python -m sse_gateway <args>` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "sse_gateway", *args],
        env=gateway_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        check=False,
    )


class RedisServer:
    """A real redis-server on 127.0.0.1 and a free port, with no persistence."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"redis-{self.port}.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10)

    def start(self, timeout: float = 20.0) -> RedisServer:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    REDIS_SERVER,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.workdir),
                    "--protected-mode",
                    "no",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self.proc.returncode}: {self.log_path.read_text()}"
                )
            try:
                with contextlib.closing(self.client()) as client:
                    if client.ping():
                        return self
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer PING on port {self.port}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no goodbye to the clients."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def make_token(secret: str | bytes, claims: Mapping[str, Any], algorithm: str = "HS256") -> str:
    return jwt.encode(dict(claims), secret, algorithm=algorithm)


def claims_for(brand: Any, player: Any, ttl: float = 3600, **extra: Any) -> dict[str, Any]:
    """Claims for a token; an `extra` value of None removes that claim."""
    claims: dict[str, Any] = {"brand_id": brand, "sub": player, "exp": int(time.time() + ttl)}
    for key, value in extra.items():
        if value is None:
            claims.pop(key, None)
        else:
            claims[key] = value
    return claims


class Gateway:
    """`python -m sse_gateway serve` on 127.0.0.1 and a free port, logs in a file."""

    def __init__(
        self,
        flags: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        workdir: Path,
        jwt_secret: str | None = DEFAULT_SECRET,
        port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        self.secret = jwt_secret
        self.flags = list(flags)
        if jwt_secret is not None:
            self.flags += ["--jwt-secret", jwt_secret]
        self.env = dict(env or {})
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"gateway-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "sse_gateway",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *self.flags,
        ]

    def start(self, timeout: float = 30.0, *, ready: bool = True) -> Gateway:
        """Starts and waits for /healthz 200, and for /readyz 200 too when `ready`."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command,
                env=gateway_env(self.env),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"gateway exited with {self.proc.returncode} before serving:\n{self.logs()}"
                )
            probe = "/readyz" if ready else "/healthz"
            with contextlib.suppress(OSError, EOFError, ValueError):
                if request(self.port, "GET", probe, timeout=2).status == 200:
                    return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway {probe} not 200 within {timeout}s:\n{self.logs()}")
            time.sleep(0.05)

    def logs(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def token(self, brand: Any, player: Any, ttl: float = 3600, **extra_claims: Any) -> str:
        assert self.secret is not None, "gateway started without --jwt-secret"
        return make_token(self.secret, claims_for(brand, player, ttl, **extra_claims))

    # -- HTTP helpers

    def get(
        self, target: str, headers: Mapping[str, str] | None = None, timeout: float = 15.0
    ) -> Response:
        return request(self.port, "GET", target, headers or {}, timeout=timeout)

    def request(self, method: str, target: str, **kwargs: Any) -> Response:
        return request(self.port, method, target, **kwargs)

    def open(
        self,
        target: str = "/v1/sse",
        headers: Mapping[str, str] | None = None,
        timeout: float = 15.0,
        **kwargs: Any,
    ) -> SSEClient:
        return SSEClient.connect(self.port, target, headers or {}, timeout=timeout, **kwargs)

    def stream(self, brand: str, player: str, *, wait_connected: bool = True) -> SSEClient:
        """An open stream for brand/player (token in the Authorization header)."""
        client = self.open(headers={"Authorization": f"Bearer {self.token(brand, player)}"})
        if client.status != 200:
            body = client.read_body()
            client.close()
            raise AssertionError(f"stream refused: {client.status} {body!r}")
        if wait_connected:
            client.wait_connected()
        return client

    def player_stream(
        self,
        brand: str,
        player: str,
        last_id: str | None = None,
        *,
        query: bool = False,
        **kwargs: Any,
    ) -> tuple[SSEClient, dict[str, Any]]:
        """An open stream and its `connected` payload; `last_id` as a header or as
        `?last_event_id=` (query=True). Extra keyword arguments go to `SSEClient.connect`."""
        headers = {"Authorization": f"Bearer {self.token(brand, player)}"}
        target = "/v1/sse"
        if last_id is not None:
            if query:
                target += "?last_event_id=" + quote(last_id, safe="")
            else:
                headers["Last-Event-ID"] = last_id
        client = self.open(target, headers, **kwargs)
        if client.status != 200:
            body = client.read_body()
            client.close()
            raise AssertionError(f"stream refused: {client.status} {body!r}")
        return client, client.wait_connected()

    def metrics_text(self) -> str:
        response = self.get("/metrics")
        assert response.status == 200, response
        return response.body.decode()

    def metrics(self) -> Metrics:
        return Metrics.parse(self.metrics_text())

    def readyz(self) -> tuple[int, dict[str, Any]]:
        response = self.get("/readyz", timeout=5)
        return response.status, response.json()

    # -- lifecycle

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def terminate(self) -> None:
        self.signal(signal.SIGTERM)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL (of the whole process group) if it lingers."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(15)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


class GatewayFactory(Protocol):
    """The `gateway_factory` fixture: starts a gateway, stopped after the test."""

    def __call__(
        self,
        *flags: str,
        redis: RedisServer | str | None = None,
        env: dict[str, str] | None = None,
        jwt_secret: str | None = ...,
        start: bool = True,
        ready: bool = True,
    ) -> Gateway: ...


class Metrics:
    """Samples of a Prometheus text exposition, keyed by name and label set."""

    def __init__(self, samples: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> None:
        self.samples = samples

    @classmethod
    def parse(cls, text: str) -> Metrics:
        """Through prometheus-client's own parser: what it cannot read, Prometheus cannot."""
        samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return cls(samples)

    def get(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))

    def value(self, name: str, **labels: str) -> float:
        """The sample's value; 0 when a labelled counter has not been created yet."""
        found = self.get(name, **labels)
        if found is None:
            if not labels and not any(n == name for n, _ in self.samples):
                raise KeyError(f"metric {name} not exposed")
            return 0.0
        return found

    def total(self, name: str) -> float:
        return sum(v for (n, _), v in self.samples.items() if n == name)

    def has(self, name: str) -> bool:
        return any(n == name for n, _ in self.samples)


@contextlib.contextmanager
def running_gateway(
    flags: Sequence[str] = (), *, workdir: Path, **kwargs: Any
) -> Iterator[Gateway]:
    gateway = Gateway(flags, workdir=workdir, **kwargs)
    try:
        gateway.start()
        yield gateway
    finally:
        gateway.stop()


@contextlib.contextmanager
def running_pair(flags: Sequence[str], *, workdir: Path) -> Iterator[tuple[Gateway, Gateway]]:
    """Two gateway instances with the same flags (in `workdir`/a and /b); both stopped after."""
    with (
        running_gateway(flags, workdir=workdir / "a") as a,
        running_gateway(flags, workdir=workdir / "b") as b,
    ):
        yield a, b


def publish(client: redis.Redis, brand: str, player: str, message: Any) -> int:
    """PUBLISH on the player's channel: dicts/lists are JSON-encoded, bytes/str sent as is."""
    payload: bytes | str
    payload = message if isinstance(message, bytes | str) else json.dumps(message)
    receivers: int = client.publish(f"SSE::{brand}::{player}", payload)
    return receivers
