"""One test per attack on token verification (gateway/auth/tokens.py).

Every token here is really signed (or really forged); every refusal is checked
for its reason and for an error message that quotes nothing of the token.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from jwt.algorithms import RSAAlgorithm

from gateway.auth.tokens import AuthError, TokenVerifier
from gateway.config import ConfigError, JwtSettings

NOW = 1_700_000_000
ISSUER = "https://idp.example"
AUDIENCE = "rabbitgate"
KID = "idp-key-1"
SECRET = "a-development-secret-of-more-than-32-bytes!"
COOLDOWN = 30.0
DROP = object()  # a claim value meaning "leave this claim out"


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "sub": "alice",
        "iat": NOW,
        "exp": NOW + 300,
        "iss": ISSUER,
        "aud": AUDIENCE,
        "roles": ["reader"],
        "scope": "read",
    }
    base.update(overrides)
    return {name: value for name, value in base.items() if value is not DROP}


def sign(key: Any, alg: str = "RS256", headers: dict[str, Any] | None = None, **kw: Any) -> str:
    return jwt.encode(claims(**kw), key, algorithm=alg, headers=headers)


def forge_rs256(header: dict[str, Any], payload: dict[str, Any], key: Any) -> str:
    """Sign what pyjwt would refuse to encode (it validates headers when encoding)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64(signature)}"


def pem(public_key: Any) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def jwk(public_key: Any, kid: str) -> dict[str, Any]:
    return {**RSAAlgorithm.to_jwk(public_key, as_dict=True), "kid": kid, "use": "sig"}


async def assert_refused(verifier: TokenVerifier, token: object, reason: str) -> AuthError:
    with pytest.raises(AuthError) as caught:
        await verifier.verify(token)
    error = caught.value
    assert error.reason == reason
    message = str(error)
    if isinstance(token, str) and token:
        assert token not in message
        for part in token.split("."):
            assert len(part) < 8 or part not in message
    assert SECRET not in message
    assert error.__cause__ is None
    return error


# ---- keys, verifiers and a JWKS server -------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def attacker_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def hs_verifier(clock: Clock) -> AsyncIterator[TokenVerifier]:
    settings = JwtSettings(algorithms=("HS256",), secret=SECRET, issuer=ISSUER, audience=AUDIENCE)
    verifier = TokenVerifier(settings, clock=clock)
    await verifier.start()
    yield verifier
    await verifier.close()


@pytest.fixture
async def rs_verifier(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, clock: Clock
) -> AsyncIterator[TokenVerifier]:
    key_file = tmp_path / "idp.pem"
    key_file.write_bytes(pem(rsa_key.public_key()))
    settings = JwtSettings(
        algorithms=("RS256",), public_key_file=key_file, issuer=ISSUER, audience=AUDIENCE
    )
    verifier = TokenVerifier(settings, clock=clock)
    await verifier.start()
    yield verifier
    await verifier.close()


class JwksServer:
    """HTTP on 127.0.0.1 serving JSON documents by path and counting requests."""

    def __init__(self) -> None:
        self.documents: dict[str, Any] = {}
        self.hits: Counter[str] = Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits[self.path] += 1
                document = server.documents.get(self.path)
                if document is None:
                    self.send_error(404)
                    return
                body = json.dumps(document).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


@pytest.fixture
def jwks_server(rsa_key: rsa.RSAPrivateKey) -> Iterator[JwksServer]:
    server = JwksServer()
    server.documents["/jwks.json"] = {"keys": [jwk(rsa_key.public_key(), KID)]}
    server.thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()
    server.thread.join()


@pytest.fixture
async def jwks_verifier(jwks_server: JwksServer, clock: Clock) -> AsyncIterator[TokenVerifier]:
    settings = JwtSettings(
        algorithms=("RS256",),
        jwks_url=jwks_server.url("/jwks.json"),
        jwks_refresh_cooldown_seconds=COOLDOWN,
        issuer=ISSUER,
        audience=AUDIENCE,
    )
    verifier = TokenVerifier(settings, clock=clock)
    await verifier.start()
    yield verifier
    await verifier.close()


