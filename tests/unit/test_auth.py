"""TokenVerifier: algorithm from configuration only, one brand's key never admits another brand."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given
from hypothesis import strategies as st

from sse_gateway.edge.auth import AuthError, Identity, TokenVerifier, make_token
from sse_gateway.settings import BrandKey, BrandKeys, load_settings

SECRET = "unit-test-secret-long-enough-for-hs256-hs384-and-hs512-0123456789abcdef"
OTHER_SECRET = "another-unit-test-secret-also-32-bytes-or-more"


@dataclass(frozen=True)
class KeyPair:
    alg: str
    private: Any
    public_pem: str


def _public_pem(private: Any) -> str:
    return (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )


@pytest.fixture(scope="module")
def keys() -> dict[str, KeyPair]:
    """One key pair per asymmetric algorithm, plus a second RSA pair."""
    pairs: dict[str, KeyPair] = {}
    for name, alg, private in (
        ("rsa", "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        ("rsa2", "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        ("ec", "ES256", ec.generate_private_key(ec.SECP256R1())),
        ("ed", "EdDSA", ed25519.Ed25519PrivateKey.generate()),
    ):
        pairs[name] = KeyPair(alg=alg, private=private, public_pem=_public_pem(private))
    return pairs


def claims(brand: object = "b1", sub: object = "p1", ttl: float = 600, **extra: Any) -> dict:
    body: dict[str, Any] = {"exp": int(time.time() + ttl)}
    if brand is not None:
        body["brand_id"] = brand
    if sub is not None:
        body["sub"] = sub
    body.update(extra)
    return body


def hs(body: Mapping[str, Any], secret: str = SECRET) -> str:
    return jwt.encode(dict(body), secret, algorithm="HS256")


def signed(pair: KeyPair, body: Mapping[str, Any]) -> str:
    return jwt.encode(dict(body), pair.private, algorithm=pair.alg)


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def hand_made_hs256(header: Mapping[str, Any], body: Mapping[str, Any], key: bytes) -> str:
    """An HS256 token signed with any bytes, bypassing PyJWT's refusal of PEM-looking keys."""
    signing_input = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(body).encode())
    signature = hmac.new(key, signing_input.encode("ascii"), hashlib.sha256).digest()
    return signing_input + "." + b64url(signature)


def refusal(verifier: TokenVerifier, token: str) -> AuthError:
    with pytest.raises(AuthError) as info:
        verifier.verify(token)
    return info.value


def assert_invalid(verifier: TokenVerifier, token: str) -> None:
    error = refusal(verifier, token)
    assert (error.status, error.code) == (401, "invalid_token")


secret_verifier = TokenVerifier(secret=SECRET, brand_keys={})


# --- HS256 shared secret ---------------------------------------------------------------------


def test_hs256_token_is_accepted() -> None:
    assert secret_verifier.verify(hs(claims("brand.A-1", "player_9"))) == Identity(
        brand_id="brand.A-1", player_id="player_9"
    )


def test_hs256_with_wrong_secret_is_invalid() -> None:
    assert_invalid(secret_verifier, hs(claims(), OTHER_SECRET))


def test_tampered_payload_is_invalid() -> None:
    header, _, signature = hs(claims("b1", "p1")).split(".")
    forged = b64url(json.dumps(claims("b1", "p2")).encode())
    assert_invalid(secret_verifier, f"{header}.{forged}.{signature}")


def test_alg_none_is_invalid() -> None:
    token = jwt.encode(claims(), None, algorithm="none")
    assert token.endswith(".")
    assert_invalid(secret_verifier, token)


def test_alg_none_with_a_signature_part_is_invalid() -> None:
    unsigned = jwt.encode(claims(), None, algorithm="none")
    assert_invalid(secret_verifier, unsigned + b64url(b"x"))


@pytest.mark.parametrize("alg", ["HS384", "HS512"])
def test_other_hmac_algorithm_with_the_right_secret_is_invalid(alg: str) -> None:
    assert_invalid(secret_verifier, jwt.encode(claims(), SECRET, algorithm=alg))


def test_asymmetric_token_is_invalid_under_the_shared_secret(keys: dict[str, KeyPair]) -> None:
    assert_invalid(secret_verifier, signed(keys["rsa"], claims()))


