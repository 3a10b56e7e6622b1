"""Key rotation (issue 10 item 9): several keys per brand picked by `kid` or tried in order, the
keys file reloaded whole or not at all, and JWKS documents fetched, parsed and refreshed."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from sse_gateway.edge.auth import AuthError, Identity, TokenVerifier
from sse_gateway.edge.jwks import (
    EARLY_REFRESH_GAP,
    JwksError,
    JwksRefresher,
    JwksSource,
    kid_changes,
    parse_jwks,
    shown_url,
)
from sse_gateway.edge.keyring import KeyRing, describe_changes
from sse_gateway.keys_file import MAX_KEYS_PER_BRAND, BrandKey, BrandKeys, load_jwt_keys
from sse_gateway.settings import SettingsError, load_settings

T = TypeVar("T")
SECRET = "shared-secret-for-unlisted-brands-0123456789abcdef"
HS_A = "brand-secret-a-0123456789abcdef-0123456789abcdef"
HS_B = "brand-secret-b-0123456789abcdef-0123456789abcdef"


def pem(private: Any) -> str:
    public: bytes = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return public.decode("ascii")


@pytest.fixture(scope="module")
def rsa_a() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_b() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def claims(brand: str = "b", sub: str = "p1") -> dict[str, Any]:
    return {"brand_id": brand, "sub": sub, "exp": int(time.time()) + 600}


def token(key: Any, alg: str, kid: str | None = None, brand: str = "b") -> str:
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(claims(brand), key, algorithm=alg, headers=headers)


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def hand_made_hs256(header: Mapping[str, Any], body: Mapping[str, Any], key: bytes) -> str:
    """An HS256 token with any header, signed with any bytes (PyJWT refuses both)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(body).encode())}"
    signature = hmac.new(key, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def refusal(verifier: TokenVerifier, value: str) -> AuthError:
    with pytest.raises(AuthError) as info:
        verifier.verify(value)
    assert (info.value.status, info.value.code) == (401, "invalid_token")
    return info.value


def brand(*keys: BrandKey) -> BrandKeys:
    return BrandKeys(keys=keys)


def write(path: Path, content: object) -> str:
    path.write_text(content if isinstance(content, str) else json.dumps(content), "utf-8")
    return str(path)


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


# --- the keys file ---------------------------------------------------------------------------


def test_a_brand_takes_a_list_of_keys_with_kids(tmp_path: Path, rsa_a: Any, ec_key: Any) -> None:
    path = write(
        tmp_path / "k.json",
        {
            "b": [
                {"alg": "RS256", "key": pem(rsa_a), "kid": "2024"},
                {"alg": "ES256", "key": pem(ec_key)},
            ],
            "old": {"alg": "HS256", "key": HS_A},
            "with-kid": {"alg": "HS256", "key": HS_B, "kid": "k"},
        },
    )
    assert load_jwt_keys(path) == {
        "b": brand(BrandKey("RS256", pem(rsa_a), "2024"), BrandKey("ES256", pem(ec_key))),
        "old": brand(BrandKey("HS256", HS_A)),
        "with-kid": brand(BrandKey("HS256", HS_B, "k")),
    }


def test_a_brand_takes_a_jwks_url(tmp_path: Path) -> None:
    path = write(
        tmp_path / "k.json",
        {
            "j": {"jwks_url": "https://issuer.example/.well-known/jwks.json"},
            "local": {"jwks_url": "http://127.0.0.1:9000/jwks", "alg": "ES256"},
        },
    )
    assert load_jwt_keys(path) == {
        "j": BrandKeys(jwks_url="https://issuer.example/.well-known/jwks.json"),
        "local": BrandKeys(jwks_url="http://127.0.0.1:9000/jwks", jwks_alg="ES256"),
    }


def test_key_material_is_not_in_the_repr() -> None:
    assert HS_A not in repr(BrandKey("HS256", HS_A, "k")) + repr(brand(BrandKey("HS256", HS_A)))


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ([], "1 to 16 keys"),
        ([{"alg": "HS256", "key": HS_A}] * (MAX_KEYS_PER_BRAND + 1), "1 to 16 keys"),
        (["secret"], "key #1: expected an object"),
        ([{"alg": "HS256", "key": HS_A}, {"alg": "none", "key": "k"}], "key #2: alg must be"),
        ([{"alg": "HS256", "key": HS_A}, {"alg": "HS256"}], "key #2: key must be"),
        ([{"alg": "RS256", "key": "nope"}], "key #1: RS256 needs a PEM public key"),
        ([{"alg": "HS256", "key": HS_A, "kid": 7}], "kid must be a string"),
        ([{"alg": "HS256", "key": HS_A, "kid": ""}], "kid must be a string"),
        ([{"alg": "HS256", "key": HS_A, "kid": "x" * 257}], "kid must be a string"),
        (
            [{"alg": "HS256", "key": HS_A, "kid": "k"}, {"alg": "HS256", "key": HS_B, "kid": "k"}],
            "kid 'k' is given twice",
        ),
        ("secret", "expected an object"),
        ({"jwks_url": "http://issuer.example/jwks"}, "https://"),
        ({"jwks_url": "ftp://127.0.0.1/jwks"}, "https://"),
        ({"jwks_url": "https:///jwks"}, "https://"),
        ({"jwks_url": ""}, "non-empty string"),
        ({"jwks_url": 5}, "non-empty string"),
        ({"jwks_url": "https://i.example/j", "key": HS_A}, "either key or jwks_url"),
        ({"jwks_url": "https://i.example/j", "alg": "HS256"}, "a JWKS alg must be one of"),
    ],
)
def test_bad_brand_entries_name_the_brand_and_the_key(
    tmp_path: Path, entry: object, fragment: str
) -> None:
    path = write(tmp_path / "k.json", {"brand1": entry})
    with pytest.raises(SettingsError) as info:
        load_settings({"SSE_JWT_KEYS_FILE": path}, {}, dev=False)
    assert "'brand1'" in info.value.reason
    assert fragment in info.value.reason


