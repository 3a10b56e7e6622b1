"""The brand keys in force: SSE_JWT_KEYS_FILE, reloaded on SIGHUP, and the JWKS of the brands
that name one. Open streams are never touched: a token is checked once, when its stream opens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import jwt

from sse_gateway.edge.auth import TokenVerifier
from sse_gateway.edge.jwks import JwksRefresher, JwksSource, fetch_url, kid_changes, shown_url
from sse_gateway.keys_file import BrandKeys, load_jwt_keys

log = logging.getLogger("sse_gateway")

#: How long a start waits for the first fetch of every JWKS (tokens of a JWKS brand are
#: refused until its keys are in).
JWKS_START_WAIT = 5.0


def jwks_sources(brands: Mapping[str, BrandKeys]) -> dict[str, JwksSource]:
    return {
        brand: JwksSource(entry.jwks_url, entry.jwks_alg)
        for brand, entry in brands.items()
        if entry.jwks_url is not None
    }


def _summary(entry: BrandKeys) -> str:
    if entry.jwks_url is not None:
        return f"JWKS {shown_url(entry.jwks_url)}"
    kids = [repr(key.kid) if key.kid is not None else f"({key.alg}, no kid)" for key in entry.keys]
    return f"{len(entry.keys)} key{'s' if len(entry.keys) > 1 else ''}: {', '.join(kids)}"


def describe_changes(old: Mapping[str, BrandKeys], new: Mapping[str, BrandKeys]) -> list[str]:
    """One line per brand that differs, naming keys by kid (never by their material)."""
    lines = [f"brand {brand!r} added ({_summary(new[brand])})" for brand in new if brand not in old]
    lines += [f"brand {brand!r} removed" for brand in old if brand not in new]
    for brand, entry in new.items():
        before = old.get(brand)
        if before is None or before == entry:
            continue
        if entry.jwks_url is not None or before.jwks_url is not None:
            lines.append(f"brand {brand!r} now uses {_summary(entry)}")
        else:
            lines.append(f"brand {brand!r}: {kid_changes(before.keys, entry.keys)}")
    return lines


class KeyRing:
    """Owns the verifier's keys after start: `reload()` (SIGHUP) re-reads the keys file and
    swaps the whole set at once, or keeps the set in force when the file is invalid; JWKS
    brands are fetched in the background (`start`, `close`)."""

    def __init__(
        self,
        verifier: TokenVerifier,
        *,
        keys_file: str | None,
        brand_keys: Mapping[str, BrandKeys],
        jwks_refresh: float,
        fetch: Callable[[str], bytes] = fetch_url,
    ) -> None:
        self._verifier = verifier
        self._path = keys_file
        self._brands = dict(brand_keys)
        self._jwks = JwksRefresher(verifier.set_jwks_keys, refresh=jwks_refresh, fetch=fetch)
        verifier.on_unknown_kid = self._jwks.refresh_soon

    @property
    def brands(self) -> Mapping[str, BrandKeys]:
        """The keys file's content in force."""
        return self._brands

    async def start(self, wait: float = JWKS_START_WAIT) -> None:
        """Starts the JWKS fetches and waits at most `wait` s for the first of each."""
        self._jwks.configure(jwks_sources(self._brands))
        await self._jwks.wait_fetched(wait)

    def reload(self) -> bool:
        """Re-reads SSE_JWT_KEYS_FILE and puts it in force; logs what changed (INFO) or why
        the file was refused (ERROR, and the keys in force stay). True when it was put in
        force. Needs the running loop (JWKS tasks start and stop here)."""
        if self._path is None:
            log.info("SIGHUP: no SSE_JWT_KEYS_FILE to reload", extra={"event": "keys_reload"})
            return False
        try:
            brands = load_jwt_keys(self._path)
            self._verifier.set_brand_keys(brands)
        except (ValueError, TypeError, jwt.PyJWTError) as exc:
            log.error(
                "SSE_JWT_KEYS_FILE %s not reloaded, the keys in force stay: %s",
                self._path,
                exc,
                extra={"event": "keys_reload_failed"},
            )
            return False
        changes = describe_changes(self._brands, brands)
        self._brands = brands
        self._jwks.configure(jwks_sources(brands))
        if not changes:
            log.info(
                "SSE_JWT_KEYS_FILE %s reloaded: no change",
                self._path,
                extra={"event": "keys_reload"},
            )
        for change in changes:
            log.info(
                "SSE_JWT_KEYS_FILE %s reloaded: %s",
                self._path,
                change,
                extra={"event": "keys_reload"},
            )
        return True

    async def close(self) -> None:
        await self._jwks.close()