def test_no_key_at_all_refuses_every_token() -> None:
    verifier = TokenVerifier(secret=None, brand_keys={})
    assert_invalid(verifier, hs(claims()))


# --- expiry and required claims --------------------------------------------------------------


def test_expired_token() -> None:
    error = refusal(secret_verifier, hs(claims(ttl=-3600)))
    assert (error.status, error.code) == (401, "token_expired")


def test_expired_token_with_bad_signature_is_invalid_not_expired() -> None:
    assert_invalid(secret_verifier, hs(claims(ttl=-3600), OTHER_SECRET))


def test_missing_exp_is_invalid() -> None:
    body = claims()
    del body["exp"]
    assert_invalid(secret_verifier, hs(body))


@pytest.mark.parametrize("exp", ["tomorrow", None, [1], {"t": 1}])
def test_non_numeric_exp_is_invalid(exp: object) -> None:
    assert_invalid(secret_verifier, hs({**claims(), "exp": exp}))


def test_not_yet_valid_token_is_invalid() -> None:
    assert_invalid(secret_verifier, hs(claims(nbf=int(time.time()) + 3600)))


# --- session lifetime: valid_until and SSE_JWT_MAX_TTL (issue 10 item 5) -----------------------

NOW = 1_700_000_000.0
LEEWAY = 5


def test_valid_until_is_exp_plus_the_leeway() -> None:
    # A stream ends when its token would no longer be accepted at connect: a client whose
    # stream ended cannot be let in again with the same token (no reconnect loop).
    identity = secret_verifier.verify(hs({"brand_id": "b1", "sub": "p1", "exp": NOW + 60}), NOW)
    assert identity.valid_until == NOW + 60 + LEEWAY
    assert identity == Identity("b1", "p1")  # not part of who the player is
    late = hs({"brand_id": "b1", "sub": "p1", "exp": NOW})
    assert secret_verifier.verify(late, NOW + LEEWAY).valid_until == NOW + LEEWAY
    assert refusal(secret_verifier, late).code == "token_expired"  # now is long after NOW


def test_exp_may_be_a_fraction() -> None:
    token = hs({"brand_id": "b1", "sub": "p1", "exp": NOW + 0.5})
    assert secret_verifier.verify(token, NOW).valid_until == NOW + 0.5 + LEEWAY


MAX_TTL = 3600.0
capped = TokenVerifier(secret=SECRET, brand_keys={}, max_ttl=MAX_TTL)


@pytest.mark.parametrize("ahead", [1, 600, MAX_TTL, MAX_TTL + LEEWAY])
def test_max_ttl_admits_tokens_that_end_within_it(ahead: float) -> None:
    token = hs({"brand_id": "b1", "sub": "p1", "exp": NOW + ahead})
    assert capped.verify(token, NOW).valid_until == NOW + ahead + LEEWAY


@pytest.mark.parametrize("ahead", [MAX_TTL + LEEWAY + 1, 86_400 * 365, 2**53])
def test_max_ttl_refuses_tokens_that_end_further_ahead(ahead: float) -> None:
    token = hs({"brand_id": "b1", "sub": "p1", "exp": NOW + ahead})
    with pytest.raises(AuthError) as info:
        capped.verify(token, NOW)
    error = info.value
    assert (error.status, error.code) == (401, "invalid_token")
    assert "SSE_JWT_MAX_TTL" in error.message and "too far ahead" in error.message
    # Without a max TTL the same token is accepted (the old behaviour).
    assert secret_verifier.verify(token, NOW).valid_until == NOW + ahead + LEEWAY


def test_max_ttl_does_not_make_exp_optional() -> None:
    with pytest.raises(AuthError) as info:
        capped.verify(hs({"brand_id": "b1", "sub": "p1"}), NOW)
    assert info.value.code == "invalid_token"
    assert "exp" in info.value.message


def test_max_ttl_refusal_of_a_badly_signed_token_is_the_signature() -> None:
    token = hs({"brand_id": "b1", "sub": "p1", "exp": NOW + 10 * MAX_TTL}, OTHER_SECRET)
    with pytest.raises(AuthError) as info:
        capped.verify(token, NOW)
    assert "signature" in info.value.message


