"""SSE_JWT_KEYS_FILE: each brand's own key and algorithm, and nothing else, admits its players."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from support.asserts import assert_error, assert_www_authenticate
from support.procs import (
    DEFAULT_SECRET,
    Gateway,
    RedisServer,
    claims_for,
    cli,
    free_port,
    running_gateway,
)
from support.sse import Response, request

pytestmark = pytest.mark.timeout(90)

HS_KEY = "brand-hs-secret-0123456789abcdef-0123456789abcdef"


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _pem_public(private: Any) -> str:
    public: bytes = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return public.decode()


class Keys:
    def __init__(self) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.ed = ed25519.Ed25519PrivateKey.generate()

    def file_content(self) -> dict[str, dict[str, str]]:
        return {
            "hs": {"alg": "HS256", "key": HS_KEY},
            "rs": {"alg": "RS256", "key": _pem_public(self.rsa)},
            "es": {"alg": "ES256", "key": _pem_public(self.ec)},
            "ed": {"alg": "EdDSA", "key": _pem_public(self.ed)},
        }


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture(scope="module")
def gw_keys(
    keys: Keys, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """Keys file and SSE_JWT_SECRET both set: unlisted brands use the shared secret."""
    workdir = tmp_path_factory.mktemp("gw-keys")
    path = workdir / "keys.json"
    path.write_text(json.dumps(keys.file_content()))
    with running_gateway(
        ["--redis", redis_server.url, "--jwt-keys-file", str(path)], workdir=workdir
    ) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def gw_keys_only(
    keys: Keys, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    workdir = tmp_path_factory.mktemp("gw-keys-only")
    path = workdir / "keys.json"
    path.write_text(json.dumps(keys.file_content()))
    with running_gateway(
        ["--redis", redis_server.url],
        workdir=workdir,
        jwt_secret=None,
        env={"SSE_JWT_KEYS_FILE": str(path)},
    ) as gateway:
        yield gateway


def sse_status(gw: Gateway, token: str) -> tuple[int, Response]:
    response = request(gw.port, "GET", "/v1/sse", {"Authorization": f"Bearer {token}"})
    return response.status, response


def tok(brand: str, key: Any, alg: str) -> str:
    return jwt.encode(claims_for(brand, "p1"), key, algorithm=alg)


def test_each_brand_with_its_own_key(gw_keys: Gateway, keys: Keys) -> None:
    assert sse_status(gw_keys, tok("hs", HS_KEY, "HS256"))[0] == 200
    assert sse_status(gw_keys, tok("rs", keys.rsa, "RS256"))[0] == 200
    assert sse_status(gw_keys, tok("es", keys.ec, "ES256"))[0] == 200
    assert sse_status(gw_keys, tok("ed", keys.ed, "EdDSA"))[0] == 200


def test_unlisted_brand_uses_shared_secret(gw_keys: Gateway) -> None:
    assert sse_status(gw_keys, tok("unlisted", DEFAULT_SECRET, "HS256"))[0] == 200


@pytest.mark.parametrize(
    ("brand", "signer"),
    [
        ("hs", "shared-secret"),  # listed brand: the shared secret must not admit it
        ("rs", "shared-secret"),
        ("rs", "hs-key"),  # one brand's key never admits another brand
        ("hs", "rsa-public-pem-as-hmac"),  # algorithm confusion
        ("rs", "rsa-public-pem-as-hmac"),
        ("es", "rs-private"),
        ("ed", "es-private"),
        ("rs", "rs-private-ps256"),
    ],
)
def test_wrong_key_or_algorithm_is_refused(
    gw_keys: Gateway, keys: Keys, brand: str, signer: str
) -> None:
    pem = _pem_public(keys.rsa).encode()
    if signer == "shared-secret":
        token = tok(brand, DEFAULT_SECRET, "HS256")
    elif signer == "hs-key":
        token = tok(brand, HS_KEY, "HS256")
    elif signer == "rsa-public-pem-as-hmac":
        # PyJWT refuses to HMAC with a PEM; build the confused token by hand.
        signing_input = (
            b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
            + "."
            + b64(json.dumps(claims_for(brand, "p1")).encode())
        )
        signature = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
        token = f"{signing_input}.{b64(signature)}"
    elif signer == "rs-private":
        token = tok(brand, keys.rsa, "RS256")
    elif signer == "es-private":
        token = tok(brand, keys.ec, "ES256")
    else:
        token = tok(brand, keys.rsa, "PS256")
    status, response = sse_status(gw_keys, token)
    assert status == 401, f"{brand} signed with {signer} was admitted"
    assert_error(response, 401, "invalid_token")
    assert_www_authenticate(response, error="invalid_token")


def test_keys_file_only_refuses_unknown_brand(gw_keys_only: Gateway, keys: Keys) -> None:
    assert sse_status(gw_keys_only, tok("rs", keys.rsa, "RS256"))[0] == 200
    status, response = sse_status(gw_keys_only, tok("unlisted", DEFAULT_SECRET, "HS256"))
    assert status == 401
    assert_error(response, 401, "invalid_token")


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "{}",
        json.dumps({"b": {"alg": "none", "key": "x"}}),
        json.dumps({"b": {"alg": "RS256", "key": "not a pem"}}),
        json.dumps({"b::x": {"alg": "HS256", "key": "secret"}}),
    ],
    ids=["not-json", "empty", "alg-none", "rs-not-pem", "bad-brand"],
)
def test_bad_keys_file_exits_2(tmp_path: Path, content: str) -> None:
    path = tmp_path / "keys.json"
    path.write_text(content)
    result = cli(
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(free_port()),
        env={"SSE_JWT_KEYS_FILE": str(path)},
    )
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "SSE_JWT_KEYS_FILE" in result.stderr
