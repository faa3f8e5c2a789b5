"""Memory per idle connection of the bare layers under the gateway: the floor.

    .venv/bin/python -m bench.memfloor --connections 10000

A server process holds ``--connections`` idle connections of one layer at a
time, opened by client processes, and reports its resident memory (VmRSS)
growth per connection after a full collection. The layers, each a bare
server with no gateway code:

- ``tcp``: uvloop's plain TCP transport and a protocol that does nothing;
- ``tls``: the same with uvloop's own TLS (``create_server(ssl=...)``, what
  ``loop.start_tls`` gives);
- ``tls-layer``: plain TCP with the gateway's TLS layer
  (``gateway/transports/tls.py``) on it;
- ``ws`` / ``wss``: a bare ``websockets`` server (its default connection
  objects, handler waiting for the close), plaintext / uvloop's TLS.

``bench.connections`` gives the gateway's own figure on the same machine;
the difference is what the gateway adds over the layers it stands on.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import os
import ssl
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import uvloop

from bench.proc import rss_kib
from bench.target import free_port, raise_nofile_limit
from gateway.devtools.devcerts import client_ssl_context, make_dev_certificates, server_ssl_context
from gateway.transports.tls import TlsLayer

LAYERS = ("tcp", "tls", "tls-layer", "ws", "wss")
CONNECTIONS_PER_CLIENT = 2500
HOST = "127.0.0.1"


class _Idle(asyncio.Protocol):
    def data_received(self, data: bytes) -> None:
        pass


class _IdleOverTlsLayer(asyncio.Protocol):
    context: ssl.SSLContext

    def connection_made(self, transport: Any) -> None:
        if not isinstance(transport, TlsLayer):
            TlsLayer(transport, self, self.context, 10.0, self.connection_made, lambda _: None)

    def data_received(self, data: bytes) -> None:
        pass


async def _serve(layer: str, port: int, certs: Path, pipe: Connection) -> None:
    loop = asyncio.get_running_loop()
    context = server_ssl_context(certs / "server.pem", certs / "server.key")
    if layer in ("tcp", "tls"):
        await loop.create_server(
            _Idle, HOST, port, ssl=context if layer == "tls" else None, backlog=1024
        )
    elif layer == "tls-layer":
        _IdleOverTlsLayer.context = context
        await loop.create_server(_IdleOverTlsLayer, HOST, port, backlog=1024)
    else:
        from websockets.asyncio.server import ServerConnection, serve

        async def handler(connection: ServerConnection) -> None:
            await connection.send("welcome")
            await connection.wait_closed()

        await serve(
            handler,
            HOST,
            port,
            ssl=context if layer == "wss" else None,
            backlog=1024,
            ping_interval=None,
            compression=None,
        )
    gc.collect()
    pipe.send(rss_kib(os.getpid()))
    await loop.run_in_executor(None, pipe.recv)  # the clients are all connected
    gc.collect()
    await asyncio.sleep(1)
    gc.collect()
    pipe.send(rss_kib(os.getpid()))
    await loop.run_in_executor(None, pipe.recv)


def _server(layer: str, port: int, certs: Path, pipe: Connection) -> None:
    raise_nofile_limit()
    uvloop.run(_serve(layer, port, certs, pipe))


async def _connect(layer: str, port: int, certs: Path, count: int, pipe: Connection) -> None:
    context = client_ssl_context(certs / "ca.pem") if layer in ("tls", "tls-layer", "wss") else None
    held: list[Any] = []
    gate = asyncio.Semaphore(32)

    async def one() -> None:
        async with gate:
            if layer.startswith("ws"):
                from websockets.asyncio.client import connect

                scheme = "wss" if context else "ws"
                connection = await connect(
                    f"{scheme}://localhost:{port}/", ssl=context, ping_interval=None
                )
                await connection.recv()
                held.append(connection)
            else:
                _, writer = await asyncio.open_connection(
                    HOST, port, ssl=context, server_hostname="localhost" if context else None
                )
                held.append(writer)

    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    pipe.send(sum(1 for r in results if r is None))
    await asyncio.get_running_loop().run_in_executor(None, pipe.recv)


def _client(layer: str, port: int, certs: Path, count: int, pipe: Connection) -> None:
    raise_nofile_limit()
    uvloop.run(_connect(layer, port, certs, count, pipe))


def measure(layer: str, connections: int, certs: Path) -> dict[str, Any]:
    port = free_port()
    server_end, ours = multiprocessing.Pipe()
    server = multiprocessing.Process(target=_server, args=(layer, port, certs, server_end))
    server.start()
    clients: list[tuple[multiprocessing.Process, Connection]] = []
    try:
        before = ours.recv()
        for start in range(0, connections, CONNECTIONS_PER_CLIENT):
            count = min(CONNECTIONS_PER_CLIENT, connections - start)
            client_end, pipe = multiprocessing.Pipe()
            process = multiprocessing.Process(
                target=_client, args=(layer, port, certs, count, client_end)
            )
            process.start()
            clients.append((process, pipe))
        opened = sum(pipe.recv() for _, pipe in clients)
        time.sleep(1)
        ours.send("measure")
        after = ours.recv()
        return {
            "layer": layer,
            "connections": opened,
            "kib_per_connection": (after - before) / max(opened, 1),
            "rss_kib_before": before,
            "rss_kib_after": after,
        }
    finally:
        for process, pipe in clients:
            pipe.send("exit")
            process.join(10)
        ours.send("exit")
        server.join(5)
        if server.is_alive():
            server.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memfloor", description=__doc__)
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument(
        "--layers", default=",".join(LAYERS), help=f"comma-separated, of {', '.join(LAYERS)}"
    )
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    layers = [name.strip() for name in args.layers.split(",") if name.strip()]
    unknown = sorted(set(layers) - set(LAYERS))
    if unknown or not layers:
        parser.error(f"--layers: unknown {', '.join(unknown) or '(none given)'}")
    if not 1 <= args.connections <= 50_000 or not 1 <= args.rounds <= 10:
        parser.error("--connections 1..50000, --rounds 1..10")
    certs = Path(tempfile.mkdtemp(prefix="rabbitgate-memfloor-"))
    make_dev_certificates(certs)
    results = []
    for round_number in range(1, args.rounds + 1):
        for layer in layers:
            print(f"round {round_number}: {layer}", file=sys.stderr, flush=True)
            results.append({"round": round_number, **measure(layer, args.connections, certs)})
    if args.json:
        print(json.dumps({"results": results}))
    else:
        print(f"{'round':>5} {'layer':<10} {'KiB/conn':>9} {'opened':>7}")
        for r in results:
            print(
                f"{r['round']:>5} {r['layer']:<10} {r['kib_per_connection']:>9.1f} "
                f"{r['connections']:>7}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
