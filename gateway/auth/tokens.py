"""JWT -> Principal: the one place a token is checked (wire contract, section 2).

The algorithms and the key come from configuration, never from the token: the
``jku``, ``x5u``, ``jwk`` and ``x5c`` headers are never read, and ``kid`` only
picks a key out of the key set fetched from ``jwt.jwks_url``. A token is sized
and shape-checked before anything decodes it.

Usage: ``verifier = TokenVerifier(settings.jwt)``, ``await verifier.start()``
(raises ConfigError when the keys are unusable), then ``await
verifier.verify(token)`` per connection or refresh, and ``await
verifier.close()`` on shutdown.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import ECAlgorithm, HMACAlgorithm, OKPAlgorithm, RSAAlgorithm

from gateway.auth.principal import AuthError, AuthReason, Principal, is_finite_number
from gateway.config import ASYMMETRIC_ALGORITHMS, SYMMETRIC_ALGORITHMS, ConfigError, JwtSettings

__all__ = ["AuthError", "Principal", "TokenVerifier", "load_hmac_secret", "parse_jwks"]

log = logging.getLogger("rabbitgate.auth")

MIN_RSA_BITS = 2048
# RFC 7518 section 3.2: an HMAC key at least as long as the hash output.
HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
JWKS_FETCH_TIMEOUT_SECONDS = 5.0  # per socket operation (urllib's timeout)
JWKS_MAX_BYTES = 512 * 1024

_EC_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "ES256": ec.SECP256R1,
    "ES384": ec.SECP384R1,
    "ES512": ec.SECP521R1,
}
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
_JWK_LOADERS: dict[str, Callable[[Any], Any]] = {
    "RSA": RSAAlgorithm.from_jwk,
    "EC": ECAlgorithm.from_jwk,
    "OKP": OKPAlgorithm.from_jwk,
    # no "oct": a symmetric key fetched from a URL would be a shared secret in transit
}

# pyjwt exception -> AuthError reason; the first match wins (subclasses first).
_REASONS: tuple[tuple[type[Exception], AuthReason], ...] = (
    (jwt.InvalidSignatureError, "bad_signature"),
    (jwt.DecodeError, "malformed"),
    (jwt.InvalidAlgorithmError, "bad_algorithm"),
    (jwt.InvalidIssuerError, "bad_issuer"),
    (jwt.InvalidAudienceError, "bad_audience"),
    (jwt.MissingRequiredClaimError, "missing_claim"),
    (jwt.InvalidKeyError, "key_unavailable"),
    (jwt.InvalidTokenError, "bad_claim"),  # sub/jti not strings and the like
)


@dataclass(frozen=True)
class _Key:
    key: Any  # HMAC secret bytes, or a cryptography public key
    algorithms: tuple[str, ...]  # the configured algorithms this key may verify


class TokenVerifier:
    """Verifies tokens against one configured key source.

    ``clock`` gives the current time (epoch seconds); it decides ``exp``,
    ``nbf`` and ``iat``, and also the JWKS cache lifespan and refresh cooldown.
    """

    def __init__(self, settings: JwtSettings, *, clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._clock = clock
        self._algorithms = tuple(settings.algorithms)
        self._require = ["exp", "iat", "sub"]
        if settings.issuer is not None:
            self._require.append("iss")
        if settings.audience is not None:
            self._require.append("aud")
        self._keys: dict[str | None, _Key] = {}
        self._jwks_url: str | None = None
        self._fetched_at = -math.inf  # last successful JWKS fetch
        self._attempted_at = -math.inf  # last JWKS fetch, successful or not
        self._refresh: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Load the key material; raises ConfigError (one line) when it is unusable."""
        s = self._settings
        algorithms = set(self._algorithms)
        if not algorithms or not algorithms <= SYMMETRIC_ALGORITHMS | ASYMMETRIC_ALGORITHMS:
            raise ConfigError("jwt.algorithms must name HS*, RS*, PS*, ES* or EdDSA algorithms")
        if algorithms <= SYMMETRIC_ALGORITHMS:
            self._keys = {None: _Key(load_hmac_secret(s), self._algorithms)}
        elif algorithms & SYMMETRIC_ALGORITHMS:
            raise ConfigError("jwt.algorithms mixes HS* with RS*/ES*/EdDSA; pick one family")
        elif s.public_key_file is not None and s.jwks_url:
            raise ConfigError("jwt: set jwt.public_key_file or jwt.jwks_url, not both")
        elif s.public_key_file is not None:
            self._keys = {None: load_public_key_file(s.public_key_file, self._algorithms)}
        elif s.jwks_url:
            url = urlsplit(s.jwks_url)
            # Whoever can alter the key set can sign tokens: plain http on loopback only.
            if url.scheme != "https" and not (url.scheme == "http" and url.hostname in _LOOPBACK):
                raise ConfigError("jwt.jwks_url must be https:// (http:// only to localhost)")
            self._jwks_url = s.jwks_url
            self._attempted_at = self._clock()
            try:
                self._keys = await self._fetch_keys()
            except (OSError, ValueError) as exc:
                raise ConfigError(f"jwt.jwks_url: cannot load the key set: {exc}") from None
            self._fetched_at = self._attempted_at
        else:
            raise ConfigError("jwt: RS*/ES*/EdDSA algorithms need jwt.public_key_file or jwks_url")

    async def close(self) -> None:
        """Stop any JWKS refresh in flight; ``verify`` fails with key_unavailable after this."""
        task, self._refresh = self._refresh, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._keys = {}
        self._jwks_url = None

    async def verify(self, token: object) -> Principal:
        """The principal of a valid token; raises AuthError (its message never quotes the token)."""
        token = _check_shape(token, self._settings.max_token_bytes)
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, ValueError, TypeError, RecursionError):
            raise AuthError("malformed") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise AuthError("bad_algorithm")
        if "crit" in header:  # RFC 7515 4.1.11: we understand no extension, so refuse
            raise AuthError("malformed", "token has critical header extensions")
        key = await self._key_for(header.get("kid"))
        if alg not in key.algorithms:
            raise AuthError("bad_algorithm")
        claims = self._decode(token, key)
        self._check_times(claims)
        return Principal.from_claims(claims)

    def _decode(self, token: str, key: _Key) -> dict[str, Any]:
        # exp/nbf/iat are checked by _check_times against self._clock: pyjwt reads
        # the system clock itself and accepts numeric strings there.
        options: Any = {
            "require": self._require,
            "verify_signature": True,
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
            "verify_iss": True,
            "verify_aud": True,
            "verify_sub": True,
            "verify_jti": True,
            "enforce_minimum_key_length": True,
        }
        try:
            return jwt.decode(
                token,
                key.key,
                algorithms=list(key.algorithms),
                options=options,
                issuer=self._settings.issuer,
                audience=self._settings.audience,
            )
        except jwt.MissingRequiredClaimError as exc:
            # exc.claim is one of self._require: our text, not the token's.
            raise AuthError("missing_claim", f'token lacks the "{exc.claim}" claim') from None
        except jwt.PyJWTError as exc:
            reason: AuthReason = next(
                (r for kind, r in _REASONS if isinstance(exc, kind)), "malformed"
            )
            raise AuthError(reason) from None
        except (ValueError, TypeError, OverflowError, RecursionError):
            raise AuthError("malformed") from None

    def _check_times(self, claims: dict[str, Any]) -> None:
        for name in ("exp", "iat", "nbf"):
            if name in claims and not is_finite_number(claims[name]):
                raise AuthError("bad_claim", f'"{name}" must be a number')
        now, leeway = self._clock(), self._settings.leeway_seconds
        if claims["exp"] <= now - leeway:
            raise AuthError("expired")
        if "nbf" in claims and claims["nbf"] > now + leeway:
            raise AuthError("not_yet_valid")
        if claims["iat"] > now + leeway:
            raise AuthError("not_yet_valid", "token issued in the future")

    async def _key_for(self, kid: object) -> _Key:
        if kid is not None and not isinstance(kid, str):
            raise AuthError("malformed")
        if self._jwks_url is None:
            # One configured key (secret or PEM file): a kid names nothing here.
            if not self._keys:
                raise AuthError("key_unavailable")
            return next(iter(self._keys.values()))
        if self._clock() - self._fetched_at >= self._settings.jwks_cache_seconds:
            await self._maybe_refresh()
        key = self._lookup(kid)
        if key is None and await self._maybe_refresh():
            key = self._lookup(kid)
        if key is None:
            raise AuthError("unknown_key" if self._keys else "key_unavailable")
        return key

    def _lookup(self, kid: str | None) -> _Key | None:
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return self._keys.get(kid)

    async def _maybe_refresh(self) -> bool:
        """Refetch the JWKS unless one was tried within the cooldown; True when one ran.

        Concurrent callers share one fetch. Within the cooldown every unknown kid
        is refused without a fetch: that is the negative cache, and it stores
        nothing the attacker chose.
        """
        task = self._refresh
        if task is None or task.done():
            since = self._clock() - self._attempted_at
            # A clock that stepped back (since < 0) must not block refreshes for good.
            if 0 <= since < self._settings.jwks_refresh_cooldown_seconds:
                return False
            self._attempted_at = self._clock()
            task = self._refresh = asyncio.create_task(self._refresh_keys())
        try:
            # shield: a caller that gives up (auth timeout) must not cancel the shared fetch.
            await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and current is not None and not current.cancelling():
                # close() stopped the fetch, not our caller: answer, do not cancel it.
                raise AuthError("key_unavailable") from None
            raise
        return True

    async def _refresh_keys(self) -> None:
        try:
            keys = await self._fetch_keys()
        except Exception as exc:  # a failed refresh must never take the gateway down
            log.warning(
                "JWKS refresh failed, keeping the %d keys in hand: %s", len(self._keys), exc
            )
            return
        self._keys = keys
        self._fetched_at = self._clock()

    async def _fetch_keys(self) -> dict[str | None, _Key]:
        assert self._jwks_url is not None
        document = await asyncio.to_thread(_fetch, self._jwks_url)
        return parse_jwks(document, self._algorithms)


