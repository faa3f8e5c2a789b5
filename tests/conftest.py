"""Shared fixtures: real TLS certificates, real signed tokens, a real gateway
on the real RabbitMQ (127.0.0.1:5672). Nothing here fakes the broker."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from tests_cleanup import delete_streams

from gateway.config import JwtSettings, LimitSettings, Settings, TlsSettings
from gateway.devtools.devcerts import make_dev_certificates
from gateway.devtools.devtokens import mint_token

# The real-gateway fixtures (gateway, connect_client, client_ssl, Client).
pytest_plugins = ["gateway_fixtures", "anomaly_fixtures"]

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
ISSUER = "rabbitgate-test"
AUDIENCE = "rabbitgate"


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return make_dev_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="session")
def jwt_settings() -> JwtSettings:
    return JwtSettings(
        algorithms=("HS256",),
        secret=secrets.token_hex(32),
        issuer=ISSUER,
        audience=AUDIENCE,
        leeway_seconds=0,
    )


@pytest.fixture(scope="session")
def make_token(jwt_settings: JwtSettings) -> Callable[..., str]:
    def make(
        sub: str, roles: tuple[str, ...] = ("member",), ttl: float = 600, **claims: Any
    ) -> str:
        return mint_token(jwt_settings, sub=sub, roles=list(roles), ttl_seconds=ttl, extra=claims)

    return make


# Every prefix handed out in this run, so that its streams can be deleted at the end.
_PREFIXES: set[str] = set()


@pytest.fixture
def exchange_prefix() -> str:
    """Exchanges unique to one test, so tests never see each other's history."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    _PREFIXES.add(prefix)
    return prefix


@pytest.fixture(scope="session", autouse=True)
def _delete_test_streams() -> Iterator[None]:
    """After the run, delete the history streams and exchanges its tests made.

    Each stream keeps files open in RabbitMQ even with no reader: left behind,
    a few hundred test streams use up the broker's 1,024 descriptors (the
    common soft limit), and a broker out of descriptors stops serving.
    """
    yield
    if _PREFIXES:
        asyncio.run(delete_streams(_PREFIXES))


POLICY_TEMPLATE = """
version: 1
rules:
  - channel: "chat.{{room}}"
    exchange: {p}.chat
    subscribe: [role:member]
    publish: [role:member]
    limits: {{max_bytes: 4096}}
    history: 100
  - channel: "user.{{user}}.inbox"
    exchange: {p}.notify
    subscribe: ["claim:sub={{user}}"]
    publish: [nobody]
  - channel: "tenant.{{tenant}}.feed"
    exchange: {p}.feeds
    subscribe: [{{all: ["role:member", "claim:tenant={{tenant}}"]}}]
    publish: [role:admin]
  - channel: "news.{{topic}}"
    exchange: {p}.news
    subscribe: [anyone]
    publish: ["scope:news.write"]
  - channel: "small.{{topic}}"
    exchange: {p}.small
    subscribe: [anyone]
    publish: [anyone]
    history: 3
"""


@pytest.fixture
def policies_dir(tmp_path: Path, exchange_prefix: str) -> Path:
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "10-test.yaml").write_text(POLICY_TEMPLATE.format(p=exchange_prefix))
    return folder


@pytest.fixture
def settings(certs: Any, jwt_settings: JwtSettings, policies_dir: Path) -> Settings:
    return Settings(
        host="127.0.0.1",
        port=0,
        tls=TlsSettings(enabled=True, cert_file=certs.server_cert, key_file=certs.server_key),
        amqp_url=AMQP_URL,
        broker_connect_timeout_seconds=10,
        policies_dir=policies_dir,
        jwt=jwt_settings,
        limits=LimitSettings(auth_timeout_seconds=1.0),
        stream_max_bytes=16 * 1024 * 1024,
        admin_port=0,  # any free port: tests run several gateways at once
        sse_port=0,
    )


@pytest.fixture
async def amqp() -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    connection = await aio_pika.connect(AMQP_URL)
    yield connection
    await connection.close()


@pytest.fixture
async def cleanup_broker(exchange_prefix: str) -> AsyncIterator[None]:
    """Delete the test's exchanges and history streams afterwards."""
    yield
    connection = await aio_pika.connect(AMQP_URL)
    try:
        for kind in ("chat", "notify", "feeds", "news", "small"):
            channel = await connection.channel()
            await channel.queue_delete(f"rabbitgate.stream.{exchange_prefix}.{kind}")
            await channel.exchange_delete(f"{exchange_prefix}.{kind}")
            await channel.close()
    finally:
        await connection.close()