# --- choosing the key ------------------------------------------------------------------------


@pytest.fixture
def two_rsa(rsa_a: Any, rsa_b: Any) -> TokenVerifier:
    """Brand b: RS256 key "a" then RS256 key "b"; unlisted brands: the shared secret."""
    keys = brand(BrandKey("RS256", pem(rsa_a), "a"), BrandKey("RS256", pem(rsa_b), "b"))
    return TokenVerifier(secret=SECRET, brand_keys={"b": keys})


def test_kid_picks_the_key(two_rsa: TokenVerifier, rsa_a: Any, rsa_b: Any) -> None:
    assert two_rsa.verify(token(rsa_a, "RS256", "a")) == Identity("b", "p1")
    assert two_rsa.verify(token(rsa_b, "RS256", "b")) == Identity("b", "p1")


def test_kid_picks_only_that_key(two_rsa: TokenVerifier, rsa_a: Any, rsa_b: Any) -> None:
    """Signed with a, labelled b: the other keys of the brand are not tried."""
    assert "does not verify" in refusal(two_rsa, token(rsa_a, "RS256", "b")).message
    assert "does not verify" in refusal(two_rsa, token(rsa_b, "RS256", "a")).message


def test_unknown_kid_is_refused(two_rsa: TokenVerifier, rsa_a: Any) -> None:
    assert "kid" in refusal(two_rsa, token(rsa_a, "RS256", "c")).message
    # nor does the shared secret step in for a listed brand's unknown kid
    refusal(two_rsa, token(SECRET, "HS256", "c"))


def test_without_kid_the_keys_are_tried_in_order(
    two_rsa: TokenVerifier, rsa_a: Any, rsa_b: Any
) -> None:
    assert two_rsa.verify(token(rsa_a, "RS256")) == Identity("b", "p1")
    assert two_rsa.verify(token(rsa_b, "RS256")) == Identity("b", "p1")
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert "does not verify" in refusal(two_rsa, token(other, "RS256")).message


def test_a_key_without_kid_matches_any_kid(rsa_a: Any, rsa_b: Any) -> None:
    """The old single-key shape keeps admitting tokens whose issuer sets a kid."""
    verifier = TokenVerifier(
        secret=None,
        brand_keys={"b": brand(BrandKey("RS256", pem(rsa_a), "a"), BrandKey("RS256", pem(rsa_b)))},
    )
    assert verifier.verify(token(rsa_b, "RS256", "anything")) == Identity("b", "p1")
    assert verifier.verify(token(rsa_a, "RS256", "a")) == Identity("b", "p1")
    # an exact kid wins: the kid-less key is not tried for kid "a"
    refusal(verifier, token(rsa_b, "RS256", "a"))
    # an unknown kid is tried on the kid-less key only
    refusal(verifier, token(rsa_a, "RS256", "anything"))


