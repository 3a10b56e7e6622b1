"""JWKS: the signing keys a brand publishes at a URL, fetched in the background and refreshed.

Fetching is blocking urllib in a daemon thread (no HTTP client is a dependency, and a thread
keeps the event loop free); parsing turns each usable JWK into a `BrandKey` with a PEM public
key, so that a fetched key is checked exactly like one from the keys file. The algorithm of a
key comes from the JWK (`alg`, else its type and curve) or from the brand's `alg`, never from
a token.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple, TypeVar
from urllib.parse import urlsplit

import jwt
import orjson
from cryptography.hazmat.primitives import serialization

from sse_gateway.keys_file import MAX_KEYS_PER_BRAND, MAX_KID_LENGTH, BrandKey

log = logging.getLogger("sse_gateway")

T = TypeVar("T")

#: A JWKS document larger than this is refused (a few keys take a few KiB).
MAX_JWKS_BYTES = 1 << 20
FETCH_TIMEOUT = 5.0
#: After a failed fetch, the next try comes this soon (or at the refresh period if shorter).
RETRY_AFTER_FAILURE = 30.0
#: A token with an unknown kid makes its brand's JWKS be fetched early at most this often:
#: tokens with made-up kids must not turn the gateway into a load generator for the JWKS host.
EARLY_REFRESH_GAP = 30.0

# What each supported algorithm needs of a JWK: the key type and, for curves, the curve.
_KEY_TYPES = {"RS256": ("RSA", None), "ES256": ("EC", "P-256"), "EdDSA": ("OKP", "Ed25519")}
_DEFAULT_ALG: dict[tuple[object, object], str] = {
    ("RSA", None): "RS256",
    ("EC", "P-256"): "ES256",
    ("OKP", "Ed25519"): "EdDSA",
}


class JwksError(Exception):
    """A JWKS document that could not be fetched or holds no usable key."""


class JwksSource(NamedTuple):
    url: str
    alg: str | None = None


def shown_url(url: str) -> str:
    """The URL as logs may show it: no credentials, no query (either may carry a secret)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port is not None else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect could lead from https to http, or elsewhere: JWKS URLs are configured exactly."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirect)


