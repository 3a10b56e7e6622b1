"""Token checking: pure functions over the token string and the configured keys.

The algorithm always comes from configuration, never from the token header, and a token is
checked only with the keys of the brand it names: one brand's key cannot admit another's players.
A brand may have several keys (rotation): the token's `kid` picks one, or they are tried in order.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jwt
import orjson

from sse_gateway.keys_file import BrandKey, BrandKeys
from sse_gateway.wire.naming import Identity, is_valid_id


class AuthError(Exception):
    """Refusal of a token; maps straight onto the HTTP error response."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


_LEEWAY_SECONDS = 5
_ID_RULE = "1-64 chars of [A-Za-z0-9_.-]"
_MAX_TOKEN_BYTES = 8192
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_URLSAFE_TO_STD = bytes.maketrans(b"-_", b"+/")


def _invalid(message: str) -> AuthError:
    return AuthError(401, "invalid_token", message)


class _Key:
    """One configured verification key, parsed once (PEM parsing costs more than a check)."""

    __slots__ = ("alg", "hmac_key", "kid", "prepared", "verifier")

    def __init__(self, alg: str, key: str, kid: str | None = None) -> None:
        self.alg = alg
        self.kid = kid
        self.verifier = jwt.get_algorithm_by_name(alg)
        # prepare_key refuses e.g. a PEM public key as an HMAC secret (algorithm confusion).
        self.prepared = self.verifier.prepare_key(key)
        # HS256: the keyed state is set up once and copied per token (cheaper than keying anew).
        self.hmac_key = (
            hmac.new(key.encode("utf-8"), digestmod=hashlib.sha256) if alg == "HS256" else None
        )

    def check(self, signing_input: bytes, signature: bytes) -> bool:
        if self.hmac_key is not None:
            mac = self.hmac_key.copy()
            mac.update(signing_input)
            return hmac.compare_digest(mac.digest(), signature)
        return bool(self.verifier.verify(signing_input, self.prepared, signature))


# The characters that may end a canonical base64url segment (RFC 4648 §3.5: the bits a last
# character carries beyond the data are zero), by the segment's length modulo 4.
_CANONICAL_LAST = {2: frozenset("AQgw"), 3: frozenset("AEIMQUYcgkosw048")}


def _b64url(segment: str) -> bytes:
    """base64url without padding, canonical only (ValueError otherwise): four strings that
    differ in the last character's unused bits must not pass for one token, or a denylist or
    replay cache keyed on the string is sidestepped. The caller has checked the alphabet."""
    rest = len(segment) % 4
    if rest == 1 or (rest and segment[-1] not in _CANONICAL_LAST[rest]):
        raise ValueError("not canonical base64url")
    # bytes.translate is a table lookup; str.translate a dict lookup per character (6x slower).
    padded = (segment + "=" * (-len(segment) % 4)).encode("ascii")
    return binascii.a2b_base64(padded.translate(_URLSAFE_TO_STD))


def _b64_json(segment: str, what: str) -> dict[str, Any]:
    try:
        value = orjson.loads(_b64url(segment))
    except (ValueError, RecursionError) as exc:
        raise _invalid(f"malformed token {what}") from exc
    if not isinstance(value, dict):
        raise _invalid(f"token {what} is not a JSON object")
    return value


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _prepared(keys: Iterable[BrandKey]) -> tuple[_Key, ...]:
    return tuple(_Key(key.alg, key.key, key.kid) for key in keys)


