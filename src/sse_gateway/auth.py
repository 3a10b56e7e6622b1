"""Token checking: pure functions over the token string and the configured keys.

The algorithm always comes from configuration, never from the token header, and a token is
checked only with the key of the brand it names: one brand's key cannot admit another's players.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt

from .naming import is_valid_id
from .settings import BrandKey


class AuthError(Exception):
    """Refusal of a token; maps straight onto the HTTP error response."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Identity:
    brand_id: str
    player_id: str


_LEEWAY_SECONDS = 5


def _invalid(message: str) -> AuthError:
    return AuthError(401, "invalid_token", message)


class TokenVerifier:
    def __init__(
        self,
        *,
        secret: str | None,
        brand_keys: Mapping[str, BrandKey],
        audience: str | None = None,
        issuer: str | None = None,
    ) -> None:
        self._secret = secret
        self._audience = audience
        self._issuer = issuer
        # Keys are parsed once: RS/ES/EdDSA PEM parsing costs far more than a verification.
        self._keys: dict[str, tuple[str, Any]] = {}
        for brand, entry in brand_keys.items():
            algorithm = jwt.get_algorithm_by_name(entry.alg)
            self._keys[brand] = (entry.alg, algorithm.prepare_key(entry.key))

    def verify(self, token: str) -> Identity:
        """The identity a token proves; raises AuthError (401 / 400) otherwise."""
        if not token or token.count(".") != 2 or len(token) > 8192:
            raise _invalid("token is not a JWS compact serialization")
        brand = _unverified_brand(token)
        brand_key = self._keys.get(brand) if isinstance(brand, str) else None
        if brand_key is not None:
            algorithm, key = brand_key
        elif self._secret is not None:
            algorithm, key = "HS256", self._secret
        else:
            raise _invalid("no key is configured for this token's brand")
        options: Any = {
            "require": ["exp"],
            "verify_aud": self._audience is not None,
            "verify_sub": False,  # checked below, as a player id, with its own error code
        }
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self._audience,
                issuer=self._issuer,
                leeway=_LEEWAY_SECONDS,
                options=options,
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthError(401, "token_expired", "token has expired") from exc
        except jwt.InvalidAudienceError as exc:
            raise _invalid("token audience does not match") from exc
        except jwt.InvalidIssuerError as exc:
            raise _invalid("token issuer does not match") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise _invalid(f"token lacks the required claim {exc.claim!r}") from exc
        except jwt.InvalidAlgorithmError as exc:
            raise _invalid(f"token algorithm is not {algorithm}") from exc
        except jwt.InvalidSignatureError as exc:
            raise _invalid("token signature does not verify") from exc
        except jwt.PyJWTError as exc:
            raise _invalid(f"token rejected: {exc}") from exc
        if self._issuer is not None and "iss" not in claims:
            raise _invalid("token lacks the required claim 'iss'")
        brand_id, player_id = claims.get("brand_id"), claims.get("sub")
        if not is_valid_id(brand_id):
            raise AuthError(
                400, "invalid_brand_id", "brand_id must be 1-64 chars of [A-Za-z0-9_.-]"
            )
        if not is_valid_id(player_id):
            raise AuthError(400, "invalid_player_id", "sub must be 1-64 chars of [A-Za-z0-9_.-]")
        assert isinstance(brand_id, str) and isinstance(player_id, str)
        return Identity(brand_id=brand_id, player_id=player_id)


def _unverified_brand(token: str) -> object:
    """The `brand_id` a token claims, read only to pick the key that must then verify it."""
    payload = token.split(".")[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, RecursionError) as exc:
        raise _invalid("malformed token payload") from exc
    if not isinstance(claims, dict):
        raise _invalid("token payload is not a JSON object")
    return claims.get("brand_id")


def make_token(secret: str, brand_id: str, player_id: str, ttl: float = 3600.0) -> str:
    """An HS256 token for a player, as `sse-gateway token` and the dev mode print it."""
    if not (is_valid_id(brand_id) and is_valid_id(player_id)):
        raise ValueError("brand and player ids must be 1-64 chars of [A-Za-z0-9_.-]")
    now = int(time.time())
    claims = {"brand_id": brand_id, "sub": player_id, "iat": now, "exp": now + int(ttl)}
    return jwt.encode(claims, secret, algorithm="HS256")


def random_secret() -> str:
    return secrets.token_urlsafe(32)