# --- audience and issuer ---------------------------------------------------------------------


def test_audience_checked_when_configured() -> None:
    verifier = TokenVerifier(secret=SECRET, brand_keys={}, audience="sse")
    assert verifier.verify(hs(claims(aud="sse"))) == Identity("b1", "p1")
    assert verifier.verify(hs(claims(aud=["other", "sse"]))) == Identity("b1", "p1")
    assert_invalid(verifier, hs(claims(aud="other")))
    assert_invalid(verifier, hs(claims(aud=["other"])))
    assert_invalid(verifier, hs(claims()))


@pytest.mark.parametrize("aud", ["anything", ["a", "b"], []])
def test_a_token_with_an_audience_is_refused_when_none_is_configured(aud: object) -> None:
    # RFC 7519 §4.1.3 (issue 10 item 6): it was accepted; a token for another service with
    # the same signing key opened streams.
    assert_invalid(secret_verifier, hs(claims(aud=aud)))
    assert secret_verifier.verify(hs(claims())) == Identity("b1", "p1")


def test_issuer_checked_when_configured() -> None:
    verifier = TokenVerifier(secret=SECRET, brand_keys={}, issuer="https://issuer")
    assert verifier.verify(hs(claims(iss="https://issuer"))) == Identity("b1", "p1")
    assert_invalid(verifier, hs(claims(iss="https://evil")))
    assert_invalid(verifier, hs(claims()))


def test_issuer_not_checked_when_not_configured() -> None:
    assert secret_verifier.verify(hs(claims(iss="whoever"))) == Identity("b1", "p1")


def test_audience_and_issuer_together() -> None:
    verifier = TokenVerifier(secret=SECRET, brand_keys={}, audience="a", issuer="i")
    assert verifier.verify(hs(claims(aud="a", iss="i"))) == Identity("b1", "p1")
    assert_invalid(verifier, hs(claims(aud="a")))
    assert_invalid(verifier, hs(claims(iss="i")))


# --- ids: 400 ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "brand",
    [None, "", 1, ["b1"], {"b": 1}, "b 1", "a::b", "b*", "é", "x" * 65, "b1\n"],
)
def test_invalid_brand_id(brand: object) -> None:
    error = refusal(secret_verifier, hs(claims(brand=brand)))
    assert (error.status, error.code) == (400, "invalid_brand_id")


@pytest.mark.parametrize("sub", [None, "", "p 1", "p::1", "p?", "x" * 65])
def test_invalid_player_id(sub: object) -> None:
    error = refusal(secret_verifier, hs(claims(sub=sub)))
    assert (error.status, error.code) == (400, "invalid_player_id")


@pytest.mark.parametrize("sub", [7, ["p1"], {"id": "p1"}, True])
def test_non_string_sub_is_invalid_player_id(sub: object) -> None:
    """docs/api.md: 400 invalid_player_id when `sub` is "missing, not a string, or not ..."."""
    error = refusal(secret_verifier, hs(claims(sub=sub)))
    assert (error.status, error.code) == (400, "invalid_player_id")


@pytest.mark.parametrize("value", ["a", "x" * 64, "A-z_0.9", "..", "-"])
def test_id_boundaries_accepted(value: str) -> None:
    assert secret_verifier.verify(hs(claims(value, value))) == Identity(value, value)


def test_invalid_ids_in_a_badly_signed_token_are_401_not_400() -> None:
    assert_invalid(secret_verifier, hs(claims(brand="a::b", sub=""), OTHER_SECRET))


# --- malformed tokens --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        "..",
        "!!!.!!!.!!!",
        "eyJhbGciOiJIUzI1NiJ9.bm90IGpzb24.c2ln",  # payload: b"not json"
        "eyJhbGciOiJIUzI1NiJ9.WzEsMl0.c2ln",  # payload: [1,2]
        "eyJhbGciOiJIUzI1NiJ9./w.c2ln",  # payload: b"\xff"
        "eyJhbGciOiJIUzI1NiJ9.é.c2ln",
        "x" * 8190 + ".a.b",
    ],
)
def test_malformed_token_is_invalid(token: str) -> None:
    assert_invalid(secret_verifier, token)


