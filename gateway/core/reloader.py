"""Policy hot reload: watch the policies folder, validate, swap atomically.

Spec section 6: a policy set that fails validation is rejected as a whole and
a running gateway keeps the last good set. ``PolicyReloader`` re-reads the
whole folder whenever a ``*.yaml`` file in it changes (and on SIGHUP, through
``reload_soon``), then either puts the new set in force with
``Node.swap_policies`` or logs why it refused it. Every outcome goes to the
``rabbitgate.audit`` log with a message starting "policy reload".
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from watchfiles import Change, awatch

from gateway.core.node import Node
from gateway.policy.rules import PolicyError, load_policy_set

log = logging.getLogger("rabbitgate.audit")

# Changes are gathered into one reload until the folder has been quiet for
# QUIET_MS, or for at most DEBOUNCE_MS. An editor that saves by writing a temp
# file and renaming it over the original (or by renaming the original away
# first) finishes well within QUIET_MS, so a half-saved folder is not loaded.
DEBOUNCE_MS = 2000
QUIET_MS = 300
# How often the watch thread hands over changes and checks for stop().
WATCH_STEP_MS = 50
# The folder could not be watched (removed, unreadable): retry after RETRY_SECONDS,
# doubling up to MAX_RETRY_SECONDS while it stays unwatchable.
RETRY_SECONDS = 1.0
MAX_RETRY_SECONDS = 30.0
# Kubernetes swaps a ConfigMap volume by renaming this symlink, not the files.
_K8S_DATA_LINK = "..data"


def is_policy_file(name: str) -> bool:
    """True for the file names load_policy_set reads: ``*.yaml``, no dot-files."""
    return name.endswith(".yaml") and not name.startswith(".")


class PolicyReloader:
    """Keeps the node's policy set in step with the policies folder.

    Call ``await start()`` once the node has started (it starts watching the
    folder unless ``watch`` is False) and ``await stop()`` before the node
    stops. ``await reload()`` re-reads the folder now; ``reload_soon()`` does
    the same from a signal handler.

    State for metrics and health checks (read them, never write them):

    ``live_digest`` (str)
        ``PolicySet.digest`` of the set in force on the node.
    ``loaded_at`` (float)
        Epoch seconds when the folder was last read and accepted (the
        reloader's creation until the first successful reload; a reload that
        finds the same rules counts as accepted too).
    ``last_error`` (str | None)
        One line saying why the last reload was refused (file, line, rule and
        field for an invalid set), or None when the last reload succeeded.
    ``reloads_ok`` (int)
        Reloads that ended with a valid set in force (changed or not).
    ``reloads_failed`` (int)
        Reloads refused; the previous set stayed in force each time.
    """

    def __init__(
        self,
        node: Node,
        directory: Path,
        *,
        watch: bool = True,
        debounce_ms: int = DEBOUNCE_MS,
        quiet_ms: int = QUIET_MS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.node = node
        self.directory = Path(directory)
        self.watch = watch
        self.loaded_at: float = clock()
        self.last_error: str | None = None
        self.reloads_ok = 0
        self.reloads_failed = 0
        self._debounce_ms = debounce_ms
        self._quiet_ms = quiet_ms
        self._clock = clock
        self._lock = asyncio.Lock()  # one reload at a time: watcher and SIGHUP may race
        self._stopping = asyncio.Event()
        self._changed = asyncio.Event()  # set by the watcher, cleared by the settler
        self._watcher: asyncio.Task[None] | None = None
        self._settler: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[bool]] = set()

    @property
    def live_digest(self) -> str:
        return self.node.policies.digest

    # --- life cycle -----------------------------------------------------------

    async def start(self) -> None:
        """Start watching (when enabled); returns once changes will be seen."""
        if not self.watch or self._watcher is not None:
            return
        self._stopping.clear()
        self._watcher = asyncio.create_task(self._watch(), name="policy-watcher")
        self._settler = asyncio.create_task(self._settle(), name="policy-settler")
        # The watcher's first step arms the OS watch before it first waits, so one
        # turn of the loop is enough for a change made after start() to be seen.
        await asyncio.sleep(0)

    async def stop(self) -> None:
        """Stop watching and abandon reloads in flight (the set in force stays)."""
        self._stopping.set()
        watcher, self._watcher = self._watcher, None
        settler, self._settler = self._settler, None
        if settler is not None:
            settler.cancel()
            await asyncio.gather(settler, return_exceptions=True)
        if watcher is not None:
            # The watch thread notices the stop event within WATCH_STEP_MS;
            # cancelling would wait for the thread just the same.
            done, _ = await asyncio.wait({watcher}, timeout=5.0)
            if not done:
                watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        for task in list(self._pending):
            task.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)

    # --- reloading ------------------------------------------------------------

    def reload_soon(self, trigger: str = "SIGHUP") -> asyncio.Task[bool]:
        """Schedule ``reload(trigger)``; for signal handlers, which cannot await."""
        task = asyncio.get_running_loop().create_task(self.reload(trigger))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    async def reload(self, trigger: str = "manual") -> bool:
        """Re-read the folder and put the set in force if it is valid.

        Returns True when a valid set is in force afterwards (the new one, or
        the same rules again), False when the reload was refused and the
        previous set kept. Never raises, except CancelledError.
        """
        async with self._lock:
            old = self.live_digest
            try:
                # Off the loop: a large (or hostile) file takes a while to parse.
                policies = await asyncio.to_thread(load_policy_set, self.directory)
            except PolicyError as exc:
                return self._failed(trigger, str(exc))
            except Exception as exc:  # a bug must not end the watcher or keep a bad set
                return self._failed(trigger, f"unexpected error: {exc!r}", exc_info=True)
            if policies.digest == old:
                self._succeeded()
                log.info(
                    "policy reload (%s): no change in meaning, digest %s",
                    trigger,
                    old[:12],
                    extra={"event": "policy_reload", "trigger": trigger, "digest": old},
                )
                return True
            try:
                ended = await self.node.swap_policies(policies)
            except Exception as exc:  # BrokerUnavailable: the exchanges could not be declared
                return self._failed(trigger, f"cannot put the new set in force: {exc}")
            self._succeeded()
            log.info(
                "policy reload (%s): digest %s in force (was %s), %s in %s, %s ended",
                trigger,
                policies.digest[:12],
                old[:12],
                _count(len(policies.rules), "rule"),
                _count(len(policies.files), "file"),
                _count(ended, "subscription"),
                extra={
                    "event": "policy_reload",
                    "trigger": trigger,
                    "digest": policies.digest,
                    "previous_digest": old,
                    "subscriptions_ended": ended,
                },
            )
            return True

    def _succeeded(self) -> None:
        self.reloads_ok += 1
        self.loaded_at = self._clock()
        self.last_error = None

    def _failed(self, trigger: str, message: str, *, exc_info: bool = False) -> bool:
        message = " ".join(message.splitlines())  # one log line, whatever the file held
        self.reloads_failed += 1
        self.last_error = message
        log.error(
            "policy reload (%s) refused, keeping digest %s: %s",
            trigger,
            self.live_digest[:12],
            message,
            exc_info=exc_info,
            extra={
                "event": "policy_reload_failed",
                "trigger": trigger,
                "digest": self.live_digest,
                "detail": message,
            },
        )
        return False

    # --- watching -------------------------------------------------------------

    async def _watch(self) -> None:
        """Turn OS change events into ``_changed``; re-arm when the folder is replaced."""
        folder = os.path.abspath(self.directory)
        delay = RETRY_SECONDS
        catch_up = False
        while not self._stopping.is_set():
            try:
                if not os.path.isdir(folder):  # checked first: no catch-up reload for nothing
                    raise FileNotFoundError(errno.ENOENT, "no such folder")
                changes = awatch(
                    folder,
                    watch_filter=lambda change, path: _relevant(folder, change, path),
                    step=WATCH_STEP_MS,
                    stop_event=self._stopping,
                    recursive=False,
                )
                async with contextlib.aclosing(changes):
                    if catch_up:
                        # Changes made while nothing watched. The settler wakes only
                        # once this task waits, after anext() below armed the watch.
                        self._changed.set()
                    # The generator's first step arms the OS watch before it waits.
                    batch = await anext(changes)
                    delay, catch_up = RETRY_SECONDS, False
                    while True:
                        self._changed.set()
                        if any(path == folder for _, path in batch):
                            # The folder itself was removed or renamed: the OS watch
                            # follows the old one. Watch whatever is at the path now.
                            log.warning(
                                "policy reload: %s was removed or replaced; watching the path anew",
                                folder,
                            )
                            catch_up = True
                            break
                        batch = await anext(changes)
            except StopAsyncIteration:
                return  # stop() was called
            except Exception as exc:  # the folder is missing, or inotify is out of watches
                log.warning(
                    "policy reload: cannot watch %s (%s); retrying in %g s", folder, exc, delay
                )
                catch_up = True
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._stopping.wait()
                delay = min(delay * 2, MAX_RETRY_SECONDS)

    async def _settle(self) -> None:
        """Reload once the folder has been quiet for quiet_ms (at most debounce_ms on)."""
        loop = asyncio.get_running_loop()
        quiet, longest = self._quiet_ms / 1000, self._debounce_ms / 1000
        while True:
            await self._changed.wait()
            deadline = loop.time() + longest
            while self._changed.is_set() and loop.time() < deadline:
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(quiet, max(0.0, deadline - loop.time()))):
                        await self._changed.wait()
            self._changed.clear()
            await self.reload("watch")


def _relevant(folder: str, change: Change, path: str) -> bool:
    name = os.path.basename(path)
    return path == folder or is_policy_file(name) or name == _K8S_DATA_LINK


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