def test_each_key_keeps_its_algorithm(rsa_a: Any, ec_key: Any, ed_key: Any) -> None:
    """Keys of several algorithms for one brand (an algorithm migration): the header's alg
    only selects among them; it never makes a key be used with another algorithm."""
    verifier = TokenVerifier(
        secret=None,
        brand_keys={
            "b": brand(
                BrandKey("RS256", pem(rsa_a), "r"),
                BrandKey("ES256", pem(ec_key), "e"),
                BrandKey("HS256", HS_A, "h"),
            )
        },
    )
    assert verifier.verify(token(rsa_a, "RS256")) == Identity("b", "p1")
    assert verifier.verify(token(ec_key, "ES256")) == Identity("b", "p1")
    assert verifier.verify(token(HS_A, "HS256")) == Identity("b", "p1")
    assert verifier.verify(token(ec_key, "ES256", "e")) == Identity("b", "p1")
    # kid of the RSA key, ES256 token: the RSA key is RS256 only
    assert "algorithm is not RS256" in refusal(verifier, token(ec_key, "ES256", "r")).message
    # kid of the HS256 key, signed RS256
    assert "algorithm is not HS256" in refusal(verifier, token(rsa_a, "RS256", "h")).message
    # algorithms no key of the brand has
    assert "RS256 or ES256 or HS256" in refusal(verifier, token(rsa_a, "RS512")).message
    refusal(verifier, token(rsa_a, "PS256", "r"))
    refusal(verifier, token(ed_key, "EdDSA"))
    refusal(verifier, jwt.encode(claims(), None, algorithm="none"))


def test_algorithm_confusion_with_a_public_key_as_hs256_secret(rsa_a: Any, rsa_b: Any) -> None:
    """An HS256 token MACed with a brand's public PEM: with or without that key's kid, and with
    an HS256 key beside it, nothing admits it."""
    verifier = TokenVerifier(
        secret=SECRET,
        brand_keys={"b": brand(BrandKey("RS256", pem(rsa_a), "a"), BrandKey("HS256", HS_A))},
    )
    for header in ({"alg": "HS256"}, {"alg": "HS256", "kid": "a"}):
        refusal(verifier, hand_made_hs256(header, claims(), pem(rsa_a).encode()))
        refusal(verifier, hand_made_hs256(header, claims(), pem(rsa_a).strip().encode()))


@pytest.mark.parametrize("kid", [5, True, ["a"], {"a": 1}, 1.5])
def test_a_kid_that_is_not_a_string_is_refused(kid: object) -> None:
    verifier = TokenVerifier(secret=SECRET, brand_keys={"b": brand(BrandKey("HS256", HS_A))})
    value = hand_made_hs256({"alg": "HS256", "kid": kid}, claims(), HS_A.encode())
    assert "'kid' is not a string" in refusal(verifier, value).message
    # null counts as no kid
    value = hand_made_hs256({"alg": "HS256", "kid": None}, claims(), HS_A.encode())
    assert verifier.verify(value) == Identity("b", "p1")


def test_a_brands_keys_never_admit_another_brand(two_rsa: TokenVerifier, rsa_a: Any) -> None:
    refusal(two_rsa, token(rsa_a, "RS256", "a", brand="other"))
    assert two_rsa.verify(token(SECRET, "HS256", brand="other")) == Identity("other", "p1")


def test_set_brand_keys_swaps_the_whole_set(two_rsa: TokenVerifier, rsa_a: Any, rsa_b: Any) -> None:
    two_rsa.set_brand_keys({"b": brand(BrandKey("RS256", pem(rsa_b), "b")), "c": brand()})
    refusal(two_rsa, token(rsa_a, "RS256", "a"))
    refusal(two_rsa, token(rsa_a, "RS256"))
    assert two_rsa.verify(token(rsa_b, "RS256", "b")) == Identity("b", "p1")