def _check_shape(token: object, max_bytes: int) -> str:
    """Cheap checks before any decoding: present, a str, small, ASCII, three segments."""
    if token is None or token == "":
        raise AuthError("missing")
    if not isinstance(token, str):
        raise AuthError("malformed", "token must be a string")
    if len(token) > max_bytes:  # ASCII is checked next, so characters are bytes
        raise AuthError("too_large")
    if not token.isascii() or token.count(".") != 2:
        raise AuthError("malformed")
    return token


def load_hmac_secret(settings: JwtSettings) -> bytes:
    """The HS* secret from ``secret`` or ``secret_file``, checked; raises ConfigError."""
    if settings.secret and settings.secret_file is not None:
        raise ConfigError("jwt: set jwt.secret or jwt.secret_file, not both")
    if settings.secret:
        secret = settings.secret.encode()
    elif settings.secret_file is not None:
        try:
            # A trailing newline is what editors and `echo` add, not part of the secret.
            secret = settings.secret_file.read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise ConfigError(
                f"cannot read jwt.secret_file {settings.secret_file}: {exc.strerror}"
            ) from None
    else:
        raise ConfigError("jwt: HS* algorithms need jwt.secret or jwt.secret_file")
    needed = max(HMAC_MIN_BYTES.get(alg, 32) for alg in settings.algorithms)
    if len(secret) < needed:
        raise ConfigError(
            f"jwt secret is {len(secret)} bytes; {', '.join(settings.algorithms)} "
            f"needs at least {needed} random bytes"
        )
    try:
        HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(secret)
    except jwt.InvalidKeyError:
        raise ConfigError("jwt secret is a PEM or SSH public key, not a shared secret") from None
    return secret


