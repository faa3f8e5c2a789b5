"""Development certificates: what they contain, how keys are stored, a real handshake."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.config import ConfigError
from gateway.devtools.devcerts import (
    DevCertificates,
    client_ssl_context,
    make_dev_certificates,
    server_ssl_context,
)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> DevCertificates:
    return make_dev_certificates(tmp_path_factory.mktemp("certs"))


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_files_are_written_where_announced(certs: DevCertificates) -> None:
    assert {p.name for p in (certs.ca_cert, certs.ca_key, certs.server_cert, certs.server_key)} == {
        "ca.pem",
        "ca.key",
        "server.pem",
        "server.key",
    }


def test_server_certificate_names_dns_and_ip_hosts(certs: DevCertificates) -> None:
    san = _load(certs.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.value.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]


def test_custom_hosts(tmp_path: Path) -> None:
    made = make_dev_certificates(tmp_path, ["gw.example.test", "10.0.0.7"], days=30)
    cert = _load(made.server_cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["gw.example.test"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == datetime.timedelta(days=30, minutes=5)


def test_ca_is_a_ca_that_signs_only_leaves(certs: DevCertificates) -> None:
    ca = _load(certs.ca_cert)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca is True
    assert constraints.value.path_length == 0
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign


def test_server_certificate_is_a_server_leaf_signed_by_the_ca(certs: DevCertificates) -> None:
    ca, leaf = _load(certs.ca_cert), _load(certs.server_cert)
    leaf.verify_directly_issued_by(ca)
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_validity_starts_in_the_past(certs: DevCertificates) -> None:
    now = datetime.datetime.now(datetime.UTC)
    for path in (certs.ca_cert, certs.server_cert):
        starts = _load(path).not_valid_before_utc
        assert now - datetime.timedelta(minutes=6) < starts < now - datetime.timedelta(minutes=4)


def test_private_keys_are_readable_by_owner_only(certs: DevCertificates) -> None:
    for key in (certs.ca_key, certs.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_refuses_to_overwrite_existing_files(tmp_path: Path) -> None:
    first = make_dev_certificates(tmp_path)
    before = first.ca_key.read_bytes()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        make_dev_certificates(tmp_path)
    assert first.ca_key.read_bytes() == before


def test_refuses_when_only_one_file_exists_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "server.key").write_text("someone else's key")
    with pytest.raises(FileExistsError, match="server.key"):
        make_dev_certificates(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["server.key"]


def test_overwrite_replaces_files_and_tightens_key_mode(tmp_path: Path) -> None:
    first = make_dev_certificates(tmp_path)
    old_key = first.server_key.read_bytes()
    first.server_key.chmod(0o644)
    second = make_dev_certificates(tmp_path, overwrite=True)
    assert second.server_key.read_bytes() != old_key
    assert stat.S_IMODE(second.server_key.stat().st_mode) == 0o600


def test_needs_a_host(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one host"):
        make_dev_certificates(tmp_path, [])


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(await reader.readline())
    await writer.drain()
    writer.close()
    await writer.wait_closed()


async def test_tls_handshake_with_a_client_trusting_the_dev_ca(certs: DevCertificates) -> None:
    server_context = server_ssl_context(certs.server_cert, certs.server_key)
    server = await asyncio.start_server(_echo, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    async with server:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1",
            port,
            ssl=client_ssl_context(certs.ca_cert),
            server_hostname="localhost",
        )
        try:
            assert writer.get_extra_info("ssl_object").version() in {"TLSv1.2", "TLSv1.3"}
            writer.write(b"hello\n")
            assert await asyncio.wait_for(reader.readline(), 5) == b"hello\n"
        finally:
            writer.close()
            await writer.wait_closed()


async def test_tls_handshake_fails_for_a_client_not_trusting_the_dev_ca(
    certs: DevCertificates,
) -> None:
    server_context = server_ssl_context(certs.server_cert, certs.server_key)
    server = await asyncio.start_server(_echo, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    async with server:
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.open_connection(
                "127.0.0.1",
                port,
                ssl=ssl.create_default_context(),
                server_hostname="localhost",
            )


def test_server_context_requires_tls_1_2(certs: DevCertificates) -> None:
    context = server_ssl_context(certs.server_cert, certs.server_key)
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_server_context_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        server_ssl_context(tmp_path / "nope.pem", tmp_path / "nope.key")


def test_server_context_mismatched_key_is_a_config_error(tmp_path: Path) -> None:
    one = make_dev_certificates(tmp_path / "one")
    two = make_dev_certificates(tmp_path / "two")
    with pytest.raises(ConfigError, match="does not match") as caught:
        server_ssl_context(one.server_cert, two.server_key)
    assert "\n" not in str(caught.value)


def test_server_context_garbage_certificate_is_a_config_error(tmp_path: Path) -> None:
    made = make_dev_certificates(tmp_path)
    made.server_cert.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="holds no PEM certificate"):
        server_ssl_context(made.server_cert, made.server_key)


def test_server_context_encrypted_key_is_a_config_error_not_a_prompt(tmp_path: Path) -> None:
    made = make_dev_certificates(tmp_path)
    key = serialization.load_pem_private_key(made.server_key.read_bytes(), password=None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    made.server_key.write_bytes(encrypted)
    with pytest.raises(ConfigError, match="is encrypted"):
        server_ssl_context(made.server_cert, made.server_key)


def test_server_context_directory_instead_of_file_is_a_config_error(tmp_path: Path) -> None:
    made = make_dev_certificates(tmp_path)
    with pytest.raises(ConfigError, match="cannot read TLS certificate file"):
        server_ssl_context(tmp_path, made.server_key)
