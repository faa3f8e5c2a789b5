"""One aiohttp application on one address: the admin and SSE listeners.

No access log: request lines hold query strings, and the SSE endpoint accepts
a token there (``?access_token=``), which must never reach a log.
"""

from __future__ import annotations

import ssl

from aiohttp import web


class HttpListener:
    def __init__(
        self,
        app: web.Application,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        handler_cancellation: bool = False,
        shutdown_timeout: float = 5.0,
    ) -> None:
        self._runner = web.AppRunner(
            app,
            access_log=None,
            handler_cancellation=handler_cancellation,
            shutdown_timeout=shutdown_timeout,
        )
        self._host, self._port, self._ssl = host, port, ssl_context
        self._site: web.TCPSite | None = None

    @property
    def port(self) -> int:
        """The bound port (the configured one, or the one picked for port 0)."""
        assert self._site is not None, "not started"
        return int(self._runner.addresses[0][1])

    async def start(self) -> None:
        """Bind and serve; the app's routes are frozen from here on. Raises OSError."""
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self._host, self._port, ssl_context=self._ssl)
        await self._site.start()

    async def stop(self) -> None:
        """Stop accepting, wait up to the shutdown timeout for handlers, close the rest."""
        await self._runner.cleanup()
