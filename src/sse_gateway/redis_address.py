"""Where Redis is: `EVENTS_REDIS_STORAGE` (and the publisher's `--redis`) parsed, pure.

    host | host:port | [::1]:port
    redis://[user:pass@]host[:port][/db][?tls options]          one Redis
    rediss://…                                                    the same over TLS
    redis+cluster://[user:pass@]host:port[,host:port…][?…]       Redis Cluster (seed nodes)
    rediss+cluster://…
    redis+sentinel://[user:pass@]host:port[,host:port…]/<master-name>[/db][?…]
    rediss+sentinel://…

TLS options (query parameters, redis-py's names; only with `rediss`): `ssl_ca_certs` (a CA
bundle file to trust instead of the system store), `ssl_certfile` and `ssl_keyfile` (a client
certificate and its key, for services that require one). Sentinel: `sentinel_username`,
`sentinel_password` when the sentinels have credentials of their own (the URL's user and
password are the data nodes').
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qs, quote, unquote

Mode = Literal["single", "cluster", "sentinel"]
_SCHEMES: dict[str, tuple[Mode, bool]] = {
    "redis": ("single", False),
    "rediss": ("single", True),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
}
_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
_SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """One Redis (`mode` "single"), a Redis Cluster's seed nodes, or a Sentinel set.

    `host`/`port` are the single node's, or the first seed/sentinel's; `nodes` lists every
    one given, in order (for "single", just that one). `master_name` is Sentinel's name of
    the primary. `db` is always 0 for a cluster.
    """

    host: str
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    mode: Mode = "single"
    nodes: tuple[tuple[str, int], ...] = ()
    master_name: str | None = None
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None

    @property
    def all_nodes(self) -> tuple[tuple[str, int], ...]:
        """Every node given: the seeds of a cluster, the sentinels, or the one Redis."""
        return self.nodes or ((self.host, self.port),)

    def with_node(self, host: str, port: int) -> RedisAddress:
        """This address pointed at one node (a cluster's shard, Sentinel's primary): the
        same credentials and TLS, mode "single"."""
        return RedisAddress(
            host=host,
            port=port,
            db=self.db,
            username=self.username,
            password=self.password,
            tls=self.tls,
            ssl_ca_certs=self.ssl_ca_certs,
            ssl_certfile=self.ssl_certfile,
            ssl_keyfile=self.ssl_keyfile,
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for a connection, or None without TLS. Raises OSError/SSLError when
        a CA or certificate file cannot be read."""
        if not self.tls:
            return None
        context = ssl.create_default_context(cafile=self.ssl_ca_certs)
        if self.ssl_certfile is not None:
            context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile)
        return context

    def url(self, *, redact: bool = True) -> str:
        """The address as a URL, with the password replaced by `***` unless `redact` is False."""
        scheme = ("rediss" if self.tls else "redis") + (
            "" if self.mode == "single" else "+" + self.mode
        )
        auth = ""
        if self.password is not None:
            secret = "***" if redact else quote(self.password, safe="")
            auth = f"{quote(self.username or '', safe='')}:{secret}@"
        hosts = ",".join(_format_host(host, port) for host, port in self.all_nodes)
        path = f"/{self.db}"
        if self.mode == "sentinel":
            path = f"/{self.master_name}/{self.db}"
        elif self.mode == "cluster":
            path = ""
        return f"{scheme}://{auth}{hosts}{path}"


def _format_host(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_redis_address(text: str) -> RedisAddress:
    """An address in one of the forms of this module's docstring; ValueError says why not."""
    text = text.strip()
    if not text:
        raise ValueError("empty address")
    if "://" not in text:
        text = "redis://" + text
    scheme, _, rest = text.partition("://")
    if scheme.lower() not in _SCHEMES:
        raise ValueError(
            "scheme must be redis://, rediss://, redis+cluster://, rediss+cluster://,"
            " redis+sentinel:// or rediss+sentinel://"
        )
    mode, tls = _SCHEMES[scheme.lower()]
    rest = rest.partition("#")[0]
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) if user else None
        password = unquote(secret) if colon else None
    nodes = tuple(_parse_node(part) for part in hostlist.split(","))
    if mode == "single" and len(nodes) > 1:
        raise ValueError("several hosts need redis+cluster:// or redis+sentinel://")
    options = _parse_options(query, tls, mode)
    segments = [segment for segment in path.split("/") if segment] if slash else []
    master_name = None
    if mode == "sentinel":
        if not segments:
            raise ValueError("redis+sentinel:// needs the master name: …/<master-name>")
        master_name = unquote(segments.pop(0))
    if mode == "cluster" and segments and segments != ["0"]:
        raise ValueError("a Redis Cluster has only database 0")
    if len(segments) > 1:
        raise ValueError(
            "the path must be /<db>" + (" after the master name" if master_name else "")
        )
    db_text = segments[0] if segments else "0"
    if not db_text.isdigit():
        raise ValueError("database must be a number")
    host, port = nodes[0]
    return RedisAddress(
        host=host,
        port=port,
        db=int(db_text),
        username=username,
        password=password,
        tls=tls,
        mode=mode,
        nodes=nodes if mode != "single" else (),
        master_name=master_name,
        **options,
    )


def _parse_node(text: str) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):
        host, bracket, port_text = text[1:].partition("]")
        if not bracket or (port_text and not port_text.startswith(":")):
            raise ValueError(f"bad host {text!r}")
        port_text = port_text[1:]
    elif text.count(":") > 1:
        raise ValueError(f"an IPv6 host goes in brackets: [{text}]")
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError("missing host")
    port = 6379
    if port_text:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"bad port {port_text!r}: must be 1-65535")
        port = int(port_text)
    return unquote(host), port


def _parse_options(query: str, tls: bool, mode: Mode) -> dict[str, str]:
    known = _TLS_OPTIONS + (_SENTINEL_OPTIONS if mode == "sentinel" else ())
    options: dict[str, str] = {}
    for name, values in parse_qs(query, keep_blank_values=True, strict_parsing=False).items():
        if name not in known:
            raise ValueError(f"unknown option {name!r} (known: {', '.join(known)})")
        if len(values) != 1 or not values[0]:
            raise ValueError(f"option {name!r} needs one non-empty value")
        if name in _TLS_OPTIONS and not tls:
            raise ValueError(f"{name} needs TLS: rediss://")
        options[name] = values[0]
    if "ssl_keyfile" in options and "ssl_certfile" not in options:
        raise ValueError("ssl_keyfile needs ssl_certfile")
    return options