def test_set_brand_keys_with_a_bad_key_keeps_the_set_in_force(
    two_rsa: TokenVerifier, rsa_a: Any, rsa_b: Any
) -> None:
    bad = {"b": brand(BrandKey("RS256", pem(rsa_b), "b")), "x": brand(BrandKey("RS256", "nope"))}
    with pytest.raises((ValueError, jwt.InvalidKeyError)):
        two_rsa.set_brand_keys(bad)
    assert two_rsa.verify(token(rsa_a, "RS256", "a")) == Identity("b", "p1")


def test_a_jwks_brand_before_and_after_its_keys_arrive(rsa_a: Any) -> None:
    asked: list[str] = []
    verifier = TokenVerifier(
        secret=SECRET,
        brand_keys={"j": BrandKeys(jwks_url="https://i.example/jwks"), "s": brand()},
        on_unknown_kid=asked.append,
    )
    # no keys yet: refused, never with the shared secret, and a fetch is asked for
    assert "loaded yet" in refusal(verifier, token(rsa_a, "RS256", brand="j")).message
    refusal(verifier, token(SECRET, "HS256", brand="j"))
    assert asked == ["j", "j"]
    verifier.set_jwks_keys("j", [BrandKey("RS256", pem(rsa_a), "k1")])
    assert verifier.verify(token(rsa_a, "RS256", "k1", brand="j")) == Identity("j", "p1")
    assert verifier.verify(token(rsa_a, "RS256", brand="j")) == Identity("j", "p1")
    refusal(verifier, token(rsa_a, "RS256", "k2", brand="j"))
    assert asked == ["j", "j", "j"]
    # a static brand's unknown kid asks for nothing
    refusal(verifier, token(rsa_a, "RS256", "k2", brand="s"))
    assert asked == ["j", "j", "j"]
    # a reload keeps the fetched keys of a JWKS brand still listed, drops those of one gone
    verifier.set_brand_keys({"j": BrandKeys(jwks_url="https://i.example/jwks")})
    assert verifier.verify(token(rsa_a, "RS256", "k1", brand="j")) == Identity("j", "p1")
    verifier.set_brand_keys({"s": brand(BrandKey("HS256", HS_A))})
    verifier.set_jwks_keys("j", [BrandKey("RS256", pem(rsa_a), "k1")])  # late fetch: ignored
    assert verifier.verify(token(SECRET, "HS256", brand="j")) == Identity("j", "p1")


# --- describing a reload ---------------------------------------------------------------------


def test_describe_changes_names_brands_and_kids_only(rsa_a: Any, rsa_b: Any) -> None:
    a, b = BrandKey("RS256", pem(rsa_a), "a"), BrandKey("RS256", pem(rsa_b), "b")
    old = {
        "rot": brand(a),
        "gone": brand(BrandKey("HS256", HS_A)),
        "same": brand(b),
        "swap": brand(BrandKey("HS256", HS_A, "k")),
        "bare": brand(BrandKey("HS256", HS_A)),
        "order": brand(a, b),
        "to-jwks": brand(b),
    }
    new = {
        "rot": brand(b, BrandKey("HS256", HS_B)),
        "same": brand(b),
        "swap": brand(BrandKey("HS256", HS_B, "k")),
        "bare": brand(BrandKey("HS256", HS_B)),
        "order": brand(b, a),
        "to-jwks": BrandKeys(jwks_url="https://user:pw@i.example/jwks?token=t"),
        "new": brand(a, BrandKey("HS256", HS_B)),
    }
    lines = describe_changes(old, new)
    assert lines == [
        "brand 'new' added (2 keys: 'a', (HS256, no kid))",
        "brand 'gone' removed",
        "brand 'rot': added kid 'b'; removed kid 'a'; added 1 key without kid",
        "brand 'swap': replaced the key of kid 'k'",
        "brand 'bare': added 1 key without kid; removed 1 key without kid",
        "brand 'order': reordered the keys",
        "brand 'to-jwks' now uses JWKS https://i.example/jwks",
    ]
    text = "\n".join(lines)
    for secret in (HS_A, HS_B, pem(rsa_a), pem(rsa_b), "pw", "token=t"):
        assert secret not in text
    assert describe_changes(old, dict(old)) == []
    assert kid_changes((a,), (a,)) == ""