def load_public_key_file(path: Path, algorithms: tuple[str, ...]) -> _Key:
    """The PEM public key (or certificate) at ``path``; it must serve every algorithm."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read jwt.public_key_file {path}: {exc.strerror}") from None
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key: Any = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(
            f"jwt.public_key_file {path} holds no PEM public key (a private key is refused)"
        ) from None
    try:
        usable = algorithms_for_key(key, algorithms)
    except ValueError as exc:
        raise ConfigError(f"jwt.public_key_file {path}: {exc}") from None
    unusable = [alg for alg in algorithms if alg not in usable]
    if unusable:
        raise ConfigError(
            f"jwt.public_key_file {path} holds a {_kind(key)} key, "
            f"which cannot verify {', '.join(unusable)}"
        )
    return _Key(key, usable)


def algorithms_for_key(key: Any, algorithms: Iterable[str]) -> tuple[str, ...]:
    """Those of ``algorithms`` that ``key`` can verify; ValueError for a weak RSA key."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"RSA key of {key.key_size} bits; at least {MIN_RSA_BITS} needed")
        return tuple(alg for alg in algorithms if alg[:2] in {"RS", "PS"})
    if isinstance(key, ec.EllipticCurvePublicKey):
        return tuple(
            alg
            for alg in algorithms
            if alg in _EC_CURVES and isinstance(key.curve, _EC_CURVES[alg])
        )
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return tuple(alg for alg in algorithms if alg == "EdDSA")
    return ()


