"""Development tokens: sign a JWT the gateway accepts, and make a key pair for it.

For ``rabbitgate token`` and the tests. Production tokens come from the
identity provider; this module only ever signs with the HS* secret or with
``jwt.dev_private_key_file``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gateway.auth.tokens import load_hmac_secret
from gateway.config import SYMMETRIC_ALGORITHMS, ConfigError, JwtSettings

PRIVATE_KEY_NAME = "jwt-private.pem"
PUBLIC_KEY_NAME = "jwt-public.pem"
_RSA_BITS = 3072
_EC_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "ES256": ec.SECP256R1,
    "ES384": ec.SECP384R1,
    "ES512": ec.SECP521R1,
}


def mint_token(
    settings: JwtSettings,
    *,
    sub: str,
    roles: Sequence[str] = (),
    scope: str | None = None,
    ttl_seconds: float = 3600,
    extra: Mapping[str, Any] | None = None,
    extra_headers: Mapping[str, Any] | None = None,
    now: float | None = None,
) -> str:
    """A token for ``sub`` signed with the first of ``settings.algorithms``.

    Sets ``iat``, ``nbf``, ``exp``, ``sub``, ``roles``, ``scope`` (when given)
    and ``iss``/``aud`` (when configured); ``extra`` claims are added last and
    win. ``extra_headers`` go into the JOSE header (``kid`` for a JWKS setup).
    Raises ConfigError when the signing key is missing or unreadable.
    """
    algorithm = settings.algorithms[0]
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "sub": sub,
        "iat": issued,
        "nbf": issued,
        "exp": int(issued + ttl_seconds),
        "roles": list(roles),
    }
    if scope is not None:
        claims["scope"] = scope
    if settings.issuer is not None:
        claims["iss"] = settings.issuer
    if settings.audience is not None:
        claims["aud"] = settings.audience
    claims.update(extra or {})
    return jwt.encode(
        claims,
        _signing_key(settings, algorithm),
        algorithm=algorithm,
        headers=dict(extra_headers or {}),
    )


def _signing_key(settings: JwtSettings, algorithm: str) -> Any:
    if algorithm in SYMMETRIC_ALGORITHMS:
        return load_hmac_secret(settings)
    path = settings.dev_private_key_file
    if path is None:
        raise ConfigError(f"jwt.dev_private_key_file is needed to sign {algorithm} tokens")
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(f"cannot read jwt.dev_private_key_file {path}: {exc.strerror}") from None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(
            f"jwt.dev_private_key_file {path} holds no unencrypted PEM private key"
        ) from None


def generate_dev_keypair(
    directory: Path, algorithm: str = "ES256", *, overwrite: bool = False
) -> tuple[Path, Path]:
    """Write ``jwt-private.pem`` (mode 0600) and ``jwt-public.pem`` into ``directory``.

    Returns (private, public). Point ``jwt.dev_private_key_file`` at the first
    and ``jwt.public_key_file`` at the second. Raises FileExistsError, before
    writing anything, when either exists and ``overwrite`` is false, and
    ValueError for an algorithm that has no key pair (HS*).
    """
    key = _new_private_key(algorithm)
    directory = Path(directory)
    private_path, public_path = directory / PRIVATE_KEY_NAME, directory / PUBLIC_KEY_NAME
    if not overwrite:
        existing = [str(p) for p in (private_path, public_path) if p.exists()]
        if existing:
            raise FileExistsError(
                f"refusing to overwrite {', '.join(existing)}; remove them or pass overwrite=True"
            )
    directory.mkdir(parents=True, exist_ok=True)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), 0o600)  # the mode above is ignored for an existing file
        out.write(private_pem)
    public_path.write_bytes(public_pem)
    return private_path, public_path


def _new_private_key(algorithm: str) -> Any:
    if algorithm[:2] in {"RS", "PS"}:
        return rsa.generate_private_key(public_exponent=65537, key_size=_RSA_BITS)
    if algorithm in _EC_CURVES:
        return ec.generate_private_key(_EC_CURVES[algorithm]())
    if algorithm == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"{algorithm} has no key pair (HS* uses a shared secret)")
