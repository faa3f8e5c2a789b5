"""rabbitgate-client: an asyncio client for rabbitgate gateways (wire contract v1).

    from rabbitgate_client import RabbitgateClient

See the package README for what it does by itself (reconnect, recovery, token
refresh, queued publishes) and what it refuses at once.
"""

from rabbitgate_client.client import (
    CannotConnect,
    ClientClosed,
    Disconnected,
    Message,
    QueueFull,
    RabbitgateClient,
    RabbitgateError,
    TokenSource,
)

__all__ = [
    "CannotConnect",
    "ClientClosed",
    "Disconnected",
    "Message",
    "QueueFull",
    "RabbitgateClient",
    "RabbitgateError",
    "TokenSource",
]
__version__ = "0.1.0"
