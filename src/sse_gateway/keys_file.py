"""SSE_JWT_KEYS_FILE: each brand's verification keys, or the JWKS URL they are fetched from.

Read at start by the settings and again on SIGHUP (edge/keyring.py); a file that does not load
raises ValueError naming the brand and the key, so that neither a start nor a reload half-works.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt

from sse_gateway.wire.naming import is_valid_id


@dataclass(frozen=True, slots=True)
class BrandKey:
    """One verification key: its algorithm (from configuration, never from a token), the key
    (an HS256 secret or a PEM public key) and an optional key id matched against a token's
    `kid` header."""

    alg: str
    key: str = field(repr=False)
    kid: str | None = None


@dataclass(frozen=True, slots=True)
class BrandKeys:
    """What SSE_JWT_KEYS_FILE gives one brand: keys tried in order (`keys`), or a JWKS URL
    whose signing keys are fetched and refreshed (`jwks_url`, with `jwks_alg` restricting
    them to one algorithm when set)."""

    keys: tuple[BrandKey, ...] = ()
    jwks_url: str | None = None
    jwks_alg: str | None = None


JWT_ALGORITHMS = ("HS256", "RS256", "ES256", "EdDSA")
#: Keys a token without `kid` may be tried against: each try of a public key costs an RSA or
#: ECDSA verification, so a bad token must not cost many.
MAX_KEYS_PER_BRAND = 16
MAX_KID_LENGTH = 256


def load_jwt_keys(path: str) -> dict[str, BrandKeys]:
    """Reads SSE_JWT_KEYS_FILE: a JSON object of brand id → one of

    - `{"alg", "key", "kid"?}`: one key;
    - `[{"alg", "key", "kid"?}, ...]`: up to MAX_KEYS_PER_BRAND keys, tried in that order;
    - `{"jwks_url", "alg"?}`: the signing keys of a JWKS document (fetched by the gateway).

    Raises ValueError naming the brand (and the key) that cannot be used.
    """
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read: {exc.strerror}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from exc
    if not isinstance(raw, dict) or not raw:
        raise ValueError('expected a non-empty object {"<brand_id>": {"alg": ..., "key": ...}}')
    keys: dict[str, BrandKeys] = {}
    for brand, entry in raw.items():
        if not is_valid_id(brand):
            raise ValueError(f"brand id {brand!r} is not [A-Za-z0-9_.-]{{1,64}}")
        keys[brand] = _brand_keys(brand, entry)
    return keys


def _brand_keys(brand: str, entry: object) -> BrandKeys:
    if isinstance(entry, dict) and "jwks_url" in entry:
        return _jwks_source(brand, entry)
    if isinstance(entry, dict):
        return BrandKeys(keys=(_brand_key(f"brand {brand!r}", entry),))
    if not isinstance(entry, list):
        raise ValueError(
            f"brand {brand!r}: expected an object with alg and key, a list of them, "
            "or an object with jwks_url"
        )
    if not 1 <= len(entry) <= MAX_KEYS_PER_BRAND:
        raise ValueError(f"brand {brand!r}: a key list holds 1 to {MAX_KEYS_PER_BRAND} keys")
    parsed: list[BrandKey] = []
    for index, item in enumerate(entry, 1):
        where = f"brand {brand!r} key #{index}"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected an object with alg and key")
        key = _brand_key(where, item)
        if key.kid is not None and any(other.kid == key.kid for other in parsed):
            raise ValueError(f"{where}: kid {key.kid!r} is given twice")
        parsed.append(key)
    return BrandKeys(keys=tuple(parsed))


def _brand_key(where: str, entry: dict[str, Any]) -> BrandKey:
    alg, key, kid = entry.get("alg"), entry.get("key"), entry.get("kid")
    if alg not in JWT_ALGORITHMS:
        raise ValueError(f"{where}: alg must be one of {', '.join(JWT_ALGORITHMS)}")
    if not isinstance(key, str) or not key:
        raise ValueError(f"{where}: key must be a non-empty string")
    if kid is not None and not (isinstance(kid, str) and 1 <= len(kid) <= MAX_KID_LENGTH):
        raise ValueError(f"{where}: kid must be a string of 1-{MAX_KID_LENGTH} characters")
    if alg != "HS256" and "-----BEGIN" not in key:
        raise ValueError(f"{where}: {alg} needs a PEM public key")
    if alg == "HS256" and "-----BEGIN" in key:
        raise ValueError(f"{where}: HS256 takes a shared secret, not a PEM key")
    try:
        jwt.get_algorithm_by_name(alg).prepare_key(key)
    except (jwt.InvalidKeyError, ValueError, TypeError) as exc:
        raise ValueError(f"{where}: not a usable {alg} key: {exc}") from exc
    return BrandKey(alg=str(alg), key=key, kid=kid)


_LOOPBACK_HOSTS = frozenset({"localhost", "::1"})


def _jwks_source(brand: str, entry: dict[str, Any]) -> BrandKeys:
    where = f"brand {brand!r}"
    if "key" in entry:
        raise ValueError(f"{where}: give either key or jwks_url, not both")
    url, alg = entry.get("jwks_url"), entry.get("alg")
    if not isinstance(url, str) or not url:
        raise ValueError(f"{where}: jwks_url must be a non-empty string")
    parts = urlsplit(url)
    host = parts.hostname or ""
    # Keys fetched in clear text could be swapped on the way: only a loopback address (a local
    # sidecar, the tests) is trusted without TLS.
    loopback = host in _LOOPBACK_HOSTS or host.startswith("127.")
    if not host or not (parts.scheme == "https" or (parts.scheme == "http" and loopback)):
        raise ValueError(f"{where}: jwks_url must be https:// (http:// only to a loopback host)")
    if alg is not None and alg not in JWT_ALGORITHMS[1:]:
        raise ValueError(f"{where}: a JWKS alg must be one of {', '.join(JWT_ALGORITHMS[1:])}")
    return BrandKeys(jwks_url=url, jwks_alg=alg)