def test_shown_url_hides_credentials_and_query() -> None:
    assert shown_url("https://u:p@h.example:8443/a/jwks?k=v#f") == "https://h.example:8443/a/jwks"
    assert shown_url("http://[::1]:80/j") == "http://[::1]:80/j"


# --- the keyring: reload on SIGHUP ------------------------------------------------------------


def test_reload_puts_a_new_file_in_force_and_logs_by_kid(
    tmp_path: Path, rsa_a: Any, rsa_b: Any, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys.json"
    write(path, {"b": [{"alg": "RS256", "key": pem(rsa_a), "kid": "a"}]})
    brands = load_jwt_keys(str(path))
    verifier = TokenVerifier(secret=None, brand_keys=brands)
    ring = KeyRing(verifier, keys_file=str(path), brand_keys=brands, jwks_refresh=300)
    write(
        path,
        {
            "b": [{"alg": "RS256", "key": pem(rsa_b), "kid": "b"}],
            "c": {"alg": "HS256", "key": HS_A},
        },
    )
    with caplog.at_level(logging.INFO, logger="sse_gateway"):
        assert ring.reload() is True
    assert verifier.verify(token(rsa_b, "RS256", "b")) == Identity("b", "p1")
    refusal(verifier, token(rsa_a, "RS256", "a"))
    assert verifier.verify(token(HS_A, "HS256", brand="c")) == Identity("c", "p1")
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("brand 'b': added kid 'b'; removed kid 'a'" in m for m in messages), messages
    assert any("brand 'c' added (1 key: (HS256, no kid))" in m for m in messages), messages
    assert HS_A not in caplog.text and "BEGIN" not in caplog.text
    assert ring.brands == load_jwt_keys(str(path))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sse_gateway"):
        assert ring.reload() is True
    assert "no change" in caplog.text


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        {"b": [{"alg": "RS256", "key": "not a pem", "kid": "b"}]},
        {"b": {"alg": "none", "key": "k"}},
        {},
        None,  # the file is gone
    ],
)
def test_reload_of_an_invalid_file_keeps_the_keys_in_force(
    tmp_path: Path, rsa_a: Any, content: object, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys.json"
    write(path, {"b": [{"alg": "RS256", "key": pem(rsa_a), "kid": "a"}]})
    brands = load_jwt_keys(str(path))
    verifier = TokenVerifier(secret=None, brand_keys=brands)
    ring = KeyRing(verifier, keys_file=str(path), brand_keys=brands, jwks_refresh=300)
    if content is None:
        path.unlink()
    else:
        write(path, content)
    with caplog.at_level(logging.INFO, logger="sse_gateway"):
        assert ring.reload() is False
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "not reloaded, the keys in force stay" in errors[0].getMessage()
    assert verifier.verify(token(rsa_a, "RS256", "a")) == Identity("b", "p1")
    assert ring.brands == brands


def test_reload_without_a_keys_file_changes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    verifier = TokenVerifier(secret=SECRET, brand_keys={})
    ring = KeyRing(verifier, keys_file=None, brand_keys={}, jwks_refresh=300)
    with caplog.at_level(logging.INFO, logger="sse_gateway"):
        assert ring.reload() is False
    assert "no SSE_JWT_KEYS_FILE" in caplog.text
    assert verifier.verify(token(SECRET, "HS256")) == Identity("b", "p1")


# --- JWKS documents -------------------------------------------------------------------------


def jwk(private: Any, **extra: Any) -> dict[str, Any]:
    algorithm: Any
    if isinstance(private, rsa.RSAPrivateKey):
        algorithm = RSAAlgorithm
    elif isinstance(private, ec.EllipticCurvePrivateKey):
        algorithm = ECAlgorithm
    else:
        algorithm = OKPAlgorithm
    value: dict[str, Any] = algorithm.to_jwk(private.public_key(), as_dict=True)
    value.update(extra)
    return value


def jwks(*keys: Mapping[str, Any]) -> bytes:
    return json.dumps({"keys": list(keys)}).encode()


def test_parse_jwks_takes_each_supported_signing_key(rsa_a: Any, ec_key: Any, ed_key: Any) -> None:
    keys = parse_jwks(
        jwks(
            jwk(rsa_a, kid="r", alg="RS256", use="sig"),
            jwk(ec_key, kid="e"),
            jwk(ed_key, kid="d"),
            jwk(rsa_a),
        )
    )
    assert keys == (
        BrandKey("RS256", pem(rsa_a), "r"),
        BrandKey("ES256", pem(ec_key), "e"),
        BrandKey("EdDSA", pem(ed_key), "d"),
        BrandKey("RS256", pem(rsa_a)),
    )
    verifier = TokenVerifier(secret=None, brand_keys={"j": BrandKeys(jwks_url="https://x/j")})
    verifier.set_jwks_keys("j", keys)
    assert verifier.verify(token(ed_key, "EdDSA", "d", brand="j")) == Identity("j", "p1")


def test_parse_jwks_skips_what_it_must_not_use(rsa_a: Any, rsa_b: Any, ec_key: Any) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    keys = parse_jwks(
        jwks(
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},  # a secret is never taken from a URL
            jwk(rsa_a, kid="enc", use="enc"),
            jwk(rsa_a, kid="ps", alg="PS256"),
            jwk(p384, kid="p384"),
            jwk(ec_key, kid="lie", alg="RS256"),  # an EC key claiming RS256
            jwk(rsa_a, kid=5),
            {"kty": "RSA", "kid": "broken", "n": "AQAB"},
            "not an object",
            jwk(rsa_b, kid="ok"),
            jwk(rsa_a, kid="ok"),  # a repeated kid: the first one stays
        )
    )
    assert keys == (BrandKey("RS256", pem(rsa_b), "ok"),)


