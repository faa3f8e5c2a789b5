"""Development certificates and the TLS contexts built from them.

``make_dev_certificates`` writes a private CA and a server certificate it
signed, so ``wss://localhost:8443/ws`` works out of the box. Clients must then
trust ``ca.pem`` (``client_ssl_context``). Production deployments bring their
own certificate and key; only ``server_ssl_context`` is used with those.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.config import ConfigError

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
# Started in the past so that a client whose clock lags a little still accepts it.
_BACKDATE = datetime.timedelta(minutes=5)
_CA_DAYS_EXTRA = 30  # the CA outlives the certificates it signs


@dataclass(frozen=True)
class DevCertificates:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def make_dev_certificates(
    directory: Path,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    *,
    days: int = 825,
    overwrite: bool = False,
) -> DevCertificates:
    """Write ``ca.pem``, ``ca.key``, ``server.pem`` and ``server.key`` into ``directory``.

    The server certificate names every one of ``hosts`` (IP addresses as IP
    SANs, anything else as DNS names). Key files are created with mode 0600.
    Raises FileExistsError, before writing anything, when one of the files
    exists and ``overwrite`` is false.
    """
    hosts = [host.strip() for host in hosts if host.strip()]
    if not hosts:
        raise ValueError("make_dev_certificates needs at least one host name or address")
    if days <= 0:
        raise ValueError("days must be positive")
    directory = Path(directory)
    paths = DevCertificates(
        ca_cert=directory / "ca.pem",
        ca_key=directory / "ca.key",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
    )
    if not overwrite:
        existing = [str(p) for p in _all(paths) if p.exists()]
        if existing:
            raise FileExistsError(f"refusing to overwrite existing {', '.join(existing)}")
    directory.mkdir(parents=True, exist_ok=True)

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _ca_certificate(ca_key, now, days + _CA_DAYS_EXTRA)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _server_certificate(server_key, ca_cert, ca_key, hosts, now, days)

    pem = serialization.Encoding.PEM
    files = (
        (paths.ca_key, _key_pem(ca_key), 0o600),
        (paths.ca_cert, ca_cert.public_bytes(pem), 0o644),
        (paths.server_key, _key_pem(server_key), 0o600),
        (paths.server_cert, server_cert.public_bytes(pem), 0o644),
    )
    for path, data, mode in files:
        _write(path, data, mode, replace=overwrite)
    return paths


def client_ssl_context(ca_file: Path) -> ssl.SSLContext:
    """A client context that verifies the server against ``ca_file`` (and hostnames)."""
    return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))


def server_ssl_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A TLS 1.2+ server context; raises ConfigError with a one-line message on failure."""
    _check_pem(cert_file, key_file)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # A client-started renegotiation (TLS 1.2) is a handshake's CPU for the
    # price of a record; no browser needs it.
    context.options |= ssl.OP_NO_RENEGOTIATION
    try:
        # The password callback stops OpenSSL from ever prompting on the terminal.
        context.load_cert_chain(str(cert_file), str(key_file), password=_no_password)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            detail = f"the key {key_file} does not match it"
        else:
            detail = f"{exc.reason or exc}"
        raise ConfigError(f"cannot load TLS certificate {cert_file}: {detail}") from None
    except OSError as exc:
        raise ConfigError(f"cannot load TLS certificate {cert_file}: {exc.strerror}") from None
    return context


def _check_pem(cert_file: Path, key_file: Path) -> None:
    """Read and parse both files first, to name the file and the fault precisely."""
    contents = {}
    for label, path in (("certificate", cert_file), ("key", key_file)):
        try:
            contents[label] = Path(path).read_bytes()
        except FileNotFoundError:
            raise ConfigError(
                f"TLS {label} file {path} not found (run `rabbitgate certs` for a development "
                "one, or set tls.cert_file/tls.key_file)"
            ) from None
        except OSError as exc:
            raise ConfigError(f"cannot read TLS {label} file {path}: {exc.strerror}") from None
    try:
        x509.load_pem_x509_certificates(contents["certificate"])
    except ValueError:
        raise ConfigError(f"TLS certificate file {cert_file} holds no PEM certificate") from None
    try:
        serialization.load_pem_private_key(contents["key"], password=None)
    except TypeError:
        raise ConfigError(
            f"TLS key file {key_file} is encrypted; rabbitgate needs an unencrypted key"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"TLS key file {key_file} holds no PEM private key") from None


def _no_password() -> bytes:
    return b""


def _all(paths: DevCertificates) -> tuple[Path, ...]:
    return (paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key)


def _ca_certificate(
    key: ec.EllipticCurvePrivateKey, now: datetime.datetime, days: int
) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "rabbitgate development"),
            x509.NameAttribute(NameOID.COMMON_NAME, "rabbitgate development CA"),
        ]
    )
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _server_certificate(
    key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    hosts: Sequence[str],
    now: datetime.datetime,
    days: int,
) -> x509.Certificate:
    public = key.public_key()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(_san_entries(hosts)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def _san_entries(hosts: Sequence[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return entries


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, mode: int, *, replace: bool) -> None:
    """Create ``path`` with ``mode`` from the start, so a key is never readable by others."""
    # Replacing goes through unlink + O_EXCL: reusing an old file would keep
    # its (maybe looser) permissions, and O_EXCL refuses to follow a symlink.
    if replace:
        path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as file:
        os.fchmod(fd, mode)  # the umask may have narrowed it; make it exact
        file.write(data)