async def test_the_fixtures_accept_an_honest_token(
    hs_verifier: TokenVerifier,
    rs_verifier: TokenVerifier,
    jwks_verifier: TokenVerifier,
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    # Without this, every refusal below could be a broken fixture.
    assert (await hs_verifier.verify(sign(SECRET, "HS256"))).sub == "alice"
    assert (await rs_verifier.verify(sign(rsa_key))).sub == "alice"
    assert (await jwks_verifier.verify(sign(rsa_key, headers={"kid": KID}))).sub == "alice"


# ---- algorithm attacks ----------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
async def test_alg_none_unsigned_token_is_refused(
    alg: str, hs_verifier: TokenVerifier, rs_verifier: TokenVerifier
) -> None:
    header = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    payload = b64(json.dumps(claims(roles=["admin"])).encode())
    for token in (f"{header}.{payload}.", f"{header}.{payload}.{b64(b'sig')}"):
        await assert_refused(hs_verifier, token, "bad_algorithm")
        await assert_refused(rs_verifier, token, "bad_algorithm")


async def test_hs256_signed_with_the_rsa_public_key_is_refused_by_an_rs256_verifier(
    rs_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    # The classic key confusion: the attacker knows the public key and uses its PEM
    # text as an HMAC secret, hoping the verifier lets the token pick HS256.
    # pyjwt refuses to sign with a PEM secret, so the token is built by hand.
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64(json.dumps(claims(roles=["admin"])).encode())
    signing_input = f"{header}.{payload}".encode()
    mac = hmac.new(pem(rsa_key.public_key()), signing_input, hashlib.sha256).digest()
    await assert_refused(rs_verifier, f"{header}.{payload}.{b64(mac)}", "bad_algorithm")


async def test_an_rsa_public_key_pem_is_refused_as_an_hmac_secret(
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    public_pem = pem(rsa_key.public_key()).decode()
    verifier = TokenVerifier(JwtSettings(algorithms=("HS256",), secret=public_pem))
    with pytest.raises(ConfigError, match="PEM or SSH public key"):
        await verifier.start()
    # and pyjwt itself refuses it as an HMAC key, on both sides
    with pytest.raises(jwt.InvalidKeyError):
        jwt.encode({"sub": "x"}, public_pem, algorithm="HS256")


async def test_a_token_in_an_algorithm_not_configured_is_refused(
    rs_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    # Same key, stronger-looking algorithm: still not what the operator configured.
    await assert_refused(rs_verifier, sign(rsa_key, "RS512"), "bad_algorithm")
    await assert_refused(rs_verifier, sign(rsa_key, "PS256"), "bad_algorithm")
    ec_key = ec.generate_private_key(ec.SECP256R1())
    await assert_refused(rs_verifier, sign(ec_key, "ES256"), "bad_algorithm")


async def test_ecdsa_psychic_signature_of_zeros_is_refused(tmp_path: Path, clock: Clock) -> None:
    # CVE-2022-21449: r = s = 0 verified as valid in some Java releases.
    key = ec.generate_private_key(ec.SECP256R1())
    key_file = tmp_path / "ec.pem"
    key_file.write_bytes(pem(key.public_key()))
    verifier = TokenVerifier(
        JwtSettings(algorithms=("ES256",), public_key_file=key_file), clock=clock
    )
    await verifier.start()
    honest = sign(key, "ES256", iss=DROP, aud=DROP)
    assert (await verifier.verify(honest)).sub == "alice"
    forged = honest.rsplit(".", 1)[0] + "." + b64(bytes(64))
    await assert_refused(verifier, forged, "bad_signature")


# ---- tampering ----------------------------------------------------------------------


async def test_tampered_payload_is_refused(
    rs_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    header, _, signature = sign(rsa_key).split(".")
    elevated = b64(json.dumps(claims(sub="root", roles=["admin"])).encode())
    await assert_refused(rs_verifier, f"{header}.{elevated}.{signature}", "bad_signature")


async def test_tampered_signature_is_refused(
    hs_verifier: TokenVerifier, rs_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    for verifier, token in ((rs_verifier, sign(rsa_key)), (hs_verifier, sign(SECRET, "HS256"))):
        signing_input, signature = token.rsplit(".", 1)
        raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
        raw[len(raw) // 2] ^= 0x01
        await assert_refused(verifier, f"{signing_input}.{b64(bytes(raw))}", "bad_signature")
        await assert_refused(verifier, f"{signing_input}.", "bad_signature")


async def test_token_signed_by_another_key_is_refused(
    rs_verifier: TokenVerifier, attacker_key: rsa.RSAPrivateKey
) -> None:
    await assert_refused(rs_verifier, sign(attacker_key), "bad_signature")


# ---- time claims ----------------------------------------------------------------------


async def test_expired_token_is_refused(
    rs_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    # leeway is 5 s by default
    await assert_refused(rs_verifier, sign(rsa_key, exp=NOW - 6), "expired")


async def test_not_yet_valid_nbf_is_refused(
    rs_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    await assert_refused(rs_verifier, sign(rsa_key, nbf=NOW + 60), "not_yet_valid")


async def test_iat_in_the_future_is_refused(
    rs_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    await assert_refused(rs_verifier, sign(rsa_key, iat=NOW + 60), "not_yet_valid")


@pytest.mark.parametrize("claim", ["exp", "iat", "nbf"])
async def test_time_claims_that_are_not_numbers_are_refused(
    claim: str, rs_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    # pyjwt alone would take int("1700000300") for a number.
    values: list[Any] = [str(NOW + 300), None if claim == "nbf" else [NOW], True, 1e400]
    for value in values:
        overrides: dict[str, Any] = {claim: value}
        await assert_refused(rs_verifier, sign(rsa_key, **overrides), "bad_claim")


# ---- missing or wrong claims ----------------------------------------------------------


async def test_missing_exp_is_refused(
    rs_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    await assert_refused(rs_verifier, sign(rsa_key, exp=DROP), "missing_claim")
    await assert_refused(rs_verifier, sign(rsa_key, exp=None), "missing_claim")


async def test_missing_iat_is_refused(
    rs_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    await assert_refused(rs_verifier, sign(rsa_key, iat=DROP), "missing_claim")


async def test_missing_sub_is_refused(
    rs_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    await assert_refused(rs_verifier, sign(rsa_key, sub=DROP), "missing_claim")
    await assert_refused(rs_verifier, sign(rsa_key, sub=None), "missing_claim")


@pytest.mark.parametrize("sub", ["", 42, ["alice"], "x" * 257, "alice\nERROR forged log line"])
async def test_bad_sub_is_refused(
    sub: object, rs_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    await assert_refused(rs_verifier, sign(rsa_key, sub=sub), "bad_claim")


async def test_wrong_issuer_is_refused(
    rs_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    await assert_refused(rs_verifier, sign(rsa_key, iss="https://evil.example"), "bad_issuer")
    await assert_refused(rs_verifier, sign(rsa_key, iss=DROP), "missing_claim")


async def test_wrong_audience_is_refused(
    rs_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    await assert_refused(rs_verifier, sign(rsa_key, aud="another-service"), "bad_audience")
    await assert_refused(rs_verifier, sign(rsa_key, aud=["a", "b"]), "bad_audience")
    await assert_refused(rs_verifier, sign(rsa_key, aud=DROP), "missing_claim")


@pytest.mark.parametrize("roles", ["admin", "admin reader", {"admin": True}, ["reader", 1], None])
async def test_roles_claim_not_a_list_of_strings_is_refused(
    roles: object, rs_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    await assert_refused(rs_verifier, sign(rsa_key, roles=roles), "bad_claim")


async def test_scope_claim_not_a_string_is_refused(
    rs_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    await assert_refused(rs_verifier, sign(rsa_key, scope=["read", "write"]), "bad_claim")


# ---- key selection: kid, JWKS, embedded keys -----------------------------------------


async def test_unknown_kid_is_refused(
    jwks_verifier: TokenVerifier, attacker_key: rsa.RSAPrivateKey, rsa_key: rsa.RSAPrivateKey
) -> None:
    await assert_refused(jwks_verifier, sign(attacker_key, headers={"kid": "evil"}), "unknown_key")
    # nor does a real key's token pass under a kid the key set does not hold
    await assert_refused(jwks_verifier, sign(rsa_key, headers={"kid": "idp-key-2"}), "unknown_key")
    # and a kid that is no string is malformed
    token = forge_rs256({"alg": "RS256", "kid": 1}, claims(), rsa_key)
    await assert_refused(jwks_verifier, token, "malformed")


async def test_unknown_kid_storm_refetches_the_jwks_at_most_once_per_cooldown(
    jwks_verifier: TokenVerifier,
    jwks_server: JwksServer,
    attacker_key: rsa.RSAPrivateKey,
    clock: Clock,
) -> None:
    async def storm() -> None:
        tokens = [sign(attacker_key, headers={"kid": f"forged-{i}"}) for i in range(100)]
        results = await asyncio.gather(
            *(jwks_verifier.verify(token) for token in tokens), return_exceptions=True
        )
        assert all(isinstance(r, AuthError) and r.reason == "unknown_key" for r in results)

    assert jwks_server.hits["/jwks.json"] == 1  # the fetch in start()
    await storm()  # within the cooldown after start: no fetch at all
    assert jwks_server.hits["/jwks.json"] == 1
    clock.now += COOLDOWN
    await storm()  # cooldown over: 100 concurrent unknown kids share one fetch
    assert jwks_server.hits["/jwks.json"] == 2
    clock.now += COOLDOWN - 1
    await storm()
    assert jwks_server.hits["/jwks.json"] == 2
    clock.now += 1
    await storm()
    assert jwks_server.hits["/jwks.json"] == 3


@pytest.mark.parametrize("header", ["jwk", "x5c"])
async def test_embedded_key_header_with_attacker_key_is_ignored(
    header: str,
    rs_verifier: TokenVerifier,
    jwks_verifier: TokenVerifier,
    attacker_key: rsa.RSAPrivateKey,
) -> None:
    public = attacker_key.public_key()
    embedded: Any = jwk(public, KID)
    if header == "x5c":
        der = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        embedded = [base64.b64encode(der).decode()]
    token = sign(attacker_key, headers={header: embedded, "kid": KID}, roles=["admin"])
    await assert_refused(rs_verifier, token, "bad_signature")
    await assert_refused(jwks_verifier, token, "bad_signature")


@pytest.mark.parametrize("header", ["jku", "x5u"])
async def test_key_url_header_pointing_elsewhere_is_never_fetched(
    header: str,
    jwks_verifier: TokenVerifier,
    jwks_server: JwksServer,
    attacker_key: rsa.RSAPrivateKey,
    rsa_key: rsa.RSAPrivateKey,
    clock: Clock,
) -> None:
    jwks_server.documents["/evil.json"] = {"keys": [jwk(attacker_key.public_key(), "evil")]}
    evil_url = jwks_server.url("/evil.json")
    clock.now += COOLDOWN  # a refetch is allowed: it must go to the configured URL only
    token = sign(attacker_key, headers={header: evil_url, "kid": "evil"})
    await assert_refused(jwks_verifier, token, "unknown_key")
    token = sign(attacker_key, headers={header: evil_url, "kid": KID})
    await assert_refused(jwks_verifier, token, "bad_signature")
    assert jwks_server.hits["/evil.json"] == 0
    assert jwks_server.hits["/jwks.json"] == 2
    # the header changes nothing for an honest token either
    honest = sign(rsa_key, headers={header: evil_url, "kid": KID})
    assert (await jwks_verifier.verify(honest)).sub == "alice"
    assert jwks_server.hits["/evil.json"] == 0


async def test_crit_header_is_refused(
    rs_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    for crit in (["exp"], ["b64"], "b64", []):
        await assert_refused(rs_verifier, sign(rsa_key, headers={"crit": crit}), "malformed")
    # pyjwt itself would accept this one: b64 is an extension it knows, and true is the default
    header = {"alg": "RS256", "crit": ["b64"], "b64": True}
    await assert_refused(rs_verifier, forge_rs256(header, claims(), rsa_key), "malformed")


async def test_unencoded_payload_b64_false_is_refused(
    rs_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    # RFC 7797 detached/unencoded payloads: never valid for a gateway token.
    token = jwt.api_jws.encode(
        json.dumps(claims()).encode(), rsa_key, algorithm="RS256", is_payload_detached=True
    )
    await assert_refused(rs_verifier, token, "malformed")


# ---- the token itself: size, type, encoding -------------------------------------------


async def test_oversized_token_is_refused_before_decoding(
    rs_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_run(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an oversized token reached the JWT decoder")

    huge = sign(rsa_key, padding="A" * 8 * 1024)
    monkeypatch.setattr(jwt, "get_unverified_header", must_not_run)
    monkeypatch.setattr(jwt, "decode", must_not_run)
    await assert_refused(rs_verifier, huge, "too_large")
    await assert_refused(rs_verifier, "x" * (8 * 1024 + 1), "too_large")
    await assert_refused(rs_verifier, "." * 10_000_000, "too_large")


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (None, "missing"),
        ("", "missing"),
        (b"eyJhbGciOiJSUzI1NiJ9.e30.c2ln", "malformed"),
        (12345, "malformed"),
        (["a", "b", "c"], "malformed"),
        ({"token": "x"}, "malformed"),
    ],
)
async def test_non_string_token_is_refused(
    token: object, reason: str, rs_verifier: TokenVerifier
) -> None:
    await assert_refused(rs_verifier, token, reason)


async def test_non_ascii_token_is_refused(
    rs_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    header, payload, signature = sign(rsa_key).split(".")
    await assert_refused(rs_verifier, f"{header}.{payload}é.{signature}", "malformed")
    await assert_refused(rs_verifier, f"{header}.{payload}.{signature}\u200b", "malformed")


@pytest.mark.parametrize(
    "token",
    [
        "not-a-jwt",
        "a.b",
        "a.b.c.d.e",  # a JWE has five segments
        "!!!!.e30.c2ln",
        b64(b"[]") + ".e30.c2ln",
        b64(b'{"alg":"RS256"') + ".e30.c2ln",
        " " + b64(b'{"alg":"RS256"}') + ".e30.c2ln",
    ],
)
async def test_garbage_token_is_refused_as_malformed(
    token: str, rs_verifier: TokenVerifier
) -> None:
    await assert_refused(rs_verifier, token, "malformed")


async def test_payload_that_is_not_a_json_object_is_refused(
    rs_verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    token = jwt.api_jws.encode(b'["sub", "alice"]', rsa_key, algorithm="RS256")
    await assert_refused(rs_verifier, token, "malformed")