def test_parse_jwks_with_a_brand_alg(rsa_a: Any, ec_key: Any) -> None:
    document = jwks(jwk(rsa_a, kid="r"), jwk(ec_key, kid="e"))
    assert [k.kid for k in parse_jwks(document, "ES256")] == ["e"]
    assert [k.kid for k in parse_jwks(document, "RS256")] == ["r"]


def test_parse_jwks_keeps_only_the_public_part_of_a_private_jwk(rsa_a: Any) -> None:
    private = RSAAlgorithm.to_jwk(rsa_a, as_dict=True)
    assert "d" in private
    (key,) = parse_jwks(jwks({**private, "kid": "p"}))
    assert key.key == pem(rsa_a) and "PRIVATE" not in key.key


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        (b"{", "not JSON"),
        (b"[]", "not a JWKS"),
        (b'{"keys": {}}', "not a JWKS"),
        (b'{"keys": []}', "no usable signing key"),
        (b'{"keys": [{"kty": "oct", "k": "AA"}]}', "no usable signing key"),
    ],
)
def test_parse_jwks_errors(document: bytes, fragment: str) -> None:
    with pytest.raises(JwksError, match=fragment):
        parse_jwks(document)


def test_parse_jwks_refuses_too_many_keys(ec_key: Any) -> None:
    many = [jwk(ec_key, kid=str(n)) for n in range(MAX_KEYS_PER_BRAND + 1)]
    with pytest.raises(JwksError, match="more than 16"):
        parse_jwks(jwks(*many))


# --- JWKS refreshes --------------------------------------------------------------------------