def parse_jwks(document: bytes, algorithms: tuple[str, ...]) -> dict[str | None, _Key]:
    """The usable signing keys of a JWKS document by ``kid``; ValueError when none.

    Skipped: keys not for signing, private keys, symmetric keys, RSA keys under
    2048 bits, keys whose type or ``alg`` fits none of ``algorithms``, and
    repeated kids (the first one stays).
    """
    try:
        data = json.loads(document)
    except (ValueError, RecursionError):
        raise ValueError("the key set is not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError('the key set has no "keys" list')
    keys: dict[str | None, _Key] = {}
    skipped = 0
    for jwk in data["keys"]:
        key = _jwk_key(jwk, algorithms)
        if key is None or jwk.get("kid") in keys:
            skipped += 1
            continue
        keys[jwk.get("kid")] = key
    if skipped:
        log.info("JWKS: skipped %d keys that cannot verify %s", skipped, ", ".join(algorithms))
    if not keys:
        raise ValueError(f"the key set holds no key for {', '.join(algorithms)}")
    return keys


def _jwk_key(jwk: object, algorithms: tuple[str, ...]) -> _Key | None:
    if not isinstance(jwk, dict) or "d" in jwk or jwk.get("use", "sig") != "sig":
        return None
    kty, kid, alg = jwk.get("kty"), jwk.get("kid"), jwk.get("alg")
    loader = _JWK_LOADERS.get(kty) if isinstance(kty, str) else None
    if loader is None or not isinstance(kid, str | None) or not isinstance(alg, str | None):
        return None
    try:
        key = loader(jwk)
        usable = algorithms_for_key(key, algorithms)
    except (jwt.PyJWTError, ValueError, TypeError, KeyError, UnsupportedAlgorithm):
        return None
    if alg is not None:
        usable = tuple(a for a in usable if a == alg)
    return _Key(key, usable) if usable else None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect could send the key fetch anywhere: configure the final URL instead."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _fetch(url: str) -> bytes:
    """GET ``url`` (blocking: run it in a thread); OSError or ValueError on failure."""
    opener = urllib.request.build_opener(_NoRedirect)
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with opener.open(request, timeout=JWKS_FETCH_TIMEOUT_SECONDS) as response:
            body: bytes = response.read(JWKS_MAX_BYTES + 1)
    except urllib.error.HTTPError as exc:
        exc.close()  # it holds the response open
        raise OSError(f"HTTP status {exc.code}") from None
    if len(body) > JWKS_MAX_BYTES:
        raise ValueError(f"the key set is larger than {JWKS_MAX_BYTES} bytes")
    return body


def _kind(key: Any) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return "EdDSA"
    return type(key).__name__
