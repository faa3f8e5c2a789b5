"""A tiny Chrome DevTools Protocol driver for headless Chromium, over ``websockets``.

Enough to click through a server-rendered page like a person: navigate, fill
inputs, click buttons, wait for the next page, read the DOM. Chromium is
started with its own profile in a temporary folder and killed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

CHROMIUM = Path("/usr/bin/chromium")


class Browser:
    def __init__(self, extra_args: Sequence[str] = ()) -> None:
        self._extra_args = list(extra_args)  # more chromium flags (a certificate to trust)
        self._profile = tempfile.mkdtemp(prefix="rabbitgate-chromium-")
        self._process: subprocess.Popen[bytes] | None = None
        self._ws: ClientConnection | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._loads: asyncio.Queue[None] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        self.console: list[str] = []

    async def __aenter__(self) -> Browser:
        profile = Path(self._profile)
        self._process = subprocess.Popen(
            [
                str(CHROMIUM),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                *self._extra_args,
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: renderers end with it
        )
        port_file = profile / "DevToolsActivePort"
        for _ in range(300):
            if port_file.exists() and port_file.read_text().count("\n") >= 1:
                break
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError("chromium did not open its DevTools port")
        port = int(port_file.read_text().splitlines()[0])
        pages = await asyncio.to_thread(_json, f"http://127.0.0.1:{port}/json/list")
        page = next(p for p in pages if p["type"] == "page")
        self._ws = await connect(page["webSocketDebuggerUrl"], max_size=None)
        self._reader = asyncio.get_running_loop().create_task(self._read())
        await self.send("Page.enable")
        await self.send("Runtime.enable")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
        if self._process is not None:
            # The chromium this driver started and its helpers: their own group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)
            await asyncio.to_thread(self._process.wait)
        await asyncio.to_thread(shutil.rmtree, self._profile, True)

    async def _read(self) -> None:
        assert self._ws is not None
        async for raw in self._ws:
            message = json.loads(raw)
            if "id" in message:
                future = self._pending.pop(message["id"], None)
                if future is not None and not future.done():
                    future.set_result(message)
            elif message.get("method") == "Page.loadEventFired":
                self._loads.put_nowait(None)
            elif message.get("method") == "Runtime.consoleAPICalled":
                args = message["params"].get("args", [])
                self.console.append(" ".join(str(a.get("value", "")) for a in args))

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        assert self._ws is not None
        ident = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        await self._ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        reply = await asyncio.wait_for(future, 15)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return dict(reply.get("result", {}))

    async def evaluate(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def goto(self, url: str) -> None:
        self._drain_loads()
        before = await self.evaluate("performance.timeOrigin")
        await self.send("Page.navigate", url=url)
        await self._new_document(before)

    async def fill(self, selector: str, value: str) -> None:
        found = await self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            f" if (!e) return false; e.value = {json.dumps(value)}; return true; }})()"
        )
        assert found, f"no element {selector}"

    async def click_and_wait(self, selector: str) -> None:
        """Click like a user (a real mouse event) and wait for the next page to load."""
        self._drain_loads()
        box = await self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " if (!e) return null; e.scrollIntoView(); const r = e.getBoundingClientRect();"
            " return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        assert box is not None, f"no element {selector}"
        x, y = box
        before = await self.evaluate("performance.timeOrigin")
        for kind in ("mousePressed", "mouseReleased"):
            await self.send(
                "Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1
            )
        await self._new_document(before)

    async def _new_document(self, before: float) -> None:
        """Wait until a document other than ``before``'s has loaded completely."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while True:
            await asyncio.wait_for(self._loads.get(), max(0.1, deadline - loop.time()))
            state = await self.evaluate("[performance.timeOrigin, document.readyState]")
            if state[0] != before and state[1] == "complete":
                return

    async def text(self, selector: str) -> str | None:
        value = await self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " return e ? e.textContent.trim() : null; })()"
        )
        return None if value is None else str(value)

    async def url(self) -> str:
        return str(await self.evaluate("location.href"))

    def _drain_loads(self) -> None:
        while not self._loads.empty():
            self._loads.get_nowait()


def _json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (local DevTools)
        return json.loads(response.read())