def test_deeply_nested_payload_is_invalid_not_a_crash() -> None:
    payload = b64url(b"[" * 100_000 + b"]" * 100_000)
    assert_invalid(secret_verifier, f"eyJhbGciOiJIUzI1NiJ9.{payload}.c2ln")


@given(token=st.text(max_size=300))
def test_arbitrary_text_raises_only_auth_error(token: str) -> None:
    with pytest.raises(AuthError):
        secret_verifier.verify(token)


json_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=6)
json_values = st.recursive(
    json_scalars,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
    max_leaves=8,
)
claim_names = st.sampled_from(
    ["alg", "typ", "crit", "kid", "exp", "nbf", "iat", "aud", "iss", "brand_id", "sub"]
)


@given(
    header=st.dictionaries(claim_names, json_values, max_size=5),
    body=st.dictionaries(claim_names, json_values | st.just("b1"), max_size=6),
)
def test_correctly_signed_odd_tokens_raise_only_auth_error(
    header: dict[str, Any], body: dict[str, Any]
) -> None:
    header.setdefault("alg", "HS256")
    token = hand_made_hs256(header, body, SECRET.encode())
    try:
        identity = secret_verifier.verify(token)
    except AuthError as error:
        assert error.status in (400, 401)
        return
    assert identity == Identity(body["brand_id"], body["sub"])


# --- per-brand keys --------------------------------------------------------------------------


def keys_file(tmp_path: Path, entries: Mapping[str, Mapping[str, str]]) -> str:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(entries), encoding="utf-8")
    return str(path)


def verifier_from_file(
    tmp_path: Path, entries: Mapping[str, Mapping[str, str]], secret: str | None = None
) -> TokenVerifier:
    """Goes through load_settings, exactly as the gateway reads SSE_JWT_KEYS_FILE."""
    env = {"SSE_JWT_KEYS_FILE": keys_file(tmp_path, entries)}
    if secret is not None:
        env["SSE_JWT_SECRET"] = secret
    settings = load_settings(env, {}, dev=False)
    return TokenVerifier(secret=settings.jwt_secret, brand_keys=settings.jwt_keys)


@pytest.fixture
def per_brand(tmp_path: Path, keys: dict[str, KeyPair]) -> TokenVerifier:
    return verifier_from_file(
        tmp_path,
        {
            "rsa-brand": {"alg": "RS256", "key": keys["rsa"].public_pem},
            "ec-brand": {"alg": "ES256", "key": keys["ec"].public_pem},
            "ed-brand": {"alg": "EdDSA", "key": keys["ed"].public_pem},
            "hs-brand": {"alg": "HS256", "key": OTHER_SECRET},
        },
    )


@pytest.mark.parametrize(
    ("brand", "pair"), [("rsa-brand", "rsa"), ("ec-brand", "ec"), ("ed-brand", "ed")]
)
def test_each_brand_is_admitted_with_its_own_key(
    per_brand: TokenVerifier, keys: dict[str, KeyPair], brand: str, pair: str
) -> None:
    assert per_brand.verify(signed(keys[pair], claims(brand, "p1"))) == Identity(brand, "p1")


def test_per_brand_hs256_secret(per_brand: TokenVerifier) -> None:
    assert per_brand.verify(hs(claims("hs-brand"), OTHER_SECRET)) == Identity("hs-brand", "p1")
    assert_invalid(per_brand, hs(claims("hs-brand"), SECRET))


@pytest.mark.parametrize(
    ("signer", "claimed"),
    [
        ("rsa", "ec-brand"),
        ("rsa", "ed-brand"),
        ("ec", "rsa-brand"),
        ("ec", "ed-brand"),
        ("ed", "rsa-brand"),
        ("ed", "ec-brand"),
    ],
)
def test_one_brands_key_cannot_admit_another_brand_that_has_a_key(
    per_brand: TokenVerifier, keys: dict[str, KeyPair], signer: str, claimed: str
) -> None:
    assert_invalid(per_brand, signed(keys[signer], claims(claimed)))