class TokenVerifier:
    """Compact-JWS verification with the brand's configured keys and their algorithms.

    Done here rather than by `jwt.decode` because a connect storm is bound by it: PyJWT
    validates base64 character by character in Python and prepares the key on every call.
    PyJWT's algorithm objects still do the RSA/ECDSA/EdDSA arithmetic.

    Which keys check a token: those of the brand it names (the keys file, or the JWKS of a
    brand that gives one), else `secret` (HS256) for a brand the file does not list. A `kid`
    header picks the brand's key with that kid (keys without a kid match any); no key → 401.
    Without `kid` the brand's keys are tried in order. Each key keeps its own algorithm.
    `on_unknown_kid(brand)` is told when a JWKS brand has no key for a token, so that its
    keys are fetched again early; the token is refused all the same (nothing waits here).
    """

    def __init__(
        self,
        *,
        secret: str | None,
        brand_keys: Mapping[str, BrandKeys],
        audience: str | None = None,
        issuer: str | None = None,
        max_ttl: float | None = None,
        on_unknown_kid: Callable[[str], object] | None = None,
    ) -> None:
        """`max_ttl` (SSE_JWT_MAX_TTL, seconds): a token whose `exp` lies further ahead is
        refused; None: no bound. `on_unknown_kid(brand)` hears of a JWKS brand's unknown kid."""
        self._max_ttl = max_ttl
        self._default = (_Key("HS256", secret),) if secret is not None else None
        self._audience = audience
        self._issuer = issuer
        self.on_unknown_kid = on_unknown_kid
        self._keys: dict[str, tuple[_Key, ...]] = {}
        self._jwks: dict[str, tuple[_Key, ...]] = {}
        self.set_brand_keys(brand_keys)

    def set_brand_keys(self, brand_keys: Mapping[str, BrandKeys]) -> None:
        """Puts a (re)loaded keys file in force, all at once: every key is prepared first, so a
        key that fails leaves the set in force untouched (ValueError, jwt.InvalidKeyError).
        JWKS brands keep the keys fetched so far; a brand that left the file loses its keys."""
        keys = {
            brand: _prepared(entry.keys)
            for brand, entry in brand_keys.items()
            if entry.jwks_url is None
        }
        jwks = {
            brand: self._jwks.get(brand, ())
            for brand, entry in brand_keys.items()
            if entry.jwks_url is not None
        }
        self._keys, self._jwks = keys, jwks

    def set_jwks_keys(self, brand: str, keys: Iterable[BrandKey]) -> None:
        """The keys of a JWKS brand, as last fetched; ignored for a brand that has no JWKS
        (any more: a fetch may finish after a reload removed it)."""
        if brand in self._jwks:
            self._jwks[brand] = _prepared(keys)

    def _candidates(self, brand: object, kid: str | None) -> tuple[_Key, ...]:
        """The keys that may have signed a token of `brand` with header `kid`, in order."""
        keys: tuple[_Key, ...] | None = None
        jwks = False
        if isinstance(brand, str):
            keys = self._keys.get(brand)
            if keys is None:
                keys = self._jwks.get(brand)
                jwks = keys is not None
        if keys is None:
            if self._default is None:
                raise _invalid("no key is configured for this token's brand")
            return self._default
        if kid is not None:
            keys = tuple(k for k in keys if k.kid == kid) or tuple(k for k in keys if k.kid is None)
        if not keys:
            if jwks and self.on_unknown_kid is not None:
                assert isinstance(brand, str)
                self.on_unknown_kid(brand)
            if kid is None:
                raise _invalid("no key of this token's brand is loaded yet")
            raise _invalid("no key of this token's brand has its kid")
        return keys

    def verify(self, token: str, now: float | None = None) -> Identity:
        """The identity a token proves, with `valid_until` (its `exp` plus the clock leeway:
        when a stream opened with it ends); raises AuthError (401 / 400) otherwise."""
        if len(token) > _MAX_TOKEN_BYTES or not _COMPACT_JWS.fullmatch(token):
            raise _invalid("token is not a JWS compact serialization")
        header_b64, payload_b64, signature_b64 = token.split(".")
        header = _b64_json(header_b64, "header")
        claims = _b64_json(payload_b64, "payload")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _invalid("token header 'kid' is not a string")
        candidates = self._candidates(claims.get("brand_id"), kid)
        # The header's alg only filters the configured keys; it never picks an algorithm.
        keys = [key for key in candidates if key.alg == header.get("alg")]
        if not keys:
            algs = " or ".join(dict.fromkeys(key.alg for key in candidates))
            raise _invalid(f"token algorithm is not {algs}")
        if "crit" in header:
            raise _invalid("token has critical header extensions")
        try:
            signature = _b64url(signature_b64)
        except ValueError as exc:
            raise _invalid("malformed token signature") from exc
        signing_input = f"{header_b64}.{payload_b64}".encode("ascii")
        if not any(key.check(signing_input, signature) for key in keys):
            raise _invalid("token signature does not verify")
        exp = self._check_claims(claims, time.time() if now is None else now)
        brand_id, player_id = claims.get("brand_id"), claims.get("sub")
        if not is_valid_id(brand_id):
            raise AuthError(400, "invalid_brand_id", f"brand_id must be {_ID_RULE}")
        if not is_valid_id(player_id):
            raise AuthError(400, "invalid_player_id", f"sub must be {_ID_RULE}")
        assert isinstance(brand_id, str) and isinstance(player_id, str)
        return Identity(brand_id, player_id, float(exp) + _LEEWAY_SECONDS)

    def _check_claims(self, claims: dict[str, Any], now: float) -> float:
        """Registered claims, as RFC 7519 and PyJWT read them; returns `exp`."""
        exp = claims.get("exp")
        if exp is None:
            # Required, also without SSE_JWT_MAX_TTL: a token without one would open streams
            # for ever, and a stream lives only as long as its token (`session_expired`).
            raise _invalid("token lacks the required claim 'exp'")
        if not _number(exp):
            raise _invalid("token claim 'exp' is not a number")
        if now > exp + _LEEWAY_SECONDS:
            raise AuthError(401, "token_expired", "token has expired")
        if self._max_ttl is not None and exp > now + self._max_ttl + _LEEWAY_SECONDS:
            # A stolen long-lived token opens streams only this long ahead of now.
            raise _invalid(
                f"token expires too far ahead: exp is more than {self._max_ttl:g} s from now"
                " (SSE_JWT_MAX_TTL)"
            )
        nbf = claims.get("nbf")
        if nbf is not None and (not _number(nbf) or now < nbf - _LEEWAY_SECONDS):
            raise _invalid("token is not yet valid (nbf)")
        iat = claims.get("iat")
        if iat is not None and not _number(iat):
            raise _invalid("token claim 'iat' is not a number")
        aud = claims.get("aud")
        if self._audience is not None:
            if aud is None:
                raise _invalid("token lacks the required claim 'aud'")
            audiences = [aud] if isinstance(aud, str) else aud
            if not isinstance(audiences, list) or self._audience not in audiences:
                raise _invalid("token audience does not match")
        elif aud is not None:
            # RFC 7519 §4.1.3: a token meant for named audiences is refused by a verifier that
            # is none of them (one minted for another service must not open streams here).
            raise _invalid("token has an audience and SSE_JWT_AUDIENCE names none")
        if self._issuer is not None:
            iss = claims.get("iss")
            if iss is None:
                raise _invalid("token lacks the required claim 'iss'")
            if iss != self._issuer:
                raise _invalid("token issuer does not match")
        return float(exp)


def make_token(secret: str, brand_id: str, player_id: str, ttl: float = 3600.0) -> str:
    """An HS256 token for a player, as `sse-gateway token` and the dev mode print it."""
    if not (is_valid_id(brand_id) and is_valid_id(player_id)):
        raise ValueError("brand and player ids must be 1-64 chars of [A-Za-z0-9_.-]")
    now = int(time.time())
    claims = {"brand_id": brand_id, "sub": player_id, "iat": now, "exp": now + int(ttl)}
    return jwt.encode(claims, secret, algorithm="HS256")


def random_secret() -> str:
    return secrets.token_urlsafe(32)
