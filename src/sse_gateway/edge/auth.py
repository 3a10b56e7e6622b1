"""Token checking: pure functions over the token string and the configured keys.

The algorithm always comes from configuration, never from the token header, and a token is
checked only with the key of the brand it names: one brand's key cannot admit another's players.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Mapping
from typing import Any

import jwt
import orjson

from sse_gateway.settings import BrandKey
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

    __slots__ = ("alg", "hmac_key", "prepared", "verifier")

    def __init__(self, alg: str, key: str) -> None:
        self.alg = alg
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


class TokenVerifier:
    """Compact-JWS verification with the brand's configured key and algorithm.

    Done here rather than by `jwt.decode` because a connect storm is bound by it: PyJWT
    validates base64 character by character in Python and prepares the key on every call.
    PyJWT's algorithm objects still do the RSA/ECDSA/EdDSA arithmetic.
    """

    def __init__(
        self,
        *,
        secret: str | None,
        brand_keys: Mapping[str, BrandKey],
        audience: str | None = None,
        issuer: str | None = None,
        max_ttl: float | None = None,
    ) -> None:
        """`max_ttl` (SSE_JWT_MAX_TTL, seconds): a token whose `exp` lies further ahead is
        refused; None: no bound."""
        self._max_ttl = max_ttl
        self._default = _Key("HS256", secret) if secret is not None else None
        self._audience = audience
        self._issuer = issuer
        self._keys = {brand: _Key(entry.alg, entry.key) for brand, entry in brand_keys.items()}

    def verify(self, token: str, now: float | None = None) -> Identity:
        """The identity a token proves, with `valid_until` (its `exp` plus the clock leeway:
        when a stream opened with it ends); raises AuthError (401 / 400) otherwise."""
        if len(token) > _MAX_TOKEN_BYTES or not _COMPACT_JWS.fullmatch(token):
            raise _invalid("token is not a JWS compact serialization")
        header_b64, payload_b64, signature_b64 = token.split(".")
        header = _b64_json(header_b64, "header")
        claims = _b64_json(payload_b64, "payload")
        brand = claims.get("brand_id")
        key = self._keys.get(brand) if isinstance(brand, str) else None
        if key is None:
            key = self._default
            if key is None:
                raise _invalid("no key is configured for this token's brand")
        if header.get("alg") != key.alg:
            raise _invalid(f"token algorithm is not {key.alg}")
        if "crit" in header:
            raise _invalid("token has critical header extensions")
        try:
            signature = _b64url(signature_b64)
        except ValueError as exc:
            raise _invalid("malformed token signature") from exc
        if not key.check(f"{header_b64}.{payload_b64}".encode("ascii"), signature):
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