def test_same_algorithm_other_brands_key_is_refused(
    tmp_path: Path, keys: dict[str, KeyPair]
) -> None:
    verifier = verifier_from_file(
        tmp_path,
        {
            "a": {"alg": "RS256", "key": keys["rsa"].public_pem},
            "b": {"alg": "RS256", "key": keys["rsa2"].public_pem},
        },
    )
    assert verifier.verify(signed(keys["rsa"], claims("a"))) == Identity("a", "p1")
    assert verifier.verify(signed(keys["rsa2"], claims("b"))) == Identity("b", "p1")
    assert_invalid(verifier, signed(keys["rsa"], claims("b")))
    assert_invalid(verifier, signed(keys["rsa2"], claims("a")))


@pytest.mark.parametrize("pair", ["rsa", "ec", "ed"])
def test_brand_key_cannot_admit_a_brand_without_key_and_no_secret(
    per_brand: TokenVerifier, keys: dict[str, KeyPair], pair: str
) -> None:
    assert_invalid(per_brand, signed(keys[pair], claims("unlisted-brand")))


@pytest.mark.parametrize("pair", ["rsa", "ec", "ed"])
def test_brand_key_cannot_admit_a_brand_without_key_when_a_secret_is_set(
    tmp_path: Path, keys: dict[str, KeyPair], pair: str
) -> None:
    verifier = verifier_from_file(
        tmp_path, {"a": {"alg": keys[pair].alg, "key": keys[pair].public_pem}}, secret=SECRET
    )
    assert verifier.verify(signed(keys[pair], claims("a"))) == Identity("a", "p1")
    assert_invalid(verifier, signed(keys[pair], claims("unlisted")))
    # the unlisted brand falls back to the shared secret, as documented
    assert verifier.verify(hs(claims("unlisted"))) == Identity("unlisted", "p1")


def test_listed_brand_ignores_the_shared_secret(tmp_path: Path, keys: dict[str, KeyPair]) -> None:
    verifier = verifier_from_file(
        tmp_path, {"a": {"alg": "RS256", "key": keys["rsa"].public_pem}}, secret=SECRET
    )
    assert_invalid(verifier, hs(claims("a")))


def test_token_without_brand_is_checked_with_the_secret_only(
    tmp_path: Path, keys: dict[str, KeyPair]
) -> None:
    verifier = verifier_from_file(
        tmp_path, {"a": {"alg": "RS256", "key": keys["rsa"].public_pem}}, secret=SECRET
    )
    assert_invalid(verifier, signed(keys["rsa"], claims(brand=None)))
    error = refusal(verifier, hs(claims(brand=None)))
    assert (error.status, error.code) == (400, "invalid_brand_id")


@pytest.mark.parametrize("pair", ["rsa", "ec", "ed"])
def test_algorithm_confusion_hs256_with_public_key_as_secret(
    per_brand: TokenVerifier, keys: dict[str, KeyPair], pair: str
) -> None:
    brand = {"rsa": "rsa-brand", "ec": "ec-brand", "ed": "ed-brand"}[pair]
    pem = keys[pair].public_pem.encode("ascii")
    for key in (pem, pem.strip()):
        token = hand_made_hs256({"alg": "HS256", "typ": "JWT"}, claims(brand), key)
        assert_invalid(per_brand, token)


def test_algorithm_confusion_when_shared_secret_is_also_set(
    tmp_path: Path, keys: dict[str, KeyPair]
) -> None:
    pem = keys["rsa"].public_pem
    verifier = verifier_from_file(tmp_path, {"a": {"alg": "RS256", "key": pem}}, secret=SECRET)
    assert_invalid(verifier, hand_made_hs256({"alg": "HS256"}, claims("a"), pem.encode()))


@pytest.mark.parametrize(("pair", "token_alg"), [("rsa", "PS256"), ("rsa", "RS512")])
def test_header_algorithm_other_than_configured_is_invalid(
    tmp_path: Path, keys: dict[str, KeyPair], pair: str, token_alg: str
) -> None:
    """Same key, another algorithm in the token header: the configured one is the only one."""
    verifier = verifier_from_file(
        tmp_path, {"a": {"alg": keys[pair].alg, "key": keys[pair].public_pem}}
    )
    assert_invalid(verifier, jwt.encode(claims("a"), keys[pair].private, algorithm=token_alg))