class FakeJwksHost:
    """Serves `documents[url]` (bytes, or an exception to raise) and counts requests."""

    def __init__(self, documents: dict[str, bytes | Exception]) -> None:
        self.documents = documents
        self.requests: list[str] = []

    def fetch(self, url: str) -> bytes:
        self.requests.append(url)
        answer = self.documents[url]
        if isinstance(answer, Exception):
            raise answer
        return answer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Yields to the loop until `predicate()`; fails after 10 s (a hang, not a timing test)."""
    for _ in range(10_000):
        if predicate():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"never: {what}")


def test_refresher_fetches_applies_and_refreshes_early_at_most_once_per_gap(
    rsa_a: Any, rsa_b: Any, caplog: pytest.LogCaptureFixture
) -> None:
    url = "https://issuer.example/jwks"
    host = FakeJwksHost({url: jwks(jwk(rsa_a, kid="a"))})
    applied: list[tuple[str, tuple[BrandKey, ...]]] = []
    clock = Clock()

    async def scenario() -> None:
        refresher = JwksRefresher(
            lambda b, k: applied.append((b, k)), refresh=3600, fetch=host.fetch, clock=clock
        )
        refresher.configure({"j": JwksSource(url)})
        await refresher.wait_fetched(10)
        assert applied == [("j", (BrandKey("RS256", pem(rsa_a), "a"),))]
        host.documents[url] = jwks(jwk(rsa_a, kid="a"), jwk(rsa_b, kid="b"))
        assert refresher.refresh_soon("j") is True
        await until(lambda: len(applied) == 2, "the early refresh")
        assert [k.kid for k in applied[1][1]] == ["a", "b"]
        # another unknown kid within the gap: no fetch (made-up kids cost the host nothing)
        clock.now += EARLY_REFRESH_GAP - 1
        assert refresher.refresh_soon("j") is False
        clock.now += 1
        assert refresher.refresh_soon("j") is True
        await until(lambda: refresher.attempts == 3, "the second early refresh")
        assert len(applied) == 2  # the same document again: nothing to apply
        assert refresher.refresh_soon("unknown-brand") is False
        await refresher.close()

    with caplog.at_level(logging.INFO, logger="sse_gateway"):
        run(scenario())
    assert "brand 'j': JWKS https://issuer.example/jwks added kid 'b'" in caplog.text
    assert "BEGIN" not in caplog.text


def test_refresher_keeps_the_keys_when_a_fetch_fails(
    rsa_a: Any, caplog: pytest.LogCaptureFixture
) -> None:
    url = "https://issuer.example/jwks"
    host = FakeJwksHost({url: jwks(jwk(rsa_a, kid="a"))})
    applied: list[tuple[str, tuple[BrandKey, ...]]] = []

    clock = Clock()

    async def scenario() -> None:
        refresher = JwksRefresher(
            lambda b, k: applied.append((b, k)), refresh=3600, fetch=host.fetch, clock=clock
        )
        refresher.configure({"j": JwksSource(url)})
        await refresher.wait_fetched(10)
        for count, failure in enumerate((JwksError("HTTP 503"), b'{"keys": []}'), 2):
            host.documents[url] = failure
            clock.now += EARLY_REFRESH_GAP
            assert refresher.refresh_soon("j") is True
            await until(lambda n=count: refresher.attempts == n, "the refresh")
        await refresher.close()

    with caplog.at_level(logging.INFO, logger="sse_gateway"):
        run(scenario())
    assert len(applied) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2
    assert "HTTP 503; keeping the 1 keys in force" in errors[0]
    assert "no usable signing key" in errors[1]


def test_an_unknown_kid_during_a_fetch_asks_for_another(rsa_a: Any, rsa_b: Any) -> None:
    """The fetch under way may have read the document before the new key was published."""
    url = "https://issuer.example/jwks"
    old, new = jwks(jwk(rsa_a, kid="a")), jwks(jwk(rsa_a, kid="a"), jwk(rsa_b, kid="b"))
    answers = [old, old, new]
    gate = threading.Event()
    applied: list[tuple[str | None, ...]] = []
    clock = Clock()

    stalled = threading.Event()

    def fetch(_url: str) -> bytes:
        if len(answers) == 2:  # the second fetch: stalls until released
            stalled.set()
            gate.wait(10)
        return answers.pop(0)

    async def scenario() -> None:
        refresher = JwksRefresher(
            lambda b, k: applied.append(tuple(x.kid for x in k)),
            refresh=3600,
            fetch=fetch,
            clock=clock,
        )
        refresher.configure({"j": JwksSource(url)})
        await refresher.wait_fetched(10)
        assert refresher.refresh_soon("j") is True
        await until(stalled.is_set, "the stalled fetch")
        clock.now += EARLY_REFRESH_GAP
        assert refresher.refresh_soon("j") is True  # while the second fetch is under way
        gate.set()
        await until(lambda: refresher.attempts == 3, "a third fetch")
        await refresher.close()

    run(scenario())
    assert applied == [("a",), ("a", "b")]


def test_a_refresh_that_raises_unexpectedly_does_not_end_the_refreshes(
    rsa_a: Any, caplog: pytest.LogCaptureFixture
) -> None:
    url = "https://issuer.example/jwks"
    host = FakeJwksHost({url: jwks(jwk(rsa_a, kid="a"))})
    calls: list[int] = []
    clock = Clock()

    def apply(_brand: str, keys: tuple[BrandKey, ...]) -> None:
        calls.append(len(keys))
        if len(calls) == 1:
            raise RuntimeError("boom")

    async def scenario() -> None:
        refresher = JwksRefresher(apply, refresh=3600, fetch=host.fetch, clock=clock)
        refresher.configure({"j": JwksSource(url)})
        await refresher.wait_fetched(10)
        assert refresher.refresh_soon("j") is True
        await until(lambda: refresher.attempts == 2, "the second fetch")
        await refresher.close()

    with caplog.at_level(logging.INFO, logger="sse_gateway"):
        run(scenario())
    assert calls == [1, 1]  # the keys it refused were not taken as in force
    assert "RuntimeError('boom'); keeping the 0 keys in force" in caplog.text


def test_close_right_after_a_wake_up_ends_the_task(rsa_a: Any) -> None:
    """A cancellation that meets a wake-up is not swallowed (asyncio.wait_for on 3.11 did,
    and close() then waited a whole refresh period)."""
    url = "https://issuer.example/jwks"
    host = FakeJwksHost({url: jwks(jwk(rsa_a, kid="a"))})

    async def scenario() -> None:
        refresher = JwksRefresher(lambda b, k: None, refresh=3600, fetch=host.fetch)
        refresher.configure({"j": JwksSource(url)})
        await refresher.wait_fetched(10)
        await asyncio.sleep(0.01)  # the task is asleep until the next period
        assert refresher.refresh_soon("j") is True
        async with asyncio.timeout(10):
            await refresher.close()

    run(scenario())


def test_refresher_follows_a_reconfiguration(rsa_a: Any, rsa_b: Any) -> None:
    first, second = "https://one.example/jwks", "https://two.example/jwks"
    host = FakeJwksHost({first: jwks(jwk(rsa_a, kid="a")), second: jwks(jwk(rsa_b, kid="b"))})
    applied: list[tuple[str, tuple[str | None, ...]]] = []

    async def scenario() -> None:
        refresher = JwksRefresher(
            lambda b, k: applied.append((b, tuple(x.kid for x in k))),
            refresh=3600,
            fetch=host.fetch,
        )
        refresher.configure({"j": JwksSource(first)})
        await refresher.wait_fetched(10)
        refresher.configure({"j": JwksSource(second)})  # another URL: old keys dropped first
        await refresher.wait_fetched(10)
        refresher.configure({})
        await refresher.close()

    run(scenario())
    assert applied == [("j", ("a",)), ("j", ()), ("j", ("b",)), ("j", ())]
    assert host.requests == [first, second]


def test_keyring_starts_jwks_brands_and_reload_follows_the_file(
    tmp_path: Path, rsa_a: Any, rsa_b: Any
) -> None:
    url = "https://issuer.example/jwks"
    host = FakeJwksHost({url: jwks(jwk(rsa_a, kid="a"))})
    path = tmp_path / "keys.json"
    write(path, {"j": {"jwks_url": url}})
    brands = load_jwt_keys(str(path))
    verifier = TokenVerifier(secret=None, brand_keys=brands)

    async def scenario() -> None:
        ring = KeyRing(
            verifier, keys_file=str(path), brand_keys=brands, jwks_refresh=3600, fetch=host.fetch
        )
        await ring.start(wait=10)
        assert verifier.verify(token(rsa_a, "RS256", "a", brand="j")) == Identity("j", "p1")
        # an unknown kid asks for an early fetch, which brings the new key
        host.documents[url] = jwks(jwk(rsa_a, kid="a"), jwk(rsa_b, kid="b"))
        refusal(verifier, token(rsa_b, "RS256", "b", brand="j"))
        await until(lambda: len(host.requests) == 2, "the early fetch")

        def admitted() -> bool:
            try:
                verifier.verify(token(rsa_b, "RS256", "b", brand="j"))
            except AuthError:
                return False
            return True

        await until(admitted, "key b admitted")
        # the brand leaves the file: its keys go with it
        write(path, {"s": {"alg": "HS256", "key": HS_A}})
        assert ring.reload() is True
        refusal(verifier, token(rsa_a, "RS256", "a", brand="j"))
        await ring.close()

    run(scenario())