def fetch_url(url: str) -> bytes:
    """GET `url` (blocking): the body of a 200, at most MAX_JWKS_BYTES; JwksError otherwise."""
    request = urllib.request.Request(
        url, headers={"Accept": "application/json", "User-Agent": "sse-gateway"}
    )
    deadline = time.monotonic() + 2 * FETCH_TIMEOUT
    try:
        with _opener.open(request, timeout=FETCH_TIMEOUT) as response:
            if response.status != 200:
                raise JwksError(f"HTTP {response.status}")
            chunks: list[bytes] = []
            size = 0
            while chunk := response.read(65536):
                size += len(chunk)
                if size > MAX_JWKS_BYTES:
                    raise JwksError(f"document larger than {MAX_JWKS_BYTES} bytes")
                if time.monotonic() > deadline:
                    raise JwksError("document took too long to arrive")
                chunks.append(chunk)
            return b"".join(chunks)
    except urllib.error.HTTPError as exc:
        raise JwksError(f"HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise JwksError(f"cannot fetch: {reason}") from exc


def parse_jwks(document: bytes, alg: str | None = None) -> tuple[BrandKey, ...]:
    """The signing keys of a JWKS document (RFC 7517 §5), in document order.

    Skipped: keys for encryption (`use` other than `sig`), symmetric keys (`kty: oct`: a secret
    is never taken from a URL), keys of another algorithm than `alg` when given, keys of an
    algorithm the gateway does not verify, and a repeated kid. Raises JwksError when none is
    left, more than MAX_KEYS_PER_BRAND are, or the document is not a JWKS.
    """
    try:
        value = orjson.loads(document)
    except orjson.JSONDecodeError as exc:
        raise JwksError(f"not JSON: {exc}") from exc
    entries = value.get("keys") if isinstance(value, dict) else None
    if not isinstance(entries, list):
        raise JwksError('not a JWKS document: expected {"keys": [...]}')
    keys: list[BrandKey] = []
    for entry in entries:
        key = _signing_key(entry, alg)
        if key is None or (key.kid is not None and any(k.kid == key.kid for k in keys)):
            continue
        keys.append(key)
    if not keys:
        raise JwksError("no usable signing key (RS256, ES256 or EdDSA)")
    if len(keys) > MAX_KEYS_PER_BRAND:
        raise JwksError(f"more than {MAX_KEYS_PER_BRAND} signing keys")
    return tuple(keys)


def _signing_key(entry: object, brand_alg: str | None) -> BrandKey | None:
    if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
        return None
    kty, crv, kid = entry.get("kty"), entry.get("crv"), entry.get("kid")
    if kid is not None and not (isinstance(kid, str) and 1 <= len(kid) <= MAX_KID_LENGTH):
        return None
    alg = entry.get("alg") or brand_alg or _DEFAULT_ALG.get((kty, crv))
    if alg not in _KEY_TYPES or (brand_alg is not None and alg != brand_alg):
        return None
    want_kty, want_crv = _KEY_TYPES[alg]
    if kty != want_kty or (want_crv is not None and crv != want_crv):
        return None
    try:
        loaded: Any = jwt.get_algorithm_by_name(alg).from_jwk(entry)
    except (jwt.InvalidKeyError, ValueError, TypeError, KeyError):
        return None
    if hasattr(loaded, "public_key"):  # a JWK with its private part: keep only the public one
        loaded = loaded.public_key()
    pem = loaded.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")
    return BrandKey(alg=alg, key=pem, kid=kid)


def kid_changes(old: Iterable[BrandKey], new: Iterable[BrandKey]) -> str:
    """`added kid 'b'; removed kid 'a'`: what differs between two key lists, by kid only
    (keys without a kid are counted), never by key material. Empty when nothing differs."""
    old, new = tuple(old), tuple(new)
    old_kids = {k.kid: k for k in old if k.kid is not None}
    new_kids = {k.kid: k for k in new if k.kid is not None}
    parts = [f"added kid {kid!r}" for kid in new_kids if kid not in old_kids]
    parts += [f"removed kid {kid!r}" for kid in old_kids if kid not in new_kids]
    parts += [
        f"replaced the key of kid {kid!r}"
        for kid, key in new_kids.items()
        if kid in old_kids and old_kids[kid] != key
    ]
    old_bare = [k for k in old if k.kid is None]
    new_bare = [k for k in new if k.kid is None]
    added = sum(1 for k in new_bare if k not in old_bare)
    removed = sum(1 for k in old_bare if k not in new_bare)
    if added:
        parts.append(f"added {added} key{'s' if added > 1 else ''} without kid")
    if removed:
        parts.append(f"removed {removed} key{'s' if removed > 1 else ''} without kid")
    if not parts and old != new:
        parts.append("reordered the keys")
    return "; ".join(parts)


async def in_daemon_thread(function: Callable[[], T]) -> T:
    """`function()` in a thread of its own: a daemon, unlike the loop's default executor,
    whose threads the interpreter waits for at exit (a JWKS host that stalls must not hold
    up a shutdown). Cancelling the await abandons the result."""
    done: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        if not done.set_running_or_notify_cancel():
            return
        try:
            done.set_result(function())
        except BaseException as exc:
            done.set_exception(exc)

    threading.Thread(target=run, name="sse-gateway-jwks", daemon=True).start()
    return await asyncio.wrap_future(done)


class JwksRefresher:
    """One background task per JWKS brand: fetch, hand the keys to `apply(brand, keys)`,
    sleep `refresh` seconds (RETRY_AFTER_FAILURE after a failure), again. A failed fetch
    keeps the keys in force and logs an error. `refresh_soon(brand)` (a token with an unknown
    kid) wakes the brand's task early, at most once per EARLY_REFRESH_GAP."""

    def __init__(
        self,
        apply: Callable[[str, tuple[BrandKey, ...]], None],
        *,
        refresh: float,
        fetch: Callable[[str], bytes] = fetch_url,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._apply = apply
        self._refresh = refresh
        self._fetch = fetch
        self._clock = clock
        self._sources: dict[str, JwksSource] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._fetched: dict[str, asyncio.Event] = {}
        self._keys: dict[str, tuple[BrandKey, ...]] = {}
        self._last_early: dict[str, float] = {}
        #: Fetches ended so far, well or not, over every brand.
        self.attempts = 0

    @property
    def sources(self) -> Mapping[str, JwksSource]:
        return self._sources

    def configure(self, sources: Mapping[str, JwksSource]) -> None:
        """Starts a task for each new brand, and anew for a brand whose source changed (its
        old keys are dropped: another URL is another issuer); stops those no longer listed.
        Needs the running loop."""
        for brand in list(self._sources):
            if sources.get(brand) != self._sources[brand]:
                self._stop(brand)
        for brand, source in sources.items():
            if brand not in self._sources:
                self._sources[brand] = source
                self._wake[brand] = asyncio.Event()
                self._fetched[brand] = asyncio.Event()
                self._tasks[brand] = asyncio.create_task(
                    self._run(brand, source), name=f"jwks-{brand}"
                )

    def _stop(self, brand: str) -> None:
        self._tasks.pop(brand).cancel()
        del self._sources[brand], self._wake[brand], self._fetched[brand]
        self._keys.pop(brand, None)
        self._last_early.pop(brand, None)
        self._apply(brand, ())

    def refresh_soon(self, brand: str) -> bool:
        """Wakes the brand's task for a fetch now, unless one was asked for less than
        EARLY_REFRESH_GAP ago; True when it was woken."""
        wake = self._wake.get(brand)
        if wake is None or wake.is_set():
            return False
        now = self._clock()
        last = self._last_early.get(brand)
        if last is not None and now - last < EARLY_REFRESH_GAP:
            return False
        self._last_early[brand] = now
        log.info("brand %r: a token's kid is not in its JWKS; fetching it again now", brand)
        wake.set()
        return True

    async def wait_fetched(self, timeout: float) -> None:
        """Waits (at most `timeout` s) until every brand's first fetch has ended, well or not."""
        waits = [asyncio.ensure_future(event.wait()) for event in self._fetched.values()]
        if not waits:
            return
        _, pending = await asyncio.wait(waits, timeout=timeout)
        for waiter in pending:
            waiter.cancel()

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

    async def _run(self, brand: str, source: JwksSource) -> None:
        wake, fetched = self._wake[brand], self._fetched[brand]
        while True:
            # Cleared before the fetch: an unknown kid seen while it runs asks for another one
            # (the key may have been published after this fetch read the document).
            wake.clear()
            delay = self._refresh
            try:
                keys = await self._keys_of(source)
                self._use(brand, source, keys)
            except Exception as exc:  # a JWKS host must never end the refreshes
                delay = min(self._refresh, RETRY_AFTER_FAILURE)
                log.error(
                    "brand %r: JWKS %s: %s; keeping the %d keys in force",
                    brand,
                    shown_url(source.url),
                    exc if isinstance(exc, JwksError) else repr(exc),
                    len(self._keys.get(brand, ())),
                )
            self.attempts += 1
            fetched.set()
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # meets a wake-up, and close() would then wait a whole period.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await wake.wait()

    async def _keys_of(self, source: JwksSource) -> tuple[BrandKey, ...]:
        document = await in_daemon_thread(lambda: self._fetch(source.url))
        return parse_jwks(document, source.alg)

    def _use(self, brand: str, source: JwksSource, keys: tuple[BrandKey, ...]) -> None:
        previous = self._keys.get(brand)
        if previous == keys:
            return
        self._apply(brand, keys)  # first: keys it refuses (it raises) are not logged as in force
        self._keys[brand] = keys
        if previous is None:
            kids = ", ".join(repr(k.kid) for k in keys if k.kid is not None) or "none"
            log.info(
                "brand %r: %d keys from JWKS %s (kids: %s)",
                brand,
                len(keys),
                shown_url(source.url),
                kids,
            )
        else:
            log.info(
                "brand %r: JWKS %s %s", brand, shown_url(source.url), kid_changes(previous, keys)
            )