def test_es384_header_for_an_es256_brand_is_invalid(per_brand: TokenVerifier) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    assert_invalid(per_brand, jwt.encode(claims("ec-brand"), p384, algorithm="ES384"))


def test_alg_none_for_a_listed_brand_is_invalid(per_brand: TokenVerifier) -> None:
    for brand in ("rsa-brand", "ec-brand", "ed-brand", "hs-brand"):
        assert_invalid(per_brand, jwt.encode(claims(brand), None, algorithm="none"))


def test_expired_per_brand_token(per_brand: TokenVerifier, keys: dict[str, KeyPair]) -> None:
    error = refusal(per_brand, signed(keys["ec"], claims("ec-brand", ttl=-3600)))
    assert (error.status, error.code) == (401, "token_expired")


def test_per_brand_with_audience_and_issuer(keys: dict[str, KeyPair]) -> None:
    verifier = TokenVerifier(
        secret=None,
        brand_keys={"a": BrandKeys((BrandKey(alg="EdDSA", key=keys["ed"].public_pem),))},
        audience="aud",
        issuer="iss",
    )
    assert verifier.verify(signed(keys["ed"], claims("a", aud="aud", iss="iss"))) == Identity(
        "a", "p1"
    )
    assert_invalid(verifier, signed(keys["ed"], claims("a", aud="x", iss="iss")))
    assert_invalid(verifier, signed(keys["ed"], claims("a", aud="aud")))


def test_per_brand_invalid_player_id(per_brand: TokenVerifier, keys: dict[str, KeyPair]) -> None:
    error = refusal(per_brand, signed(keys["rsa"], claims("rsa-brand", sub="a b")))
    assert (error.status, error.code) == (400, "invalid_player_id")


# --- make_token ------------------------------------------------------------------------------


def test_make_token_round_trip() -> None:
    token = make_token(SECRET, "brand-1", "player.2")
    assert secret_verifier.verify(token) == Identity("brand-1", "player.2")
    body = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    assert body["brand_id"] == "brand-1"
    assert body["sub"] == "player.2"
    assert body["exp"] - body["iat"] == 3600


def test_make_token_ttl() -> None:
    body = jwt.decode(make_token(SECRET, "b", "p", ttl=60), SECRET, algorithms=["HS256"])
    assert body["exp"] - body["iat"] == 60


def test_make_token_with_negative_ttl_is_expired() -> None:
    error = refusal(secret_verifier, make_token(SECRET, "b", "p", ttl=-3600))
    assert error.code == "token_expired"


def test_make_token_with_another_secret_is_invalid() -> None:
    assert_invalid(secret_verifier, make_token(OTHER_SECRET, "b", "p"))


@pytest.mark.parametrize(
    ("brand", "player"), [("", "p"), ("b", ""), ("a::b", "p"), ("b", "x" * 65)]
)
def test_make_token_refuses_invalid_ids(brand: str, player: str) -> None:
    with pytest.raises(ValueError):
        make_token(SECRET, brand, player)


# --- canonical base64url (issue 10 item 7) ----------------------------------------------

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@pytest.mark.parametrize(("part", "rest"), [(1, 2), (1, 3), (2, 3)])
def test_only_the_canonical_spelling_of_each_token_part_verifies(part: int, rest: int) -> None:
    """RFC 4648 §3.5: a last character whose unused bits are set spells the same bytes in
    another string; such strings must not verify, or a denylist keyed on the string is
    sidestepped. `rest`: the part's length modulo 4 (the HS256 signature has 43 characters;
    the payload's length is varied with an extra claim)."""
    for extra in range(8):
        parts = hs({**claims("b1", "p1"), "x": "y" * extra}).split(".")
        if len(parts[part]) % 4 == rest:
            break
    segment = parts[part]
    assert len(segment) % 4 == rest
    accepted = []
    for char in _ALPHABET:
        parts[part] = segment[:-1] + char
        try:
            secret_verifier.verify(".".join(parts))
            accepted.append(char)
        except AuthError:
            pass
    assert accepted == [segment[-1]]
