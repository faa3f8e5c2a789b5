"""A small SSE client for the attack tests: open /events, read events."""

from __future__ import annotations

import asyncio
import ssl

import aiohttp

from gateway.app import Gateway


async def open_events(
    session: aiohttp.ClientSession,
    gw: Gateway,
    tls: ssl.SSLContext,
    channels: list[str],
    token: str,
    headers: dict[str, str] | None = None,
) -> aiohttp.ClientResponse:
    return await session.get(
        f"https://localhost:{gw.sse_port}/events",
        params=[("channel", c) for c in channels],
        headers={"Authorization": f"Bearer {token}", **(headers or {})},
        ssl=tls,
    )


async def next_event(response: aiohttp.ClientResponse, timeout: float = 5) -> dict[str, str]:
    """The next event of the stream (comments skipped); {} at its end."""
    event: dict[str, str] = {}
    while True:
        line = await asyncio.wait_for(response.content.readline(), timeout)
        if not line:
            return {}
        text = line.decode().rstrip("\n")
        if text == "":
            if "data" in event:
                return event
            event = {}
        elif not text.startswith(":"):
            name, _, value = text.partition(":")
            event[name] = value[1:] if value.startswith(" ") else value
