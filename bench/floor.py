"""The floor: a bare ``websockets`` broadcast server, no broker, no checks.

    python -m bench.floor PORT

What one send per subscriber per message costs in Python on this machine,
with the same library and event loop (uvloop) as the gateway but nothing
else: no authentication, no policy, no limits, no broker, no confirm. A
connection that sends ``subscribe`` is answered ``subscribed`` and gets every
message from then on; any other text is broadcast as it is to the
subscribers (``websockets.broadcast``) and answered ``{"type":"ack"}``.
Prints ``listening PORT`` when ready. Only ever binds 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from websockets.asyncio.server import ServerConnection, broadcast, serve

HOST = "127.0.0.1"
_ACK = '{"type":"ack"}'


async def serve_floor(port: int) -> None:
    subscribers: set[ServerConnection] = set()

    async def handler(connection: ServerConnection) -> None:
        try:
            async for message in connection:
                if message == "subscribe":
                    subscribers.add(connection)
                    await connection.send("subscribed")
                else:
                    broadcast(subscribers, message)
                    await connection.send(_ACK)
        finally:
            subscribers.discard(connection)

    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    async with serve(handler, HOST, port, compression=None, ping_interval=None, max_queue=None):
        print(f"listening {port}", flush=True)
        await stop


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m bench.floor PORT", file=sys.stderr)
        return 2
    try:
        import uvloop

        uvloop.run(serve_floor(int(args[0])))
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(serve_floor(int(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
