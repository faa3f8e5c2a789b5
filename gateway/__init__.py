"""rabbitgate: a secure real-time gateway between WebSocket clients and RabbitMQ."""

__version__ = "0.1.0"
