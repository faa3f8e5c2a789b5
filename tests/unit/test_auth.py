"""TokenVerifier, Principal and devtokens: key loading, JWKS caching, the happy paths.

The attacks themselves are in tests/security/test_jwt_attacks.py.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import math
import stat
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from gateway.auth.principal import AUTH_REASONS, Principal
from gateway.auth.tokens import AuthError, TokenVerifier, parse_jwks
from gateway.config import ConfigError, JwtSettings
from gateway.devtools.devtokens import generate_dev_keypair, mint_token

NOW = 1_700_000_000
SECRET = "a-development-secret-of-more-than-32-bytes!"
COOLDOWN = 30.0
CACHE = 300.0


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def pem(public_key: Any) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def rsa_jwk(public_key: Any, kid: str | None, **extra: Any) -> dict[str, Any]:
    found = {**RSAAlgorithm.to_jwk(public_key, as_dict=True), **extra}
    if kid is not None:
        found["kid"] = kid
    return found


def token(key: Any, alg: str = "RS256", kid: str | None = None, **claims: Any) -> str:
    payload = {"sub": "alice", "iat": NOW, "exp": NOW + 300, **claims}
    return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid} if kid else None)


async def started(settings: JwtSettings, clock: Clock | None = None) -> TokenVerifier:
    verifier = TokenVerifier(settings, clock=clock or Clock())
    await verifier.start()
    return verifier


async def reason_of(verifier: TokenVerifier, tok: object) -> str:
    with pytest.raises(AuthError) as caught:
        await verifier.verify(tok)
    return caught.value.reason


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_key_2() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def clock() -> Clock:
    return Clock()


# ---- Principal and AuthError -----------------------------------------------------------


def test_principal_from_claims_reads_sub_roles_scope_and_exp() -> None:
    claims = {"sub": "alice", "roles": ["a", "b", "a"], "scope": " read  write ", "exp": 5, "x": 1}
    principal = Principal.from_claims(claims)
    assert principal.sub == "alice"
    assert principal.roles == frozenset({"a", "b"})
    assert principal.scopes == frozenset({"read", "write"})
    assert principal.exp == 5.0
    assert principal.claims["x"] == 1
    with pytest.raises(TypeError):
        principal.claims["x"] = 2  # type: ignore[index]
    claims["x"] = 3  # the principal keeps its own copy
    assert principal.claims["x"] == 1
    hash(principal)  # usable as a dict key despite the claims mapping


def test_principal_without_roles_or_scope_has_empty_sets() -> None:
    principal = Principal.from_claims({"sub": "bob"})
    assert principal.roles == frozenset() and principal.scopes == frozenset()
    assert principal.exp == math.inf
    assert Principal("bob", frozenset(), frozenset(), {}).exp == math.inf


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({}, "missing_claim"),
        ({"sub": None}, "missing_claim"),
        ({"sub": ""}, "bad_claim"),
        ({"sub": "x" * 257}, "bad_claim"),
        ({"sub": "tab\there"}, "bad_claim"),
        ({"sub": "a", "roles": "admin"}, "bad_claim"),
        ({"sub": "a", "roles": [["admin"]]}, "bad_claim"),
        ({"sub": "a", "scope": ["read"]}, "bad_claim"),
        ({"sub": "a", "exp": "5"}, "bad_claim"),
        ({"sub": "a", "exp": 10**400}, "bad_claim"),
    ],
)
def test_principal_from_claims_refuses(claims: dict[str, Any], reason: str) -> None:
    with pytest.raises(AuthError) as caught:
        Principal.from_claims(claims)
    assert caught.value.reason == reason


def test_principal_accepts_a_sub_of_256_characters() -> None:
    assert Principal.from_claims({"sub": "é" * 256}).sub == "é" * 256


def test_auth_error_has_a_message_for_every_reason_and_refuses_unknown_ones() -> None:
    for reason in AUTH_REASONS:
        assert str(AuthError(reason))  # type: ignore[arg-type]
    assert str(AuthError("expired", "token expired at the end")) == "token expired at the end"
    with pytest.raises(ValueError):
        AuthError("nope")  # type: ignore[arg-type]


# ---- HS* secrets ------------------------------------------------------------------------


async def test_hs256_token_is_accepted_with_principal_fields(clock: Clock) -> None:
    verifier = await started(JwtSettings(secret=SECRET), clock)
    principal = await verifier.verify(token(SECRET, "HS256", roles=["r"], scope="s t"))
    assert (principal.sub, principal.roles, principal.scopes) == ("alice", {"r"}, {"s", "t"})
    assert principal.exp == NOW + 300
    assert principal.claims["iat"] == NOW


async def test_secret_file_with_trailing_newline(tmp_path: Path, clock: Clock) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    verifier = await started(JwtSettings(secret_file=secret_file), clock)
    assert (await verifier.verify(token(SECRET, "HS256"))).sub == "alice"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (JwtSettings(secret="x" * 31), "31 bytes"),
        (JwtSettings(algorithms=("HS512",), secret="x" * 63), "at least 64"),
        (JwtSettings(secret=None), "need jwt.secret"),
        (JwtSettings(secret=SECRET, secret_file=Path("/x")), "not both"),
        (JwtSettings(secret_file=Path("/nonexistent/secret")), "cannot read"),
        (JwtSettings(algorithms=("HS256", "RS256"), secret=SECRET), "mixes"),
        (JwtSettings(algorithms=(), secret=SECRET), "algorithms"),
        (JwtSettings(algorithms=("none",), secret=SECRET), "algorithms"),
    ],
)
async def test_unusable_hmac_configuration_is_refused(settings: JwtSettings, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        await TokenVerifier(settings).start()
    assert SECRET not in str(caught.value) and "\n" not in str(caught.value)


async def test_leeway_lets_a_just_expired_token_through(clock: Clock) -> None:
    verifier = await started(JwtSettings(secret=SECRET, leeway_seconds=5), clock)
    assert await verifier.verify(token(SECRET, "HS256", exp=NOW - 4))
    assert await verifier.verify(token(SECRET, "HS256", iat=NOW + 5, nbf=NOW + 5))
    assert await reason_of(verifier, token(SECRET, "HS256", exp=NOW - 5)) == "expired"
    clock.now = NOW + 305
    assert await reason_of(verifier, token(SECRET, "HS256")) == "expired"


async def test_a_token_of_exactly_the_size_limit_is_decoded(clock: Clock) -> None:
    tok = token(SECRET, "HS256")
    verifier = await started(JwtSettings(secret=SECRET, max_token_bytes=len(tok)), clock)
    assert await verifier.verify(tok)
    small = await started(JwtSettings(secret=SECRET, max_token_bytes=len(tok) - 1), clock)
    assert await reason_of(small, tok) == "too_large"


async def test_verify_before_start_or_after_close_is_key_unavailable(clock: Clock) -> None:
    verifier = TokenVerifier(JwtSettings(secret=SECRET), clock=clock)
    assert await reason_of(verifier, token(SECRET, "HS256")) == "key_unavailable"
    await verifier.start()
    await verifier.close()
    assert await reason_of(verifier, token(SECRET, "HS256")) == "key_unavailable"


async def test_a_kid_header_is_ignored_with_a_single_configured_key(clock: Clock) -> None:
    verifier = await started(JwtSettings(secret=SECRET), clock)
    assert await verifier.verify(token(SECRET, "HS256", kid="anything"))


# ---- PEM public key files ----------------------------------------------------------------


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES256", "ES384", "ES512", "EdDSA"])
async def test_public_key_file_accepts_each_algorithm_family(
    alg: str, tmp_path: Path, clock: Clock
) -> None:
    private_file, public_file = generate_dev_keypair(tmp_path, alg)
    settings = JwtSettings(
        algorithms=(alg,), public_key_file=public_file, dev_private_key_file=private_file
    )
    verifier = await started(settings, clock)
    principal = await verifier.verify(mint_token(settings, sub="carol", roles=["r"], now=NOW))
    assert (principal.sub, principal.roles) == ("carol", {"r"})


async def test_public_key_file_may_be_a_certificate(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, clock: Clock
) -> None:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(rsa_key.public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime(2020, 1, 1))
        .not_valid_after(datetime.datetime(2040, 1, 1))
        .sign(rsa_key, hashes.SHA256())
    )
    cert_file = tmp_path / "idp.crt"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    verifier = await started(JwtSettings(algorithms=("RS256",), public_key_file=cert_file), clock)
    assert await verifier.verify(token(rsa_key))


@pytest.mark.parametrize(
    ("make_key", "algorithms", "message"),
    [
        (lambda: rsa.generate_private_key(65537, 1024), ("RS256",), "1024 bits"),
        (lambda: ec.generate_private_key(ec.SECP256R1()), ("RS256",), "cannot verify RS256"),
        (lambda: ec.generate_private_key(ec.SECP384R1()), ("ES256",), "cannot verify ES256"),
        (lambda: ed25519.Ed25519PrivateKey.generate(), ("EdDSA", "ES256"), "cannot verify ES256"),
    ],
)
async def test_unusable_public_key_file_is_refused(
    make_key: Any, algorithms: tuple[str, ...], message: str, tmp_path: Path
) -> None:
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(pem(make_key().public_key()))
    with pytest.raises(ConfigError, match=message):
        await TokenVerifier(JwtSettings(algorithms=algorithms, public_key_file=key_file)).start()


async def test_private_key_or_missing_file_as_public_key_is_refused(tmp_path: Path) -> None:
    private_file, _ = generate_dev_keypair(tmp_path, "ES256")
    for path, message in ((private_file, "no PEM public key"), (tmp_path / "no", "cannot read")):
        with pytest.raises(ConfigError, match=message):
            await TokenVerifier(JwtSettings(algorithms=("ES256",), public_key_file=path)).start()


async def test_public_key_file_and_jwks_url_together_are_refused(tmp_path: Path) -> None:
    settings = JwtSettings(
        algorithms=("RS256",), public_key_file=tmp_path / "k.pem", jwks_url="https://x/jwks"
    )
    with pytest.raises(ConfigError, match="not both"):
        await TokenVerifier(settings).start()


# ---- JWKS -------------------------------------------------------------------------------


class JwksServer:
    """HTTP on 127.0.0.1: ``documents`` by path (a status int means that error)."""

    def __init__(self) -> None:
        self.documents: dict[str, Any] = {}
        self.hits: Counter[str] = Counter()
        self.delay = 0.0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits[self.path] += 1
                time.sleep(server.delay)
                document = server.documents.get(self.path, 404)
                if isinstance(document, int):
                    if document in (301, 302):
                        self.send_response(document)
                        self.send_header("Location", "/jwks.json")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                    else:
                        self.send_error(document)
                    return
                body = document if isinstance(document, bytes) else json.dumps(document).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str = "/jwks.json") -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    @property
    def fetches(self) -> int:
        return self.hits["/jwks.json"]


@pytest.fixture
def server(rsa_key: rsa.RSAPrivateKey) -> Iterator[JwksServer]:
    jwks = JwksServer()
    jwks.documents["/jwks.json"] = {"keys": [rsa_jwk(rsa_key.public_key(), "k1")]}
    jwks.thread.start()
    yield jwks
    jwks.httpd.shutdown()
    jwks.httpd.server_close()
    jwks.thread.join()


def jwks_settings(server: JwksServer, path: str = "/jwks.json", **kw: Any) -> JwtSettings:
    return JwtSettings(
        algorithms=kw.pop("algorithms", ("RS256",)),
        jwks_url=server.url(path),
        jwks_cache_seconds=CACHE,
        jwks_refresh_cooldown_seconds=COOLDOWN,
        **kw,
    )


@pytest.fixture
async def verifier(server: JwksServer, clock: Clock) -> AsyncIterator[TokenVerifier]:
    found = await started(jwks_settings(server), clock)
    yield found
    await found.close()


async def test_jwks_key_is_selected_by_kid(
    verifier: TokenVerifier,
    server: JwksServer,
    rsa_key: rsa.RSAPrivateKey,
    rsa_key_2: rsa.RSAPrivateKey,
) -> None:
    assert (await verifier.verify(token(rsa_key, kid="k1"))).sub == "alice"
    # a token without kid is fine while the set holds one key
    assert (await verifier.verify(token(rsa_key))).sub == "alice"
    assert server.fetches == 1


async def test_a_token_without_kid_is_refused_when_the_set_holds_several_keys(
    server: JwksServer, rsa_key: rsa.RSAPrivateKey, rsa_key_2: rsa.RSAPrivateKey, clock: Clock
) -> None:
    server.documents["/jwks.json"]["keys"].append(rsa_jwk(rsa_key_2.public_key(), "k2"))
    verifier = await started(jwks_settings(server), clock)
    assert await verifier.verify(token(rsa_key_2, kid="k2"))
    assert await reason_of(verifier, token(rsa_key)) == "unknown_key"
    assert await reason_of(verifier, token(rsa_key, kid="k2")) == "bad_signature"
    await verifier.close()


async def test_a_rotated_in_key_is_fetched_once_the_cooldown_is_over(
    verifier: TokenVerifier,
    server: JwksServer,
    rsa_key_2: rsa.RSAPrivateKey,
    clock: Clock,
) -> None:
    server.documents["/jwks.json"] = {"keys": [rsa_jwk(rsa_key_2.public_key(), "k2")]}
    assert await reason_of(verifier, token(rsa_key_2, kid="k2")) == "unknown_key"
    assert server.fetches == 1
    clock.now += COOLDOWN
    assert (await verifier.verify(token(rsa_key_2, kid="k2"))).sub == "alice"
    assert server.fetches == 2


async def test_the_key_set_is_refetched_when_its_lifespan_ends(
    verifier: TokenVerifier,
    server: JwksServer,
    rsa_key: rsa.RSAPrivateKey,
    rsa_key_2: rsa.RSAPrivateKey,
    clock: Clock,
) -> None:
    # k1 is revoked at the IdP: after the cache lifespan it is no longer accepted.
    server.documents["/jwks.json"] = {"keys": [rsa_jwk(rsa_key_2.public_key(), "k2")]}
    clock.now += CACHE - 1
    assert await verifier.verify(token(rsa_key, kid="k1", exp=NOW + 3600))
    assert server.fetches == 1
    clock.now += 1
    assert await reason_of(verifier, token(rsa_key, kid="k1", exp=NOW + 3600)) == "unknown_key"
    assert server.fetches == 2  # the lifespan refresh, and no second one for the unknown kid


async def test_a_failed_refresh_keeps_the_last_good_key_set(
    verifier: TokenVerifier,
    server: JwksServer,
    rsa_key: rsa.RSAPrivateKey,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken_documents: list[Any] = [500, b"not json", {"keys": []}, {"nokeys": 1}, 302]
    for broken in broken_documents:
        server.documents["/jwks.json"] = broken
        clock.now += CACHE
        assert await verifier.verify(token(rsa_key, kid="k1", exp=NOW + 100_000))
    assert server.fetches == 6
    assert "JWKS refresh failed" in caplog.text
    # the failures are not retried within the cooldown, however many tokens come
    for _ in range(10):
        assert await verifier.verify(token(rsa_key, kid="k1", exp=NOW + 100_000))
    assert server.fetches == 6


async def test_concurrent_refreshes_share_one_fetch(
    verifier: TokenVerifier, server: JwksServer, rsa_key: rsa.RSAPrivateKey, clock: Clock
) -> None:
    server.delay = 0.2
    clock.now += CACHE
    tokens = [token(rsa_key, kid="k1", exp=NOW + 1000, n=i) for i in range(50)]
    principals = await asyncio.gather(*(verifier.verify(tok) for tok in tokens))
    assert len(principals) == 50
    assert server.fetches == 2


async def test_tokens_under_a_new_kid_all_wait_for_the_one_fetch(
    verifier: TokenVerifier, server: JwksServer, rsa_key_2: rsa.RSAPrivateKey, clock: Clock
) -> None:
    # None of them may be refused just because another one started the fetch.
    server.documents["/jwks.json"] = {"keys": [rsa_jwk(rsa_key_2.public_key(), "k2")]}
    server.delay = 0.2
    clock.now += COOLDOWN
    tokens = [token(rsa_key_2, kid="k2", n=i) for i in range(20)]
    principals = await asyncio.gather(*(verifier.verify(tok) for tok in tokens))
    assert len(principals) == 20
    assert server.fetches == 2


async def test_a_caller_giving_up_does_not_cancel_the_shared_refresh(
    verifier: TokenVerifier, server: JwksServer, rsa_key_2: rsa.RSAPrivateKey, clock: Clock
) -> None:
    server.documents["/jwks.json"] = {"keys": [rsa_jwk(rsa_key_2.public_key(), "k2")]}
    server.delay = 0.2
    clock.now += COOLDOWN
    tok = token(rsa_key_2, kid="k2")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(verifier.verify(tok), 0.05)
    assert await verifier.verify(tok)  # joins the fetch still in flight
    assert server.fetches == 2


async def test_close_during_a_refresh_is_clean(
    verifier: TokenVerifier, server: JwksServer, rsa_key: rsa.RSAPrivateKey, clock: Clock
) -> None:
    server.delay = 0.2
    clock.now += CACHE
    pending = asyncio.create_task(verifier.verify(token(rsa_key, kid="k1", exp=NOW + 1000)))
    await asyncio.sleep(0.05)
    await verifier.close()
    with pytest.raises(AuthError) as caught:
        await pending
    assert caught.value.reason == "key_unavailable"


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (404, "HTTP status 404"),
        (302, "HTTP status 302"),
        (b"<html>", "not JSON"),
        ({"keys": "no"}, '"keys" list'),
        ({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "k"}]}, "no key for RS256"),
    ],
)
async def test_start_refuses_an_unusable_key_set(
    document: Any, message: str, server: JwksServer
) -> None:
    server.documents["/jwks.json"] = document
    with pytest.raises(ConfigError, match=message):
        await TokenVerifier(jwks_settings(server)).start()


async def test_start_refuses_an_unreachable_jwks_url_and_other_schemes() -> None:
    settings = JwtSettings(algorithms=("RS256",), jwks_url="http://127.0.0.1:9/jwks.json")
    with pytest.raises(ConfigError, match="cannot load"):
        await TokenVerifier(settings).start()
    for url in ("file:///etc/passwd", "ftp://example.com/jwks", "http://idp.example/jwks"):
        with pytest.raises(ConfigError, match="https"):
            await TokenVerifier(JwtSettings(algorithms=("RS256",), jwks_url=url)).start()


async def test_start_refuses_an_oversized_key_set(server: JwksServer) -> None:
    server.documents["/jwks.json"] = b" " * (512 * 1024 + 1)
    with pytest.raises(ConfigError, match="larger than"):
        await TokenVerifier(jwks_settings(server)).start()


def test_parse_jwks_skips_keys_it_must_not_use(
    rsa_key: rsa.RSAPrivateKey, rsa_key_2: rsa.RSAPrivateKey
) -> None:
    weak = rsa.generate_private_key(65537, 1024).public_key()
    ec_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    document = {
        "keys": [
            rsa_jwk(rsa_key.public_key(), "ok"),
            rsa_jwk(rsa_key_2.public_key(), "ok"),  # repeated kid: first one stays
            rsa_jwk(weak, "weak"),
            rsa_jwk(rsa_key.public_key(), "enc", use="enc"),
            rsa_jwk(rsa_key.public_key(), "rs512-only", alg="RS512"),
            {**RSAAlgorithm.to_jwk(rsa_key, as_dict=True), "kid": "private"},
            {**ECAlgorithm.to_jwk(ec_key, as_dict=True), "kid": "ec"},
            {"kty": "oct", "k": "c2VjcmV0", "kid": "oct"},
            {"kty": ["RSA"], "kid": "odd"},
            {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
            {"kty": "RSA", "kid": 7},
            "not a key",
        ]
    }
    keys = parse_jwks(json.dumps(document).encode(), ("RS256", "PS256"))
    assert list(keys) == ["ok"]
    assert keys["ok"].algorithms == ("RS256", "PS256")
    assert keys["ok"].key.public_numbers() == rsa_key.public_key().public_numbers()


def test_parse_jwks_honours_the_alg_of_a_key(rsa_key: rsa.RSAPrivateKey) -> None:
    document = {"keys": [rsa_jwk(rsa_key.public_key(), "ps", alg="PS256")]}
    keys = parse_jwks(json.dumps(document).encode(), ("RS256", "PS256"))
    assert keys["ps"].algorithms == ("PS256",)


async def test_a_token_alg_the_jwks_key_does_not_allow_is_refused(
    server: JwksServer, rsa_key: rsa.RSAPrivateKey, clock: Clock
) -> None:
    server.documents["/jwks.json"] = {"keys": [rsa_jwk(rsa_key.public_key(), "ps", alg="PS256")]}
    verifier = await started(jwks_settings(server, algorithms=("RS256", "PS256")), clock)
    assert await verifier.verify(token(rsa_key, "PS256", kid="ps"))
    assert await reason_of(verifier, token(rsa_key, "RS256", kid="ps")) == "bad_algorithm"
    await verifier.close()


# ---- devtokens ---------------------------------------------------------------------------


async def test_mint_token_sets_the_standard_claims(clock: Clock) -> None:
    settings = JwtSettings(secret=SECRET, issuer="https://idp", audience="gw")
    tok = mint_token(
        settings,
        sub="dave",
        roles=["admin"],
        scope="read write",
        ttl_seconds=60,
        extra={"tenant": "t1"},
        extra_headers={"kid": "dev"},
        now=NOW,
    )
    assert jwt.get_unverified_header(tok)["kid"] == "dev"
    claims = jwt.decode(tok, options={"verify_signature": False})
    assert claims == {
        "sub": "dave",
        "iat": NOW,
        "nbf": NOW,
        "exp": NOW + 60,
        "roles": ["admin"],
        "scope": "read write",
        "iss": "https://idp",
        "aud": "gw",
        "tenant": "t1",
    }
    principal = await (await started(settings, clock)).verify(tok)
    assert principal.claims["tenant"] == "t1" and principal.scopes == {"read", "write"}


def test_mint_token_without_a_private_key_is_refused(tmp_path: Path) -> None:
    settings = JwtSettings(algorithms=("ES256",), public_key_file=tmp_path / "x")
    with pytest.raises(ConfigError, match="dev_private_key_file"):
        mint_token(settings, sub="x")
    _, public_file = generate_dev_keypair(tmp_path)
    settings = JwtSettings(algorithms=("ES256",), dev_private_key_file=public_file)
    with pytest.raises(ConfigError, match="no unencrypted PEM private key"):
        mint_token(settings, sub="x")


def test_generate_dev_keypair_writes_a_private_key_only_its_owner_reads(tmp_path: Path) -> None:
    private_file, public_file = generate_dev_keypair(tmp_path / "keys", "EdDSA")
    assert stat.S_IMODE(private_file.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in private_file.read_bytes()
    assert b"PUBLIC KEY" in public_file.read_bytes()
    with pytest.raises(FileExistsError):
        generate_dev_keypair(tmp_path / "keys", "EdDSA")
    private_file.chmod(0o644)
    generate_dev_keypair(tmp_path / "keys", "ES256", overwrite=True)
    assert stat.S_IMODE(private_file.stat().st_mode) == 0o600
    with pytest.raises(ValueError, match="shared secret"):
        generate_dev_keypair(tmp_path / "hs", "HS256")


def test_principals_of_the_same_kind_share_their_claim_strings_and_role_sets() -> None:
    import json

    from gateway.auth.principal import Principal

    def decoded(sub: str) -> dict[str, object]:
        # As a JSON decoder gives them: new strings for every token.
        return json.loads(
            json.dumps(
                {
                    "sub": sub,
                    "iss": "https://issuer.example",
                    "roles": ["reader", "writer"],
                    "tenant": "acme",
                    "exp": 2_000_000_000,
                    "note": "x" * 100,
                }
            )
        )

    a, b = Principal.from_claims(decoded("alice")), Principal.from_claims(decoded("bob"))
    assert dict(a.claims) == decoded("alice")  # nothing a policy reads changed
    assert a.roles == {"reader", "writer"} and a.roles is b.roles
    name_a = next(k for k in a.claims if k == "tenant")
    name_b = next(k for k in b.claims if k == "tenant")
    assert name_a is name_b and a.claims["iss"] is b.claims["iss"]
    assert a.claims["roles"][0] is b.claims["roles"][0]
    # Long strings are kept as they came (not interned).
    assert a.claims["note"] == b.claims["note"] and a.claims["note"] is not b.claims["note"]
